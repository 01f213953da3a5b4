// The estimator-bias study of SPEC §4 P4 as a library of functions (used by main.cpp and by
// tests/examples/test_estimator_analysis.cpp).
//
// For one problem (logits z, expert outputs f_e, a smooth loss L, a jitter mask ε, k slots) it
// computes, in double precision and by exact enumeration of every ordered choice (D_1..D_k) and
// every coin outcome (no Monte Carlo):
//   - the target: ∇F_k, the exact gradient of the objective SparseMixer samples,
//       F_k(z) = E_{D ~ sequential sampling}[ L(Σ_j π^(j)_{D_j} f_{D_j}) ],
//   - for each estimator, the exact expectation E[ĝ] and the trace of its covariance.
// Estimators: the SparseMixer rules of SPEC §4 (euler, midpoint, heun3), "∇₀ only" (sampled D,
// weight 1, c = 1: ordinary MoE training), and two deterministic references with zero variance:
// the dense mixture (the exact gradient of L(Σ_e softmax(z)_e f_e), what a DenseMixer-style
// dense pass computes) and top-k softmax (D = the k largest of softmax(z), plain chain rule).
// Optionally "midpoint*", the midpoint rule with the coin also flipped when D = a (NOT a SPEC
// rule; a diagnostic that explains the midpoint row, see docs/estimators.md).
//
// Built on the double-precision SPEC references in tests/common/reference.hpp (the same code the
// P1-P4 tests use); the k-slot expectation below reduces to ref::moments for k = 1 (tested).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/reference.hpp"

