// The row accessor both back ends use: a token's logits staged once, contiguously, in the math
// type (CPU: a per-thread buffer; CUDA: shared memory), plus Switch's jitter when it is on.
#pragma once

#include "../core/config.hpp"

namespace routegrad {

/// `Noisy` = false (every estimator but Switch) promises that there is no jitter, so that the
/// per-element accessors carry no test of `noise`.
template <class M, bool Noisy = true>
struct staged_row {
  const M* values;  // the caller's logits of this row, converted
  int n;
  const M* noise;  // Switch's jitter of this row, or null (always null when !Noisy)

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

}  // namespace routegrad
