// Reading (and, for tests, writing) IDX files: the format of MNIST and Fashion-MNIST.
//
//   magic   2 zero bytes, a type byte (0x08 = unsigned byte, the only type read here), the number
//           of dimensions n (1 to 8)
//   dims    n big-endian uint32 extents
//   data    prod(dims) bytes, row-major
//
// Files may be gzip-compressed (as Debian's dataset-fashion-mnist installs them) or plain: zlib's
// gz* functions read both. Every failure throws idx_error with the path and what is wrong: a
// missing or unreadable file, a corrupt gzip stream (bad data, bad checksum, cut short), a bad
// magic number, an unsupported type, a header or data section cut short, trailing bytes, or
// dimensions that do not match what the caller expects.
#pragma once

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace fmnist {

struct idx_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// An IDX array of unsigned bytes.
struct idx_array {
  std::vector<std::int64_t> dims;
  std::vector<std::uint8_t> data;  // row-major, prod(dims) bytes

  std::int64_t count() const { return dims.empty() ? 0 : dims[0]; }
};

namespace detail {

struct gz_closer {
  void operator()(gzFile_s* f) const {
    if (f != nullptr) gzclose(f);
  }
};
using gz_ptr = std::unique_ptr<gzFile_s, gz_closer>;

inline std::string hex_byte(unsigned v) {
  static const char digits[] = "0123456789abcdef";
  std::string s = "0x";
  s += digits[(v >> 4) & 0xF];
  s += digits[v & 0xF];
  return s;
}

/// zlib's description of the stream's error state, or "" when there is none.
inline std::string gz_error_text(gzFile f, const std::string& path) {
  int code = Z_OK;
  const char* msg = gzerror(f, &code);
  if (code == Z_OK) return {};
  if (code == Z_ERRNO) return std::strerror(errno);
  if (msg == nullptr) return "zlib error " + std::to_string(code);
  // zlib writes "<path>: <message>"; the caller names the path already.
  std::string text = msg;
  const std::string prefix = path + ": ";
  if (text.compare(0, prefix.size(), prefix) == 0) text.erase(0, prefix.size());
  return text;
}

/// Reads up to n bytes; returns how many were read (< n only at the end of the data). Throws on
/// a zlib error (corrupt data, bad checksum, stream cut short).
inline std::size_t gz_read(gzFile f, const std::string& path, void* dst, std::size_t n) {
  std::size_t done = 0;
  auto* out = static_cast<unsigned char*>(dst);
  while (done < n) {
    const std::size_t want = std::min<std::size_t>(n - done, 1u << 30);
    const int got = gzread(f, out + done, static_cast<unsigned>(want));
    if (got < 0) throw idx_error(path + ": corrupt gzip data (" + gz_error_text(f, path) + ")");
    if (got == 0) break;
    done += static_cast<std::size_t>(got);
  }
  // A gzip stream that ends early reads as a short read with Z_BUF_ERROR set.
  const std::string err = gz_error_text(f, path);
  if (!err.empty()) throw idx_error(path + ": corrupt or truncated gzip data (" + err + ")");
  return done;
}

}  // namespace detail

/// Reads an unsigned-byte IDX file (gzip or plain). Throws idx_error.
inline idx_array read_idx(const std::string& path) {
  errno = 0;
  detail::gz_ptr f(gzopen(path.c_str(), "rb"));
  if (!f) {
    const int e = errno;
    throw idx_error(path + ": cannot open (" +
                    (e != 0 ? std::string(std::strerror(e)) : std::string("out of memory")) + ")");
  }
  gzbuffer(f.get(), 1u << 17);

  unsigned char magic[4];
  const std::size_t got_magic = detail::gz_read(f.get(), path, magic, 4);
  if (got_magic < 4)
    throw idx_error(path + ": truncated header (" + std::to_string(got_magic) +
                    " bytes; an IDX file starts with a 4-byte magic number)");
  if (magic[0] != 0 || magic[1] != 0)
    throw idx_error(path + ": bad magic number (first bytes " + detail::hex_byte(magic[0]) + " " +
                    detail::hex_byte(magic[1]) +
                    ", expected 0x00 0x00): not an IDX file, or a damaged gzip header");
  if (magic[2] != 0x08)
    throw idx_error(path + ": unsupported IDX data type " + detail::hex_byte(magic[2]) +
                    " (only unsigned byte, 0x08, is read)");
  const int ndims = magic[3];
  if (ndims < 1 || ndims > 8)
    throw idx_error(path + ": bad number of dimensions " + std::to_string(ndims) +
                    " (expected 1 to 8)");

  idx_array out;
  std::uint64_t total = 1;
  for (int i = 0; i < ndims; ++i) {
    unsigned char b[4];
    if (detail::gz_read(f.get(), path, b, 4) < 4)
      throw idx_error(path + ": truncated header (dimension " + std::to_string(i) + " of " +
                      std::to_string(ndims) + " missing)");
    const std::uint64_t d = (std::uint64_t{b[0]} << 24) | (std::uint64_t{b[1]} << 16) |
                            (std::uint64_t{b[2]} << 8) | std::uint64_t{b[3]};
    total *= d;
    if (total > (std::uint64_t{1} << 34))
      throw idx_error(path + ": dimensions describe more than 16 GiB of data");
    out.dims.push_back(static_cast<std::int64_t>(d));
  }

  out.data.resize(static_cast<std::size_t>(total));
  const std::size_t got = detail::gz_read(f.get(), path, out.data.data(), out.data.size());
  if (got < out.data.size())
    throw idx_error(path + ": truncated data (" + std::to_string(got) + " of " +
                    std::to_string(out.data.size()) + " bytes the header declares)");
  // Reading past the declared data reaches the end of the stream, where zlib checks the gzip
  // trailer (CRC-32 and length).
  unsigned char extra = 0;
  if (detail::gz_read(f.get(), path, &extra, 1) != 0)
    throw idx_error(path + ": trailing data after the " + std::to_string(out.data.size()) +
                    " bytes the header declares");
  return out;
}

/// "[60000, 28, 28]"
inline std::string dims_text(const std::vector<std::int64_t>& dims) {
  std::string s = "[";
  for (std::size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

/// Images: rank 3, [n, rows, cols]; rows and cols must match when given (> 0).
inline idx_array read_idx_images(const std::string& path, std::int64_t rows = 0,
                                 std::int64_t cols = 0) {
  idx_array a = read_idx(path);
  if (a.dims.size() != 3 || (rows > 0 && a.dims[1] != rows) || (cols > 0 && a.dims[2] != cols))
    throw idx_error(path + ": wrong dimensions " + dims_text(a.dims) +
                    " for images (expected [n, " +
                    (rows > 0 ? std::to_string(rows) : std::string("rows")) + ", " +
                    (cols > 0 ? std::to_string(cols) : std::string("cols")) + "])");
  return a;
}

/// Labels: rank 1, [n], every label < num_classes.
inline idx_array read_idx_labels(const std::string& path, int num_classes) {
  idx_array a = read_idx(path);
  if (a.dims.size() != 1)
    throw idx_error(path + ": wrong dimensions " + dims_text(a.dims) +
                    " for labels (expected [n])");
  for (std::size_t i = 0; i < a.data.size(); ++i)
    if (a.data[i] >= num_classes)
      throw idx_error(path + ": label " + std::to_string(a.data[i]) + " at index " +
                      std::to_string(i) + " is not below the " + std::to_string(num_classes) +
                      " classes");
  return a;
}

/// Writes an unsigned-byte IDX file, gzip-compressed when `gzip` (tests and tools).
inline void write_idx(const std::string& path, const std::vector<std::int64_t>& dims,
                      const std::vector<std::uint8_t>& data, bool gzip = true) {
  std::vector<unsigned char> bytes = {0, 0, 0x08, static_cast<unsigned char>(dims.size())};
  for (std::int64_t d : dims)
    for (int s = 24; s >= 0; s -= 8)
      bytes.push_back(static_cast<unsigned char>((static_cast<std::uint64_t>(d) >> s) & 0xFF));
  bytes.insert(bytes.end(), data.begin(), data.end());
  detail::gz_ptr f(gzopen(path.c_str(), gzip ? "wb6" : "wbT"));
  if (!f) throw idx_error(path + ": cannot create (" + std::strerror(errno) + ")");
  std::size_t done = 0;
  while (done < bytes.size()) {
    const std::size_t n = std::min<std::size_t>(bytes.size() - done, 1u << 30);
    if (gzwrite(f.get(), bytes.data() + done, static_cast<unsigned>(n)) != static_cast<int>(n))
      throw idx_error(path + ": write failed (" + detail::gz_error_text(f.get(), path) + ")");
    done += n;
  }
  if (gzclose(f.release()) != Z_OK) throw idx_error(path + ": write failed on close");
}

}  // namespace fmnist
