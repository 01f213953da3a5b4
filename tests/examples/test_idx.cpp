// The IDX reader of examples/fashion_mnist (idx.hpp, dataset.hpp): small IDX files written by the
// test (gzip and plain), then damaged ones; every failure must be an idx_error that names the
// file and the problem.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "fashion_mnist/dataset.hpp"
#include "fashion_mnist/idx.hpp"

namespace {

namespace fs = std::filesystem;
using fmnist::idx_error;

/// A fresh directory under the system temp dir, removed at the end of the test case.
struct temp_dir {
  fs::path path;
  temp_dir() {
    std::random_device rd;
    path = fs::temp_directory_path() /
           ("routegrad_idx_test_" + std::to_string(rd()) + "_" + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

std::vector<unsigned char> read_bytes(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::string& p, const std::vector<unsigned char>& b) {
  std::ofstream out(p, std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

std::vector<std::uint8_t> ramp(std::size_t n) {
  std::vector<std::uint8_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::uint8_t>((i * 37 + 11) % 251);
  return v;
}

/// The message of the idx_error `fn` throws ("" when it throws nothing).
template <class F>
std::string error_of(F&& fn) {
  try {
    fn();
  } catch (const idx_error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

}  // namespace

TEST_SUITE("examples") {
  TEST_CASE("idx: gzip and plain files round-trip") {
    temp_dir dir;
    const std::vector<std::int64_t> dims = {5, 3, 4};
    const std::vector<std::uint8_t> data = ramp(60);
    for (bool gz : {true, false}) {
      const std::string p = dir.file(gz ? "a.idx.gz" : "a.idx");
      fmnist::write_idx(p, dims, data, gz);
      const std::vector<unsigned char> raw = read_bytes(p);
      REQUIRE(raw.size() >= 2);
      CHECK((raw[0] == 0x1f && raw[1] == 0x8b) == gz);  // the gzip magic only when compressed
      const fmnist::idx_array a = fmnist::read_idx(p);
      CHECK(a.dims == dims);
      CHECK(a.data == data);
      CHECK(a.count() == 5);
      const fmnist::idx_array im = fmnist::read_idx_images(p, 3, 4);
      CHECK(im.data == data);
    }
    // rank 1, large enough to cross zlib's buffer several times
    const std::vector<std::uint8_t> big = ramp(1 << 20);
    fmnist::write_idx(dir.file("big.gz"), {1 << 20}, big, true);
    CHECK(fmnist::read_idx(dir.file("big.gz")).data == big);
  }

  TEST_CASE("idx: a missing file") {
    temp_dir dir;
    const std::string msg = error_of([&] { fmnist::read_idx(dir.file("nope.gz")); });
    CHECK(contains(msg, "nope.gz"));
    CHECK(contains(msg, "cannot open"));
    CHECK(contains(msg, "No such file"));
    const std::string msg2 = error_of([&] { fmnist::load_split(dir.path.string(), "train"); });
    CHECK(contains(msg2, "train-images-idx3-ubyte.gz: not found"));
    CHECK(contains(msg2, "dataset-fashion-mnist"));
  }

  TEST_CASE("idx: bad magic, type and rank") {
    temp_dir dir;
    const std::string p = dir.file("x");
    write_bytes(p, {'h', 'e', 'l', 'l', 'o', ' ', 'w', 'o', 'r', 'l', 'd'});
    std::string msg = error_of([&] { fmnist::read_idx(p); });
    CHECK(contains(msg, "bad magic number"));
    CHECK(contains(msg, p));

    write_bytes(p, {0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0});  // float data
    msg = error_of([&] { fmnist::read_idx(p); });
    CHECK(contains(msg, "unsupported IDX data type 0x0d"));

    write_bytes(p, {0, 0, 0x08, 0});  // zero dimensions
    msg = error_of([&] { fmnist::read_idx(p); });
    CHECK(contains(msg, "bad number of dimensions 0"));
  }

  TEST_CASE("idx: truncated header, truncated data, trailing data") {
    temp_dir dir;
    const std::string p = dir.file("t.gz");
    // a plain file, cut at exact byte positions
    fmnist::write_idx(dir.file("t.idx"), {2, 3}, ramp(6), false);
    const std::vector<unsigned char> good = read_bytes(dir.file("t.idx"));
    REQUIRE(good.size() == 4 + 8 + 6);
    write_bytes(dir.file("cut2"), {good.begin(), good.begin() + 2});
    std::string msg = error_of([&] { fmnist::read_idx(dir.file("cut2")); });
    CHECK(contains(msg, "truncated header"));
    write_bytes(dir.file("cut9"), {good.begin(), good.begin() + 9});
    msg = error_of([&] { fmnist::read_idx(dir.file("cut9")); });
    CHECK(contains(msg, "truncated header (dimension 1 of 2 missing)"));
    write_bytes(dir.file("cut15"), {good.begin(), good.begin() + 15});
    msg = error_of([&] { fmnist::read_idx(dir.file("cut15")); });
    CHECK(contains(msg, "truncated data (3 of 6 bytes"));

    // a well-formed gzip stream whose IDX content is short: header says 10, 7 bytes follow
    const std::vector<unsigned char> hdr = {0, 0, 0x08, 1, 0, 0, 0, 10};
    {
      gzFile f = gzopen(p.c_str(), "wb");
      REQUIRE(f != nullptr);
      std::vector<unsigned char> b = hdr;
      for (int i = 0; i < 7; ++i) b.push_back(static_cast<unsigned char>(i));
      gzwrite(f, b.data(), static_cast<unsigned>(b.size()));
      gzclose(f);
    }
    msg = error_of([&] { fmnist::read_idx(p); });
    CHECK(contains(msg, "truncated data (7 of 10 bytes"));

    // trailing bytes after the declared data
    std::vector<unsigned char> longer = good;
    longer.push_back(42);
    write_bytes(dir.file("long"), longer);
    msg = error_of([&] { fmnist::read_idx(dir.file("long")); });
    CHECK(contains(msg, "trailing data"));
  }

  TEST_CASE("idx: corrupt gzip streams") {
    temp_dir dir;
    const std::string p = dir.file("c.gz");
    fmnist::write_idx(p, {64, 16, 16}, ramp(64 * 16 * 16), true);
    const std::vector<unsigned char> gz = read_bytes(p);
    REQUIRE(gz.size() > 40);

    // 1. the compressed stream cut in half
    write_bytes(dir.file("half.gz"), {gz.begin(), gz.begin() + gz.size() / 2});
    std::string msg = error_of([&] { fmnist::read_idx(dir.file("half.gz")); });
    CHECK(contains(msg, "gzip"));
    CHECK(contains(msg, "half.gz"));

    // 2. the CRC-32 in the trailer damaged: the data decode, the check fails at the end
    std::vector<unsigned char> crc = gz;
    crc[crc.size() - 8] ^= 0xFF;
    write_bytes(dir.file("crc.gz"), crc);
    msg = error_of([&] { fmnist::read_idx(dir.file("crc.gz")); });
    CHECK(contains(msg, "incorrect data check"));

    // 3. garbage in the deflate data: some error must be reported (which one depends on where
    //    the damage lands), never a silent success with wrong bytes
    int detected = 0;
    std::mt19937 rng(7);
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<unsigned char> bad = gz;
      const std::size_t at =
          12 + static_cast<std::size_t>(rng() % static_cast<unsigned>(gz.size() - 24));
      for (std::size_t i = at; i < at + 4; ++i) bad[i] ^= static_cast<unsigned char>(rng() | 1);
      write_bytes(dir.file("bad.gz"), bad);
      msg = error_of([&] { fmnist::read_idx(dir.file("bad.gz")); });
      if (!msg.empty()) ++detected;
    }
    CHECK(detected == 20);

    // 4. not gzip at all and not IDX: read as plain bytes, rejected by the magic check
    write_bytes(dir.file("junk.gz"), {0x1f, 0x8c, 1, 2, 3, 4, 5, 6, 7, 8});
    msg = error_of([&] { fmnist::read_idx(dir.file("junk.gz")); });
    CHECK(contains(msg, "bad magic number"));
  }

  TEST_CASE("idx: wrong dimensions and labels for Fashion-MNIST") {
    temp_dir dir;
    fmnist::write_idx(dir.file("img.gz"), {3, 28, 27}, ramp(3 * 28 * 27));
    std::string msg = error_of([&] { fmnist::read_idx_images(dir.file("img.gz"), 28, 28); });
    CHECK(contains(msg, "wrong dimensions [3, 28, 27] for images (expected [n, 28, 28])"));
    msg = error_of([&] { fmnist::read_idx_labels(dir.file("img.gz"), 10); });
    CHECK(contains(msg, "wrong dimensions [3, 28, 27] for labels"));

    fmnist::write_idx(dir.file("lbl.gz"), {4}, {1, 2, 10, 3});
    msg = error_of([&] { fmnist::read_idx_labels(dir.file("lbl.gz"), 10); });
    CHECK(contains(msg, "label 10 at index 2"));

    // a split whose image and label counts differ
    fmnist::write_idx(dir.file("train-images-idx3-ubyte.gz"), {3, 28, 28}, ramp(3 * 784));
    fmnist::write_idx(dir.file("train-labels-idx1-ubyte.gz"), {2}, {1, 2});
    msg = error_of([&] { fmnist::load_split(dir.path.string(), "train"); });
    CHECK(contains(msg, "has 3 images but"));

    // ... and a consistent one (plain files are found too), standardised pixels
    fmnist::write_idx(dir.file("t10k-images-idx3-ubyte"), {2, 28, 28},
                      std::vector<std::uint8_t>(2 * 784, 255), false);
    fmnist::write_idx(dir.file("t10k-labels-idx1-ubyte"), {2}, {9, 0}, false);
    const fmnist::split s = fmnist::load_split(dir.path.string(), "t10k");
    CHECK(s.n == 2);
    CHECK(s.labels == std::vector<std::uint8_t>{9, 0});
    CHECK(s.pixels.size() == 2 * 784u);
    CHECK(s.pixels[5] ==
          doctest::Approx((1.0f - fmnist::pixel_mean) / fmnist::pixel_std).epsilon(1e-6));
  }

#ifdef ROUTEGRAD_FASHION_MNIST_DIR
  TEST_CASE("idx: the installed Fashion-MNIST files") {
    const fmnist::dataset d = fmnist::load_fashion_mnist(ROUTEGRAD_FASHION_MNIST_DIR);
    CHECK(d.train.n == 60000);
    CHECK(d.test.n == 10000);
    int counts[10] = {};
    for (std::uint8_t l : d.train.labels) ++counts[l];
    for (int c : counts) CHECK(c == 6000);  // the training set is balanced
    double mean = 0.0;
    for (float v : d.train.pixels) mean += v;
    mean /= static_cast<double>(d.train.pixels.size());
    CHECK(std::abs(mean) < 0.01);  // standardised with the training set's own statistics
  }
#endif
}
