// Row-level building blocks shared by every estimator: validity check, masked max, softmax
// normaliser, inverse-CDF sampling and the jitter mask. Written against the lanes policy
// (lanes.hpp), so the CPU and CUDA back ends run the same code.
//
// A Row accessor provides: size(); logit(i) (the logit the estimator routes on: jittered for
// Switch in training); clean(i) (the caller's logit, for the auxiliary losses); chain(i) (the
// factor ∂logit(i)/∂clean(i): the jitter noise, or 1).
#pragma once

#include <type_traits>

#include "../core/math.hpp"
#include "lanes.hpp"
#include "staged_row.hpp"

namespace routegrad {

/// SPEC §2: expert i is removed when (m − z_i) / max(|z_i|, m) > 2ε; a zero denominator keeps it.
template <class M>
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE bool jitter_masked(M z, M m, M two_eps) {
  const M den = math::max(math::abs(z), m);
  if (den == M(0)) return false;
  return (m - z) / den > two_eps;
}

/// jitter_masked for one slot max m (z ≤ m), decided for almost every z by one comparison.
/// For 0 < 2ε < ½ the mask removes exactly the z below a threshold τ (m·(1 − 2ε) when m > 0,
/// m / (1 − 2ε) when m ≤ 0; z < −m is always removed when m > 0), up to the rounding of the
/// quotient. z below τ − δ is removed and z above τ + δ kept, with δ = 2^-16·max(|m|, |τ|): there
/// the quotient differs from 2ε by more than 2^-18, far beyond its few ulps of rounding error, so
/// the answer is jitter_masked's. Only z within δ of τ (and every z for other ε) take the division.
/// τ itself needs only a few correct bits: it is computed to a few ulps (2^-21 relative, the GPU's
/// fast division), which moves the two bounds by far less than δ.
template <class M>
struct jitter_mask_test {
  M m, two_eps;
  M masked_below = -math::infinity<M>();
  M kept_above = math::infinity<M>();

