// The backward rule of every estimator for one token (SPEC §4–5), written once for all back ends:
//   ∂L/∂z_i = chain(i) · Σ_j w · G_j · J_{D_j}(i)   (+ the auxiliary-loss terms)
// with J_D(i) = π_D (δ_iD − π_i) over slot j's candidate set, the softmax recomputed from the
// logits. With renormalised gates, G_j first goes through the renormalisation's exact backward.
//
// Slots accessor: expert(j), coin(j), grad_gate(j). Grad accessor: set(i, v), add(i, v) and
// scale(i, f) on the lane's own elements; token_backward sets every element before it adds to or
// scales any (so the back end need not clear the row first) and the back end stores it after.
#pragma once

#include <type_traits>

#include "token_common.hpp"

namespace routegrad {

/// The auxiliary-loss terms of SPEC §5 for one token: α·E/T·p_i(f_i − Σ_e f_e p_e) and
/// (2β/T)·lse·p_i over the unmasked softmax p of the caller's logits. `fraction(e)` is f_e.
template <class M, class Fraction>
struct aux_gradient {
  M load_balance_scale;  // α·E/T (0: off)
  M z_loss_scale;        // 2β/T (0: off)
  Fraction fraction;
};

/// Max and normaliser of the unmasked softmax of the caller's logits (assumes a routable row).
template <class Est, class M, class Lanes, class Row>
ROUTEGRAD_HD slot_softmax<M> clean_softmax(const Lanes& lanes, const Row& row, M routed_max) {
  M m = routed_max;
  if constexpr (Est::noisy) {
    m = -math::infinity<M>();  // (a routable row's clean logits hold no NaN)
    lanes.each(row.size(), [&](int i) { m = math::max_of_numbers(m, row.clean(i)); });
    m = lanes.max(m);
  }
  return {m, sum_exp_clean(lanes, row, m)};
}

/// Slot j's softmax and its π_D, recomputed from the logits exactly as the forward computed them.
template <class M>
struct slot_view {
  slot_softmax<M> sm;
  M pi_chosen;  // π_{D_j}, 0 when D_j is not a candidate of slot j
};

/// For per-slot softmaxes it also refills `weights` with slot j's candidate weights (unless it is
/// nullptr: see token_backward) and `live` with their positive elements (when candidate_weights
/// keeps them).
template <class Est, class M, class Lanes, class Row, class Slots, class Weights>
ROUTEGRAD_HD slot_view<M> recompute_slot(const Lanes& lanes, const Row& row, const Slots& slots,
                                         slot_softmax<M> shared, M row_max, M two_eps, int j,
                                         Weights weights, positive_elements<Lanes>* live) {
  const int d = static_cast<int>(slots.expert(j));
  if constexpr (Est::per_slot_softmax) {
    return with_taken(lanes, slots, j, row.size(), [&](const auto& taken) -> slot_view<M> {
      using Taken = std::decay_t<decltype(taken)>;
      const M top = j == 0 ? row_max : max_value_where<M>(lanes, row, not_taken<Taken>{taken});
      if (!(top > -math::infinity<M>())) return {shared, M(0)};  // no finite logit left
      const slot_candidates<Est, M, Row, Taken> candidate{row, taken, top, two_eps};
      const slot_softmax<M> sm{top, candidate_weights(lanes, row, top, candidate, weights, live)};
      if (!candidate.contains(d)) return {sm, M(0)};
      return {sm, math::exp(row.logit(d) - sm.max) / sm.norm};
    });
  } else {
    return {shared, math::exp(row.logit(d) - shared.max) / shared.norm};
  }
}

/// Writes token t's logit gradient into `grad` (every element) and returns true; returns false,
/// having written nothing, for a row the forward could not route (SPEC §7: its gradient is 0).
/// `weights` is E elements of scratch (lane-owned), or `nullptr` (std::nullptr_t) where
/// candidate_weights surely takes its sparse form: the Jacobian then recomputes the few weights it
/// reads, as candidate_weights computed them (bitwise the same).
template <class Est, class M, class Lanes, class Row, class Slots, class Grad, class Fraction,
          class Weights>
ROUTEGRAD_HD bool token_backward(const Lanes& lanes, const Row& row, const Slots& slots, Grad& grad,
                                 Weights weights, const token_params<M>& p,
                                 const aux_gradient<M, Fraction>& aux) {
  constexpr bool stored = !std::is_null_pointer_v<Weights>;
  const row_peak<M> peak = peak_of_row<M>(lanes, row);  // the backward needs no argmax
  if (!peak.routable) return false;
  const M two_eps = M(2) * p.jitter_eps;
  slot_softmax<M> shared{peak.max, M(1)};
  if constexpr (!Est::per_slot_softmax) {
    static_assert(stored, "the dense form's weights need a row");
    shared.norm = candidate_weights(lanes, row, peak.max, any_expert{}, weights);
  }
  using view_t = slot_view<M>;
  // Where candidate_weights takes its sparse form (SparseMixer's slots on long rows), the weights
  // of the positive candidates alone are written and the Jacobian below visits them alone (the
  // other elements' gradient is 0); otherwise every element is visited.
  const bool sparse =
      sparse_weights<slot_candidates<Est, M, Row, nothing_taken>>(lanes, row.size());
  // Slot j's positive candidates, asked for only where sparse: recording the set elsewhere costs
  // the dense backward (H200, 131072 × 16: 20.9 → 22.8 µs).
  positive_elements<Lanes> live;

  // Renormalised gates g̃_j = g_j / s: G_j = (G̃_j − Σ_l G̃_l g̃_l) / s.
  M renorm_shift = M(0), renorm_inv = M(1);
  if (p.renormalize) {
    M s = M(0), q = M(0);
    for (int j = 0; j < p.k; ++j) {
      const view_t v = recompute_slot<Est, M, Lanes, Row, Slots>(
          lanes, row, slots, shared, peak.max, two_eps, j, weights, nullptr);
      const M g = coin_scale<typename Est::rule, M>(slots.coin(j)) * v.pi_chosen;
      s += g;
      q += static_cast<M>(slots.grad_gate(j)) * g;
    }
    if (s > M(0)) {
      renorm_inv = M(1) / s;
      renorm_shift = q / s;
    } else {
      renorm_inv = M(0);  // every gate was 0: so is the gates' gradient
    }
  }

  const M weight = static_cast<M>(Est::weight);
  bool written = false;  // the first contribution sets the row, the later ones add to it
  for (int j = 0; j < p.k; ++j) {
    const view_t v = recompute_slot<Est, M, Lanes, Row, Slots>(
        lanes, row, slots, shared, peak.max, two_eps, j, weights, sparse ? &live : nullptr);
    if (!(v.pi_chosen > M(0)) || renorm_inv == M(0)) continue;
    M g = static_cast<M>(slots.grad_gate(j));
    if (p.renormalize) g = (g - renorm_shift) * renorm_inv;
    const M coef = weight * g * v.pi_chosen;
    const int d = static_cast<int>(slots.expert(j));
    const M coef_over_norm = coef / v.sm.norm;  // J_D(i) = π_D (δ_iD − w_i / norm)
    const auto jacobian = [&](int i) {
      if constexpr (stored)
        return (i == d ? coef : M(0)) - coef_over_norm * weights[i];
      else  // (sparse: i is a candidate)
        return (i == d ? coef : M(0)) - coef_over_norm * math::exp_fast(row.logit(i) - v.sm.max);
    };
    if (sparse) {
      if (!written) lanes.each_light(row.size(), [&](int i) { grad.set(i, M(0)); });
      bool saw_chosen = false;
      live.each_own(lanes, [&](int i, int, int) {
        grad.add(i, jacobian(i));
        saw_chosen |= i == d;
      });
      // π_D > 0 with an underflowed exp_fast weight (a subnormal π_D): the dense form's δ term.
      if (!saw_chosen && d % lanes.count() == lanes.lane()) grad.add(d, coef);
    } else if constexpr (stored) {  // (without a row of weights, the caller promised `sparse`)
      if (written)
        lanes.each(row.size(), [&](int i) { grad.add(i, jacobian(i)); });
      else
        lanes.each(row.size(), [&](int i) { grad.set(i, jacobian(i)); });
    }
    written = true;
  }
  if (!written) lanes.each_light(row.size(), [&](int i) { grad.set(i, M(0)); });
  if constexpr (Est::noisy) lanes.each(row.size(), [&](int i) { grad.scale(i, row.chain(i)); });

  if (aux.load_balance_scale != M(0) || aux.z_loss_scale != M(0)) {
    const slot_softmax<M> c = clean_softmax<Est, M>(lanes, row, peak.max);
    M fp = M(0);
    if (aux.load_balance_scale != M(0)) {
      lanes.each(row.size(),
                 [&](int i) { fp += aux.fraction(i) * math::exp_fast(row.clean(i) - c.max); });
      fp = lanes.sum(fp) / c.norm;
    }
    const M lse = c.max + math::log(c.norm);
    const M inv_norm = M(1) / c.norm;
    lanes.each(row.size(), [&](int i) {
      const M pi = math::exp_fast(row.clean(i) - c.max) * inv_norm;
      grad.add(i,
               aux.load_balance_scale * pi * (aux.fraction(i) - fp) + aux.z_loss_scale * lse * pi);
    });
  }
  return true;
}

}  // namespace routegrad
