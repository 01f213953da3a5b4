// SPEC.md section 4, properties P1-P4, checked on the double-precision reference
// (tests/common/reference.hpp) by exact enumeration of every D and every coin outcome.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "common/reference.hpp"

namespace {

using namespace routegrad::test::ref;

const double kEpsSettings[] = {no_mask, 0.1, 0.01};

const char* eps_label(double eps) {
  return eps == no_mask ? "none" : (eps == 0.1 ? "0.1" : "0.01");
}

// (L(pi_D f_D) - L(0)) / pi_D : the exact path integral  int_0^1 G_D(s pi_D) ds.
double path_integral(const problem& p, int D, double piD) {
  return (p.loss_at(D, piD) - p.loss_at_zero()) / piD;
}

}  // namespace

// P1. Quadratic loss: for every D != a, the coin-averaged midpoint estimate equals
// (G_D(pi_D) + (L(pi_D f_D) - L(0)) / pi_D) grad pi_D to 1e-12.
// The tolerance is relative to the magnitude of the terms of the formula,
// (|G(pi)| + |G(pi/2)| + (|L(pi f)| + |L(0)|) / pi) |grad pi|_inf, because computing
// L(pi f) - L(0) in double loses |L(0)| * 1e-16 absolutely whatever the formula is.
TEST_CASE("SPEC P1: midpoint is exact for a quadratic loss (D != a)") {
  std::mt19937_64 rng(0xA11CE001ULL);
  const rule mid = midpoint_rule();
  int checks = 0;
  int euler_differs = 0;
  double worst = 0.0;
  for (double eps : kEpsSettings) {
    for (int E : {2, 3, 4, 8, 16}) {
      for (int d : {1, 4, 16}) {
        for (double sigma : {0.5, 1.0, 2.0, 4.0}) {
          for (int rep = 0; rep < 4; ++rep) {
            const problem p = random_problem(rng, E, d, loss_type::quadratic, sigma, eps);
            const index_set S = candidates(p);
            const vec pi = softmax(p.z, S);
            const int a = argmax(p.z, S);
            for (int D = 0; D < E; ++D) {
              if (!S[static_cast<std::size_t>(D)] || D == a) continue;
              const double piD = pi[static_cast<std::size_t>(D)];
              const vec J = softmax_jacobian_row(pi, S, D);
              const double coef = p.gate_grad(D, piD) + path_integral(p, D, piD);
              vec target = J;
              for (double& v : target) v *= coef;
              const vec got = coin_average(p, mid, D);
              const double scale =
                  (std::fabs(p.gate_grad(D, piD)) + std::fabs(p.gate_grad(D, piD / 2)) +
                   (std::fabs(p.loss_at(D, piD)) + std::fabs(p.loss_at_zero())) / piD) *
                  max_abs(J);
              const double err = max_abs_diff(got, target);
              CHECK(err <= 1e-12 * scale);
              if (scale > 0) worst = std::max(worst, err / scale);
              ++checks;
              // negative control: the Euler rule is not exact here
              if (max_abs_diff(coin_average(p, euler_rule(), D), target) > 1e-6 * scale)
                ++euler_differs;
            }
          }
        }
      }
    }
  }
  std::printf(
      "[P1] %d (problem, D != a) cases, worst error / term scale = %.3g; euler differs in %d\n",
      checks, worst, euler_differs);
  CHECK(checks > 500);
  CHECK(euler_differs > checks / 2);
}

