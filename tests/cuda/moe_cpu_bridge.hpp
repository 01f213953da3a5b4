// The CPU MoE layer as the CUDA tests call it: a plain interface (doubles, row-major vectors)
// implemented in moe_cpu_bridge.cpp, which the host compiler builds with Eigen, so that Eigen
// never enters a .cu translation unit (docs/design.md).
#pragma once

#include <cstdint>
#include <routegrad/core/philox.hpp>
#include <routegrad/estimators/estimators.hpp>
#include <routegrad/moe/options.hpp>
#include <string>
#include <type_traits>
#include <vector>

namespace routegrad::test::gpu {

enum class estimator_id { switch_router, topk_softmax, euler, midpoint, heun3 };

template <class Est>
constexpr estimator_id estimator_id_of() {
  if constexpr (std::is_same_v<Est, switch_router>)
    return estimator_id::switch_router;
  else if constexpr (std::is_same_v<Est, topk_softmax>)
    return estimator_id::topk_softmax;
  else if constexpr (std::is_same_v<Est, sparsemixer_euler>)
    return estimator_id::euler;
  else if constexpr (std::is_same_v<Est, sparsemixer_midpoint>)
    return estimator_id::midpoint;
  else
    return estimator_id::heun3;
}

/// One layer problem, every tensor row-major and contiguous (the values as the GPU's storage
/// type holds them). The CPU layer runs it in double or float.
struct cpu_problem {
  moe_options opt;
  estimator_id estimator = estimator_id::heun3;
  rng_stream rng;
  index_t tokens = 0;
  bool in_double = false;
  grad_mode mode = grad_mode::overwrite;
  std::vector<double> x, dy, router_weight, router_bias, w1, b1, w2, b2, omega;
  /// The gradients' and dx's values before the backward (accumulate mode); zeros when empty.
  std::vector<double> grad_init, dx_init;
};

/// What the CPU layer wrote: outputs, statistics and its routing decisions ([T, k] row-major).
struct cpu_result {
  int forward_code = -1, backward_code = -1;
  std::string forward_message, backward_message;
  std::vector<double> y, dx;
  std::vector<double> router_weight, router_bias, w1, b1, w2, b2, omega;  // the gradients
  std::vector<std::int64_t> expert_counts, kept_counts;
  std::int64_t dropped = -1, nonfinite = -1;
  double load_balance_loss = 0.0, z_loss = 0.0;
  std::vector<double> logits;         // [T, E]
  std::vector<std::int32_t> experts;  // [T, k]
  std::vector<std::uint8_t> coins;    // [T, k]
  std::vector<double> gates;          // [T, k]
  std::vector<std::int64_t> rows;     // [T, k] packed row, −1 when not kept (sparse only)
};

/// The gradients in one flat vector, in the order router_weight, router_bias, w1, b1, w2, b2,
/// omega (what cpu_problem::grad_init holds).
inline std::size_t gradient_elements(const moe_options& o) {
  const std::size_t E = static_cast<std::size_t>(o.experts),
                    d = static_cast<std::size_t>(o.d_model),
                    h = static_cast<std::size_t>(o.d_hidden),
                    h1 = static_cast<std::size_t>(w1_rows(o));
  return E * d + E + E * h1 * d + E * h1 + E * d * h + E * d + (o.use_omega ? d : 0);
}

cpu_result run_cpu_layer(const cpu_problem& problem);

}  // namespace routegrad::test::gpu
