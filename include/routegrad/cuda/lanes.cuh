// The warp lanes policy: `Width` consecutive lanes of a warp share one token row (Width = 1, a
// thread per token, for small E). Same members as serial_lanes (estimators/lanes.hpp), so the
// per-token rules run unchanged. Every reduction is a butterfly, so all lanes of the group end
// with bitwise-identical results; the group's own mask lets groups of one warp diverge freely.
// `PerLane` > 0 promises rows of at most Width · PerLane elements: the row loops then unroll
// completely (independent iterations in flight, immediate shared-memory offsets); 0 = any E.
#pragma once

#include <cuda_runtime.h>

#include "../estimators/lanes.hpp"

namespace routegrad::cuda {

template <int Width, int PerLane = 0>
struct warp_lanes {
  static_assert(Width >= 1 && Width <= 32 && (Width & (Width - 1)) == 0,
                "Width must be a power of two up to 32");
  static_assert(PerLane >= 0, "PerLane: 0 (any E) or the elements per lane");
  unsigned mask;  // this group's lanes within the warp
  int lane_id;    // 0..Width-1

  __device__ static warp_lanes make() {
    const int lane_in_warp = static_cast<int>(threadIdx.x & 31u);
    const int base = lane_in_warp & ~(Width - 1);
    const unsigned m = Width == 32 ? 0xFFFFFFFFu : (((1u << Width) - 1u) << base);
    return {m, lane_in_warp - base};
  }

  __device__ static constexpr int count() { return Width; }
  __device__ int lane() const { return lane_id; }

  template <class F>
  __device__ __forceinline__ void each(int n, F&& f) const {
    if constexpr (PerLane > 0) {
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
    for (int d = Width / 2; d > 0; d /= 2) {
      const row_extreme<M> o{__shfl_xor_sync(mask, x.value, d, Width),
                             __shfl_xor_sync(mask, x.index, d, Width)};
      x = better_extreme(x, o);
    }
    return x;
  }
  __device__ unsigned bit_or(unsigned x) const {
    for (int d = Width / 2; d > 0; d /= 2) x |= __shfl_xor_sync(mask, x, d, Width);
    return x;
  }
  __device__ bool any(bool x) const {
    if constexpr (Width == 1) return x;
    return __any_sync(mask, x) != 0;
  }
  __device__ index_t max_index(index_t x) const {
    for (int d = Width / 2; d > 0; d /= 2) {
      const index_t o = __shfl_xor_sync(mask, x, d, Width);
      x = o > x ? o : x;
    }
    return x;
  }
  template <class M>
  __device__ M inclusive_scan(M x) const {
    for (int d = 1; d < Width; d *= 2) {
      const M o = __shfl_up_sync(mask, x, d, Width);
      if (lane_id >= d) x += o;
    }
    return x;
  }
  template <class M>
  __device__ M from_last_lane(M x) const {
    if constexpr (Width == 1) return x;
    return __shfl_sync(mask, x, Width - 1, Width);
  }
  __device__ int first_lane(bool pred) const {
    if constexpr (Width == 1) return pred ? 0 : -1;
    const unsigned ballot = __ballot_sync(mask, pred) & mask;
    if (ballot == 0u) return -1;
    return __ffs(static_cast<int>(ballot)) - 1 - (__ffs(static_cast<int>(mask)) - 1);
  }
};

}  // namespace routegrad::cuda
