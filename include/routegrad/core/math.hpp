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
/// float it is the hardware 2^x of x·log2(e) (ex2.approx.ftz: two instructions instead of about
/// ten), the computation of __expf with at most 2 + ⌊1.173·|x|⌋ ulp of error (CUDA's documented
/// bound) — for the weights that matter (x = z − max near 0) a few ulp, far inside the float
/// tolerance the back ends agree to — except that results below 2^-126 flush to 0. Everywhere
/// else it is exp.
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE float exp_fast(float x) {
#if ROUTEGRAD_DEVICE_PASS
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.44269504088896340736f));
  return y;
#else
  return std::exp(x);
#endif
}
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE double exp_fast(double x) { return exp(x); }
/// exp_fast(x) where keep() is true, else 0. The GPU computes the exp unconditionally, then
/// selects (two instructions, no divergent branch); the CPU calls exp only where keep() (a libm
/// call costs far more than a predictable branch, and most of a SparseMixer slot's experts are
/// masked).
template <class M, class Keep>
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE M exp_where(M x, Keep&& keep) {
#if ROUTEGRAD_DEVICE_PASS
  const M e = exp_fast(x);
  return keep() ? e : M(0);
#else
  return keep() ? exp_fast(x) : M(0);
#endif
}
/// a / b to a few ulp: the GPU's fast reciprocal-based division (__fdividef, two instructions);
/// exact division elsewhere. For values whose rounding the caller's margin absorbs.
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE float divide_approx(float a, float b) {
#if ROUTEGRAD_DEVICE_PASS
  return ::__fdividef(a, b);
#else
  return a / b;
#endif
}
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE double divide_approx(double a, double b) { return a / b; }
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
/// The larger of a and b where neither is NaN: one instruction on either side (fmax's FMNMX on
/// the GPU; max's compare-and-select, maxss, on the CPU, where fmax would test for NaN).
template <class M>
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE M max_of_numbers(M a, M b) {
#if ROUTEGRAD_DEVICE_PASS
  return ::fmax(a, b);  // (CUDA's float overload: fmaxf)
#else
  return max(a, b);
#endif
}
/// The larger of a and b, NaN when either is NaN: one instruction on the GPU (max.NaN, sm_80
/// on), a compare and select elsewhere.
template <class M>
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE M max_nan(M a, M b) {
  return (b > a) | is_nan(b) ? b : a;
}
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE float max_nan(float a, float b) {
#if ROUTEGRAD_DEVICE_PASS && __CUDA_ARCH__ >= 800
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
#else
  return max_nan<float>(a, b);  // the generic form
#endif
}

}  // namespace routegrad::math
