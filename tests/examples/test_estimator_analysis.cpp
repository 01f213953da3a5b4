// examples/estimator_analysis (analysis.hpp): the tool's numbers agree with SPEC §4 P1-P3 and
// with the reference moments of tests/common/reference.hpp.
//   - k = 1: its k-slot enumeration equals ref::moments (mean and total variance) for every rule.
//   - P1 (quadratic): the midpoint rule with the coin also flipped at D = a is unbiased for ∇F
//     (P1 for every D), and the SPEC midpoint's bias is exactly the D = a term.
//   - P2 (cubic): heun3 with the coin at D = a too estimates ∇₁ exactly, and the SPEC heun3's
//     deviation from ∇₁ is exactly the D = a term.
//   - P3: the tool's target ∇F_k (k = 1, 2) matches central differences of F_k; its dense and
//     top-k references match central differences of their own objectives.
//   - run_study: counts, finiteness, relmse = rel² + relvar, zero variance for the deterministic
//     references.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "estimator_analysis/analysis.hpp"

namespace {

using namespace rg_analysis;
using ref::vec;

const double kEps[] = {ref::no_mask, 0.1, 0.01};

/// π_a (G_a(π_a) − I_a) ∇π_a, I_a = (L(π_a f_a) − L(0)) / π_a: for a loss the rule integrates
/// exactly (midpoint: quadratic, heun3: cubic), what the SPEC rule (c = 1 at D = a) adds to the
/// expectation of its coin-at-argmax variant.
vec argmax_term(const ref::problem& p) {
  const ref::index_set S = ref::candidates(p);
  const vec pi = ref::softmax(p.z, S);
  const int a = ref::argmax(p.z, S);
  const double pa = pi[static_cast<std::size_t>(a)];
  const double Ia = (p.loss_at(a, pa) - p.loss_at_zero()) / pa;
  vec t = ref::softmax_jacobian_row(pi, S, a);
  for (double& v : t) v *= pa * (p.gate_grad(a, pa) - Ia);
  return t;
}

double scale_of(const vec& a, const vec& b) { return 1e-300 + ref::max_abs(a) + ref::max_abs(b); }

}  // namespace

