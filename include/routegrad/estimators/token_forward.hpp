// The forward rule of every estimator for one token (SPEC §3–4), written once for all back ends.
//
// Slots accessor (provided by the back end), called with the same arguments on every lane:
//   expert(j)                       the expert recorded for slot j (j below the current slot)
//   record(j, expert, gate, coin)   store slot j's choice
//   gate(j), set_gate(j, g)         read back / replace a gate (renormalisation)
// `weights` is E elements of scratch (per lane, only its own elements are used), or `nullptr`
// (std::nullptr_t) where candidate_weights surely takes its sparse form (the draw then recomputes
// the weights it reads).
#pragma once

#include <type_traits>

#include "token_common.hpp"

namespace routegrad {

/// What happened to a token. An unroutable row (a NaN or +inf logit, or no finite logit) goes to
/// experts 0..k−1 with gate 0; a routable row with fewer than k finite logits is incomplete: its
/// slots with no finite candidate go to the lowest free expert with gate 0 (SPEC §7).
struct token_outcome {
  bool routable;
  bool complete;
};

/// Routes token `t`.
template <class Est, class M, class Lanes, class Row, class Slots, class Weights>
ROUTEGRAD_HD token_outcome token_forward(const Lanes& lanes, const Row& row, Slots& slots,
                                         Weights weights, const token_params<M>& p,
                                         const rng_stream& rng, index_t t) {
  static_assert(!Est::sampled || Est::per_slot_softmax, "sampling draws from per-slot weights");
  // Where candidate_weights takes its sparse form, the row pass finds the max alone (one
  // instruction per element on the GPU) and each slot's argmax comes from its candidates, of
  // which it is always one; elsewhere summarize_row and max_where find both.
  const bool sparse =
      sparse_weights<slot_candidates<Est, M, Row, nothing_taken>>(lanes, row.size());
  row_summary<M> summary;
  if (sparse) {
    const row_peak<M> peak = peak_of_row<M>(lanes, row);
    summary = {peak.routable, {peak.max, -1}};  // the index: slot 0's candidate_weights
  } else {
    summary = summarize_row<M>(lanes, row);
  }
  if (!summary.routable) {
    for (int j = 0; j < p.k; ++j) slots.record(j, j, M(0), 0);
    return {false, false};
  }
  const M two_eps = M(2) * p.jitter_eps;
  slot_softmax<M> shared{summary.top.value, M(1)};
  if constexpr (!Est::per_slot_softmax)
    shared.norm = sum_exp_where(lanes, row, summary.top.value, any_expert{});

  bool complete = true;
  // Routes slot j with its taken-expert test; returns the gate.
  const auto route_slot = [&](int j, const auto& taken) -> M {
    using Taken = std::decay_t<decltype(taken)>;
    row_extreme<M> top = summary.top;
    if (j > 0)
      top = sparse ? row_extreme<M>{max_value_where<M>(lanes, row, not_taken<Taken>{taken}), -1}
                   : max_where<M>(lanes, row, not_taken<Taken>{taken});
    if (!(top.value > -math::infinity<M>())) {  // no finite logit left for this slot
      slots.record(j, lowest_free_expert(slots, j), M(0), 0);
      complete = false;
      return M(0);
    }
    const slot_candidates<Est, M, Row, Taken> candidate{row, taken, top.value, two_eps};
    slot_softmax<M> sm = shared;
    [[maybe_unused]] positive_elements<Lanes> live;  // the candidates (inverse-CDF draw)
    if constexpr (Est::per_slot_softmax)
      sm = {top.value, candidate_weights(lanes, row, top.value, candidate, weights, &live,
                                         sparse ? &top.index : nullptr)};

    int chosen = top.index;
    int coin = 0;
    if constexpr (Est::sampled) {
      if (p.train) {
        const philox4x32 b = rng.block(static_cast<std::uint64_t>(t), rng_purpose::slot,
                                       static_cast<std::uint32_t>(j));
        const M target = static_cast<M>(uniform_open01(b.v[0])) * sm.norm;
        // Weights the sparse form did not store (weights: nullptr) are recomputed as it computed
        // them: bitwise the same.
        const auto weight = [&](int e) -> M {
          if constexpr (std::is_null_pointer_v<Weights>)
            return math::exp_fast(row.logit(e) - sm.max);
          else
            return weights[e];
        };
        chosen = inverse_cdf(lanes, weight, row.size(), target, live);
        if (chosen != top.index)
          coin = draw_coin<typename Est::rule>(static_cast<M>(uniform_open01(b.v[1])));
      }
    }
    const M gate =
        coin_scale<typename Est::rule, M>(coin) * math::exp(row.logit(chosen) - sm.max) / sm.norm;
    slots.record(j, chosen, gate, coin);
    return gate;
  };
  M gate_sum = M(0);
  for (int j = 0; j < p.k; ++j)
    gate_sum += with_taken(lanes, slots, j, row.size(),
                           [&](const auto& taken) { return route_slot(j, taken); });
  if (p.renormalize && gate_sum > M(0))
    for (int j = 0; j < p.k; ++j) slots.set_gate(j, slots.gate(j) / gate_sum);
  return {true, complete};
}

}  // namespace routegrad
