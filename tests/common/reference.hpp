// Double-precision reference of SPEC.md (sections 2-4): softmax over a candidate set, the
// SparseMixer jitter mask, the k = 1 objective F(z) with its exact gradient, the exact
// expectation / second moment of every quadrature rule by enumeration, and the sequential
// top-k objective F_k(z) with its exact gradient.
//
// Written for clarity, not speed. Independent of the library's code on purpose: this is what the
// library is checked against. Only the standard library is used.
//
// Conventions:
// - vectors are std::vector<double>; a candidate set is std::vector<bool> (index_set) of size E.
// - logits that are not finite (NaN, -inf, +inf) are never candidates (+inf is not supported by
//   SPEC: such rows are outside what this reference describes).
// - eps = no_mask (+infinity) means "no jitter mask": every usable expert is a candidate.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace routegrad::test::ref {

using vec = std::vector<double>;
using index_set = std::vector<bool>;

/// eps value meaning "no jitter mask" (the ratio test `> 2 eps` is never true).
inline constexpr double no_mask = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------------
// Small vector helpers.
// ---------------------------------------------------------------------------------------------

inline double dot(const vec& a, const vec& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

inline double norm2(const vec& a) { return std::sqrt(dot(a, a)); }

inline double max_abs(const vec& a) {
  double m = 0.0;
  for (double x : a) m = std::max(m, std::fabs(x));
  return m;
}

inline double max_abs_diff(const vec& a, const vec& b) {
  double m = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

/// Cosine similarity; NaN when either vector is zero.
inline double cosine(const vec& a, const vec& b) {
  const double na = norm2(a);
  const double nb = norm2(b);
  if (na == 0.0 || nb == 0.0) return std::numeric_limits<double>::quiet_NaN();
  return dot(a, b) / (na * nb);
}

/// a += s * b
inline void axpy(vec& a, double s, const vec& b) {
  for (std::size_t i = 0; i < a.size(); ++i) a[i] += s * b[i];
}

// ---------------------------------------------------------------------------------------------
// Candidate sets, the jitter mask, softmax, argmax (SPEC sections 1-2).
// ---------------------------------------------------------------------------------------------

/// Every expert whose logit is finite.
inline index_set usable_experts(const vec& z) {
  index_set s(z.size(), false);
  for (std::size_t i = 0; i < z.size(); ++i) s[i] = std::isfinite(z[i]);
  return s;
}

inline int set_size(const index_set& s) {
  return static_cast<int>(std::count(s.begin(), s.end(), true));
}

/// SPEC section 2. Among the current candidates `cand` (non-finite logits are dropped first),
/// with m = max over the candidates, expert i is removed when (m - z_i) / max(|z_i|, m) > 2 eps;
/// a zero denominator (z_i = m = 0) counts as ratio 0 (kept). eps = no_mask keeps everyone.
inline index_set jitter_mask(const vec& z, const index_set& cand, double eps) {
  const std::size_t n = z.size();
  index_set out(n, false);
  double m = -std::numeric_limits<double>::infinity();
  bool any = false;
  for (std::size_t i = 0; i < n; ++i) {
    if (cand[i] && std::isfinite(z[i])) {
      m = std::max(m, z[i]);
      any = true;
    }
  }
  if (!any) return out;
  for (std::size_t i = 0; i < n; ++i) {
    if (!cand[i] || !std::isfinite(z[i])) continue;
    if (eps == no_mask) {
      out[i] = true;
      continue;
    }
    const double den = std::max(std::fabs(z[i]), m);
    const double ratio = (den == 0.0) ? 0.0 : (m - z[i]) / den;
    out[i] = !(ratio > 2.0 * eps);
  }
  return out;
}

/// Softmax of z restricted to S; 0 off S; all zeros when S is empty.
inline vec softmax(const vec& z, const index_set& S) {
  const std::size_t n = z.size();
  vec p(n, 0.0);
  double m = -std::numeric_limits<double>::infinity();
  bool any = false;
  for (std::size_t i = 0; i < n; ++i) {
    if (S[i]) {
      m = std::max(m, z[i]);
      any = true;
    }
  }
  if (!any) return p;
  double sum = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    if (S[i]) {
      p[i] = std::exp(z[i] - m);
      sum += p[i];
    }
  }
  for (std::size_t i = 0; i < n; ++i) p[i] /= sum;
  return p;
}

/// argmax of z over S, lowest index on ties; -1 when S is empty.
inline int argmax(const vec& z, const index_set& S) {
  int best = -1;
  for (std::size_t i = 0; i < z.size(); ++i) {
    if (!S[i]) continue;
    if (best < 0 || z[i] > z[static_cast<std::size_t>(best)]) best = static_cast<int>(i);
  }
  return best;
}

/// Row D of the softmax Jacobian: J_D(i) = d pi_D / d z_i = pi_D (delta_iD - pi_i) on S, 0 off S.
inline vec softmax_jacobian_row(const vec& pi, const index_set& S, int D) {
  const std::size_t n = pi.size();
  vec g(n, 0.0);
  const std::size_t d = static_cast<std::size_t>(D);
  for (std::size_t i = 0; i < n; ++i) {
    if (!S[i]) continue;
    g[i] = pi[d] * ((i == d ? 1.0 : 0.0) - pi[i]);
  }
  return g;
}

/// Candidates of a slot: experts with a finite logit, minus `already_chosen`, then the jitter mask
/// recomputed over what remains (m = max of the remaining logits, |z_i| the original logit).
inline index_set slot_candidates(const vec& z, double eps, const std::vector<int>& already_chosen) {
  index_set remaining = usable_experts(z);
  for (int c : already_chosen) remaining[static_cast<std::size_t>(c)] = false;
  return jitter_mask(z, remaining, eps);
}

// ---------------------------------------------------------------------------------------------
// Losses L : R^d -> R, with gradients.
// ---------------------------------------------------------------------------------------------

enum class loss_type {
  quadratic,  ///< sum 1/2 (y - t)^2             G(s) affine in s
  cubic,      ///< sum (y - t)^3 / 3 + 1/2 (y - t)^2   G(s) quadratic in s
  logcosh,    ///< sum log cosh(y - t)            non-polynomial
  softplus,   ///< sum softplus(y) - t y          non-polynomial (Bernoulli NLL, t in (0,1))
};

inline const char* loss_name(loss_type t) {
  switch (t) {
    case loss_type::quadratic:
      return "quadratic";
    case loss_type::cubic:
      return "cubic";
    case loss_type::logcosh:
      return "logcosh";
    case loss_type::softplus:
      return "softplus";
  }
  return "?";
}

/// A separable loss L(y) = sum_k l(y_k; t_k).
struct loss {
  loss_type type = loss_type::quadratic;
  vec t;  ///< target / parameter, size d

  /// l(y_k; t_k)
  double component(std::size_t k, double yk) const {
    const double r = yk - t[k];
    switch (type) {
      case loss_type::quadratic:
        return 0.5 * r * r;
      case loss_type::cubic:
        return r * r * r / 3.0 + 0.5 * r * r;
      case loss_type::logcosh:
        // log cosh r = |r| + log1p(exp(-2|r|)) - log 2   (no overflow)
        return std::fabs(r) + std::log1p(std::exp(-2.0 * std::fabs(r))) - std::log(2.0);
      case loss_type::softplus:
        return std::max(yk, 0.0) + std::log1p(std::exp(-std::fabs(yk))) - t[k] * yk;
    }
    return 0.0;
  }

  /// d l(y_k; t_k) / d y_k
  double component_grad(std::size_t k, double yk) const {
    const double r = yk - t[k];
    switch (type) {
      case loss_type::quadratic:
        return r;
      case loss_type::cubic:
        return r * r + r;
      case loss_type::logcosh:
        return std::tanh(r);
      case loss_type::softplus:
        return 1.0 / (1.0 + std::exp(-yk)) - t[k];
    }
    return 0.0;
  }

  double value(const vec& y) const {
    double s = 0.0;
    for (std::size_t k = 0; k < y.size(); ++k) s += component(k, y[k]);
    return s;
  }

  vec grad(const vec& y) const {
    vec g(y.size(), 0.0);
    for (std::size_t k = 0; k < y.size(); ++k) g[k] = component_grad(k, y[k]);
    return g;
  }
};

// ---------------------------------------------------------------------------------------------
// A k = 1 problem (SPEC section 4): logits z, expert outputs f_i in R^d, a loss, a mask eps.
// ---------------------------------------------------------------------------------------------

struct problem {
  vec z;               ///< logits, size E
  std::vector<vec> f;  ///< expert outputs, E vectors of size d
  loss L;
  double eps = no_mask;  ///< jitter mask (no_mask: S = all experts)

  int num_experts() const { return static_cast<int>(z.size()); }
  int dim() const { return static_cast<int>(L.t.size()); }

  /// y = s * f_i
  vec output(int i, double s) const {
    vec y = f[static_cast<std::size_t>(i)];
    for (double& v : y) v *= s;
    return y;
  }
  /// L(s f_i)
  double loss_at(int i, double s) const {
    const vec& fi = f[static_cast<std::size_t>(i)];
    double v = 0.0;
    for (std::size_t k = 0; k < fi.size(); ++k) v += L.component(k, s * fi[k]);
    return v;
  }
  /// L(0)
  double loss_at_zero() const {
    double v = 0.0;
    for (std::size_t k = 0; k < L.t.size(); ++k) v += L.component(k, 0.0);
    return v;
  }
  /// G_i(s) = dL/dg with gate g = s on expert i = grad L(s f_i) . f_i
  double gate_grad(int i, double s) const {
    const vec& fi = f[static_cast<std::size_t>(i)];
    double v = 0.0;
    for (std::size_t k = 0; k < fi.size(); ++k) v += L.component_grad(k, s * fi[k]) * fi[k];
    return v;
  }
};

/// The masked candidate set S of a problem at logits z (k = 1).
inline index_set candidates(const problem& p, const vec& z) {
  return jitter_mask(z, usable_experts(z), p.eps);
}
inline index_set candidates(const problem& p) { return candidates(p, p.z); }

/// F(z) = sum_{i in S} pi_i L(pi_i f_i), with S the masked set at z.
inline double objective(const problem& p, const vec& z) {
  const index_set S = candidates(p, z);
  const vec pi = softmax(z, S);
  double F = 0.0;
  for (int i = 0; i < p.num_experts(); ++i) {
    if (!S[static_cast<std::size_t>(i)]) continue;
    const double pii = pi[static_cast<std::size_t>(i)];
    F += pii * p.loss_at(i, pii);
  }
  return F;
}
inline double objective(const problem& p) { return objective(p, p.z); }

/// grad_0 = sum_{i in S} pi_i G_i(pi_i) grad pi_i   (gradient through the gate value)
inline vec grad0(const problem& p) {
  const index_set S = candidates(p);
  const vec pi = softmax(p.z, S);
  vec g(p.z.size(), 0.0);
  for (int i = 0; i < p.num_experts(); ++i) {
    if (!S[static_cast<std::size_t>(i)]) continue;
    const double pii = pi[static_cast<std::size_t>(i)];
    axpy(g, pii * p.gate_grad(i, pii), softmax_jacobian_row(pi, S, i));
  }
  return g;
}

/// grad_1 = sum_{i in S} (L(pi_i f_i) - L(0)) grad pi_i   (gradient through the choice)
inline vec grad1(const problem& p) {
  const index_set S = candidates(p);
  const vec pi = softmax(p.z, S);
  const double L0 = p.loss_at_zero();
  vec g(p.z.size(), 0.0);
  for (int i = 0; i < p.num_experts(); ++i) {
    if (!S[static_cast<std::size_t>(i)]) continue;
    const double pii = pi[static_cast<std::size_t>(i)];
    axpy(g, p.loss_at(i, pii) - L0, softmax_jacobian_row(pi, S, i));
  }
  return g;
}

/// Exact gradient of F in closed form (mask treated as locally constant): grad_0 + grad_1.
inline vec exact_gradient(const problem& p) {
  vec g = grad0(p);
  axpy(g, 1.0, grad1(p));
  return g;
}

/// Central finite differences of fn at x with step h (same step for every coordinate).
inline vec central_difference(const std::function<double(const vec&)>& fn, const vec& x, double h) {
  vec g(x.size(), 0.0);
  for (std::size_t i = 0; i < x.size(); ++i) {
    vec xp = x;
    vec xm = x;
    xp[i] += h;
    xm[i] -= h;
    g[i] = (fn(xp) - fn(xm)) / (2.0 * h);
  }
  return g;
}

// ---------------------------------------------------------------------------------------------
// Quadrature rules and the exact moments of each estimator (k = 1, by enumeration).
// ---------------------------------------------------------------------------------------------

/// One outcome of the per-slot coin when D != a: forward scale c with probability prob.
struct coin_outcome {
  double scale;
  double prob;
};

/// A SparseMixer rule: backward weight w and the coin outcomes used when D != a
/// (when D = a every rule runs c = 1, SPEC section 4). coin_at_argmax = true is NOT a SPEC rule:
/// a diagnostic variant that flips the coin for D = a too (used to explain the P4 table).
struct rule {
  std::string name;
  double w;
  std::vector<coin_outcome> nodes;
  bool coin_at_argmax = false;
};

inline rule euler_rule() { return {"euler", 2.0, {{1.0, 1.0}}, false}; }
inline rule midpoint_rule() { return {"midpoint", 2.0, {{0.5, 0.5}, {1.0, 0.5}}, false}; }
inline rule heun3_rule() { return {"heun3", 1.0, {{1.0 / 3.0, 0.75}, {1.0, 0.25}}, false}; }
/// "grad_0 only": what ordinary MoE training computes (sampled D, w = 1, c = 1).
inline rule grad0_only_rule() { return {"grad0_only", 1.0, {{1.0, 1.0}}, false}; }

/// The estimate for one (D, c): w * G_D(c pi_D) * grad pi_D (pi, S at p.z).
inline vec estimate(const problem& p, double w, int D, double c) {
  const index_set S = candidates(p);
  const vec pi = softmax(p.z, S);
  const double piD = pi[static_cast<std::size_t>(D)];
  vec g = softmax_jacobian_row(pi, S, D);
  const double s = w * p.gate_grad(D, c * piD);
  for (double& v : g) v *= s;
  return g;
}

/// The coin outcomes that apply to expert D: the rule's nodes when D != a, {c = 1} when D = a.
inline std::vector<coin_outcome> coin_outcomes(const problem& p, const rule& r, int D) {
  const int a = argmax(p.z, candidates(p));
  if (D == a && !r.coin_at_argmax) return {{1.0, 1.0}};
  return r.nodes;
}

/// E_coin[estimate | D].
inline vec coin_average(const problem& p, const rule& r, int D) {
  vec g(p.z.size(), 0.0);
  for (const coin_outcome& o : coin_outcomes(p, r, D))
    axpy(g, o.prob, estimate(p, r.w, D, o.scale));
  return g;
}

struct estimator_moments {
  vec mean;      ///< E[estimate]
  vec second;    ///< E[estimate_i^2] per coordinate
  vec variance;  ///< second - mean^2 per coordinate
};

/// Exact moments over D ~ Categorical(pi on S) and the coin.
inline estimator_moments moments(const problem& p, const rule& r) {
  const index_set S = candidates(p);
  const vec pi = softmax(p.z, S);
  const std::size_t n = p.z.size();
  estimator_moments m{vec(n, 0.0), vec(n, 0.0), vec(n, 0.0)};
  for (int D = 0; D < p.num_experts(); ++D) {
    if (!S[static_cast<std::size_t>(D)]) continue;
    const double pD = pi[static_cast<std::size_t>(D)];
    for (const coin_outcome& o : coin_outcomes(p, r, D)) {
      const vec e = estimate(p, r.w, D, o.scale);
      for (std::size_t i = 0; i < n; ++i) {
        m.mean[i] += pD * o.prob * e[i];
        m.second[i] += pD * o.prob * e[i] * e[i];
      }
    }
  }
  for (std::size_t i = 0; i < n; ++i)
    m.variance[i] = std::max(0.0, m.second[i] - m.mean[i] * m.mean[i]);
  return m;
}

inline vec expectation(const problem& p, const rule& r) { return moments(p, r).mean; }

// ---------------------------------------------------------------------------------------------
// k >= 2: sequential sampling without replacement (SPEC section 3).
// ---------------------------------------------------------------------------------------------

struct slot {
  int expert;      ///< D_j
  index_set cand;  ///< S_j
  vec pi;          ///< pi^(j), softmax over S_j
};

/// Calls fn(slots, probability) for every ordered tuple (D_1..D_k) of positive probability,
/// P(tuple) = prod_j pi^(j)_{D_j}. Tuples stop early (fewer than k slots) only when no
/// candidate is left, which cannot happen while k <= number of finite logits.
inline void for_each_sequence(const vec& z, int k, double eps,
                              const std::function<void(const std::vector<slot>&, double)>& fn) {
  std::vector<slot> slots;
  std::vector<int> chosen;
  std::function<void(double)> rec = [&](double prob) {
    if (static_cast<int>(slots.size()) == k) {
      fn(slots, prob);
      return;
    }
    const index_set S = slot_candidates(z, eps, chosen);
    if (set_size(S) == 0) {
      fn(slots, prob);
      return;
    }
    const vec pi = softmax(z, S);
    for (std::size_t D = 0; D < z.size(); ++D) {
      if (!S[D]) continue;
      slots.push_back({static_cast<int>(D), S, pi});
      chosen.push_back(static_cast<int>(D));
      rec(prob * pi[D]);
      chosen.pop_back();
      slots.pop_back();
    }
  };
  rec(1.0);
}

/// y = sum_j pi^(j)_{D_j} f_{D_j}
inline vec combined_output(const problem& p, const std::vector<slot>& slots) {
  vec y(static_cast<std::size_t>(p.dim()), 0.0);
  for (const slot& s : slots)
    axpy(y, s.pi[static_cast<std::size_t>(s.expert)], p.f[static_cast<std::size_t>(s.expert)]);
  return y;
}

/// F_k(z) = sum over ordered tuples P(tuple) L(sum_j pi^(j)_{D_j} f_{D_j}); the mask is p.eps.
inline double objective_topk(const problem& p, int k, const vec& z) {
  double F = 0.0;
  for_each_sequence(z, k, p.eps, [&](const std::vector<slot>& slots, double prob) {
    F += prob * p.L.value(combined_output(p, slots));
  });
  return F;
}

/// Exact gradient of F_k at p.z (masks treated as locally constant):
///   sum_tuples P [ L(y) sum_j (e_{D_j} - pi^(j))|_{S_j} + sum_j (grad L(y) . f_{D_j}) grad
///   pi^(j)_{D_j} ]
/// using grad P = P sum_j grad log pi^(j)_{D_j} and grad log pi_D = (e_D - pi) on S, 0 off S.
inline vec exact_gradient_topk(const problem& p, int k) {
  const std::size_t n = p.z.size();
  vec g(n, 0.0);
  for_each_sequence(p.z, k, p.eps, [&](const std::vector<slot>& slots, double prob) {
    const vec y = combined_output(p, slots);
    const double Ly = p.L.value(y);
    const vec gL = p.L.grad(y);
    for (const slot& s : slots) {
      const std::size_t D = static_cast<std::size_t>(s.expert);
      for (std::size_t i = 0; i < n; ++i) {
        if (!s.cand[i]) continue;
        g[i] += prob * Ly * ((i == D ? 1.0 : 0.0) - s.pi[i]);
      }
      const double Gj = dot(gL, p.f[D]);
      axpy(g, prob * Gj, softmax_jacobian_row(s.pi, s.cand, s.expert));
    }
  });
  return g;
}

/// True when every candidate set that the k-slot sequential process can reach (every ordered
/// prefix of fewer than k distinct experts) is the same at z and at z +- h e_i for every i:
/// the mask is then locally constant and finite differences see a smooth function.
inline bool masks_locally_constant(const vec& z, double eps, int k, double h) {
  const std::size_t n = z.size();
  std::vector<int> chosen;
  bool ok = true;
  std::function<void()> rec = [&]() {
    if (!ok) return;
    const index_set S = slot_candidates(z, eps, chosen);
    for (std::size_t i = 0; i < n && ok; ++i) {
      for (double sgn : {-1.0, 1.0}) {
        vec zp = z;
        zp[i] += sgn * h;
        if (slot_candidates(zp, eps, chosen) != S) ok = false;
      }
    }
    if (static_cast<int>(chosen.size()) + 1 >= k) return;
    for (std::size_t D = 0; D < n && ok; ++D) {
      if (!S[D]) continue;
      chosen.push_back(static_cast<int>(D));
      rec();
      chosen.pop_back();
    }
  };
  rec();
  return ok;
}

// ---------------------------------------------------------------------------------------------
// Random problems (fixed seeds in the tests).
// ---------------------------------------------------------------------------------------------

/// z ~ N(0, sigma^2), f_i ~ N(0, 1)^d, t ~ N(0, 1)^d (U(0, 1)^d for the softplus loss).
inline problem random_problem(std::mt19937_64& rng, int E, int d, loss_type type, double sigma,
                              double eps) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  problem p;
  p.eps = eps;
  p.z.resize(static_cast<std::size_t>(E));
  for (double& v : p.z) v = sigma * normal(rng);
  p.f.assign(static_cast<std::size_t>(E), vec(static_cast<std::size_t>(d), 0.0));
  for (vec& fi : p.f)
    for (double& v : fi) v = normal(rng);
  p.L.type = type;
  p.L.t.resize(static_cast<std::size_t>(d));
  for (double& v : p.L.t) v = (type == loss_type::softplus) ? unif(rng) : normal(rng);
  return p;
}

}  // namespace routegrad::test::ref
