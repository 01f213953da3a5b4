// What a routing call is asked to do, and the state the forward leaves for the backward.
#pragma once

#include <cstdint>

#include "../core/philox.hpp"
#include "../core/view.hpp"

namespace routegrad {

enum class routing_mode : std::uint8_t {
  train,  // sample / jitter
  eval,   // deterministic: D = argmax, coin c = 1, no noise
};

enum class grad_mode : std::uint8_t {
  overwrite,   // grad_logits = ∂L/∂z
  accumulate,  // grad_logits += ∂L/∂z
};

/// Options shared by the forward and the backward of one routing step (pass the same to both).
struct routing_options {
  int k = 1;  // experts per token, 1 ≤ k ≤ E
  routing_mode mode = routing_mode::train;
  double jitter_eps = 0.1;         // SparseMixer mask ε, or Switch noise ε; 0 ≤ ε < 0.5
  bool renormalize = false;        // gates divided by their sum over the k slots
  double load_balance_coef = 0.0;  // α of SPEC §5 (0: off)
  double z_loss_coef = 0.0;        // β of SPEC §5 (0: off)
};

/// The state the backward needs, in caller-owned memory (SPEC §4, docs/api.md "Routing state").
///
/// experts(t, j): the expert chosen for token t, slot j (int32, in [0, E)).
/// coins(t, j):   the coin outcome: 0 = forward scale c = 1; n ≥ 1 = the rule's node n−1
///                (SparseMixer rules with reduced scales only; may be empty for other estimators).
/// rng:           the seed, offset and global index of the first token that drew the randomness.
/// offset_counter: optional; the value it points to is added to rng.offset when the call runs
///                (host memory for the CPU back end; device memory for CUDA, read by the kernels
///                themselves, so a CUDA graph replayed after the counter was advanced draws anew).
///
/// A caller may fill one by hand (replaying decisions made elsewhere, or after activation
/// recomputation) and run the backward from it; rerunning the forward with the same rng
/// reproduces the experts and coins exactly.
template <memory_space Space>
struct routing_state {
  strided_view<std::int32_t, 2, Space> experts;
  strided_view<std::uint8_t, 2, Space> coins;
  rng_stream rng;
  const std::uint64_t* offset_counter = nullptr;
};

/// The stream a call draws from: rng with *counter added to its offset (counter may be null).
/// Called where the counter's memory is: by the CPU back end, and by the CUDA kernels.
ROUTEGRAD_HD inline rng_stream rng_with_counter(rng_stream rng, const std::uint64_t* counter) {
  if (counter != nullptr) rng.offset += *counter;  // wraps modulo 2^64, as offsets do
  return rng;
}

/// Optional outputs of the forward (null pointers are skipped). The backward reads
/// expert_counts when load_balance_coef != 0.
template <memory_space Space>
struct routing_stats {
  std::int64_t* expert_counts = nullptr;   // [E]: (token, slot) pairs routed to each expert
  double* load_balance_loss = nullptr;     // α·E·Σ_e f_e·P_e
  double* z_loss = nullptr;                // β·mean_t logsumexp(z_t)²
  std::int64_t* nonfinite_rows = nullptr;  // rows that could not be routed fully (SPEC §7)
};

using host_routing_state = routing_state<memory_space::host>;
using host_routing_stats = routing_stats<memory_space::host>;

}  // namespace routegrad
