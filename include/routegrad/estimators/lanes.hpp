// The "lanes" policy: how many lanes share one token row and how they combine partial results.
//
// The per-token rules (estimators/token_forward.hpp, token_backward.hpp) are written once against
// this interface. Lane `l` of `L` visits the elements l, l + L, l + 2L, ... of a row; reductions
// combine the lanes' partial results and return the same value on every lane. The CPU back end
// uses serial_lanes (one lane, every operation is the identity); the CUDA back end supplies a
// warp policy with the same members.
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
  if (a.index < 0) return b;
  if (b.index < 0) return a;
  if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
  return a;
}

/// One lane per row: the CPU back end.
struct serial_lanes {
  ROUTEGRAD_HD static constexpr int count() { return 1; }
  ROUTEGRAD_HD static constexpr int lane() { return 0; }

  template <class M>
  ROUTEGRAD_HD M sum(M x) const {
    return x;
  }
  template <class M>
  ROUTEGRAD_HD row_extreme<M> argmax(row_extreme<M> x) const {
    return x;
  }
  ROUTEGRAD_HD bool any(bool x) const { return x; }
  ROUTEGRAD_HD int max_index(int x) const { return x; }
  /// Inclusive prefix sum across lanes (lane l gets the sum of lanes 0..l).
  template <class M>
  ROUTEGRAD_HD M inclusive_scan(M x) const {
    return x;
  }
  /// The value held by the last lane.
  template <class M>
  ROUTEGRAD_HD M from_last_lane(M x) const {
    return x;
  }
  /// The lowest lane whose `pred` is true, or -1.
  ROUTEGRAD_HD int first_lane(bool pred) const { return pred ? 0 : -1; }
};

}  // namespace routegrad
