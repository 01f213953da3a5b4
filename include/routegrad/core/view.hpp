// A small non-owning strided view tagged with the memory space its pointer lives in.
//
// The vocabulary is mdspan's (data_handle(), extent(i), stride(i), operator()), so moving to
// std::mdspan later is mechanical; the memory-space tag makes a host pointer unable to reach a
// kernel by accident (a host_view does not convert to a device_view).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "config.hpp"

namespace routegrad {

enum class memory_space { host, device };

using index_t = std::int64_t;

template <class T, int Rank, memory_space Space>
class strided_view {
  static_assert(Rank >= 1 && Rank <= 4, "strided_view supports ranks 1 to 4");

 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;
  using pointer = T*;
  static constexpr int rank = Rank;
  static constexpr memory_space space = Space;

  ROUTEGRAD_HD constexpr strided_view() : data_(nullptr), extents_{}, strides_{} {}

  /// Extents and strides are counted in elements (as DLPack does), not bytes.
  ROUTEGRAD_HD constexpr strided_view(T* data, const index_t (&extents)[Rank],
                                      const index_t (&strides)[Rank])
      : data_(data), extents_{}, strides_{} {
    for (int i = 0; i < Rank; ++i) {
      extents_[i] = extents[i];
      strides_[i] = strides[i];
    }
  }

  /// A contiguous row-major view.
  ROUTEGRAD_HD constexpr strided_view(T* data, const index_t (&extents)[Rank])
      : data_(data), extents_{}, strides_{} {
    index_t s = 1;
    for (int i = Rank - 1; i >= 0; --i) {
      extents_[i] = extents[i];
      strides_[i] = s;
      s *= extents[i];
    }
  }

  /// A view of const elements from a view of mutable ones.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  ROUTEGRAD_HD constexpr strided_view(const strided_view<U, Rank, Space>& other)
      : data_(other.data_handle()), extents_{}, strides_{} {
    for (int i = 0; i < Rank; ++i) {
      extents_[i] = other.extent(i);
      strides_[i] = other.stride(i);
    }
  }

  ROUTEGRAD_HD constexpr T* data_handle() const { return data_; }
  ROUTEGRAD_HD constexpr index_t extent(int i) const { return extents_[i]; }
  ROUTEGRAD_HD constexpr index_t stride(int i) const { return strides_[i]; }

  ROUTEGRAD_HD constexpr index_t size() const {
    index_t n = 1;
    for (int i = 0; i < Rank; ++i) n *= extents_[i];
    return n;
  }
  ROUTEGRAD_HD constexpr bool empty() const { return size() == 0; }

  template <int R = Rank, class = std::enable_if_t<R == 1>>
  ROUTEGRAD_HD constexpr T& operator()(index_t i) const {
    return data_[i * strides_[0]];
  }
  template <int R = Rank, class = std::enable_if_t<R == 2>>
  ROUTEGRAD_HD constexpr T& operator()(index_t i, index_t j) const {
    return data_[i * strides_[0] + j * strides_[1]];
  }

  /// Row `i` of a rank-2 view, as a rank-1 view.
  template <int R = Rank, class = std::enable_if_t<R == 2>>
  ROUTEGRAD_HD constexpr strided_view<T, 1, Space> row(index_t i) const {
    return strided_view<T, 1, Space>(data_ + i * strides_[0], {extents_[1]}, {strides_[1]});
  }

 private:
  T* data_;
  index_t extents_[Rank];
  index_t strides_[Rank];
};

template <class T, int Rank = 1>
using host_view = strided_view<T, Rank, memory_space::host>;
template <class T, int Rank = 1>
using device_view = strided_view<T, Rank, memory_space::device>;

/// A contiguous [rows, cols] host view.
template <class T>
host_view<T, 2> host_matrix(T* data, index_t rows, index_t cols) {
  return host_view<T, 2>(data, {rows, cols});
}
/// A [rows, cols] host view with explicit element strides.
template <class T>
host_view<T, 2> host_matrix(T* data, index_t rows, index_t cols, index_t row_stride,
                            index_t col_stride) {
  return host_view<T, 2>(data, {rows, cols}, {row_stride, col_stride});
}
/// A contiguous [n] host view.
template <class T>
host_view<T, 1> host_vector(T* data, index_t n) {
  return host_view<T, 1>(data, {n});
}

}  // namespace routegrad