  ROUTEGRAD_HD jitter_mask_test(M slot_max, M eps2) : m(slot_max), two_eps(eps2) {
    if (two_eps > M(0) && two_eps < M(0.5)) {
      const M tau = m > M(0) ? m * (M(1) - two_eps) : math::divide_approx(m, M(1) - two_eps);
      const M delta = M(0x1p-16) * math::max(math::abs(m), math::abs(tau));
      masked_below = tau - delta;
      kept_above = tau + delta;
    }
  }
  /// Whether quick() can decide any z at all (no: ε outside (0, ½), where every z is unsure).
  ROUTEGRAD_HD bool has_quick() const { return masked_below > -math::infinity<M>(); }
  /// The mask by the comparisons alone, branch-free: jitter_masked's answer for z outside τ ± δ;
  /// for z inside it sets `unsure` (the caller then asks operator()).
  ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE bool quick(M z, bool& unsure) const {
    const bool below = z < masked_below;
    unsure |= !(below | (z > kept_above));
    return below & (z > -math::infinity<M>());  // as jitter_masked: −inf kept
  }
  /// z is kept, or quick() cannot decide it (z at or above τ − δ; −inf never, though the mask
  /// keeps it: its weight is 0). One comparison: candidate_weights' sparse form marks these, then
  /// asks surely_kept() of the few it marked.
  ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE bool maybe_kept(M z) const { return z >= masked_below; }
  /// For a z with maybe_kept(z): quick() decides it (z above τ + δ, kept).
  ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE bool surely_kept(M z) const { return z > kept_above; }
  ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE bool operator()(M z) const {
    bool unsure = false;
    const bool masked = quick(z, unsure);
    return unsure ? jitter_masked(z, m, two_eps) : masked;
  }
};

/// Whether the row can be routed, and its largest logit. A row with a NaN or +inf logit, or with
/// no finite logit, cannot (SPEC §7: it is routed to the lowest experts with gate 0).
template <class M>
struct row_summary {
  bool routable;
  row_extreme<M> top;  // max of logit(i) over finite entries
};

template <class M, class Lanes, class Row>
ROUTEGRAD_HD row_summary<M> summarize_row(const Lanes& lanes, const Row& row) {
  const M inf = math::infinity<M>();
  bool bad = false;
  row_extreme<M> top{-inf, -1};
  const M largest = math::largest_finite<M>();
  lanes.each(row.size(), [&](int i) {  // branch-free: it runs once per element
    const M c = row.clean(i);
    const M z = row.logit(i);  // Switch's jitter can overflow a huge finite logit to +inf
    bad |= !(c <= largest) | !(z <= largest);  // NaN or +inf: the values not ≤ the largest
    keep_larger(top, z, i);
  });
  bad = lanes.any(bad);
  top = lanes.argmax(top);
  return {!bad && top.index >= 0, top};
}

/// The row's largest logit and whether it can be routed (summarize_row's `routable`), without
/// the argmax, which the backward and the GPU's sparse form do not need. From the GPU's staged
/// rows without jitter (row_brings_staged_max) it costs no pass over the row: staging kept each
/// lane's NaN-propagating max, and that max is finite exactly when the row is routable (a NaN or
/// +inf logit makes it NaN or +inf; no finite logit leaves it −inf). Other rows: summarize_row.
template <class M>
struct row_peak {
  bool routable;
  M max;  // max of logit(i); meaningful when routable
};

template <class M, class Lanes, class Row>
ROUTEGRAD_HD row_peak<M> peak_of_row(const Lanes& lanes, const Row& row) {
  const M inf = math::infinity<M>();
  if constexpr (row_brings_staged_max<Row>::value) {
    const M top = lanes.max(row.staged_max);  // logit = clean: the max its staging found
    return {-inf < top && top <= math::largest_finite<M>(), top};
  } else {  // a pass over the row (on the CPU: as cheap as any, its max is one compare per element)
    const row_summary<M> summary = summarize_row<M>(lanes, row);
    return {summary.routable, summary.top.value};
  }
}

/// The largest logit(i) over entries with include(i, logit(i)), −inf when none, on a routable
/// row (no NaN): max_where without the argmax.
template <class M, class Lanes, class Row, class Include>
ROUTEGRAD_HD M max_value_where(const Lanes& lanes, const Row& row, Include include) {
  const M inf = math::infinity<M>();
  M top = -inf;
  lanes.each(row.size(), [&](int i) {
    const M z = row.logit(i);
    top = math::max_of_numbers(top, include(i, z) ? z : -inf);
  });
  return lanes.max(top);
}

/// max / argmax of logit(i) over finite entries with include(i, logit(i)). (Predicates take the
/// logit the caller already loaded, so each element is read once per pass.)
template <class M, class Lanes, class Row, class Include>
ROUTEGRAD_HD row_extreme<M> max_where(const Lanes& lanes, const Row& row, Include include) {
  const M inf = math::infinity<M>();
  row_extreme<M> top{-inf, -1};
  lanes.each(row.size(), [&](int i) {
    const M z = row.logit(i);
    keep_larger(top, include(i, z) ? z : -inf, i);
  });
  return lanes.argmax(top);
}

/// Σ exp(logit(i) − m) over entries with include(i, logit(i)) (−inf entries add 0).
template <class M, class Lanes, class Row, class Include>
ROUTEGRAD_HD M sum_exp_where(const Lanes& lanes, const Row& row, M m, Include include) {
  M s = M(0);
  lanes.each(row.size(), [&](int i) {
    const M z = row.logit(i);
    if (include(i, z)) s += math::exp_fast(z - m);
  });
  return lanes.sum(s);
}

/// Σ exp(clean(i) − m) over all entries: the unmasked softmax normaliser of the caller's logits.
template <class M, class Lanes, class Row>
ROUTEGRAD_HD M sum_exp_clean(const Lanes& lanes, const Row& row, M m) {
  M s = M(0);
  lanes.each(row.size(), [&](int i) { s += math::exp_fast(row.clean(i) - m); });
  return lanes.sum(s);
}

/// The elements of a row with a positive candidate weight, as candidate_weights finds them for
/// inverse_cdf and the backward's Jacobian. A lanes policy whose rows are unrolled completely and
/// bounded by 256 elements (Lanes::index_words > 0) keeps them for the whole group in index order:
/// bit i % 32 of word i / 32 is element i, so the draw walks them with no step across lanes.
/// Otherwise bit s of word[0] is this lane's element of step s (elements s·L .. s·L + L − 1; rows
/// of at most 32 steps: longer rows are scanned whole).
template <class Lanes>
struct positive_elements {
  static constexpr int words = Lanes::index_words;
  static constexpr bool indexed = words > 0;
  unsigned word[indexed ? words : 1] = {};

