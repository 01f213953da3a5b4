// Status values returned by every core entry point, and the throwing convenience layer.
//
// Core entry points never throw (so a C ABI or JAX FFI can pass the result through): they return a
// [[nodiscard]] status. `check(status)` turns a failure into a `routegrad::error` exception.
#pragma once

#include <stdexcept>
#include <string>

#include "config.hpp"

namespace routegrad {

enum class status_code : int {
  success = 0,
  invalid_argument,     // a value is out of its allowed range (k, eps, ...)
  invalid_shape,        // extents disagree with each other
  invalid_stride,       // strides are negative, zero where they must not be, or overlapping
  null_pointer,         // a required pointer is null
  wrong_memory_space,   // a host view where a device view is needed, or the reverse
  misaligned,           // a pointer is not aligned as a kernel requires
  workspace_too_small,  // the caller's scratch buffer is smaller than the size query said
  not_supported,        // a valid combination this build or back end does not implement
  cuda_error,           // a CUDA runtime call failed; `detail` holds cudaError_t
};

/// The outcome of a call. `message` names the argument and the rule that failed; it points to a
/// string literal, so a status is trivially copyable and never allocates.
class [[nodiscard]] status {
 public:
  constexpr status() = default;
  constexpr status(status_code code, const char* message, int detail = 0)
      : code_(code), message_(message), detail_(detail) {}

  static constexpr status ok() { return status(); }

  constexpr bool is_ok() const { return code_ == status_code::success; }
  constexpr explicit operator bool() const { return is_ok(); }
  constexpr status_code code() const { return code_; }
  constexpr const char* message() const { return message_; }
  /// Back-end specific detail (the cudaError_t value for status_code::cuda_error).
  constexpr int detail() const { return detail_; }

 private:
  status_code code_ = status_code::success;
  const char* message_ = "success";
  int detail_ = 0;
};

inline const char* to_string(status_code code) {
  switch (code) {
    case status_code::success:
      return "success";
    case status_code::invalid_argument:
      return "invalid argument";
    case status_code::invalid_shape:
      return "invalid shape";
    case status_code::invalid_stride:
      return "invalid stride";
    case status_code::null_pointer:
      return "null pointer";
    case status_code::wrong_memory_space:
      return "wrong memory space";
    case status_code::misaligned:
      return "misaligned pointer";
    case status_code::workspace_too_small:
      return "workspace too small";
    case status_code::not_supported:
      return "not supported";
    case status_code::cuda_error:
      return "CUDA error";
  }
  return "unknown status";
}

/// Thrown by `check` for a failed status.
class error : public std::runtime_error {
 public:
  explicit error(const status& s)
      : std::runtime_error(std::string("routegrad: ") + to_string(s.code()) + ": " + s.message() +
                           (s.code() == status_code::cuda_error
                                ? " (cudaError " + std::to_string(s.detail()) + ")"
                                : std::string())),
        status_(s) {}
  const status& get_status() const noexcept { return status_; }

 private:
  status status_;
};

/// Throws routegrad::error when `s` is not ok.
inline void check(const status& s) {
  if (!s.is_ok()) throw error(s);
}

}  // namespace routegrad

// Returns from the enclosing function when `expr` yields a failed status.
#define ROUTEGRAD_RETURN_IF_ERROR(expr)         \
  do {                                          \
    ::routegrad::status rg_status_ = (expr);    \
    if (!rg_status_.is_ok()) return rg_status_; \
  } while (0)
