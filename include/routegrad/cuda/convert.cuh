// Storage ↔ math conversions on the device: fp32, fp64, fp16 and bf16 storage; math in fp32
// (fp64 for double storage).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace routegrad::cuda {

template <class T>
using math_t = std::conditional_t<std::is_same_v<std::remove_cv_t<T>, double>, double, float>;

template <class M, class T>
__device__ __forceinline__ M to_math(T x) {
  using S = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<S, __half>)
    return static_cast<M>(__half2float(x));
  else if constexpr (std::is_same_v<S, __nv_bfloat16>)
    return static_cast<M>(__bfloat162float(x));
  else
    return static_cast<M>(x);
}

template <class T, class M>
__device__ __forceinline__ T from_math(M x) {
  if constexpr (std::is_same_v<T, __half>)
    return __float2half_rn(static_cast<float>(x));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __float2bfloat16_rn(static_cast<float>(x));
  else
    return static_cast<T>(x);
}

template <class T>
inline constexpr bool is_supported_storage =
    std::is_same_v<std::remove_cv_t<T>, float> || std::is_same_v<std::remove_cv_t<T>, double> ||
    std::is_same_v<std::remove_cv_t<T>, __half> ||
    std::is_same_v<std::remove_cv_t<T>, __nv_bfloat16>;

}  // namespace routegrad::cuda
