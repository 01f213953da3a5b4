// The warp lanes policy: `Width` consecutive lanes of a warp share one token row (Width = 1, a
// thread per token, for small E). Same members as serial_lanes (estimators/lanes.hpp), so the
// per-token rules run unchanged. Every reduction (a butterfly, or an integer REDUX) leaves all
// lanes of the group with bitwise-identical results; the group's own mask lets groups of one warp
// diverge freely.
// `PerLane` > 0 promises rows of at most Width · PerLane elements (0 = any E): then steps(n) is a
// compile-time bound, and with `Unroll` the row loops unroll completely (independent iterations in
// flight, immediate shared-memory offsets) — which costs registers, so it is a separate choice.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "../estimators/lanes.hpp"

// Integer warp reductions in one instruction (__reduce_*_sync) exist from sm_80 on.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define ROUTEGRAD_WARP_REDUX 1
#else
#define ROUTEGRAD_WARP_REDUX 0
#endif

namespace routegrad::cuda {

template <int Width, int PerLane = 0, bool Unroll = (PerLane > 0)>
struct warp_lanes {
  static_assert(Width >= 1 && Width <= 32 && (Width & (Width - 1)) == 0,
                "Width must be a power of two up to 32");
  static_assert(PerLane >= 0, "PerLane: 0 (any E) or the elements per lane");
  static_assert(PerLane > 0 || !Unroll, "unrolling needs a bound");
  static constexpr int width = Width;  // count(), for host code
  static constexpr int per_lane = PerLane;
  static constexpr bool unroll = Unroll;
  unsigned mask;  // this group's lanes within the warp
  int lane_id;    // 0..Width-1

  __device__ static warp_lanes make() {
    const int lane_in_warp = static_cast<int>(threadIdx.x & 31u);
    const int base = lane_in_warp & ~(Width - 1);
    const unsigned m = Width == 32 ? 0xFFFFFFFFu : (((1u << Width) - 1u) << base);
    return {m, lane_in_warp - base};
  }

  __device__ static constexpr int count() { return Width; }

  /// Integer max / min over the group: one REDUX instruction on sm_80 and later.
  static constexpr bool has_redux = ROUTEGRAD_WARP_REDUX != 0;
  __device__ int reduce_max(int x) const {
#if ROUTEGRAD_WARP_REDUX
    return __reduce_max_sync(mask, x);
#else
    for (int d = Width / 2; d > 0; d /= 2) x = max(x, __shfl_xor_sync(mask, x, d, Width));
    return x;
#endif
  }
  __device__ int reduce_min(int x) const {
#if ROUTEGRAD_WARP_REDUX
    return __reduce_min_sync(mask, x);
#else
    for (int d = Width / 2; d > 0; d /= 2) x = min(x, __shfl_xor_sync(mask, x, d, Width));
    return x;
#endif
  }

  /// An int whose order is the order of the float (for non-NaN values; −0 < +0).
  __device__ static int order_key(float v) {
    const int bits = __float_as_int(v);
    return bits >= 0 ? bits : bits ^ 0x7FFFFFFF;
  }
  __device__ int lane() const { return lane_id; }

  template <class F>
  __device__ __forceinline__ void each(int n, F&& f) const {
    if constexpr (Unroll) {
      if (n == Width * PerLane) {  // a full row (E a power of two): no bound test per element
#pragma unroll
        for (int s = 0; s < PerLane; ++s) f(lane_id + s * Width);
      } else {
#pragma unroll
        for (int s = 0; s < PerLane; ++s) {
          const int i = lane_id + s * Width;
          if (i < n) f(i);
        }
      }
    } else {
      for (int i = lane_id; i < n; i += Width) f(i);
    }
  }
  __device__ static constexpr int steps(int n) {
    return PerLane > 0 ? PerLane : (n + Width - 1) / Width;
  }

  template <class M>
  __device__ M sum(M x) const {
    for (int d = Width / 2; d > 0; d /= 2) x += __shfl_xor_sync(mask, x, d, Width);
    return x;
  }
  template <class M>
  __device__ row_extreme<M> argmax(row_extreme<M> x) const {
    if constexpr (Width == 1) {
      return x;
    } else if constexpr (std::is_same_v<M, float> && has_redux) {
      // Integer reductions (one REDUX instruction each) instead of a butterfly of value and
      // index shuffles: the largest order-preserving key, then the lowest index holding it, then
      // the value from the lane that owns that index (so −0 and +0 come back as they were; they
      // share a key, as better_extreme treats them as equal). "none" ({−inf, −1}) loses to any
      // real entry and stays −1 when every lane has none.
      const int top = reduce_max(order_key(x.value + 0.0f));
      const int index = reduce_min(order_key(x.value + 0.0f) == top ? x.index : 0x7FFFFFFF);
      const float value = __shfl_sync(mask, x.value, index & (Width - 1), Width);
      return {value, index};
    } else {
      for (int d = Width / 2; d > 0; d /= 2) {
        const row_extreme<M> o{__shfl_xor_sync(mask, x.value, d, Width),
                               __shfl_xor_sync(mask, x.index, d, Width)};
        x = better_extreme(x, o);
      }
      return x;
    }
  }
  __device__ unsigned bit_or(unsigned x) const {
#if ROUTEGRAD_WARP_REDUX
    if constexpr (Width > 1) x = __reduce_or_sync(mask, x);
#else
    for (int d = Width / 2; d > 0; d /= 2) x |= __shfl_xor_sync(mask, x, d, Width);
#endif
    return x;
  }
  __device__ bool any(bool x) const {
    if constexpr (Width == 1) return x;
    return __any_sync(mask, x) != 0;
  }
  /// Makes each lane's earlier shared-memory writes visible to the other lanes of the group.
  __device__ void sync() const { __syncwarp(mask); }
  /// Bit l set when the group's lane l has `pred`.
  __device__ unsigned ballot(bool pred) const {
    if constexpr (Width == 1) return pred ? 1u : 0u;
    const unsigned b = __ballot_sync(mask, pred) & mask;
    return Width == 32 ? b : b >> (__ffs(static_cast<int>(mask)) - 1);
  }
};

}  // namespace routegrad::cuda
