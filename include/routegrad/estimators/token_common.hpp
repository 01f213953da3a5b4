// Pieces the per-token forward and backward share: parameters, the slot's candidate set and its
// softmax, the coin, and the Switch jitter noise.
#pragma once

#include "../core/philox.hpp"
#include "estimators.hpp"
#include "row_math.hpp"

namespace routegrad {

/// Per-call values the per-token rules need, in the math type M.
template <class M>
struct token_params {
  int k;
  bool train;
  M jitter_eps;  // the mask ε (SparseMixer) or the noise ε (Switch)
  bool renormalize;
};

/// π_i = exp(logit(i) − max) / norm over a slot's candidate set.
template <class M>
struct slot_softmax {
  M max;
  M norm;
};

/// Whether expert i was taken by a slot before `slot` (reads Slots::expert).
template <class Slots>
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE bool taken_before(const Slots& slots, int slot, int i) {
  for (int l = 0; l < slot; ++l)
    if (static_cast<int>(slots.expert(l)) == i) return true;
  return false;
}

/// The lowest expert no earlier slot took: where a slot with no candidate goes (SPEC §7).
template <class Slots>
ROUTEGRAD_HD int lowest_free_expert(const Slots& slots, int slot) {
  int i = 0;
  while (taken_before(slots, slot, i)) ++i;
  return i;
}

/// The experts slots before `slot` took, as a test of element i. On rows of at most 32 steps
/// per lane it is one bit test (bit s of `bits`: this lane's element of step s, i = s·L + lane),
/// set up once per slot instead of comparing every element with every earlier slot's expert.
template <class Lanes, class Slots>
struct taken_experts {
  const Slots& slots;
  int slot;
  int lane;
  bool use_bits;
  unsigned bits = 0;

  ROUTEGRAD_HD taken_experts(const Lanes& lanes, const Slots& s, int j, int n)
      : slots(s), slot(j), lane(lanes.lane()), use_bits(lanes.steps(n) <= 32) {
    constexpr unsigned L = static_cast<unsigned>(Lanes::count());
    if (use_bits)
      for (int l = 0; l < j; ++l) {
        const unsigned e = static_cast<unsigned>(slots.expert(l));
        if (e % L == static_cast<unsigned>(lanes.lane())) bits |= 1u << (e / L);
      }
  }
  /// Whether an earlier slot took expert i, for any i (every lane gives the same answer).
  ROUTEGRAD_HD bool any_lane(int i) const { return taken_before(slots, slot, i); }
  /// Only for elements i this lane owns (as each(n, f) passes them).
  ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE bool operator()(int i) const {
    constexpr unsigned L = static_cast<unsigned>(Lanes::count());
    if (use_bits) return ((bits >> (static_cast<unsigned>(i - lane) / L)) & 1u) != 0u;
    return taken_before(slots, slot, i);
  }
  /// Removes the taken experts from a set of this lane's elements (positive_elements) that a
  /// pass marked without testing each element: a few operations per earlier slot instead of a
  /// bit test per element (H200, E = 128, heun3 top-2: slot 2's marking pass ran 7.4 instructions
  /// per element against slot 1's 4.5).
  template <class Set>
  ROUTEGRAD_HD void drop_from(Set& set) const {
    if constexpr (Set::indexed) {
      for (int l = 0; l < slot; ++l) {
        const unsigned e = static_cast<unsigned>(slots.expert(l));
        for (int q = 0; q < Set::words; ++q)  // (a run-time word index would spill)
          if (e / 32u == static_cast<unsigned>(q)) set.word[q] &= ~(1u << (e % 32u));
      }
    } else if (use_bits) {  // (bit s: this lane's element of step s, as in the set)
      set.word[0] &= ~bits;
    }  // (otherwise the row has more than 32 steps per lane, and no set is kept)
  }
};

/// Slot 0's taken-expert test: nothing is taken yet.
struct nothing_taken {
  ROUTEGRAD_HD bool operator()(int) const { return false; }
  ROUTEGRAD_HD bool any_lane(int) const { return false; }
  template <class Set>
  ROUTEGRAD_HD void drop_from(Set&) const {}
};

/// Returns f(taken) with slot j's taken-expert test: nothing_taken for slot 0 (at k = 1 every
/// token's only slot), so that its per-element loops carry no taken check; taken_experts after.
template <class Lanes, class Slots, class F>
ROUTEGRAD_HD auto with_taken(const Lanes& lanes, const Slots& slots, int j, int n, F&& f) {
  if (j == 0) return f(nothing_taken{});
  return f(taken_experts<Lanes, Slots>(lanes, slots, j, n));
}

/// The candidate set S_j of slot j (SPEC §1–2): finite logits, not taken by earlier slots, and,
/// for SparseMixer, not removed by the jitter mask relative to `slot_max` (the slot's max).
/// Estimators without a per-slot softmax normalise over every finite logit instead.
template <class Est, class M, class Row, class Taken>
struct slot_candidates {
  /// A few experts of the row (SparseMixer's jitter mask): candidate_weights computes exp for the
  /// candidates alone and keeps their set.
  static constexpr bool sparse = Est::per_slot_softmax && Est::jitter_mask;
  const Row& row;
  const Taken& taken;
  jitter_mask_test<M> masked;

