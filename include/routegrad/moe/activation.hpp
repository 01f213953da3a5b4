// The experts' activations and their derivatives, written once for both back ends (math type M:
// float or double). SwiGLU acts on a pair (a, b) of pre-activations: out = silu(a)·b.
#pragma once

#include "../core/config.hpp"
#include "../core/math.hpp"
#include "options.hpp"

namespace routegrad::moe_math {

template <class M>
ROUTEGRAD_HD M sigmoid(M x) {
  return M(1) / (M(1) + math::exp(-x));
}

template <class M>
ROUTEGRAD_HD M silu(M x) {
  return x * sigmoid(x);
}
template <class M>
ROUTEGRAD_HD M silu_grad(M x) {
  const M s = sigmoid(x);
  return s * (M(1) + x * (M(1) - s));
}

/// x·Φ(x) with Φ the standard normal CDF (the erf form, not the tanh approximation).
template <class M>
ROUTEGRAD_HD M gelu(M x) {
  return M(0.5) * x * (M(1) + math::erf(x * M(0.70710678118654752440)));
}
template <class M>
ROUTEGRAD_HD M gelu_grad(M x) {
  const M cdf = M(0.5) * (M(1) + math::erf(x * M(0.70710678118654752440)));
  const M pdf = M(0.39894228040143267794) * math::exp(M(-0.5) * x * x);
  return cdf + x * pdf;
}

/// Single-input activations (GELU, SiLU).
template <class M>
ROUTEGRAD_HD M activate(activation act, M x) {
  return act == activation::gelu ? gelu(x) : silu(x);
}
template <class M>
ROUTEGRAD_HD M activate_grad(activation act, M x) {
  return act == activation::gelu ? gelu_grad(x) : silu_grad(x);
}

/// A single-input activation and its derivative at x in one pass (GELU: one erf and one exp;
/// SiLU: one exp). The same operations as activate() and activate_grad(), so the same values.
template <class M>
ROUTEGRAD_HD M activate_with_grad(activation act, M x, M& grad) {
  if (act == activation::gelu) {
    const M e = math::erf(x * M(0.70710678118654752440));
    const M cdf = M(0.5) * (M(1) + e);
    const M pdf = M(0.39894228040143267794) * math::exp(M(-0.5) * x * x);
    grad = cdf + x * pdf;
    return M(0.5) * x * (M(1) + e);
  }
  const M s = sigmoid(x);
  grad = s * (M(1) + x * (M(1) - s));
  return x * s;
}

/// SwiGLU: out = silu(a)·b; given d out, the gradients of a and b.
template <class M>
ROUTEGRAD_HD M swiglu(M a, M b) {
  return silu(a) * b;
}
template <class M>
ROUTEGRAD_HD void swiglu_grad(M a, M b, M d_out, M& d_a, M& d_b) {
  d_a = d_out * b * silu_grad(a);
  d_b = d_out * silu(a);
}

}  // namespace routegrad::moe_math
