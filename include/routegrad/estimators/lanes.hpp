// The "lanes" policy: how many lanes share one token row and how they combine partial results.
//
// The per-token rules (estimators/token_forward.hpp, token_backward.hpp) are written once against
// this interface. Lane `l` of `L` visits the elements l, l + L, l + 2L, ... of a row (each(n, f));
// reductions combine the lanes' partial results and return the same value on every lane. Every
// policy visits a lane's elements in ascending index (keep_larger relies on it). The CPU
// back end uses serial_lanes (one lane, every operation is the identity); the CUDA back end
// supplies a warp policy with the same members.
#pragma once

#include "../core/config.hpp"
#include "../core/view.hpp"

namespace routegrad {

/// A maximum and where it is (ties: the lowest index). index == -1 when no element qualified.
template <class M>
struct row_extreme {
  M value;
  int index;  // < 2^24: E is validated
};

/// Combines two row_extremes: larger value wins, ties go to the lower index, "none" loses.
template <class M>
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE row_extreme<M> better_extreme(row_extreme<M> a,
                                                                 row_extreme<M> b) {
  // b wins when a is "none", or b is a real entry that is larger, or equal with a lower index.
  // Bitwise | and & (not || and &&): no short-circuit branches in the butterfly reductions.
  const bool b_wins =
      (a.index < 0) |
      ((b.index >= 0) & ((b.value > a.value) | ((b.value == a.value) & (b.index < a.index))));
  return {b_wins ? b.value : a.value, b_wins ? b.index : a.index};
}

/// Adds element i with value z to one lane's running maximum. Valid because each(n, f) visits a
/// lane's elements in ascending index: only a strictly larger value replaces, so ties keep the
/// lowest index, and −inf or NaN never enter (start from {−inf, −1}).
template <class M>
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE void keep_larger(row_extreme<M>& top, M z, int i) {
  const bool larger = z > top.value;
  top.value = larger ? z : top.value;
  top.index = larger ? i : top.index;
}

/// One lane per row: the CPU back end.
struct serial_lanes {
  ROUTEGRAD_HD static constexpr int count() { return 1; }
  ROUTEGRAD_HD static constexpr int lane() { return 0; }

  /// Calls f(i) for each element i < n this lane owns.
  template <class F>
  ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE void each(int n, F&& f) const {
    for (int i = 0; i < n; ++i) f(i);
  }
  /// each() for a body that keeps nothing in registers (a store of a constant): lanes that unroll
  /// their loops partly to save registers may unroll this one completely.
  template <class F>
  ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE void each_light(int n, F&& f) const {
    each(n, static_cast<F&&>(f));
  }
  /// Bit s set when pred(i) holds for this lane's element i of step s, for rows of at most 32
  /// steps (here: elements).
  template <class P>
  ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE unsigned step_bits(int n, P&& pred) const {
    unsigned bits = 0u;
    for (int i = 0; i < n; ++i) bits |= pred(i) ? 1u << i : 0u;
    return bits;
  }
  /// How many steps of count() elements cover a row of n (an upper bound is allowed).
  ROUTEGRAD_HD static constexpr int steps(int n) { return n; }
  /// Words of a row's element set in index order (row_math.hpp positive_elements): none, rows
  /// have no bound here.
  static constexpr int index_words = 0;
  /// Whether exp runs for every element of a masked pass (row_math.hpp exp_where): not here, the
  /// CPU calls it for the kept elements only, so candidate_weights' sparse form saves it nothing.
  static constexpr bool exp_for_every_element = false;

  template <class M>
  ROUTEGRAD_HD M sum(M x) const {
    return x;
  }
  template <class M>
  ROUTEGRAD_HD row_extreme<M> argmax(row_extreme<M> x) const {
    return x;
  }
  /// The largest x across lanes, NaN when any lane's x is NaN (math::max_nan).
  template <class M>
  ROUTEGRAD_HD M max(M x) const {
    return x;
  }
  ROUTEGRAD_HD bool any(bool x) const { return x; }
  /// Makes each lane's earlier writes to a row visible to the other lanes of the group.
  ROUTEGRAD_HD void sync() const {}
  /// Bit l set when lane l's `pred` is true.
  ROUTEGRAD_HD unsigned ballot(bool pred) const { return pred ? 1u : 0u; }
  /// Bitwise or across lanes.
  ROUTEGRAD_HD unsigned bit_or(unsigned x) const { return x; }
};

}  // namespace routegrad