namespace rg_analysis {

namespace ref = routegrad::test::ref;
using ref::vec;

enum class estimator_id {
  grad0_only,     // sampled D, w = 1, c = 1
  euler,          // SPEC: w = 2, c = 1
  midpoint,       // SPEC: w = 2, c = ½ w.p. ½ when D ≠ a
  heun3,          // SPEC: w = 1, c = ⅓ w.p. ¾ when D ≠ a
  midpoint_star,  // diagnostic: midpoint with the coin at D = a too (not SPEC)
  dense,          // exact gradient of L(Σ_e π_e f_e), π = softmax(z) over all experts
  topk_softmax,   // top-k of softmax(z), exact chain rule through the chosen gates
};

inline const char* estimator_name(estimator_id id) {
  switch (id) {
    case estimator_id::grad0_only:
      return "grad0_only";
    case estimator_id::euler:
      return "euler";
    case estimator_id::midpoint:
      return "midpoint";
    case estimator_id::heun3:
      return "heun3";
    case estimator_id::midpoint_star:
      return "midpoint*";
    case estimator_id::dense:
      return "dense";
    case estimator_id::topk_softmax:
      return "topk_softmax";
  }
  return "?";
}

/// The SPEC rule (backward weight and coin outcomes) of a sampled estimator.
inline ref::rule rule_of(estimator_id id) {
  switch (id) {
    case estimator_id::euler:
      return ref::euler_rule();
    case estimator_id::midpoint:
      return ref::midpoint_rule();
    case estimator_id::heun3:
      return ref::heun3_rule();
    case estimator_id::midpoint_star: {
      ref::rule r = ref::midpoint_rule();
      r.name = "midpoint*";
      r.coin_at_argmax = true;
      return r;
    }
    default:
      return ref::grad0_only_rule();
  }
}

inline bool is_sampled(estimator_id id) {
  return id != estimator_id::dense && id != estimator_id::topk_softmax;
}

/// Exact first and second moments of an estimator of ∇F_k.
struct moments {
  vec mean;                // E[ĝ]
  double trace_cov = 0.0;  // Σ_i Var[ĝ_i]
};

/// A sampled estimator with k slots: enumerate every ordered tuple (D_1..D_k) with its probability
/// Π_j π^(j)_{D_j} and, per slot, the coin outcomes (c = 1 when D_j = a_j, the argmax of slot j's
/// candidates; the rule's nodes otherwise). For each outcome: gates g_j = c_j π^(j)_{D_j},
/// y = Σ_j g_j f_{D_j}, G_j = ∇L(y)·f_{D_j} and ĝ = Σ_j w G_j ∇π^(j)_{D_j} (SPEC §4).
inline moments sampled_moments(const ref::problem& p, int k, const ref::rule& r) {
  const std::size_t n = p.z.size();
  moments m{vec(n, 0.0), 0.0};
  vec second(n, 0.0);
  ref::for_each_sequence(p.z, k, p.eps, [&](const std::vector<ref::slot>& slots, double prob) {
    const std::size_t ks = slots.size();
    std::vector<std::vector<ref::coin_outcome>> coins(ks);
    std::vector<vec> jac(ks);
    for (std::size_t j = 0; j < ks; ++j) {
      const int a = ref::argmax(p.z, slots[j].cand);
      coins[j] = (slots[j].expert == a && !r.coin_at_argmax)
                     ? std::vector<ref::coin_outcome>{{1.0, 1.0}}
                     : r.nodes;
      jac[j] = ref::softmax_jacobian_row(slots[j].pi, slots[j].cand, slots[j].expert);
    }
    std::vector<std::size_t> pick(ks, 0);
    for (;;) {
      double cp = prob;
      vec y(static_cast<std::size_t>(p.dim()), 0.0);
      for (std::size_t j = 0; j < ks; ++j) {
        const ref::coin_outcome& o = coins[j][pick[j]];
        cp *= o.prob;
        const std::size_t D = static_cast<std::size_t>(slots[j].expert);
        ref::axpy(y, o.scale * slots[j].pi[D], p.f[D]);
      }
      const vec gL = p.L.grad(y);
      vec est(n, 0.0);
      for (std::size_t j = 0; j < ks; ++j) {
        const double G = ref::dot(gL, p.f[static_cast<std::size_t>(slots[j].expert)]);
        ref::axpy(est, r.w * G, jac[j]);
      }
      for (std::size_t i = 0; i < n; ++i) {
        m.mean[i] += cp * est[i];
        second[i] += cp * est[i] * est[i];
      }
      std::size_t j = 0;  // next coin combination (odometer)
      while (j < ks && ++pick[j] == coins[j].size()) pick[j++] = 0;
      if (j == ks) break;
    }
  });
  for (std::size_t i = 0; i < n; ++i)
    m.trace_cov += std::max(0.0, second[i] - m.mean[i] * m.mean[i]);
  return m;
}

/// ∇ of L(Σ_e π_e f_e) with π = softmax(z) over every finite logit (no mask, no k).
inline vec dense_gradient(const ref::problem& p) {
  const ref::index_set all = ref::usable_experts(p.z);
  const vec pi = ref::softmax(p.z, all);
  vec y(static_cast<std::size_t>(p.dim()), 0.0);
  for (std::size_t e = 0; e < p.z.size(); ++e) ref::axpy(y, pi[e], p.f[e]);
  const vec gL = p.L.grad(y);
  vec g(p.z.size(), 0.0);
  for (int e = 0; e < p.num_experts(); ++e) {
    if (!all[static_cast<std::size_t>(e)]) continue;
    ref::axpy(g, ref::dot(gL, p.f[static_cast<std::size_t>(e)]),
              ref::softmax_jacobian_row(pi, all, e));
  }
  return g;
}

/// Top-k softmax: D = the k largest of softmax(z) (ties to the lower index), g_j = π_{D_j},
/// gradient Σ_j G_j ∇π_{D_j} (exact chain rule; no mask).
/// The k largest entries of `scores`, largest first, ties to the lower index.
inline std::vector<int> top_k_indices(const vec& scores, int k) {
  std::vector<int> idx(scores.size());
  for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int>(i);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) {
    return scores[static_cast<std::size_t>(a)] > scores[static_cast<std::size_t>(b)];
  });
  idx.resize(static_cast<std::size_t>(k));
  return idx;
}