TEST_SUITE("examples") {
  TEST_CASE("estimator_analysis: k = 1 enumeration equals the reference moments") {
    std::mt19937_64 rng(0xE5A1);
    int checks = 0;
    for (double eps : kEps)
      for (int E : {2, 3, 5, 8})
        for (int lt = 0; lt < 4; ++lt)
          for (int rep = 0; rep < 3; ++rep) {
            const ref::problem p =
                ref::random_problem(rng, E, 4, static_cast<ref::loss_type>(lt), 1.5, eps);
            for (estimator_id id :
                 {estimator_id::grad0_only, estimator_id::euler, estimator_id::midpoint,
                  estimator_id::heun3, estimator_id::midpoint_star}) {
              const moments got = estimator_moments(p, 1, id);
              const ref::estimator_moments want = ref::moments(p, rule_of(id));
              double var = 0.0;
              for (double v : want.variance) var += v;
              CHECK(ref::max_abs_diff(got.mean, want.mean) <=
                    1e-12 * scale_of(got.mean, want.mean));
              CHECK(std::fabs(got.trace_cov - var) <= 1e-10 * (1.0 + var));
              ++checks;
            }
            // E[euler] = 2 ∇₀ and E[grad0_only] = ∇₀ exactly
            vec g0 = ref::grad0(p);
            const vec eu = estimator_moments(p, 1, estimator_id::euler).mean;
            const vec g0o = estimator_moments(p, 1, estimator_id::grad0_only).mean;
            CHECK(ref::max_abs_diff(g0o, g0) <= 1e-12 * scale_of(g0, g0o));
            for (double& v : g0) v *= 2.0;
            CHECK(ref::max_abs_diff(eu, g0) <= 1e-12 * scale_of(g0, eu));
            // the two closed forms of ∇F agree (k = 1)
            const vec t1 = ref::exact_gradient(p);
            const vec tk = ref::exact_gradient_topk(p, 1);
            CHECK(ref::max_abs_diff(t1, tk) <= 1e-12 * scale_of(t1, tk));
          }
    CHECK(checks == 3 * 4 * 4 * 3 * 5);
  }

  TEST_CASE("estimator_analysis: P1 (quadratic) and P2 (cubic) through the tool's expectations") {
    std::mt19937_64 rng(0xE5A2);
    ref::rule heun3_star = ref::heun3_rule();
    heun3_star.coin_at_argmax = true;
    int quad = 0, cubic = 0, nonpoly_differs = 0, nonpoly = 0;
    for (double eps : kEps)
      for (int E : {2, 3, 4, 8, 16})
        for (double sigma : {0.5, 1.0, 2.0, 4.0})
          for (int rep = 0; rep < 3; ++rep) {
            // P1: for the quadratic loss the coin-averaged midpoint term is exact for every D ≠ a;
            // flipping the coin at D = a too makes the whole expectation ∇F, and the SPEC rule's
            // bias is exactly the D = a term.
            const ref::problem q =
                ref::random_problem(rng, E, 4, ref::loss_type::quadratic, sigma, eps);
            const vec g = target_gradient(q, 1);
            const vec mstar = estimator_moments(q, 1, estimator_id::midpoint_star).mean;
            CHECK(ref::max_abs_diff(mstar, g) <= 1e-11 * scale_of(mstar, g));
            vec mid_bias = estimator_moments(q, 1, estimator_id::midpoint).mean;
            ref::axpy(mid_bias, -1.0, g);
            const vec term = argmax_term(q);
            CHECK(ref::max_abs_diff(mid_bias, term) <= 1e-11 * scale_of(g, term));
            ++quad;

            // P2: for the cubic loss the coin-averaged heun3 term is exactly ∇₁'s term for every
            // D ≠ a (same structure with ∇₁ as the target).
            for (ref::loss_type lt : {ref::loss_type::cubic, ref::loss_type::logcosh}) {
              const ref::problem c = ref::random_problem(rng, E, 4, lt, sigma, eps);
              const vec g1 = ref::grad1(c);
              const vec hstar = sampled_moments(c, 1, heun3_star).mean;
              vec h_dev = estimator_moments(c, 1, estimator_id::heun3).mean;
              ref::axpy(h_dev, -1.0, g1);
              const vec hterm = argmax_term(c);
              const double err_star = ref::max_abs_diff(hstar, g1);
              const double err_term = ref::max_abs_diff(h_dev, hterm);
              const double sc = scale_of(g1, hterm) + ref::max_abs(ref::grad0(c));
              if (lt == ref::loss_type::cubic) {
                CHECK(err_star <= 1e-11 * sc);
                CHECK(err_term <= 1e-11 * sc);
                ++cubic;
              } else if (ref::set_size(ref::candidates(c)) > 1) {
                // negative control: log-cosh is not a polynomial, the rule is not exact
                ++nonpoly;
                if (err_star > 1e-8 * sc) ++nonpoly_differs;
              }
            }
          }
    MESSAGE("quadratic ", quad, ", cubic ", cubic, ", logcosh inexact in ", nonpoly_differs, " of ",
            nonpoly);
    CHECK(quad == 180);
    CHECK(cubic == 180);
    CHECK(nonpoly > 60);
    CHECK(nonpoly_differs > nonpoly * 9 / 10);
  }

  TEST_CASE("estimator_analysis: P3, the targets against finite differences") {
    std::mt19937_64 rng(0xE5A3);
    const double h = 1e-5;
    int checks = 0, skipped = 0, dense_checks = 0;
    for (int k : {1, 2})
      for (double eps : kEps)
        for (int E : {2, 3, 4, 6})
          for (double sigma : {0.5, 1.0, 3.0})
            for (int lt = 0; lt < 4; ++lt) {
              if (k > E) continue;
              const ref::problem p =
                  ref::random_problem(rng, E, 3, static_cast<ref::loss_type>(lt), sigma, eps);
              // dense mixture: smooth everywhere
              if (k == 1) {
                ref::problem pd = p;
                auto dense_obj = [&](const vec& z) {
                  pd.z = z;
                  const vec pi = ref::softmax(z, ref::usable_experts(z));
                  vec y(3, 0.0);
                  for (std::size_t e = 0; e < z.size(); ++e) ref::axpy(y, pi[e], p.f[e]);
                  return p.L.value(y);
                };
                const vec gd = dense_gradient(p);
                const vec fd = ref::central_difference(dense_obj, p.z, h);
                CHECK(ref::max_abs_diff(gd, fd) <= 1e-6 * scale_of(gd, fd) + 1e-10);
                ++dense_checks;
              }
              if (!ref::masks_locally_constant(p.z, eps, k, h)) {
                ++skipped;
                continue;
              }
              const vec g = target_gradient(p, k);
              const vec fd = ref::central_difference(
                  [&](const vec& z) { return ref::objective_topk(p, k, z); }, p.z, h);
              const double F = ref::objective_topk(p, k, p.z);
              CHECK(ref::max_abs_diff(g, fd) <=
                    1e-6 * scale_of(g, fd) + 1e-9 * (1.0 + std::fabs(F)));
              ++checks;
            }
    MESSAGE("P3 via the tool: ", checks, " checked, ", skipped,
            " skipped (mask boundary within h)");
    CHECK(checks > 200);
    CHECK(dense_checks == 3 * 4 * 3 * 4);
  }

  TEST_CASE("estimator_analysis: top-k softmax reference against finite differences") {
    std::mt19937_64 rng(0xE5A4);
    const double h = 1e-6;
    int checks = 0;
    for (int k : {1, 2, 3})
      for (int E : {3, 5, 8})
        for (int rep = 0; rep < 6; ++rep) {
          const ref::problem p =
              ref::random_problem(rng, E, 4, ref::loss_type::logcosh, 1.0, ref::no_mask);
          // the objective with the top-k set held fixed (it is piecewise smooth)
          const std::vector<int> top =
              top_k_indices(ref::softmax(p.z, ref::usable_experts(p.z)), k);
          auto obj = [&](const vec& z) {
            const vec pi = ref::softmax(z, ref::usable_experts(z));
            vec y(4, 0.0);
            for (int D : top)
              ref::axpy(y, pi[static_cast<std::size_t>(D)], p.f[static_cast<std::size_t>(D)]);
            return p.L.value(y);
          };
          const vec g = topk_softmax_gradient(p, k);
          const vec fd = ref::central_difference(obj, p.z, h);
          CHECK(ref::max_abs_diff(g, fd) <= 1e-6 * scale_of(g, fd) + 1e-9);
          ++checks;
        }
    CHECK(checks == 54);
  }

  TEST_CASE("estimator_analysis: run_study on a small problem set") {
    study_config cfg;
    cfg.reps = 3;
    cfg.experts = {2, 4};
    cfg.dims = {3};
    cfg.sigmas = {1.0};
    cfg.estimators.push_back(estimator_id::midpoint_star);
    const study_result res = run_study(cfg);
    REQUIRE(res.degenerate_by_setting.size() == cfg.ks.size() * cfg.eps.size());
    int degenerate = 0;
    for (int d : res.degenerate_by_setting) degenerate += d;
    CHECK(static_cast<int>(res.problems.size()) + degenerate ==
          static_cast<int>(cfg.ks.size() * cfg.eps.size() * 2 * 1 * 1 * 4 * 3));
    CHECK(res.degenerate_by_setting[0] == 0);  // k = 1, no mask: never a single candidate
    for (const problem_result& p : res.problems) {
      REQUIRE(p.m.size() == cfg.estimators.size());
      CHECK(p.grad_norm > 0.0);
      for (std::size_t i = 0; i < p.m.size(); ++i) {
        const metric& m = p.m[i];
        CHECK(std::isfinite(m.rel));
        CHECK(std::isfinite(m.relvar));
        CHECK(m.cos <= 1.0 + 1e-12);
        CHECK(m.cos >= -1.0 - 1e-12);
        CHECK(m.relmse == doctest::Approx(m.rel * m.rel + m.relvar));
        if (!is_sampled(cfg.estimators[i])) CHECK(m.relvar == 0.0);
      }
      // E[euler] = 2 E[grad0_only] (both run c = 1, weights 2 and 1), for every k
      CHECK(p.m[1].cos == doctest::Approx(p.m[0].cos).epsilon(1e-9));
      // P1 in the table: midpoint* is unbiased for the quadratic loss (k = 1)
      if (p.k == 1 && p.loss == ref::loss_type::quadratic) CHECK(p.m.back().rel < 1e-9);
    }
    const std::vector<summary_row> rows = summarize(
        cfg, res, [](const problem_result& p) { return p.k == 1 && p.eps == ref::no_mask; });
    REQUIRE(rows.size() == cfg.estimators.size());
    CHECK(rows[0].problems == 2 * 4 * 3);
    CHECK(rows[1].win_vs_euler == 0.0);  // nothing is strictly better than itself
    CHECK(rows[0].win_vs_grad0 == 0.0);
  }
}
