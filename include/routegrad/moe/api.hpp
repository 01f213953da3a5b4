// The public entry points of the reference MoE layer for host memory (SPEC §6). A back end for
// another memory space adds overloads of the same names taking its own views and parameter sets
// (cuda/moe_layer.cuh). What the layer computes, the layouts and the capacity order:
// moe/options.hpp; the context and the rest: docs/api.md ("MoE layer").
//
//   moe_forward<Estimator>(options, params, x [T,d], y [T,d], rng, context, stats = {}, exec = {})
//   moe_backward<Estimator>(options, params, x [T,d], dy [T,d], context, grads, dx [T,d],
//                           grad_mode = overwrite, exec = {})
//
// The context is caller-owned bytes of cpu::moe_context_bytes<T>(options, T), aligned to 256
// bytes (or a cpu::moe_context<T>); the forward writes it, the backward reads it. Both validate
// every argument before touching memory and return a status.
#pragma once

#include "../cpu/moe_layer.hpp"

namespace routegrad {

/// Runs the layer: writes y and the context (and the stats that are non-null). The routing
/// draws its random numbers from `rng` (routing_state's counter layout).
template <class Est, class T>
status moe_forward(const moe_options& opt, const host_moe_params<T>& params,
                   type_identity_t<host_view<const T, 2>> x, type_identity_t<host_view<T, 2>> y,
                   const rng_stream& rng, host_view<std::byte> context,
                   const host_moe_stats& stats = {}, const cpu::execution& exec = {}) {
  return cpu::run_moe_forward<Est, T>(opt, params, x, y, rng, context, stats, exec);
}

/// Gradients of L = Σ dy·y + (the load-balancing and z-loss values the forward reported) with
/// respect to x (dx) and every parameter (grads; ω only with use_omega), overwritten or
/// accumulated. `context` must come from moe_forward with the same options, x and estimator.
template <class Est, class T>
status moe_backward(const moe_options& opt, const host_moe_params<T>& params,
                    type_identity_t<host_view<const T, 2>> x,
                    type_identity_t<host_view<const T, 2>> dy, host_view<const std::byte> context,
                    const host_moe_grads<T>& grads, type_identity_t<host_view<T, 2>> dx,
                    grad_mode mode = grad_mode::overwrite, const cpu::execution& exec = {}) {
  return cpu::run_moe_backward<Est, T>(opt, params, x, dy, context, grads, dx, mode, exec);
}

}  // namespace routegrad