inline vec topk_softmax_gradient(const ref::problem& p, int k) {
  const ref::index_set all = ref::usable_experts(p.z);
  const vec pi = ref::softmax(p.z, all);
  const std::vector<int> idx = top_k_indices(pi, k);
  vec y(static_cast<std::size_t>(p.dim()), 0.0);
  for (int D : idx) ref::axpy(y, pi[static_cast<std::size_t>(D)], p.f[static_cast<std::size_t>(D)]);
  const vec gL = p.L.grad(y);
  vec g(p.z.size(), 0.0);
  for (int D : idx)
    ref::axpy(g, ref::dot(gL, p.f[static_cast<std::size_t>(D)]),
              ref::softmax_jacobian_row(pi, all, D));
  return g;
}

/// Moments of any estimator (deterministic ones have zero variance).
inline moments estimator_moments(const ref::problem& p, int k, estimator_id id) {
  if (id == estimator_id::dense) return {dense_gradient(p), 0.0};
  if (id == estimator_id::topk_softmax) return {topk_softmax_gradient(p, k), 0.0};
  return sampled_moments(p, k, rule_of(id));
}

/// The target ∇F_k (k = 1: ref::exact_gradient, the closed form ∇₀ + ∇₁).
inline vec target_gradient(const ref::problem& p, int k) {
  return k == 1 ? ref::exact_gradient(p) : ref::exact_gradient_topk(p, k);
}

// ---------------------------------------------------------------------------------------------
// The problem set and the per-problem metrics.
// ---------------------------------------------------------------------------------------------

struct study_config {
  unsigned long long seed = 0xB1A5ULL;
  std::vector<int> ks = {1, 2};
  std::vector<double> eps = {ref::no_mask, 0.1, 0.01};
  std::vector<int> experts = {2, 4, 8, 16};
  std::vector<int> dims = {4, 16};
  std::vector<double> sigmas = {0.5, 1.0, 2.0};
  std::vector<ref::loss_type> losses = {ref::loss_type::quadratic, ref::loss_type::cubic,
                                        ref::loss_type::logcosh, ref::loss_type::softplus};
  int reps = 25;  // problems per (E, d, σ, loss) cell
  std::vector<estimator_id> estimators = {estimator_id::grad0_only, estimator_id::euler,
                                          estimator_id::midpoint,   estimator_id::heun3,
                                          estimator_id::dense,      estimator_id::topk_softmax};
};

/// One estimator on one problem.
struct metric {
  double cos = 0.0;     // cos(E[ĝ], ∇F)
  double rel = 0.0;     // ‖E[ĝ] − ∇F‖ / ‖∇F‖          (relative bias)
  double relvar = 0.0;  // tr Cov[ĝ] / ‖∇F‖²            (relative variance)
  double relmse = 0.0;  // E‖ĝ − ∇F‖² / ‖∇F‖² = rel² + relvar   (one-sample relative error)
};

/// One problem with every estimator's metrics.
struct problem_result {
  int k = 1;
  double eps = ref::no_mask;
  int E = 0;
  int d = 0;
  double sigma = 0.0;
  ref::loss_type loss = ref::loss_type::quadratic;
  double grad_norm = 0.0;  // ‖∇F‖
  std::vector<metric> m;   // per estimator, in config order
};

inline metric compare(const moments& mo, const vec& g) {
  const double ng = ref::norm2(g);
  vec diff = mo.mean;
  ref::axpy(diff, -1.0, g);
  metric out;
  out.cos = ref::cosine(mo.mean, g);
  if (!std::isfinite(out.cos)) out.cos = 0.0;  // a zero expectation: orthogonal to everything
  out.rel = ref::norm2(diff) / ng;
  out.relvar = mo.trace_cov / (ng * ng);
  out.relmse = out.rel * out.rel + out.relvar;
  return out;
}

/// Where the problem set stands after a run: every (k, ε) setting gets the same problems (the
/// logits, experts and targets drawn from one generator per setting, seeded identically).
struct study_result {
  std::vector<problem_result> problems;
  std::vector<int> degenerate_by_setting;  // ∇F = 0 (a single candidate): skipped, per (k, ε)
};