// P2. Cubic loss: the coin-averaged heun3 estimate for D != a equals
// (L(pi_D f_D) - L(0)) / pi_D grad pi_D to 1e-12 (same tolerance convention as P1).
TEST_CASE("SPEC P2: heun3 is exact for a cubic loss (D != a)") {
  std::mt19937_64 rng(0xA11CE002ULL);
  const rule h3 = heun3_rule();
  int checks = 0;
  int nonpoly_differs = 0;
  int nonpoly_checks = 0;
  double worst = 0.0;
  for (double eps : kEpsSettings) {
    for (int E : {2, 3, 4, 8, 16}) {
      for (int d : {1, 4, 16}) {
        for (double sigma : {0.5, 1.0, 2.0, 4.0}) {
          for (int rep = 0; rep < 4; ++rep) {
            for (loss_type lt : {loss_type::cubic, loss_type::quadratic, loss_type::logcosh}) {
              const problem p = random_problem(rng, E, d, lt, sigma, eps);
              const index_set S = candidates(p);
              const vec pi = softmax(p.z, S);
              const int a = argmax(p.z, S);
              for (int D = 0; D < E; ++D) {
                if (!S[static_cast<std::size_t>(D)] || D == a) continue;
                const double piD = pi[static_cast<std::size_t>(D)];
                const vec J = softmax_jacobian_row(pi, S, D);
                vec target = J;
                for (double& v : target) v *= path_integral(p, D, piD);
                const vec got = coin_average(p, h3, D);
                const double scale =
                    (std::fabs(p.gate_grad(D, piD)) + std::fabs(p.gate_grad(D, piD / 3)) +
                     (std::fabs(p.loss_at(D, piD)) + std::fabs(p.loss_at_zero())) / piD) *
                    max_abs(J);
                const double err = max_abs_diff(got, target);
                if (lt == loss_type::logcosh) {
                  // negative control: not a polynomial, the rule is not exact
                  ++nonpoly_checks;
                  if (err > 1e-9 * scale) ++nonpoly_differs;
                  continue;
                }
                CHECK(err <= 1e-12 * scale);
                if (scale > 0) worst = std::max(worst, err / scale);
                ++checks;
              }
            }
          }
        }
      }
    }
  }
  std::printf(
      "[P2] %d (problem, D != a) cases (cubic and quadratic), worst error / term scale = %.3g; "
      "logcosh differs in %d of %d\n",
      checks, worst, nonpoly_differs, nonpoly_checks);
  CHECK(checks > 1000);
  CHECK(nonpoly_differs > nonpoly_checks / 2);
}

// P3 (k = 1). Closed-form grad F = grad_0 + grad_1 vs central finite differences of F.
TEST_CASE("SPEC P3: exact gradient of F vs finite differences (k = 1)") {
  std::mt19937_64 rng(0xA11CE003ULL);
  const double h = 1e-5;
  int checks = 0;
  int skipped = 0;
  for (double eps : kEpsSettings) {
    for (int E : {1, 2, 3, 5, 8, 16}) {
      for (int d : {1, 4, 16}) {
        for (double sigma : {0.5, 1.0, 3.0}) {
          for (loss_type lt :
               {loss_type::quadratic, loss_type::cubic, loss_type::logcosh, loss_type::softplus}) {
            const problem p = random_problem(rng, E, d, lt, sigma, eps);
            if (!masks_locally_constant(p.z, eps, 1, h)) {
              ++skipped;
              continue;
            }
            const vec g = exact_gradient(p);
            const vec fd =
                central_difference([&](const vec& z) { return objective(p, z); }, p.z, h);
            const double F = objective(p);
            const double tol =
                1e-6 * std::max(max_abs(g), max_abs(fd)) + 1e-9 * (1.0 + std::fabs(F));
            CHECK(max_abs_diff(g, fd) <= tol);
            // the k = 1 case of the top-k formula is the same gradient
            const vec gk = exact_gradient_topk(p, 1);
            CHECK(max_abs_diff(g, gk) <= 1e-12 * (1.0 + max_abs(g)));
            CHECK(std::fabs(objective_topk(p, 1, p.z) - F) <= 1e-12 * (1.0 + std::fabs(F)));
            // "grad_0 only" is unbiased for grad_0 (what ordinary MoE training keeps)
            CHECK(max_abs_diff(expectation(p, grad0_only_rule()), grad0(p)) <=
                  1e-12 * (1.0 + max_abs(g)));
            ++checks;
          }
        }
      }
    }
  }
  std::printf("[P3 k=1] %d problems checked, %d skipped (mask boundary within h)\n", checks,
              skipped);
  CHECK(checks > 500);
  CHECK(skipped * 10 < checks);
}

