// The warp lanes policy: `Width` consecutive lanes of a warp share one token row (Width = 1, a
// thread per token, for small E). Same members as serial_lanes (estimators/lanes.hpp), so the
// per-token rules run unchanged. Every reduction (a butterfly, or an integer REDUX) leaves all
// lanes of the group with bitwise-identical results; the group's own mask lets groups of one warp
// diverge freely.
// `PerLane` > 0 promises rows of at most Width · PerLane elements (0 = any E): then steps(n) is a
// compile-time bound. `Unroll` is how many of a lane's steps each row loop runs per iteration:
// PerLane (the default with a bound) unrolls completely (immediate shared-memory offsets, no loop),
// 1 not at all, values between partly (independent iterations in flight without keeping a whole
// row's values live) — unrolling costs registers, so it is a separate choice.
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

template <int Width, int PerLane = 0, int Unroll = (PerLane > 0 ? PerLane : 1)>
struct warp_lanes {
  static_assert(Width >= 1 && Width <= 32 && (Width & (Width - 1)) == 0,
                "Width must be a power of two up to 32");
  static_assert(PerLane >= 0, "PerLane: 0 (any E) or the elements per lane");
  static_assert(Unroll >= 1 && (PerLane == 0 || (Unroll <= PerLane && PerLane % Unroll == 0)),
                "Unroll: 1 (a plain loop) up to PerLane (no loop), a divisor of PerLane");
  static constexpr int width = Width;  // count(), for host code
  static constexpr int per_lane = PerLane;
  static constexpr int unroll = Unroll;
  static constexpr bool full_unroll = PerLane > 0 && Unroll == PerLane;
  /// A set of a row's elements can be kept in index order, for the whole group, in this many
  /// 32-bit words (row_math.hpp positive_elements) when the row loops unroll completely (each
  /// element's word and bit offset are then constants) and rows hold at most 256 elements.
  static constexpr int index_words =
      full_unroll && Width * PerLane <= 256 ? (Width * PerLane + 31) / 32 : 0;
  /// exp_where computes exp for every element and selects (no divergent branch), so
  /// candidate_weights' sparse form, which calls exp for the candidates alone, pays off here.
  static constexpr bool exp_for_every_element = true;
  unsigned mask;  // this group's lanes within the warp
  int lane_id;    // 0..Width-1

  __device__ static warp_lanes make() {
    const int lane_in_warp = static_cast<int>(threadIdx.x & 31u);
    const int base = lane_in_warp & ~(Width - 1);
    const unsigned m = Width == 32 ? 0xFFFFFFFFu : (((1u << Width) - 1u) << base);
    return {m, lane_in_warp - base};
  }

  __device__ static constexpr int count() { return Width; }

  /// REDUX and VOTE give one answer for the whole warp: with groups narrower than the warp the
  /// compiler runs them once per group (a loop over the distinct masks: 4× at 8 lanes per token,
  /// measured with Nsight Compute), while a shuffle serves every group at once. So whole-warp
  /// groups reduce with REDUX / VOTE, narrower ones with shuffle butterflies.
  static constexpr bool whole_warp = Width == 32;
  static constexpr bool has_redux = ROUTEGRAD_WARP_REDUX != 0 && whole_warp;

  /// x = op(x, the value of lane ^ d) for d = Width/2, ..., 1: every lane ends with op over the
  /// group, combined in the same order on every lane.
  template <class V, class Op>
  __device__ V butterfly(V x, Op op) const {
#pragma unroll
    for (int d = Width / 2; d > 0; d /= 2) x = op(x, __shfl_xor_sync(mask, x, d, Width));
    return x;
  }

  /// An int whose order is the order of the float (for non-NaN values; −0 < +0).
  __device__ static int order_key(float v) {
    const int bits = __float_as_int(v);
    return bits >= 0 ? bits : bits ^ 0x7FFFFFFF;
  }
  __device__ int lane() const { return lane_id; }