  /// Calls f(i, q, b) for each element i of the set that this lane owns, in index order (which
  /// is its step order); i is bit b of word q.
  template <class F>
  ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE void each_own(const Lanes& lanes, F&& f) const {
    const unsigned L = static_cast<unsigned>(lanes.count());
    if constexpr (indexed) {
      // This lane's bits: those ≡ lane (mod L) (L divides 32).
      const unsigned own = (L >= 32u ? 1u : ~0u / ((1u << L) - 1u)) << lanes.lane();
      for (int q = 0; q < words; ++q)
        for (unsigned bits = word[q] & own; bits != 0; bits &= bits - 1) {
          const int b = math::lowest_bit(bits);
          f(32 * q + b, q, b);
        }
    } else {
      for (unsigned bits = word[0]; bits != 0; bits &= bits - 1) {
        const int b = math::lowest_bit(bits);
        f(lanes.lane() + b * static_cast<int>(L), 0, b);
      }
    }
  }
};

/// Whether candidate_weights keeps a row's set of positive weights (positive_elements) for a lanes
/// policy: with index words, or rows of at most 32 steps per lane.
template <class Lanes>
ROUTEGRAD_HD constexpr bool keeps_positive_elements(const Lanes&, int n) {
  return positive_elements<Lanes>::indexed || Lanes::steps(n) <= 32;
}

/// Rows of at least this many steps per lane take candidate_weights' sparse form. Measured on an
/// H200 (2026-11-30 09:57 UTC, T = 131072, SparseMixer midpoint, kernels launched directly): E =
/// 128 (16 and 32 steps) forward + backward 98 → 90 µs, E = 64 (16 steps) 57.8 → 55.2, heun3
/// top-2 E = 128 160 → 145; but E = 16's 4-step backward 17.9 → 19.9 µs and E = 32 (8 steps)
/// 1–2% slower: on short rows the walk over the set costs more than the exps it saves.
inline constexpr int sparse_weights_min_steps = 16;

/// Whether candidate_weights takes its sparse form for `Include` on rows of n elements: on lanes
/// that would compute exp for every element (the GPU's), never on the CPU, where exp_where skips
/// the masked ones already (and the extra branches cost SparseMixer's CPU backward 4–6%).
template <class Include, class Lanes>
ROUTEGRAD_HD constexpr bool sparse_weights(const Lanes& lanes, int n) {
  if constexpr (Include::sparse && Lanes::exp_for_every_element)
    return keeps_positive_elements(lanes, n) && Lanes::steps(n) >= sparse_weights_min_steps;
  else
    return false;
}

/// Writes w_i = exp(logit(i) − m) for the entries with include(i, logit(i)) into the lane-owned
/// elements of `weights` (lane l writes i ≡ l mod L), and returns Σ w. The passes that follow (the
/// inverse-CDF draw, the softmax Jacobian) read these instead of testing the mask and calling exp
/// again. With `live`, also records in *live which elements have a positive weight
/// (positive_elements), for inverse_cdf.
///
/// An Include with `sparse` (SparseMixer's jitter-masked slots: a few experts of the row), on the
/// GPU's lanes and rows whose set can be kept and that are long enough (sparse_weights), writes
/// the weights of its candidates alone — the others hold no meaning afterwards, only the set says
/// which are positive: one pass marks the candidates by comparisons, then each lane calls exp for
/// its own candidates only. Otherwise every element is written (0 where include is false). Both
/// forms add each lane's weights in step order and return the same sum (the dense form's extra
/// terms are +0).
///
/// The pass decides each element with include.quick(i, z, unsure) — comparisons only, no branch
/// (an element's division or any branch in the loop body would split the unrolled pass into one
/// basic block per element, serialising its shared-memory and exp latencies). A lane with an
/// element quick() could not decide (a logit within 2^-16 of the jitter-mask threshold: about
/// one row in a thousand) redoes its elements with the exact include(i, z), so the result is
/// always include's.
///
/// `weights` may be `nullptr` (the type std::nullptr_t, a compile-time choice) where the caller
/// knows the sparse form is taken: the weights are then not stored, and whoever needs one
/// recomputes it as exp_fast(logit(i) − m), bitwise the same value.
///
/// With `first_max`, the sparse form also finds the lowest index whose logit is m (the slot's
/// argmax when m is its max: always a candidate, so it is among the few it visits); the dense
/// form leaves *first_max as it was.
template <class M, class Lanes, class Row, class Include, class Weights>
ROUTEGRAD_HD M candidate_weights(const Lanes& lanes, const Row& row, M m, Include include,
                                 Weights weights, positive_elements<Lanes>* live = nullptr,
                                 int* first_max = nullptr) {
  constexpr bool stored = !std::is_null_pointer_v<Weights>;
  using found_t = positive_elements<Lanes>;
  M s = M(0);
  found_t found;
  const int n = row.size();
  const bool sparse = sparse_weights<Include>(lanes, n);
  const bool track = sparse || (live != nullptr && keeps_positive_elements(lanes, n));
  const unsigned L = static_cast<unsigned>(lanes.count());
  // Records element i (owned by this lane) when `in`. i − lane is step · L: a constant in unrolled
  // loops, so the word and the bit's offset are too (indexed: i's bit is (i − lane) % 32 + lane,
  // as L divides 32).
  const auto mark = [&](int i, bool in) {
    const unsigned at = static_cast<unsigned>(i - lanes.lane());
    if constexpr (found_t::indexed) {
      if (in) found.word[at / 32] |= 1u << (at % 32 + static_cast<unsigned>(lanes.lane()));
    } else {
      if (in) found.word[0] |= 1u << (at / L);
    }
  };
  bool unsure = !include.has_quick();
  if (sparse) {
    if constexpr (Include::sparse) {  // (sparse is false otherwise)
      // Weighs the marked elements; with `check`, also asks whether quick() decides each of them.
      int first = -1;  // this lane's first element holding m
      const auto weigh = [&](bool check) {
        s = M(0);
        first = -1;
        found.each_own(lanes, [&](int i, int q, int b) {
          const M z = row.logit(i);
          if (check) unsure |= !include.surely_kept(z);
          if (first_max != nullptr && first < 0 && z == m) first = i;
          const M w = math::exp_fast(z - m);
          if constexpr (stored) weights[i] = w;
          s += w;
          if (!(w > M(0))) found.word[q] &= ~(1u << b);  // exp underflowed: not positive
        });
      };
      // One comparison per element: the candidates and the few elements quick() cannot decide
      // (those are in the marked set, so asking the marked ones alone finds every unsure element).
      if (!unsure) {
        const auto maybe = [&](int i) { return include.maybe_kept(row.logit(i)); };
        if constexpr (found_t::indexed)
          lanes.each(n, [&](int i) { mark(i, maybe(i)); });  // (constant bit positions)
        else
          found.word[0] = lanes.step_bits(n, maybe);
        include.drop_taken(found);
        weigh(true);
      }
      if (unsure) {  // this lane's elements again, exactly (rarely: about one row in a thousand;
                     // a plain loop, as include() branches: unrolled, it would split the pass)
        found = found_t{};
        if constexpr (stored) {  // the answers pass through `weights`, marked by each()
          for (int i = lanes.lane(); i < n; i += lanes.count())
            weights[i] = include(i, row.logit(i)) ? M(1) : M(0);
          lanes.each(n, [&](int i) { mark(i, weights[i] > M(0)); });
        } else {
          for (int i = lanes.lane(); i < n; i += lanes.count()) {
            if (!include(i, row.logit(i))) continue;
            const unsigned at = static_cast<unsigned>(i - lanes.lane());
            if constexpr (found_t::indexed) {
              for (int q = 0; q < found_t::words; ++q)  // (a run-time word index would spill)
                if (at / 32 == static_cast<unsigned>(q))
                  found.word[q] |= 1u << (at % 32 + static_cast<unsigned>(lanes.lane()));
            } else {
              found.word[0] |= 1u << (at / L);
            }
          }
        }
        weigh(false);
      }
      if (first_max != nullptr)
        *first_max =
            lanes.argmax(row_extreme<M>{first >= 0 ? m : -math::infinity<M>(), first}).index;
    }
  } else if constexpr (stored) {  // (without a row to store in, the caller promised `sparse`)
    const auto put = [&](int i, M z, bool keep) {
      const M w = math::exp_where(z - m, [keep] { return keep; });
      weights[i] = w;
      s += w;
      if (track) mark(i, w > M(0));
    };
    if (!unsure)
      lanes.each(n, [&](int i) {
        const M z = row.logit(i);
        put(i, z, include.quick(i, z, unsure));
      });
    if (unsure) {  // this lane's elements again, exactly (a plain loop: it rarely runs)
      s = M(0);
      for (int i = lanes.lane(); i < n; i += lanes.count()) {
        const M z = row.logit(i);
        const M w = math::exp_where(z - m, [&] { return include(i, z); });
        weights[i] = w;
        s += w;
      }
      if (track) {  // (marked by each(): the plain loop's run-time index would not fold)
        found = found_t{};
        lanes.each(n, [&](int i) { mark(i, weights[i] > M(0)); });
      }
    }
  }
  if (track && live != nullptr) {
    if constexpr (found_t::indexed)
      for (int q = 0; q < found_t::words; ++q) found.word[q] = lanes.bit_or(found.word[q]);
    *live = found;
  }
  return lanes.sum(s);
}

/// Inverse-CDF draw over candidate_weights: the first i (in index order) whose running sum of
/// weights exceeds `target` (= u · Σ w, u in (0,1)). If rounding leaves the target unreached, the
/// last entry with positive weight is taken. Needs one uniform, not one per expert. The running
/// sum adds the positive weights one at a time in index order — every lane does it, reading the
/// weights from the row, so every back end sums in the same order. `weight(e)` is element e's
/// candidate weight (read from candidate_weights' row, or recomputed where it stored none).
/// `live`: candidate_weights' positive elements (unused for rows of more than 32 steps without an
/// index-order set, which scan every step).
template <class M, class Lanes, class Weight>
ROUTEGRAD_HD int inverse_cdf(const Lanes& lanes, const Weight& weight, int n, M target,
                             const positive_elements<Lanes>& live) {
  using found_t = positive_elements<Lanes>;
  const int L = lanes.count();
  M running = M(0);
  int last_positive = -1;
  // Adds element e's weight; true when it reaches the target.
  const auto add = [&](int e) {
    running += weight(e);
    if (running > target) return true;
    last_positive = e;
    return false;
  };
  // One step covers elements step·L .. step·L + L − 1; a step without a positive weight adds
  // nothing (most experts are masked out), so only the steps in `live` are scanned, and in a
  // step only the lanes holding a positive weight.
  const auto scan_step = [&](int step, bool mine) {
    const int base = step * L;
    for (unsigned holders = lanes.ballot(mine); holders != 0; holders &= holders - 1) {
      const int e = base + math::lowest_bit(holders);
      if (add(e)) return e;
    }
    return -1;
  };
  const auto draw = [&] {
    if constexpr (found_t::indexed) {
      // Every lane of the group walks the same elements, in index order: no step across lanes.
      for (int q = 0; q < found_t::words; ++q)
        for (unsigned bits = live.word[q]; bits != 0; bits &= bits - 1) {
          const int e = 32 * q + math::lowest_bit(bits);
          if (add(e)) return e;
        }
    } else if (lanes.steps(n) <= 32) {
      for (unsigned steps = lanes.bit_or(live.word[0]); steps != 0; steps &= steps - 1) {
        const int step = math::lowest_bit(steps);
        const int hit = scan_step(step, ((live.word[0] >> step) & 1u) != 0u);
        if (hit >= 0) return hit;
      }
    } else {
      for (int step = 0; step * L < n; ++step) {
        const int i = step * L + lanes.lane();
        const int hit = scan_step(step, i < n && weight(i) > M(0));
        if (hit >= 0) return hit;
      }
    }
    return last_positive;
  };
  // Every lane reads weights the other lanes wrote: after their writes, and before any lane
  // writes the next slot's.
  lanes.sync();
  const int chosen = draw();
  lanes.sync();
  return chosen;
}

}  // namespace routegrad
