// The estimator policy types (SPEC §4). Each names how a slot's expert is chosen and how the gate
// gradient flows back; the per-token rules in token_forward.hpp / token_backward.hpp read these
// traits at compile time, so an estimator is a type, never a run-time switch inside a kernel.
//
// Traits:
//   sampled           training draws D from the slot's (masked) softmax; else D is the argmax
//   jitter_mask       the slot's candidates pass SparseMixer's jitter mask (SPEC §2)
//   per_slot_softmax  π is recomputed over the experts left for each slot (sampling without
//                     replacement); otherwise one softmax over all experts serves every slot
//   noisy             training multiplies the logits by U(1−ε, 1+ε) noise (Switch)
//   weight            backward weight w
//   rule              the quadrature rule that draws the forward scale (sampled estimators)
#pragma once

#include "quadrature_rules.hpp"

namespace routegrad {

/// Switch Transformer router: argmax (top-k) of the softmax of jittered logits; exact chain rule.
struct switch_router {
  static constexpr bool sampled = false;
  static constexpr bool jitter_mask = false;
  static constexpr bool per_slot_softmax = false;
  static constexpr bool noisy = true;
  static constexpr double weight = 1.0;
  using rule = euler;  // unused: no coin
  static constexpr const char* name = "switch";
};

/// The common top-k softmax router: top-k of softmax(z) over all experts; exact chain rule.
struct topk_softmax {
  static constexpr bool sampled = false;
  static constexpr bool jitter_mask = false;
  static constexpr bool per_slot_softmax = false;
  static constexpr bool noisy = false;
  static constexpr double weight = 1.0;
  using rule = euler;  // unused: no coin
  static constexpr const char* name = "topk_softmax";
};

/// SparseMixer with quadrature rule `Rule` (euler, midpoint, heun3, or a user's own).
template <class Rule>
struct sparsemixer {
  static constexpr bool sampled = true;
  static constexpr bool jitter_mask = true;
  static constexpr bool per_slot_softmax = true;
  static constexpr bool noisy = false;
  static constexpr double weight = Rule::weight;
  using rule = Rule;
  static constexpr const char* name = "sparsemixer";
};

using sparsemixer_euler = sparsemixer<euler>;
using sparsemixer_midpoint = sparsemixer<midpoint>;
using sparsemixer_heun3 = sparsemixer<heun3>;

template <class Estimator>
inline constexpr bool has_coin = Estimator::sampled&& Estimator::rule::num_nodes > 0;

}  // namespace routegrad
