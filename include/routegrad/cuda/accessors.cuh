// Device-side row, slots and gradient accessors the per-token rules run on (see
// estimators/token_forward.hpp and token_backward.hpp for what each member means).
#pragma once

#include <cstdint>

#include "../estimators/staged_row.hpp"
#include "../estimators/token_common.hpp"
#include "convert.cuh"

namespace routegrad::cuda::detail {

/// Whether a contiguous row of n elements can move in 16-byte pieces between `a` and `b`: both
/// 16-byte aligned and n a multiple of the piece.
template <class T>
__device__ bool row_in_pieces(int n, const void* a, const void* b) {
  constexpr int per_piece = 16 / static_cast<int>(sizeof(T));
  return n % per_piece == 0 &&
         (reinterpret_cast<std::uintptr_t>(a) | reinterpret_cast<std::uintptr_t>(b)) % 16 == 0;
}

/// dst[i] = to_math(src[i]) for a contiguous row (row_in_pieces), in 16-byte pieces of the source:
/// one load and one or two shared-memory stores per piece instead of one of each per element.
/// Lane l moves pieces l, l + L, ...: other lanes may read the row only after a __syncwarp.
/// `lane_max` takes in the values this lane moved (math::max_nan). A full row of a lanes policy
/// with a bound (n = Width · PerLane) moves a compile-time number of pieces per lane: no remainder
/// code ahead of the first load (H200, T = 131072, E = 128, with the staging's leading __syncwarp
/// gone: midpoint fp32 forward + backward 72.5 → 70.8–72.1 µs, bf16 69.8 → 66.7–67.1, heun3
/// top-2 bf16 122.1–122.3 → 117.7–117.9).
template <class Lanes, class T, class M>
__device__ void load_row_pieces(const Lanes& lanes, const T* src, int n, M* dst, M& lane_max) {
  constexpr int per_piece = 16 / static_cast<int>(sizeof(T));
  constexpr int stores = per_piece * static_cast<int>(sizeof(M)) / 16;
  const auto move = [&](int c) {  // piece c: elements c · per_piece ...
    const uint4 raw = reinterpret_cast<const uint4*>(src)[c];
    T in[per_piece];
    memcpy(in, &raw, sizeof(raw));
    M out[per_piece];
#pragma unroll
    for (int v = 0; v < per_piece; ++v) {
      out[v] = to_math<M>(in[v]);
      lane_max = math::max_nan(lane_max, out[v]);
    }
    uint4 words[stores];
    memcpy(words, out, sizeof(out));
    uint4* to = reinterpret_cast<uint4*>(dst + c * per_piece);
#pragma unroll
    for (int q = 0; q < stores; ++q) to[q] = words[q];
  };
  constexpr int lanes_n = Lanes::count();
  constexpr int full_row = Lanes::per_lane * lanes_n;  // 0: no bound
  if constexpr (full_row > 0 && full_row % (per_piece * lanes_n) == 0) {
    if (n == full_row) {
#pragma unroll 4
      for (int k = 0; k < full_row / (per_piece * lanes_n); ++k) move(lanes.lane() + k * lanes_n);
      return;
    }
  }
#pragma unroll 4
  for (int c = lanes.lane(); c < n / per_piece; c += lanes_n) move(c);
}

/// dst[i] = from_math(src[i]) (plus dst[i]'s old value with `Accumulate`) for a contiguous row
/// (row_in_pieces), in 16-byte pieces of the destination. Reads elements other lanes wrote: the
/// caller synchronises the group first. (A compile-time piece count for full rows, as in
/// load_row_pieces, measured slower here: H200, 2026-11-30 18:50 UTC, docs/performance.md run 11.)
template <bool Accumulate, class Lanes, class T, class M>
__device__ void store_pieces(const Lanes& lanes, const M* src, int n, T* dst) {
  static_assert(sizeof(T) <= sizeof(M), "a piece of T must come from whole 16-byte loads of M");
  constexpr int per_piece = 16 / static_cast<int>(sizeof(T));
  constexpr int loads = per_piece * static_cast<int>(sizeof(M)) / 16;
  const auto move = [&](int c) {
    const uint4* from = reinterpret_cast<const uint4*>(src + c * per_piece);
    uint4 words[loads];
#pragma unroll
    for (int q = 0; q < loads; ++q) words[q] = from[q];
    M in[per_piece];
    memcpy(in, words, sizeof(words));
    uint4* to = reinterpret_cast<uint4*>(dst) + c;
    T out[per_piece];
    if constexpr (Accumulate) {
      const uint4 raw = *to;
      T old[per_piece];
      memcpy(old, &raw, sizeof(raw));
#pragma unroll
      for (int v = 0; v < per_piece; ++v) out[v] = from_math<T>(to_math<M>(old[v]) + in[v]);
    } else {
#pragma unroll
      for (int v = 0; v < per_piece; ++v) out[v] = from_math<T>(in[v]);
    }
    uint4 raw;
    memcpy(&raw, out, sizeof(raw));
    *to = raw;
  };
  if constexpr (Accumulate) {
#pragma unroll 1
    for (int c = lanes.lane(); c < n / per_piece; c += lanes.count()) move(c);
  } else {
#pragma unroll 4
    for (int c = lanes.lane(); c < n / per_piece; c += lanes.count()) move(c);
  }
}

/// store_pieces with the accumulation chosen at run time: two loops, as a run-time flag inside
/// one kept the loads and adds of the old values in the overwriting loop as predicated-off
/// instructions (H200, E = 128 backward: 32 of its 815 instructions per warp).
template <class Lanes, class T, class M>
__device__ __noinline__ void store_pieces_accumulating(const Lanes& lanes, const M* src, int n,
                                                       T* dst) {
  store_pieces<true>(lanes, src, n, dst);
}
template <class Lanes, class T, class M>
__device__ void store_row_pieces(const Lanes& lanes, const M* src, int n, T* dst, bool accumulate) {
  if (accumulate)
    store_pieces_accumulating(lanes, src, n, dst);
  else
    store_pieces<false>(lanes, src, n, dst);
}

/// Stages row t of the logits (and Switch's jitter when `noise_eps` != 0) into the group's
/// shared memory: one coalesced read of the row, then every pass of the per-token rules reads
/// shared memory. Ends with a __syncwarp so every lane of the group sees every element. A caller
/// that stages another row into the same memory synchronises the group first (every lane done
/// with the previous row); the first row needs no synchronisation, so the loads of a group's
/// first (mostly only) token are not held behind one.
template <bool Noisy, class Lanes, class T, class M>
__device__ staged_row<M, Noisy, true> stage_row(const Lanes& lanes, const T* src, index_t stride,
                                                int n, const rng_stream& rng, index_t t,
                                                M noise_eps, M* values, M* noise) {
  M lane_max = -math::infinity<M>();
  const auto put = [&](int i, M v) {
    values[i] = v;
    lane_max = math::max_nan(lane_max, v);
  };
  if (stride == 1 && row_in_pieces<T>(n, src, values))
    load_row_pieces(lanes, src, n, values, lane_max);
  else if (stride == 1)
    lanes.each(n, [&](int i) { put(i, to_math<M>(src[i])); });
  else
    lanes.each(n, [&](int i) { put(i, to_math<M>(src[i * stride])); });
  if (Noisy && noise_eps != M(0)) {
    for (int g = lanes.lane(); 4 * g < n; g += lanes.count()) {
      const philox4x32 b = switch_noise_block(rng, t, g);
      for (int w = 0; w < 4 && 4 * g + w < n; ++w)
        noise[4 * g + w] = switch_noise_from_word(b.v[w], noise_eps);
    }
  }
  __syncwarp(lanes.mask);
  return {values, n, Noisy && noise_eps != M(0) ? noise : nullptr, lane_max};
}

/// base[j · stride]: a slot past those kept in registers, read out of line by the backward.
/// Inline, nvcc predicated its address arithmetic and load instead of branching around them, so
/// every slot access paid them, predicated off (H200, Nsight Compute, T = 131072, E = 128: 27 of
/// the SparseMixer bf16 backward's 769 instructions per warp at k = 1, 54 of heun3's 1341 at
/// k = 2). Not in the forward, where they were 2–3% and the call made 48-register shapes spill.
template <class V>
__device__ __noinline__ V load_slot_past_registers(const V* base, index_t j, index_t stride) {
  return base[j * stride];
}

/// Forward slots: every lane keeps the first KMax choices in registers (they are read back by the
/// later slots); the group's first lane writes the caller's buffers. Slots past KMax are read back
/// from global memory after a __syncwarp.
template <class G, class M, int KMax>
struct device_forward_slots {
  std::int32_t* experts;
  index_t expert_stride;
  std::uint8_t* coins;  // may be null
  index_t coin_stride;
  G* gates;
  index_t gate_stride;
  bool leader;
  unsigned mask;
  std::int32_t chosen[KMax];
  M kept_gate[KMax];

