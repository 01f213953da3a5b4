// Device-side row, slots and gradient accessors the per-token rules run on (see
// estimators/token_forward.hpp and token_backward.hpp for what each member means).
#pragma once

#include <cstdint>

#include "../estimators/staged_row.hpp"
#include "../estimators/token_common.hpp"
#include "convert.cuh"

namespace routegrad::cuda::detail {

/// Stages row t of the logits (and Switch's jitter when `noise_eps` != 0) into the group's
/// shared memory: one coalesced read of the row, then every pass of the per-token rules reads
/// shared memory. Ends with a __syncwarp so every lane of the group sees every element.
template <bool Noisy, class Lanes, class T, class M>
__device__ staged_row<M, Noisy> stage_row(const Lanes& lanes, const T* src, index_t stride, int n,
                                          const rng_stream& rng, index_t t, M noise_eps, M* values,
                                          M* noise) {
  __syncwarp(lanes.mask);  // every lane is done with the previous row
  if (stride == 1)
    lanes.each(n, [&](int i) { values[i] = to_math<M>(src[i]); });
  else
    lanes.each(n, [&](int i) { values[i] = to_math<M>(src[i * stride]); });
  if (Noisy && noise_eps != M(0)) {
    for (int g = lanes.lane(); 4 * g < n; g += lanes.count()) {
      const philox4x32 b = switch_noise_block(rng, t, g);
      for (int w = 0; w < 4 && 4 * g + w < n; ++w)
        noise[4 * g + w] = switch_noise_from_word(b.v[w], noise_eps);
    }
  }
  __syncwarp(lanes.mask);
  return {values, n, Noisy && noise_eps != M(0) ? noise : nullptr};
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
      kept_expert[s] = s < k ? experts[s * expert_stride] : 0;
      kept_coin[s] = s < k && coins ? coins[s * coin_stride] : 0;
      kept_grad[s] = s < k ? to_math<M>(grad_gates[s * grad_stride]) : M(0);
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
    return j < KMax ? pick(kept_expert, j) : experts[j * expert_stride];
  }
  __device__ int coin(int j) const {
    return j < KMax ? pick(kept_coin, j) : (coins ? coins[j * coin_stride] : 0);
  }
  __device__ M grad_gate(int j) const {
    return j < KMax ? pick(kept_grad, j) : to_math<M>(grad_gates[j * grad_stride]);
  }
};

/// The group's gradient row in shared memory; each lane touches only its own elements.
template <class M>
struct shared_grad {
  M* values;
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
