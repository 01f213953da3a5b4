// DLPack interop: a DLTensor (from PyTorch, JAX, CuPy, TVM, ...) as a routegrad view.
//
//   #include <routegrad/interop/dlpack.hpp>   // needs <dlpack/dlpack.h> (DLPack >= 0.6;
//                                             // Debian: libdlpack-dev)
//   host_view<const float, 2> logits;
//   ROUTEGRAD_RETURN_IF_ERROR(from_dlpack(tensor, logits));
//
// `from_dlpack` checks everything a view's user relies on and returns a status (it never throws);
// `out` is written only when the status is ok. The tensor is borrowed: the view is valid as long
// as the producer keeps the memory alive (for a DLManagedTensor, until its deleter is called).
// Checks, in this order:
//
//   ndim == Rank, shape not null .................................... invalid_shape / null_pointer
//   device type: host views accept kDLCPU and kDLCUDAHost; device views
//     accept kDLCUDA and kDLCUDAManaged; device_id is not checked ......... wrong_memory_space
//   dtype: code and bits match the element type, lanes == 1 .................. invalid_argument
//   shape entries >= 0; the element count and, with strides, the largest
//     element offset fit in index_t (and in bytes, in std::ptrdiff_t) ............ invalid_shape
//   strides: NULL = compact row-major; none negative ............................ invalid_stride
//   data not null unless the tensor has no element .................................. null_pointer
//   byte_offset a multiple of sizeof(T); data + byte_offset aligned to alignof(T) ...... misaligned
//
// Messages are fixed string literals ("dlpack: ..."): the caller knows which tensor it passed.
// What the routing entry points check later (shapes against each other, outputs that overlap,
// on the GPU the pointer's actual memory space) is not repeated here.
//
// Element types: float (kDLFloat 32), double (kDLFloat 64), std::int32_t (kDLInt 32),
// std::int64_t (kDLInt 64), std::uint8_t (kDLUInt 8), const-qualified or not. __half (kDLFloat
// 16) and __nv_bfloat16 (kDLBfloat 16) are supported when the translation unit is compiled by
// nvcc, or has included <cuda_fp16.h> / <cuda_bf16.h> (or <routegrad/cuda.cuh>) before this
// header; this header never pulls the CUDA headers into a plain C++ translation unit.
#pragma once

#include <dlpack/dlpack.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../core/status.hpp"
#include "../core/view.hpp"