  // The register arrays are only ever indexed inside fully unrolled loops (a run-time index would
  // move them to local memory).
  __device__ index_t expert(int j) const {
    if (j >= KMax) return experts[j * expert_stride];
    std::int32_t e = chosen[0];
#pragma unroll
    for (int s = 1; s < KMax; ++s)
      if (s == j) e = chosen[s];
    return e;
  }
  __device__ void record(int j, index_t e, M gate, int coin) {
#pragma unroll
    for (int s = 0; s < KMax; ++s)
      if (s == j) {
        chosen[s] = static_cast<std::int32_t>(e);
        kept_gate[s] = gate;
      }
    if (leader) {
      experts[j * expert_stride] = static_cast<std::int32_t>(e);
      gates[j * gate_stride] = from_math<G>(gate);
      if (coins) coins[j * coin_stride] = static_cast<std::uint8_t>(coin);
    }
    if (j >= KMax) __syncwarp(mask);
  }
  __device__ M gate(int j) const {
    if (j >= KMax) return to_math<M>(gates[j * gate_stride]);
    M g = kept_gate[0];
#pragma unroll
    for (int s = 1; s < KMax; ++s)
      if (s == j) g = kept_gate[s];
    return g;
  }
  __device__ void set_gate(int j, M g) {
#pragma unroll
    for (int s = 0; s < KMax; ++s)
      if (s == j) kept_gate[s] = g;
    if (leader) gates[j * gate_stride] = from_math<G>(g);
  }
};

/// Backward slots: the first KMax slots' expert, coin and gate gradient are read once into
/// registers; later slots are read from global memory when asked for.
template <class GG, class M, int KMax>
struct device_backward_slots {
  const std::int32_t* experts;
  index_t expert_stride;
  const std::uint8_t* coins;  // may be null
  index_t coin_stride;
  const GG* grad_gates;
  index_t grad_stride;
  std::int32_t kept_expert[KMax];
  int kept_coin[KMax];
  M kept_grad[KMax];

