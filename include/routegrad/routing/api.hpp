// The public routing entry points for host memory. A back end for another memory space adds
// overloads of the same names taking its own view type (device_view for CUDA).
//
//   route_forward<Estimator>(options, logits [T,E], state, gates [T,k], stats = {}, exec = {})
//   route_backward<Estimator>(options, logits [T,E], state, grad_gates [T,k],
//                             grad_logits [T,E], grad_mode, stats = {}, exec = {})
//
// Both validate every argument before touching memory and return a status (docs/api.md).
#pragma once

#include "../cpu/routing.hpp"

namespace routegrad {

/// Routes a batch: writes state.experts, state.coins (when given) and gates; never modifies the
/// logits. `stats` pointers that are non-null receive the per-expert counts, the auxiliary
/// losses and the count of rows that could not be routed fully.
template <class Est, class TL, class G>
status route_forward(const routing_options& opt, host_view<TL, 2> logits,
                     const host_routing_state& state, host_view<G, 2> gates,
                     const host_routing_stats& stats = {}, const cpu::execution& exec = {}) {
  return cpu::run_forward<Est>(opt, logits, state, gates, stats, exec);
}

/// Turns the gate gradients into logit gradients (overwrite or accumulate), adding the
/// load-balancing and z-loss gradients when their coefficients are non-zero.
template <class Est, class TL, class GG, class GL>
status route_backward(const routing_options& opt, host_view<TL, 2> logits,
                      const host_routing_state& state, host_view<GG, 2> grad_gates,
                      host_view<GL, 2> grad_logits, grad_mode mode = grad_mode::overwrite,
                      const host_routing_stats& stats = {}, const cpu::execution& exec = {}) {
  return cpu::run_backward<Est>(opt, logits, state, grad_gates, grad_logits, mode, stats, exec);
}

}  // namespace routegrad