// P3 (k >= 2). Exact gradient of F_k (sequential sampling without replacement, SPEC section 3)
// vs central finite differences of F_k.
TEST_CASE("SPEC P3: exact gradient of F_k vs finite differences (k = 2 and 3)") {
  std::mt19937_64 rng(0xA11CE004ULL);
  const double h = 1e-5;
  int checks = 0;
  int skipped = 0;
  for (int k : {2, 3}) {
    for (double eps : kEpsSettings) {
      for (int E : {3, 4, 6, 8}) {
        if (E < k) continue;
        for (double sigma : {0.5, 1.0, 3.0}) {
          for (loss_type lt :
               {loss_type::quadratic, loss_type::cubic, loss_type::logcosh, loss_type::softplus}) {
            const problem p = random_problem(rng, E, 3, lt, sigma, eps);
            // probabilities of the ordered tuples sum to one
            double total = 0.0;
            int tuples = 0;
            for_each_sequence(p.z, k, eps, [&](const std::vector<slot>& s, double prob) {
              CHECK(static_cast<int>(s.size()) == k);
              total += prob;
              ++tuples;
            });
            CHECK(std::fabs(total - 1.0) < 1e-13);
            if (eps == no_mask) {
              int expected = 1;
              for (int j = 0; j < k; ++j) expected *= E - j;
              CHECK(tuples == expected);
            }
            if (!masks_locally_constant(p.z, eps, k, h)) {
              ++skipped;
              continue;
            }
            const vec g = exact_gradient_topk(p, k);
            const vec fd =
                central_difference([&](const vec& z) { return objective_topk(p, k, z); }, p.z, h);
            const double F = objective_topk(p, k, p.z);
            const double tol =
                1e-6 * std::max(max_abs(g), max_abs(fd)) + 1e-9 * (1.0 + std::fabs(F));
            CHECK(max_abs_diff(g, fd) <= tol);
            ++checks;
          }
        }
      }
    }
  }
  std::printf("[P3 k=2,3] %d problems checked, %d skipped (mask boundary within h)\n", checks,
              skipped);
  CHECK(checks > 150);
  CHECK(skipped * 10 < checks);
}

// ---------------------------------------------------------------------------------------------
// P4: bias of each estimator's expectation vs grad F on a fixed, untuned random problem set.
// The problem set is fixed by the brief (sigma, E, d, losses) and one seed; nothing here is tuned
// to make a claim pass. Only what holds by construction or by a wide margin is asserted; the
// paper's ordering claim is printed (HOLDS / FAILS), not asserted.
// ---------------------------------------------------------------------------------------------