  ROUTEGRAD_HD slot_candidates(const Row& r, const Taken& t, M slot_max, M two_eps)
      : row(r), taken(t), masked(slot_max, two_eps) {}

  /// For an element this lane owns (as each(n, f) passes them), with its logit z.
  ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE bool operator()(int i, M z) const {
    if constexpr (Est::per_slot_softmax) {
      if constexpr (Est::jitter_mask) return !taken(i) & !masked(z);  // bitwise: no branch
      return !taken(i);
    }
    return true;
  }
  /// operator()'s answer by comparisons alone (candidate_weights): sets `unsure` for an element
  /// the jitter mask's quick test cannot decide.
  ROUTEGRAD_HD bool has_quick() const {
    if constexpr (Est::per_slot_softmax && Est::jitter_mask) return masked.has_quick();
    return true;
  }
  ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE bool quick(int i, M z, bool& unsure) const {
    if constexpr (Est::per_slot_softmax) {
      if constexpr (Est::jitter_mask) return !taken(i) & !masked.quick(z, unsure);
      return !taken(i);
    }
    return true;
  }
  /// For the sparse form (candidate_weights): every candidate and every element quick() cannot
  /// decide, by one comparison, taken experts included (drop_taken removes them from the marked
  /// set); then surely_kept(z) of those tells which quick() decides.
  ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE bool maybe_kept(M z) const {
    static_assert(sparse, "the sparse form's test");
    return masked.maybe_kept(z);
  }
  template <class Set>
  ROUTEGRAD_HD void drop_taken(Set& set) const {
    taken.drop_from(set);
  }
  ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE bool surely_kept(M z) const {
    static_assert(sparse, "the sparse form's test");
    return masked.surely_kept(z);
  }
  /// For any element, the same answer on every lane.
  ROUTEGRAD_HD bool contains(int i) const {
    if constexpr (Est::per_slot_softmax) {
      if (taken.any_lane(i)) return false;
      if constexpr (Est::jitter_mask) return !masked(row.logit(i));
    }
    return true;
  }
};

/// Experts not yet taken (for the slot's argmax).
template <class Taken>
struct not_taken {
  const Taken& taken;
  template <class M>
  ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE bool operator()(int i, M) const {
    return !taken(i);
  }
};

struct any_expert {
  static constexpr bool sparse = false;
  template <class M>
  ROUTEGRAD_HD bool operator()(int, M) const {
    return true;
  }
  ROUTEGRAD_HD bool has_quick() const { return true; }
  template <class M>
  ROUTEGRAD_HD bool quick(int, M, bool&) const {
    return true;
  }
};

/// The coin of a quadrature rule: 0 → c = 1, n ≥ 1 → node n−1, from a uniform u in (0, 1).
template <class Rule, class M>
ROUTEGRAD_HD int draw_coin(M u) {
  M acc = M(0);
  for (int n = 0; n < Rule::num_nodes; ++n) {
    acc += static_cast<M>(Rule::probability(n));
    if (u < acc) return n + 1;
  }
  return 0;
}

/// The forward scale c of a coin outcome.
template <class Rule, class M>
ROUTEGRAD_HD M coin_scale(int coin) {
  return coin == 0 ? M(1) : static_cast<M>(Rule::scale(coin - 1));
}

/// Switch jitter from one Philox word: 1 + ε(2u − 1).
template <class M>
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE M switch_noise_from_word(std::uint32_t word, M eps) {
  const M u = static_cast<M>(uniform_open01(word));
  return M(1) + eps * (M(2) * u - M(1));
}

/// The Philox block holding the jitter of experts 4g .. 4g+3 of row t.
ROUTEGRAD_HD inline philox4x32 switch_noise_block(const rng_stream& rng, index_t t, index_t g) {
  return rng.block(static_cast<std::uint64_t>(t), rng_purpose::switch_noise,
                   static_cast<std::uint32_t>(g));
}

/// Switch jitter: the factor multiplying logit e of row t.
template <class M>
ROUTEGRAD_HD M switch_noise(const rng_stream& rng, index_t t, int e, M eps) {
  return switch_noise_from_word(switch_noise_block(rng, t, e >> 2).v[e & 3], eps);
}

}  // namespace routegrad
