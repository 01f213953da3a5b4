// What the reference MoE layer computes (SPEC §6), the caller's parameter and gradient views, and
// the statistics a forward reports. Shared by the CPU and the CUDA layer.
//
//   z   = x W_rᵀ + b_r                                  router logits [T, E]
//   D,g = the estimator's forward on z                  experts and gates [T, k]
//   f_e(x) = W2_e · act(W1_e x + b1_e) + b2_e           expert FFN (act: GELU, SiLU or SwiGLU)
//   y_t = ω ⊙ Σ_j g_tj · f_{D_tj}(x_t)                  (sparse; pairs past capacity contribute 0)
//   y_t = ω ⊙ Σ_e π_te · f_e(x_t), π = softmax(z_t)     (dense: every expert on every token)
//
// Layouts follow torch.nn.Linear (weight [out, in]), one slab per expert.
#pragma once

#include <cmath>
#include <cstdint>

#include "../core/view.hpp"
#include "../routing/options.hpp"

namespace routegrad {

/// std::type_identity (C++20): keeps a parameter out of template argument deduction, so the
/// layer's scalar type is deduced from the parameter set alone and views of T convert to views
/// of const T at the call.
template <class T>
struct type_identity {
  using type = T;
};
template <class T>
using type_identity_t = typename type_identity<T>::type;

enum class activation : std::uint8_t {
  gelu,    // x·Φ(x), the exact (erf) form, as torch.nn.GELU()
  silu,    // x·σ(x)
  swiglu,  // silu(a)·b, with W1's rows [0, h) giving a and rows [h, 2h) giving b
};

enum class mixing : std::uint8_t {
  sparse,  // the estimator's top-k choices (the layer's normal mode)
  dense,   // every expert on every token, mixed by softmax(z): the exact gradient of the dense
           // objective (for research and bias measurement, not for speed)
};

struct moe_options {
  index_t d_model = 0;   // d: width of x and y
  index_t d_hidden = 0;  // h: width of act(...) (W1 has 2h rows for SwiGLU)
  int experts = 0;       // E
  activation act = activation::gelu;
  mixing mix = mixing::sparse;
  bool use_omega = false;  // multiply the output by the learned ω [d]
  // Capacity per expert = ceil(capacity_factor · T · k / E); 0 = dropless. Pairs are admitted in
  // (slot, token) order: every token's slot 0 before any slot 1, tokens in index order; pairs
  // past an expert's capacity are dropped (they contribute 0 and get no gradient).
  double capacity_factor = 0.0;
  routing_options routing;  // k, train/eval, jitter ε, renormalise, α (load balance), β (z-loss)
};

/// Rows of W1 per expert: h, or 2h for SwiGLU.
constexpr index_t w1_rows(const moe_options& opt) {
  return opt.act == activation::swiglu ? 2 * opt.d_hidden : opt.d_hidden;
}

/// Slots an expert accepts for a batch of `tokens`; `tokens · k` (no limit) when dropless.
inline index_t expert_capacity(const moe_options& opt, index_t tokens) {
  const index_t pairs = tokens * opt.routing.k;
  if (opt.capacity_factor <= 0.0 || opt.experts <= 0) return pairs;
  const double c = std::ceil(opt.capacity_factor * static_cast<double>(pairs) / opt.experts);
  return c >= static_cast<double>(pairs) ? pairs : static_cast<index_t>(c);
}

/// The layer's parameters (read only). Every view is required, except ω when !use_omega.
template <class T, memory_space S>
struct moe_params {
  strided_view<const T, 2, S> router_weight;  // W_r [E, d]
  strided_view<const T, 1, S> router_bias;    // b_r [E]
  strided_view<const T, 3, S> w1;             // [E, w1_rows, d]
  strided_view<const T, 2, S> b1;             // [E, w1_rows]
  strided_view<const T, 3, S> w2;             // [E, d, h]
  strided_view<const T, 2, S> b2;             // [E, d]
  strided_view<const T, 1, S> omega;          // ω [d] (only with use_omega)
};

/// Where the backward writes the parameter gradients (same shapes as moe_params).
template <class T, memory_space S>
struct moe_grads {
  strided_view<T, 2, S> router_weight;
  strided_view<T, 1, S> router_bias;
  strided_view<T, 3, S> w1;
  strided_view<T, 2, S> b1;
  strided_view<T, 3, S> w2;
  strided_view<T, 2, S> b2;
  strided_view<T, 1, S> omega;
};

/// Optional outputs of the forward (null pointers are skipped), in the layer's memory space.
template <memory_space S>
struct moe_stats {
  std::int64_t* expert_counts = nullptr;   // [E]: routed (token, slot) pairs, before capacity
  std::int64_t* kept_counts = nullptr;     // [E]: pairs each expert computed (after capacity)
  std::int64_t* dropped_pairs = nullptr;   // pairs dropped by capacity
  double* load_balance_loss = nullptr;     // α·E·Σ_e f_e·P_e
  double* z_loss = nullptr;                // β·mean_t logsumexp(z_t)²
  std::int64_t* nonfinite_rows = nullptr;  // rows of z the router could not route (SPEC §7)
};

template <class T>
using host_moe_params = moe_params<T, memory_space::host>;
template <class T>
using host_moe_grads = moe_grads<T, memory_space::host>;
using host_moe_stats = moe_stats<memory_space::host>;

}  // namespace routegrad