/// Runs the study. `progress(done, total)` is called now and then (may be empty).
inline study_result run_study(const study_config& cfg,
                              const std::function<void(long, long)>& progress = {}) {
  study_result out;
  const long total = static_cast<long>(cfg.ks.size() * cfg.eps.size() * cfg.experts.size() *
                                       cfg.dims.size() * cfg.sigmas.size() * cfg.losses.size()) *
                     cfg.reps;
  long done = 0;
  for (int k : cfg.ks) {
    for (double eps : cfg.eps) {
      int degenerate = 0;
      std::mt19937_64 rng(cfg.seed);  // the same problems for every (k, ε)
      for (int E : cfg.experts) {
        for (int d : cfg.dims) {
          for (double sigma : cfg.sigmas) {
            for (ref::loss_type lt : cfg.losses) {
              for (int rep = 0; rep < cfg.reps; ++rep, ++done) {
                const ref::problem p = ref::random_problem(rng, E, d, lt, sigma, eps);
                if (progress && done % 256 == 0) progress(done, total);
                if (k > E) continue;
                const vec g = target_gradient(p, k);
                const double ng = ref::norm2(g);
                if (!(ng > 0.0)) {
                  ++degenerate;
                  continue;
                }
                problem_result r;
                r.k = k;
                r.eps = eps;
                r.E = E;
                r.d = d;
                r.sigma = sigma;
                r.loss = lt;
                r.grad_norm = ng;
                for (estimator_id id : cfg.estimators)
                  r.m.push_back(compare(estimator_moments(p, k, id), g));
                out.problems.push_back(std::move(r));
              }
            }
          }
        }
      }
      out.degenerate_by_setting.push_back(degenerate);
    }
  }
  if (progress) progress(total, total);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Summaries.
// ---------------------------------------------------------------------------------------------

inline double median(std::vector<double> v) {
  if (v.empty()) return std::numeric_limits<double>::quiet_NaN();
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/// One row of the table: an estimator over the problems that `keep` selects.
struct summary_row {
  std::string estimator;
  int problems = 0;
  double mean_cos = 0.0;
  double mean_rel = 0.0;
  double median_rel = 0.0;
  double median_relvar = 0.0;
  double median_relmse = 0.0;
  double win_vs_euler = 0.0;  // fraction of problems where rel is strictly below euler's
  double win_vs_grad0 = 0.0;  // ... below grad0_only's
};

inline std::size_t index_of(const study_config& cfg, estimator_id id) {
  for (std::size_t i = 0; i < cfg.estimators.size(); ++i)
    if (cfg.estimators[i] == id) return i;
  return cfg.estimators.size();
}

inline std::vector<summary_row> summarize(const study_config& cfg, const study_result& res,
                                          const std::function<bool(const problem_result&)>& keep) {
  std::vector<summary_row> rows;
  const std::size_t ie = index_of(cfg, estimator_id::euler);
  const std::size_t ig = index_of(cfg, estimator_id::grad0_only);
  for (std::size_t i = 0; i < cfg.estimators.size(); ++i) {
    summary_row s;
    s.estimator = estimator_name(cfg.estimators[i]);
    std::vector<double> rel, relvar, relmse;
    int win_e = 0, win_g = 0;
    for (const problem_result& p : res.problems) {
      if (!keep(p)) continue;
      const metric& m = p.m[i];
      ++s.problems;
      s.mean_cos += m.cos;
      s.mean_rel += m.rel;
      rel.push_back(m.rel);
      relvar.push_back(m.relvar);
      relmse.push_back(m.relmse);
      if (ie < p.m.size() && m.rel < p.m[ie].rel) ++win_e;
      if (ig < p.m.size() && m.rel < p.m[ig].rel) ++win_g;
    }
    if (s.problems > 0) {
      s.mean_cos /= s.problems;
      s.mean_rel /= s.problems;
      s.win_vs_euler = static_cast<double>(win_e) / s.problems;
      s.win_vs_grad0 = static_cast<double>(win_g) / s.problems;
    }
    s.median_rel = median(rel);
    s.median_relvar = median(relvar);
    s.median_relmse = median(relmse);
    rows.push_back(s);
  }
  return rows;
}

inline std::string eps_text(double eps) {
  if (eps == ref::no_mask) return "none";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", eps);
  return buf;
}

}  // namespace rg_analysis