  __device__ device_backward_slots(const std::int32_t* e, index_t es, const std::uint8_t* c,
                                   index_t cs, const GG* g, index_t gs, int k)
      : experts(e), expert_stride(es), coins(c), coin_stride(cs), grad_gates(g), grad_stride(gs) {
#pragma unroll
    for (int s = 0; s < KMax; ++s) {
      kept_expert[s] = 0;
      kept_coin[s] = 0;
      kept_grad[s] = M(0);
    }
    // Only the k slots that exist (an early exit: k = 1 loads one slot, not KMax).
#pragma unroll
    for (int s = 0; s < KMax; ++s) {
      if (s >= k) break;
      kept_expert[s] = experts[s * expert_stride];
      kept_coin[s] = coins ? coins[s * coin_stride] : 0;
      kept_grad[s] = to_math<M>(grad_gates[s * grad_stride]);
    }
  }

  template <class V>
  __device__ static V pick(const V (&kept)[KMax], int j) {
    V v = kept[0];
#pragma unroll
    for (int s = 1; s < KMax; ++s)
      if (s == j) v = kept[s];
    return v;
  }
  __device__ index_t expert(int j) const {
    return j < KMax ? pick(kept_expert, j) : load_slot_past_registers(experts, j, expert_stride);
  }
  __device__ int coin(int j) const {
    return j < KMax ? pick(kept_coin, j)
                    : (coins ? load_slot_past_registers(coins, j, coin_stride) : 0);
  }
  __device__ M grad_gate(int j) const {
    return j < KMax ? pick(kept_grad, j)
                    : to_math<M>(load_slot_past_registers(grad_gates, j, grad_stride));
  }
};

/// The group's gradient row in shared memory; each lane touches only its own elements.
template <class M>
struct shared_grad {
  M* values;
  __device__ void set(int i, M v) { values[i] = v; }
  __device__ void add(int i, M v) { values[i] += v; }
  __device__ void scale(int i, M f) { values[i] *= f; }
};

template <class M>
struct device_count_fraction {
  const std::int64_t* counts;  // null: load balancing off
  M inv_pairs;
  __device__ M operator()(index_t e) const {
    return counts ? static_cast<M>(counts[e]) * inv_pairs : M(0);
  }
};

}  // namespace routegrad::cuda::detail
