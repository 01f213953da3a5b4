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
template <class Lanes, class T, class M>
__device__ staged_row<M> stage_row(const Lanes& lanes, const T* src, index_t stride, int n,
                                   const rng_stream& rng, index_t t, M noise_eps, M* values,
                                   M* noise) {
  __syncwarp(lanes.mask);  // every lane is done with the previous row
  for (int i = lanes.lane(); i < n; i += lanes.count()) values[i] = to_math<M>(src[i * stride]);
  if (noise_eps != M(0)) {
    for (int g = lanes.lane(); 4 * g < n; g += lanes.count()) {
      const philox4x32 b = switch_noise_block(rng, t, g);
      for (int w = 0; w < 4 && 4 * g + w < n; ++w)
        noise[4 * g + w] = switch_noise_from_word(b.v[w], noise_eps);
    }
  }
  __syncwarp(lanes.mask);
  return {values, n, noise_eps != M(0) ? noise : nullptr};
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

  __device__ index_t expert(int j) const {
    return j < KMax ? chosen[j] : experts[j * expert_stride];
  }
  __device__ void record(int j, index_t e, M gate, int coin) {
    if (j < KMax) {
      chosen[j] = static_cast<std::int32_t>(e);
      kept_gate[j] = gate;
    }
    if (leader) {
      experts[j * expert_stride] = static_cast<std::int32_t>(e);
      gates[j * gate_stride] = from_math<G>(gate);
      if (coins) coins[j * coin_stride] = static_cast<std::uint8_t>(coin);
    }
    if (j >= KMax) __syncwarp(mask);
  }
  __device__ M gate(int j) const {
    return j < KMax ? kept_gate[j] : to_math<M>(gates[j * gate_stride]);
  }
  __device__ void set_gate(int j, M g) {
    if (j < KMax) kept_gate[j] = g;
    if (leader) gates[j * gate_stride] = from_math<G>(g);
  }
};

template <class GG, class M>
struct device_backward_slots {
  const std::int32_t* experts;
  index_t expert_stride;
  const std::uint8_t* coins;  // may be null
  index_t coin_stride;
  const GG* grad_gates;
  index_t grad_stride;

  __device__ index_t expert(int j) const { return experts[j * expert_stride]; }
  __device__ int coin(int j) const { return coins ? coins[j * coin_stride] : 0; }
  __device__ M grad_gate(int j) const { return to_math<M>(grad_gates[j * grad_stride]); }
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