namespace {

struct p4_rule_stats {
  std::string name;
  double sum_cos = 0.0;
  double sum_rel = 0.0;
  double sum_relvar = 0.0;     // trace(Cov) / |grad F|^2
  double sum_var = 0.0;        // trace(Cov)
  std::vector<double> rel;     // per problem
  std::vector<double> relvar;  // per problem
  double sum_rel_by_loss[4] = {0, 0, 0, 0};
  double sum_rel_by_sigma[3] = {0, 0, 0};
  bool all_finite = true;
};

struct p4_result {
  double eps = no_mask;
  int problems = 0;
  int degenerate = 0;  // |S| = 1, grad F = 0: skipped
  int count_by_loss[4] = {0, 0, 0, 0};
  int count_by_sigma[3] = {0, 0, 0};
  std::vector<p4_rule_stats> rules;  // euler, midpoint, heun3, grad0_only, midpoint* (diagnostic)
  // identities that hold by construction (asserted):
  double worst_euler_vs_2grad0 = 0.0;  // E[euler] = 2 grad_0 exactly
  double worst_mid_bias_identity =
      0.0;  // quadratic: E[midpoint] - grad F = pi_a (G_a(pi_a) - I_a) grad pi_a
  double worst_midstar_quadratic =
      0.0;  // quadratic: midpoint with the coin at D = a too is unbiased
};

enum { kEuler = 0, kMidpoint = 1, kHeun3 = 2, kGrad0 = 3, kMidStar = 4 };

const double kP4Sigmas[3] = {0.5, 1.0, 2.0};

p4_result run_p4(double eps, unsigned long long seed) {
  p4_result res;
  res.eps = eps;
  rule mid_star = midpoint_rule();
  mid_star.name = "midpoint*";
  mid_star.coin_at_argmax = true;
  const std::vector<rule> rules = {euler_rule(), midpoint_rule(), heun3_rule(), grad0_only_rule(),
                                   mid_star};
  for (const rule& r : rules) {
    p4_rule_stats st;
    st.name = r.name;
    res.rules.push_back(st);
  }
  std::mt19937_64 rng(seed);  // same problems (logits before masking) for every eps setting
  const int per_cell = 25;
  for (int si = 0; si < 3; ++si) {
    for (int E : {4, 8, 16}) {
      for (int d : {4, 16}) {
        for (int li = 0; li < 4; ++li) {
          for (int rep = 0; rep < per_cell; ++rep) {
            const problem p =
                random_problem(rng, E, d, static_cast<loss_type>(li), kP4Sigmas[si], eps);
            const vec g = exact_gradient(p);
            const double ng = norm2(g);
            if (ng == 0.0) {
              ++res.degenerate;
              continue;
            }
            ++res.problems;
            ++res.count_by_loss[li];
            ++res.count_by_sigma[si];
            std::vector<vec> means;
            for (std::size_t ri = 0; ri < rules.size(); ++ri) {
              const estimator_moments m = moments(p, rules[ri]);
              means.push_back(m.mean);
              p4_rule_stats& st = res.rules[ri];
              const double c = cosine(m.mean, g);
              vec diff = m.mean;
              axpy(diff, -1.0, g);
              const double rel = norm2(diff) / ng;
              double var = 0.0;
              for (double v : m.variance) var += v;
              if (!std::isfinite(c) || !std::isfinite(rel) || !std::isfinite(var))
                st.all_finite = false;
              st.sum_cos += c;
              st.sum_rel += rel;
              st.sum_var += var;
              st.sum_relvar += var / (ng * ng);
              st.rel.push_back(rel);
              st.relvar.push_back(var / (ng * ng));
              st.sum_rel_by_loss[li] += rel;
              st.sum_rel_by_sigma[si] += rel;
            }
            const double scale = max_abs(g) + max_abs(means[kEuler]);
            vec two_g0 = grad0(p);
            for (double& v : two_g0) v *= 2.0;
            res.worst_euler_vs_2grad0 =
                std::max(res.worst_euler_vs_2grad0, max_abs_diff(means[kEuler], two_g0) / scale);
            if (static_cast<loss_type>(li) == loss_type::quadratic) {
              const index_set S = candidates(p);
              const vec pi = softmax(p.z, S);
              const int a = argmax(p.z, S);
              const double pa = pi[static_cast<std::size_t>(a)];
              vec bias = softmax_jacobian_row(pi, S, a);
              const double coef = pa * (p.gate_grad(a, pa) - path_integral(p, a, pa));
              for (double& v : bias) v *= coef;
              vec mid_bias = means[kMidpoint];
              axpy(mid_bias, -1.0, g);
              res.worst_mid_bias_identity =
                  std::max(res.worst_mid_bias_identity, max_abs_diff(mid_bias, bias) / scale);
              res.worst_midstar_quadratic =
                  std::max(res.worst_midstar_quadratic, max_abs_diff(means[kMidStar], g) / scale);
            }
          }
        }
      }
    }
  }
  return res;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  if (v.empty()) return std::nan("");
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Fraction of problems where rule x's relative error is strictly below rule y's.
double win_fraction(const p4_rule_stats& x, const p4_rule_stats& y) {
  int w = 0;
  for (std::size_t i = 0; i < x.rel.size(); ++i) w += x.rel[i] < y.rel[i] ? 1 : 0;
  return x.rel.empty() ? 0.0 : static_cast<double>(w) / static_cast<double>(x.rel.size());
}

bool paper_claim_on_mean(const p4_result& r) {
  const double eu = r.rules[kEuler].sum_rel;
  const double mi = r.rules[kMidpoint].sum_rel;
  const double g0 = r.rules[kGrad0].sum_rel;
  return mi < eu && eu < g0 && mi < g0;
}

void print_p4(const p4_result& r) {
  const double n = r.problems;
  std::printf(
      "\n[P4] mask eps = %s: %d problems (E in {4,8,16}, d in {4,16}, sigma in {0.5,1,2}, 4 "
      "losses, "
      "25 each; %d degenerate with |S| = 1 skipped)\n",
      eps_label(r.eps), r.problems, r.degenerate);
  std::printf(
      "  E[estimator] vs grad F. rel = |E - grad F| / |grad F|; relvar = trace(Cov) / |grad "
      "F|^2.\n");
  std::printf(
      "  midpoint* = midpoint with the coin flipped at D = a too (NOT a SPEC rule; diagnostic)\n");
  std::printf("  %-11s %9s %9s %9s %12s %12s %12s\n", "estimator", "mean cos", "mean rel",
              "med rel", "mean relvar", "med relvar", "mean var");
  for (const p4_rule_stats& s : r.rules)
    std::printf("  %-11s %9.4f %9.4f %9.4f %12.4g %12.4g %12.4g\n", s.name.c_str(), s.sum_cos / n,
                s.sum_rel / n, median(s.rel), s.sum_relvar / n, median(s.relvar), s.sum_var / n);
  std::printf("  mean rel by loss:  ");
  for (int li = 0; li < 4; ++li) std::printf(" %10s", loss_name(static_cast<loss_type>(li)));
  std::printf("\n");
  for (const p4_rule_stats& s : r.rules) {
    std::printf("    %-15s", s.name.c_str());
    for (int li = 0; li < 4; ++li)
      std::printf(" %10.4f", s.sum_rel_by_loss[li] / r.count_by_loss[li]);
    std::printf("\n");
  }
  std::printf("  mean rel by sigma: ");
  for (int si = 0; si < 3; ++si) std::printf("  sigma=%-4g", kP4Sigmas[si]);
  std::printf("\n");
  for (const p4_rule_stats& s : r.rules) {
    std::printf("    %-15s", s.name.c_str());
    for (int si = 0; si < 3; ++si)
      std::printf(" %10.4f", s.sum_rel_by_sigma[si] / r.count_by_sigma[si]);
    std::printf("\n");
  }
  const p4_rule_stats& eu = r.rules[kEuler];
  const p4_rule_stats& mi = r.rules[kMidpoint];
  const p4_rule_stats& h3 = r.rules[kHeun3];
  const p4_rule_stats& g0 = r.rules[kGrad0];
  const p4_rule_stats& ms = r.rules[kMidStar];
  std::printf(
      "  per-problem wins (rel strictly lower): midpoint<euler %.3f, euler<grad0_only %.3f, "
      "midpoint<grad0_only %.3f,\n    heun3<grad0_only %.3f, heun3<euler %.3f, midpoint*<euler "
      "%.3f\n",
      win_fraction(mi, eu), win_fraction(eu, g0), win_fraction(mi, g0), win_fraction(h3, g0),
      win_fraction(h3, eu), win_fraction(ms, eu));
  std::printf(
      "  paper claim on mean rel (midpoint < euler, both < grad0_only): %s;  on median rel: %s\n",
      paper_claim_on_mean(r) ? "HOLDS" : "FAILS",
      (median(mi.rel) < median(eu.rel) && median(eu.rel) < median(g0.rel) &&
       median(mi.rel) < median(g0.rel))
          ? "HOLDS"
          : "FAILS");
  std::printf(
      "  identities: max |E[euler] - 2 grad_0| = %.2g; quadratic: max |midpoint bias - D=a term| = "
      "%.2g, "
      "max |E[midpoint*] - grad F| = %.2g (relative)\n",
      r.worst_euler_vs_2grad0, r.worst_mid_bias_identity, r.worst_midstar_quadratic);
}

}  // namespace

TEST_CASE("SPEC P4: bias table of euler midpoint heun3 and grad0_only vs grad F") {
  for (double eps : {no_mask, 0.1}) {
    const p4_result r = run_p4(eps, 0xB1A5ULL);
    print_p4(r);
    REQUIRE(r.rules.size() == 5);
    CHECK(r.problems + r.degenerate == 3 * 3 * 2 * 4 * 25);
    CHECK(r.problems >= 250);
    for (int li = 0; li < 4; ++li) CHECK(r.count_by_loss[li] > 0);
    for (int si = 0; si < 3; ++si) CHECK(r.count_by_sigma[si] > 0);
    for (const p4_rule_stats& s : r.rules) {
      CHECK(s.all_finite);
      CHECK(s.rel.size() == static_cast<std::size_t>(r.problems));
      const double mc = s.sum_cos / r.problems;
      CHECK(std::isfinite(mc));
      CHECK(mc <= 1.0 + 1e-12);
      CHECK(mc >= -1.0 - 1e-12);
    }
    // Identities (hold by construction of the rules; they explain the table):
    // Euler's expectation is exactly 2 grad_0 (same direction as "grad_0 only").
    CHECK(r.worst_euler_vs_2grad0 <= 1e-12);
    // Quadratic loss: midpoint's whole bias is the D = a term, where SPEC keeps c = 1.
    CHECK(r.worst_mid_bias_identity <= 1e-12);
    // ... and flipping the coin at D = a as well would make it unbiased.
    CHECK(r.worst_midstar_quadratic <= 1e-12);
    // What holds by a wide margin on this set (and on other seeds: win fractions 0.78-0.85 and
    // 0.68-0.82): euler and midpoint each beat "grad_0 only" on most problems and on the median
    // relative error. The paper's full ordering (midpoint closer than euler) does NOT hold here
    // and is not asserted: see the printed HOLDS / FAILS line.
    const p4_rule_stats& eu = r.rules[kEuler];
    const p4_rule_stats& mi = r.rules[kMidpoint];
    const p4_rule_stats& g0 = r.rules[kGrad0];
    CHECK(win_fraction(eu, g0) > 0.6);
    CHECK(median(eu.rel) < median(g0.rel));
    CHECK(win_fraction(mi, g0) > 0.6);
    CHECK(median(mi.rel) < median(g0.rel));
  }
}