  template <class F>
  __device__ __forceinline__ void each(int n, F&& f) const {
    if constexpr (full_unroll) {
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
    } else if constexpr (PerLane > 0) {
      // Unroll steps per iteration of a loop with a compile-time trip count: no remainder loop,
      // and no bound test per element on full rows.
      if (n == Width * PerLane) {
#pragma unroll 1
        for (int first = 0; first < PerLane; first += Unroll) {
#pragma unroll
          for (int s = first; s < first + Unroll; ++s) f(lane_id + s * Width);
        }
      } else {
#pragma unroll 1
        for (int first = 0; first < PerLane; first += Unroll) {
#pragma unroll
          for (int s = first; s < first + Unroll; ++s) {
            const int i = lane_id + s * Width;
            if (i < n) f(i);
          }
        }
      }
    } else {
#pragma unroll Unroll
      for (int i = lane_id; i < n; i += Width) f(i);
    }
  }
  /// each() for a body that keeps nothing in registers (a store of a constant): on full rows of a
  /// bounded policy, unrolled completely whatever `Unroll` is (no loop counter or address
  /// arithmetic per step: H200, E = 128, the SparseMixer backward's gradient row was cleared in
  /// four iterations of 10 instructions for 4 stores).
  template <class F>
  __device__ __forceinline__ void each_light(int n, F&& f) const {
    if constexpr (PerLane > 0) {
      if (n == Width * PerLane) {
#pragma unroll
        for (int s = 0; s < PerLane; ++s) f(lane_id + s * Width);
        return;
      }
    }
    each(n, static_cast<F&&>(f));
  }
  /// Bit s set when pred(i) holds for this lane's element i = lane + s · Width of step s, for
  /// rows of at most 32 steps. Each unrolled run of steps gathers its bits at constant positions
  /// and shifts them into place once: in `each` with a per-element mark, a partly unrolled loop
  /// shifted a bit by the run-time step for every element (H200, E = 128: a fifth of the
  /// forward's instructions were that marking pass).
  template <class P>
  __device__ __forceinline__ unsigned step_bits(int n, P&& pred) const {
    unsigned bits = 0u;
    if constexpr (PerLane > 0) {
      // The bits of steps first .. first + Run − 1; `bounded` tests each element against n.
      const auto run = [&](int first, auto length, auto bounded) {
        constexpr int Run = decltype(length)::value;
        unsigned r = 0u;
#pragma unroll
        for (int s = 0; s < Run; ++s) {
          const int i = lane_id + (first + s) * Width;
          if (!decltype(bounded)::value || i < n) r |= pred(i) ? 1u << s : 0u;
        }
        return r;
      };
      if (n == Width * PerLane) {  // a full row: no bound test per element
        // Runs of at least 8 steps: the pass keeps no value past its step, so a longer run costs
        // no registers and saves each run's loop and address arithmetic (H200, E = 128, the
        // SparseMixer backward's 8 × 16 by 4: 9 of every 22 instructions of its marking pass).
        constexpr int by = Unroll < 8 && PerLane % 8 == 0 ? 8 : Unroll;
#pragma unroll 1
        for (int first = 0; first < PerLane; first += by)
          bits |= run(first, std::integral_constant<int, by>{}, std::false_type{}) << first;
      } else {
#pragma unroll 1
        for (int first = 0; first < PerLane; first += Unroll)
          bits |= run(first, std::integral_constant<int, Unroll>{}, std::true_type{}) << first;
      }
    } else {
      int s = 0;
#pragma unroll Unroll
      for (int i = lane_id; i < n; i += Width, ++s) bits |= pred(i) ? 1u << s : 0u;
    }
    return bits;
  }
  __host__ __device__ static constexpr int steps(int n) {
    return PerLane > 0 ? PerLane : (n + Width - 1) / Width;
  }

  template <class M>
  __device__ M sum(M x) const {
    return butterfly(x, [](M a, M b) { return a + b; });
  }
  template <class M>
  __device__ M max(M x) const {
    return butterfly(x, [](M a, M b) { return math::max_nan(a, b); });
  }
  template <class M>
  __device__ row_extreme<M> argmax(row_extreme<M> x) const {
    if constexpr (Width == 1) {
      return x;
    }
#if ROUTEGRAD_WARP_REDUX
    else if constexpr (std::is_same_v<M, float> && has_redux) {
      // Integer reductions (one REDUX instruction each) instead of a butterfly of value and
      // index shuffles: the largest order-preserving key, then the lowest index holding it, then
      // the value from the lane that owns that index (so −0 and +0 come back as they were; they
      // share a key, as better_extreme treats them as equal). "none" ({−inf, −1}) loses to any
      // real entry and stays −1 when every lane has none.
      const int top = __reduce_max_sync(mask, order_key(x.value + 0.0f));
      const int index =
          __reduce_min_sync(mask, order_key(x.value + 0.0f) == top ? x.index : 0x7FFFFFFF);
      const float value = __shfl_sync(mask, x.value, index & (Width - 1), Width);
      return {value, index};
    }
#endif
    else {
#pragma unroll
      for (int d = Width / 2; d > 0; d /= 2) {
        const row_extreme<M> o{__shfl_xor_sync(mask, x.value, d, Width),
                               __shfl_xor_sync(mask, x.index, d, Width)};
        x = better_extreme(x, o);
      }
      return x;
    }
  }
  __device__ unsigned bit_or(unsigned x) const {
    if constexpr (Width == 1) return x;
#if ROUTEGRAD_WARP_REDUX
    if constexpr (has_redux) return __reduce_or_sync(mask, x);
#endif
    return butterfly(x, [](unsigned a, unsigned b) { return a | b; });
  }
  __device__ bool any(bool x) const {
    if constexpr (Width == 1) return x;
    if constexpr (whole_warp) return __any_sync(mask, x) != 0;
    return bit_or(x ? 1u : 0u) != 0u;
  }
  /// Makes each lane's earlier shared-memory writes visible to the other lanes of the group.
  __device__ void sync() const { __syncwarp(mask); }
  /// Bit l set when the group's lane l has `pred`.
  __device__ unsigned ballot(bool pred) const {
    if constexpr (whole_warp) return __ballot_sync(mask, pred);
    return bit_or(pred ? 1u << lane_id : 0u);
  }
};

}  // namespace routegrad::cuda
