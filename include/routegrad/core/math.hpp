// Scalar math usable from host and device code, in float or double.
#pragma once

#include <cfloat>
#include <cmath>
#include <type_traits>

#include "config.hpp"

namespace routegrad::math {

template <class M>
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE M infinity() {
  return static_cast<M>(INFINITY);
}

/// The largest finite float or double.
template <class M>
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE M largest_finite() {
  static_assert(std::is_same_v<M, float> || std::is_same_v<M, double>, "float or double");
  if constexpr (std::is_same_v<M, float>)
    return FLT_MAX;
  else
    return DBL_MAX;
}

template <class M>
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE bool is_nan(M x) {
  return x != x;
}

ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE float exp(float x) {
#if ROUTEGRAD_DEVICE_PASS
  return ::expf(x);
#else
  return std::exp(x);
#endif
}
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE double exp(double x) {
#if ROUTEGRAD_DEVICE_PASS
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
/// exp for the per-element passes over a row (softmax weights and normalisers). On the GPU in
/// float it is the hardware approximation __expf: about 10 instructions fewer per element, with
/// at most 2 + ⌊1.173·|x|⌋ ulp of error (CUDA's documented bound) — for the weights that matter
/// (x = z − max near 0) a few ulp, far inside the float tolerance the back ends agree to; results
/// below the smallest normal flush to 0. Everywhere else it is exp.
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE float exp_fast(float x) {
#if ROUTEGRAD_DEVICE_PASS
  return ::__expf(x);
#else
  return std::exp(x);
#endif
}
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE double exp_fast(double x) { return exp(x); }
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE float log(float x) {
#if ROUTEGRAD_DEVICE_PASS
  return ::logf(x);
#else
  return std::log(x);
#endif
}
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE double log(double x) {
#if ROUTEGRAD_DEVICE_PASS
  return ::log(x);
#else
  return std::log(x);
#endif
}

/// Index of the lowest set bit of x != 0.
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE int lowest_bit(unsigned x) {
#if ROUTEGRAD_DEVICE_PASS
  return __ffs(static_cast<int>(x)) - 1;
#else
  return __builtin_ctz(x);
#endif
}

ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE float erf(float x) {
#if ROUTEGRAD_DEVICE_PASS
  return ::erff(x);
#else
  return std::erf(x);
#endif
}
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE double erf(double x) {
#if ROUTEGRAD_DEVICE_PASS
  return ::erf(x);
#else
  return std::erf(x);
#endif
}

template <class M>
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE M abs(M x) {
  return x < M(0) ? -x : x;
}
template <class M>
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE M max(M a, M b) {
  return a < b ? b : a;
}

}  // namespace routegrad::math
