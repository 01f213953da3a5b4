// The row accessor both back ends use: a token's logits staged once, contiguously, in the math
// type (CPU: a per-thread buffer; CUDA: shared memory), plus Switch's jitter when it is on.
#pragma once

#include <type_traits>

#include "../core/config.hpp"

namespace routegrad {

/// `Noisy` = false (every estimator but Switch) promises that there is no jitter, so that the
/// per-element accessors carry no test of `noise`. `StagedMax` = true promises that `staged_max`
/// holds what its name says.
template <class M, bool Noisy = true, bool StagedMax = false>
struct staged_row {
  static constexpr bool noisy = Noisy;
  static constexpr bool has_staged_max = StagedMax;
  const M* values;  // the caller's logits of this row, converted
  int n;
  const M* noise;  // Switch's jitter of this row, or null (always null when !Noisy)
  /// With StagedMax: the largest of the values this lane staged, NaN if one was NaN
  /// (math::max_nan); lanes.max of it is the row's, found while staging instead of in a pass over
  /// the row. The GPU's staging finds it (one max.NaN per element while the values are in
  /// registers); the CPU's does not (its scalar loop cost the CPU's routing step 8–24%).
  M staged_max = M(0);

  ROUTEGRAD_HD int size() const { return n; }
  ROUTEGRAD_HD M clean(int i) const { return values[i]; }
  ROUTEGRAD_HD M logit(int i) const {
    if constexpr (Noisy) return noise ? values[i] * noise[i] : values[i];
    return values[i];
  }
  ROUTEGRAD_HD M chain(int i) const {
    if constexpr (Noisy) return noise ? noise[i] : M(1);
    return M(1);
  }
};

/// Whether a Row accessor brings the maxima its lanes found while staging (`staged_max`) and its
/// logit(i) is its clean(i) (no jitter): the GPU's staged_row of an estimator without jitter.
/// Other rows (the CPU's, Switch's, or a caller's own accessor) are read element by element.
template <class Row, class = void>
struct row_brings_staged_max : std::false_type {};
template <class Row>
struct row_brings_staged_max<Row, std::void_t<decltype(Row::noisy), decltype(Row::has_staged_max)>>
    : std::bool_constant<Row::has_staged_max && !Row::noisy> {};

}  // namespace routegrad