#if defined(DLPACK_VERSION) && DLPACK_VERSION < 60
#error "routegrad/interop/dlpack.hpp needs DLPack 0.6 or newer (kDLCUDA, kDLCUDAManaged)"
#endif

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace routegrad {

namespace dlpack_detail {

/// The DLPack dtype (code, bits) of a routegrad element type; `supported` is false for others.
template <class T>
struct dtype_of {
  static constexpr bool supported = false;
};

template <std::uint8_t Code, std::uint8_t Bits>
struct dtype_is {
  static constexpr bool supported = true;
  static constexpr std::uint8_t code = Code;
  static constexpr std::uint8_t bits = Bits;
};

template <>
struct dtype_of<float> : dtype_is<kDLFloat, 32> {};
template <>
struct dtype_of<double> : dtype_is<kDLFloat, 64> {};
template <>
struct dtype_of<std::int32_t> : dtype_is<kDLInt, 32> {};
template <>
struct dtype_of<std::int64_t> : dtype_is<kDLInt, 64> {};
template <>
struct dtype_of<std::uint8_t> : dtype_is<kDLUInt, 8> {};
#if defined(__CUDA_FP16_H__)
template <>
struct dtype_of<__half> : dtype_is<kDLFloat, 16> {};
#endif
#if defined(__CUDA_BF16_H__)
template <>
struct dtype_of<__nv_bfloat16> : dtype_is<kDLBfloat, 16> {};
#endif

template <memory_space Space>
constexpr bool device_type_accepted(DLDeviceType type) {
  if constexpr (Space == memory_space::host) {
    return type == kDLCPU || type == kDLCUDAHost;
  } else {
    return type == kDLCUDA || type == kDLCUDAManaged;
  }
}

/// a * b for non-negative a, b; false when it exceeds `limit`.
constexpr bool mul_within(index_t a, index_t b, index_t limit, index_t& result) {
  if (a != 0 && b > limit / a) return false;
  result = a * b;
  return true;
}

}  // namespace dlpack_detail

/// Whether `from_dlpack` supports views of element type T (cv-qualifiers ignored).
template <class T>
inline constexpr bool dlpack_supports_v = dlpack_detail::dtype_of<std::remove_cv_t<T>>::supported;

/// Makes `out` a view of the DLTensor `t`: same data (data + byte_offset), extents (shape) and
/// strides (in elements; NULL means compact row-major). Returns a failed status, and leaves `out`
/// unchanged, when the tensor does not fit the view (the checks are listed at the top of this
/// file). Never throws; reads only the DLTensor's fields and its shape and strides arrays.
template <class T, int Rank, memory_space Space>
status from_dlpack(const DLTensor& t, strided_view<T, Rank, Space>& out) noexcept {
  using value_type = std::remove_cv_t<T>;
  static_assert(dlpack_supports_v<T>,
                "from_dlpack: unsupported element type (float, double, int32_t, int64_t, uint8_t; "
                "__half / __nv_bfloat16 with the CUDA headers included first)");
  constexpr index_t kMax = std::numeric_limits<index_t>::max();
  constexpr index_t kMaxBytes =
      static_cast<index_t>(std::numeric_limits<std::ptrdiff_t>::max() / sizeof(value_type));
  constexpr index_t kLimit = kMax < kMaxBytes ? kMax : kMaxBytes;

  // Rank and shape.
  if (t.ndim != Rank)
    return {status_code::invalid_shape, "dlpack: ndim does not match the view's rank"};
  if (t.shape == nullptr) return {status_code::null_pointer, "dlpack: shape is null"};

  // Device.
  if (!dlpack_detail::device_type_accepted<Space>(t.device.device_type))
    return {status_code::wrong_memory_space,
            Space == memory_space::host
                ? "dlpack: device type must be kDLCPU or kDLCUDAHost for a host view"
                : "dlpack: device type must be kDLCUDA or kDLCUDAManaged for a device view"};

  // Element type.
  using dt = dlpack_detail::dtype_of<value_type>;
  if (t.dtype.code != dt::code)
    return {status_code::invalid_argument,
            "dlpack: dtype.code does not match the view's element type"};
  if (t.dtype.bits != dt::bits)
    return {status_code::invalid_argument,
            "dlpack: dtype.bits does not match the view's element type"};
  if (t.dtype.lanes != 1)
    return {status_code::invalid_argument, "dlpack: dtype.lanes must be 1 (no vector types)"};

  // Extents and the element count.
  index_t extents[Rank];
  bool has_zero_extent = false;
  for (int i = 0; i < Rank; ++i) {
    extents[i] = t.shape[i];
    if (extents[i] < 0) return {status_code::invalid_shape, "dlpack: negative shape entry"};
    if (extents[i] == 0) has_zero_extent = true;
  }
  if (!has_zero_extent) {
    index_t count = 1;
    for (int i = 0; i < Rank; ++i)
      if (!dlpack_detail::mul_within(count, extents[i], kLimit, count))
        return {status_code::invalid_shape, "dlpack: element count overflows index_t"};
  }

  // Strides, in elements.
  index_t strides[Rank];
  if (t.strides == nullptr) {
    // Compact row-major. For a tensor with no element, a zero extent counts as 1 (as PyTorch
    // does), so the strides stay finite and positive.
    index_t s = 1;
    for (int i = Rank - 1; i >= 0; --i) {
      strides[i] = s;
      if (i > 0 && !dlpack_detail::mul_within(s, extents[i] > 0 ? extents[i] : 1, kLimit, s))
        return {status_code::invalid_shape, "dlpack: element count overflows index_t"};
    }
  } else {
    for (int i = 0; i < Rank; ++i) {
      strides[i] = t.strides[i];
      if (strides[i] < 0)
        return {status_code::invalid_stride,
                "dlpack: negative stride (routegrad views need non-negative strides)"};
    }
    if (!has_zero_extent) {
      // The largest element offset, sum_i (extent_i - 1) * stride_i, must be addressable.
      index_t span = 0;
      for (int i = 0; i < Rank; ++i) {
        index_t term = 0;
        if (!dlpack_detail::mul_within(extents[i] - 1, strides[i], kLimit, term) ||
            term > kLimit - span)
          return {status_code::invalid_shape, "dlpack: strides reach beyond the index_t range"};
        span += term;
      }
    }
  }

  // Data pointer, byte offset, alignment.
  if (t.data == nullptr) {
    if (!has_zero_extent)
      return {status_code::null_pointer, "dlpack: data is null for a non-empty tensor"};
    out = strided_view<T, Rank, Space>(nullptr, extents, strides);
    return status::ok();
  }
  if (t.byte_offset % sizeof(value_type) != 0)
    return {status_code::misaligned, "dlpack: byte_offset is not a multiple of the element size"};
  const std::uintptr_t base = reinterpret_cast<std::uintptr_t>(t.data);
  if (t.byte_offset > std::numeric_limits<std::uintptr_t>::max() - base)
    return {status_code::invalid_argument, "dlpack: data + byte_offset overflows the address"};
  if ((base + static_cast<std::uintptr_t>(t.byte_offset)) % alignof(value_type) != 0)
    return {status_code::misaligned,
            "dlpack: data + byte_offset is not aligned to the element type"};

  T* const data = reinterpret_cast<T*>(static_cast<unsigned char*>(t.data) + t.byte_offset);
  out = strided_view<T, Rank, Space>(data, extents, strides);
  return status::ok();
}

}  // namespace routegrad
