// Scalar math usable from host and device code, in float or double.
#pragma once

#include <cmath>

#include "config.hpp"

namespace routegrad::math {

template <class M>
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE M infinity() {
  return static_cast<M>(INFINITY);
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
