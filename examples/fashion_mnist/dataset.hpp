// Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017) from its original IDX files: 60,000 training and
// 10,000 test images of 28x28 grey pixels, 10 classes. Debian's dataset-fashion-mnist installs
// them in /usr/share/datasets/fashion-mnist (gzip-compressed; `dpkg -L dataset-fashion-mnist`).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "idx.hpp"

namespace fmnist {

inline constexpr int image_rows = 28;
inline constexpr int image_cols = 28;
inline constexpr int num_pixels = image_rows * image_cols;
inline constexpr int num_classes = 10;

inline const char* const class_names[num_classes] = {
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};

/// Where Debian's dataset-fashion-mnist puts the files.
inline const char* default_data_dir() { return "/usr/share/datasets/fashion-mnist"; }

/// One split: n images as floats (row-major [n, 784]) and their labels.
struct split {
  std::int64_t n = 0;
  std::vector<float> pixels;  // standardised: (p / 255 - mean) / std, mean/std of the train set
  std::vector<std::uint8_t> labels;
};

struct dataset {
  split train;
  split test;
};

/// Pixel statistics of the Fashion-MNIST training set (p / 255): mean 0.2860, std 0.3530.
inline constexpr float pixel_mean = 0.2860f;
inline constexpr float pixel_std = 0.3530f;

/// Reads `<stem>-images-idx3-ubyte[.gz]` and `<stem>-labels-idx1-ubyte[.gz]` from `dir`.
inline split load_split(const std::string& dir, const std::string& stem) {
  auto pick = [&](const std::string& name) {
    const std::string gz = dir + "/" + name + ".gz";
    const std::string plain = dir + "/" + name;
    if (gzFile f = gzopen(gz.c_str(), "rb")) {
      gzclose(f);
      return gz;
    }
    if (gzFile f = gzopen(plain.c_str(), "rb")) {
      gzclose(f);
      return plain;
    }
    throw idx_error(gz + ": not found (nor " + plain +
                    "); install Debian's dataset-fashion-mnist or pass --data DIR");
  };
  const std::string img_path = pick(stem + "-images-idx3-ubyte");
  const std::string lbl_path = pick(stem + "-labels-idx1-ubyte");
  const idx_array img = read_idx_images(img_path, image_rows, image_cols);
  const idx_array lbl = read_idx_labels(lbl_path, num_classes);
  if (img.count() != lbl.count())
    throw idx_error(img_path + " has " + std::to_string(img.count()) + " images but " + lbl_path +
                    " has " + std::to_string(lbl.count()) + " labels");
  split s;
  s.n = img.count();
  s.pixels.resize(img.data.size());
  for (std::size_t i = 0; i < img.data.size(); ++i)
    s.pixels[i] = (static_cast<float>(img.data[i]) / 255.0f - pixel_mean) / pixel_std;
  s.labels = lbl.data;
  return s;
}

/// Both splits of Fashion-MNIST from `dir` (train-* and t10k-* files).
inline dataset load_fashion_mnist(const std::string& dir) {
  dataset d;
  d.train = load_split(dir, "train");
  d.test = load_split(dir, "t10k");
  return d;
}

}  // namespace fmnist
