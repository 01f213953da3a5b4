// Self-checks of tests/common/reference.hpp and tests/common/estimator_reference.hpp: wherever an
// estimator's backward IS a true derivative (topk_softmax and switch for fixed choices; sparsemixer
// with fixed choices and locally constant masks, up to its weight w; renormalised gates; the
// load-balancing and z losses), compare it with central finite differences, so that the reference
// itself can fail.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "common/estimator_reference.hpp"
#include "common/reference.hpp"

namespace {

using namespace routegrad::test::ref;

// Finite-difference agreement: |a - b|_inf <= rel * max(|a|_inf, |b|_inf) + abs.
bool fd_close(const vec& analytic, const vec& fd, double rel, double abs_tol) {
  return max_abs_diff(analytic, fd) <= rel * std::max(max_abs(analytic), max_abs(fd)) + abs_tol;
}

vec random_normal(std::mt19937_64& rng, std::size_t n, double sigma) {
  std::normal_distribution<double> normal(0.0, sigma);
  vec v(n);
  for (double& x : v) x = normal(rng);
  return v;
}

// Draw D_1..D_k sequentially from the sparsemixer slot distributions.
std::vector<int> sample_sequential(const vec& z, int k, double eps, std::mt19937_64& rng) {
  std::vector<int> chosen;
  for (int j = 0; j < k; ++j) {
    const index_set S = slot_candidates(z, eps, chosen);
    const vec pi = softmax(z, S);
    std::discrete_distribution<int> pick(pi.begin(), pi.end());
    chosen.push_back(pick(rng));
  }
  return chosen;
}

// The masks of the slots along `chosen` do not change under z +- h e_i for any i.
bool chosen_masks_stable(const vec& z, double eps, const std::vector<int>& chosen, double h) {
  std::vector<int> before;
  for (std::size_t j = 0; j < chosen.size(); ++j) {
    const index_set S = slot_candidates(z, eps, before);
    for (std::size_t i = 0; i < z.size(); ++i) {
      for (double sgn : {-1.0, 1.0}) {
        vec zp = z;
        zp[i] += sgn * h;
        if (slot_candidates(zp, eps, before) != S) return false;
      }
    }
    before.push_back(chosen[j]);
  }
  return true;
}

// phi(z) = sum_j G_j gates_j(z) for the given args (choices fixed).
double gate_functional(token_args a, const vec& z, const vec& G) {
  a.z = z;
  const token_forward fw = forward(a);
  return dot(G, fw.gates);
}

constexpr double kH = 1e-6;
constexpr double kRel = 1e-6;
constexpr double kAbs = 1e-9;

}  // namespace

TEST_CASE("ref: softmax over a set and its Jacobian and argmax ties") {
  std::mt19937_64 rng(0x5eed0001ULL);
  std::uniform_int_distribution<int> coin(0, 1);
  for (int trial = 0; trial < 300; ++trial) {
    const std::size_t E = 1 + static_cast<std::size_t>(trial % 12);
    const vec z = random_normal(rng, E, 3.0);
    index_set S(E, false);
    for (std::size_t i = 0; i < E; ++i) S[i] = coin(rng) == 1;
    const vec pi = softmax(z, S);
    double sum = 0.0;
    for (std::size_t i = 0; i < E; ++i) {
      if (!S[i]) CHECK(pi[i] == 0.0);
      CHECK(pi[i] >= 0.0);
      sum += pi[i];
    }
    if (set_size(S) == 0) {
      CHECK(sum == 0.0);
      CHECK(argmax(z, S) == -1);
      continue;
    }
    CHECK(std::fabs(sum - 1.0) < 1e-14);
    // shift invariance
    vec zs = z;
    for (double& v : zs) v += 7.25;
    CHECK(max_abs_diff(softmax(zs, S), pi) < 1e-14);
    // argmax: in S, not beaten by any member of S
    const int a = argmax(z, S);
    REQUIRE(a >= 0);
    CHECK(S[static_cast<std::size_t>(a)]);
    for (std::size_t i = 0; i < E; ++i)
      if (S[i]) CHECK(z[i] <= z[static_cast<std::size_t>(a)]);
    // Jacobian rows vs finite differences of pi_D
    for (std::size_t D = 0; D < E; ++D) {
      if (!S[D]) continue;
      const vec J = softmax_jacobian_row(pi, S, static_cast<int>(D));
      const vec fd = central_difference([&](const vec& x) { return softmax(x, S)[D]; }, z, kH);
      CHECK(fd_close(J, fd, kRel, 1e-10));
    }
  }
  // ties go to the lowest index
  for (int trial = 0; trial < 100; ++trial) {
    const std::size_t E = 2 + static_cast<std::size_t>(trial % 10);
    vec z = random_normal(rng, E, 1.0);
    std::uniform_int_distribution<std::size_t> idx(0, E - 1);
    std::size_t i = idx(rng);
    std::size_t j = idx(rng);
    if (i == j) j = (i + 1) % E;
    const double top = max_abs(z) + 1.0;
    z[i] = top;
    z[j] = top;
    CHECK(argmax(z, index_set(E, true)) == static_cast<int>(std::min(i, j)));
    const std::vector<int> tk = top_k(z, 2);
    CHECK(tk[0] == static_cast<int>(std::min(i, j)));
    CHECK(tk[1] == static_cast<int>(std::max(i, j)));
  }
}

TEST_CASE("ref: jitter mask (SPEC section 2)") {
  std::mt19937_64 rng(0x5eed0002ULL);
  const double eps_list[] = {0.01, 0.1, 0.25, 0.45};
  for (int trial = 0; trial < 400; ++trial) {
    const std::size_t E = 1 + static_cast<std::size_t>(trial % 16);
    const double eps = eps_list[trial % 4];
    const double shift = (trial % 3 == 0) ? -3.0 : (trial % 3 == 1 ? 0.0 : 3.0);
    vec z = random_normal(rng, E, 1.0 + (trial % 5));
    for (double& v : z) v += shift;
    const index_set all(E, true);
    const index_set S = jitter_mask(z, all, eps);
    const int a = argmax(z, all);
    CHECK(S[static_cast<std::size_t>(a)]);  // the best expert is always kept
    const double m = z[static_cast<std::size_t>(a)];
    for (std::size_t i = 0; i < E; ++i) {
      // equivalent case forms of (m - z_i) / max(|z_i|, m) > 2 eps, valid for eps < 1/2:
      bool removed;
      if (m > 0.0 && z[i] > 0.0)
        removed = z[i] < m * (1.0 - 2.0 * eps);
      else if (m > 0.0)
        removed = true;  // m - z_i >= max(m, -z_i) > 2 eps max(|z_i|, m)
      else
        removed = z[i] * (1.0 - 2.0 * eps) < m;      // z_i <= m <= 0: denominator |z_i|
      if (z[i] == 0.0 && m == 0.0) removed = false;  // 0/0: kept
      CHECK(S[i] == !removed);
    }
    // a larger eps never removes more
    const index_set S_loose = jitter_mask(z, all, std::min(0.49, eps * 2.0));
    for (std::size_t i = 0; i < E; ++i)
      if (S[i]) CHECK(S_loose[i]);
    // no mask keeps every finite logit
    CHECK(set_size(jitter_mask(z, all, no_mask)) == static_cast<int>(E));
    // the mask never adds experts outside the given set, m is taken over that set
    if (E >= 2) {
      index_set sub = all;
      sub[static_cast<std::size_t>(a)] = false;
      const index_set Ssub = jitter_mask(z, sub, eps);
      CHECK_FALSE(Ssub[static_cast<std::size_t>(a)]);
      CHECK(Ssub[static_cast<std::size_t>(argmax(z, sub))]);
      for (std::size_t i = 0; i < E; ++i)
        if (S[i] && sub[i]) CHECK(Ssub[i]);  // a lower max only keeps more
    }
  }
  // zero denominator: z_i = m = 0 is kept
  {
    const vec z = {0.0, -1.0, 0.0, -0.5};
    const index_set S = jitter_mask(z, index_set(4, true), 0.1);
    CHECK(S[0]);
    CHECK(S[2]);
    CHECK(set_size(jitter_mask(vec(5, 0.0), index_set(5, true), 0.1)) == 5);
  }
  // non-finite logits are never candidates
  {
    const double inf = std::numeric_limits<double>::infinity();
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const vec z = {-inf, 0.5, nan, 0.45, -inf};
    for (double eps : {0.1, no_mask}) {
      const index_set S = jitter_mask(z, index_set(5, true), eps);
      CHECK_FALSE(S[0]);
      CHECK_FALSE(S[2]);
      CHECK_FALSE(S[4]);
      CHECK(S[1]);
      CHECK(S[3]);
    }
    CHECK(set_size(jitter_mask(vec(3, -inf), index_set(3, true), 0.1)) == 0);
  }
}

TEST_CASE("ref: topk_softmax and switch backward are the exact derivative of their gates") {
  std::mt19937_64 rng(0x5eed0003ULL);
  std::uniform_real_distribution<double> noise_dist(0.9, 1.1);
  int checks = 0;
  for (int trial = 0; trial < 240; ++trial) {
    const int E = 2 + trial % 15;
    const int k = 1 + (trial / 15) % std::min(E, 4);
    const bool renorm = (trial % 2) == 1;
    const vec z = random_normal(rng, static_cast<std::size_t>(E), 2.0);
    const vec G = random_normal(rng, static_cast<std::size_t>(k), 1.0);
    for (kind est : {kind::topk_softmax, kind::switch_}) {
      token_args a;
      a.estimator = est;
      a.z = z;
      a.k = k;
      a.renormalize = renorm;
      if (est == kind::switch_)
        for (int i = 0; i < E; ++i) a.noise.push_back(noise_dist(rng));
      const token_forward fw = forward(a);
      // the choices are the top-k of (noisy) pi, distinct, gates = pi at them
      REQUIRE(fw.experts.size() == static_cast<std::size_t>(k));
      const vec& pi = fw.slots[0].pi;
      std::vector<bool> picked(static_cast<std::size_t>(E), false);
      for (int j = 0; j < k; ++j) {
        const std::size_t D = static_cast<std::size_t>(fw.experts[static_cast<std::size_t>(j)]);
        CHECK_FALSE(picked[D]);
        picked[D] = true;
        CHECK(fw.raw_gates[static_cast<std::size_t>(j)] == pi[D]);
        if (j > 0)
          CHECK(pi[static_cast<std::size_t>(fw.experts[static_cast<std::size_t>(j - 1)])] >= pi[D]);
      }
      for (int i = 0; i < E; ++i)
        if (!picked[static_cast<std::size_t>(i)])
          for (int D : fw.experts)
            CHECK(pi[static_cast<std::size_t>(i)] <= pi[static_cast<std::size_t>(D)]);
      // backward vs finite differences with the choices held fixed
      token_args fixed = a;
      fixed.chosen = fw.experts;
      const vec dz = backward(fixed, G);
      const vec fd =
          central_difference([&](const vec& x) { return gate_functional(fixed, x, G); }, z, kH);
      CHECK(fd_close(dz, fd, kRel, kAbs));
      CHECK(fd_close(backward(a, G), dz, 1e-15, 0.0));  // same choices when left to top-k
      ++checks;
    }
    // switch in eval (no noise) is topk_softmax
    token_args t;
    t.estimator = kind::topk_softmax;
    t.z = z;
    t.k = k;
    t.renormalize = renorm;
    token_args s = t;
    s.estimator = kind::switch_;
    CHECK(forward(t).experts == forward(s).experts);
    CHECK(max_abs_diff(forward(t).gates, forward(s).gates) == 0.0);
    CHECK(max_abs_diff(backward(t, G), backward(s, G)) == 0.0);
  }
  CHECK(checks == 480);
}

TEST_CASE(
    "ref: sparsemixer backward is w times the derivative of the unscaled gates for fixed choices") {
  std::mt19937_64 rng(0x5eed0004ULL);
  std::uniform_int_distribution<int> node_pick(0, 2);
  const double eps_list[] = {0.01, 0.1, no_mask};
  const double node_scales[] = {1.0, 0.5, 1.0 / 3.0};
  int checked = 0;
  int skipped = 0;
  for (int trial = 0; trial < 600; ++trial) {
    const int E = 2 + trial % 15;
    const int k = 1 + (trial / 15) % std::min(E, 4);
    const double eps = eps_list[trial % 3];
    const double sigma = (trial % 4 == 0) ? 0.3 : 2.0;
    const vec z = random_normal(rng, static_cast<std::size_t>(E), sigma);
    const std::vector<int> chosen = sample_sequential(z, k, eps, rng);
    if (!chosen_masks_stable(z, eps, chosen, kH)) {
      ++skipped;
      continue;
    }
    const vec G = random_normal(rng, static_cast<std::size_t>(k), 1.0);
    const std::vector<slot_info> slots = sparsemixer_slots(z, k, eps, chosen);
    // every D_j is a candidate of its slot, and no D_j repeats; slot j's candidates exclude
    // D_1..D_{j-1} and always contain the best expert not yet chosen (m_j is the max of
    // the experts not yet chosen, not of all experts)
    for (int j = 0; j < k; ++j) {
      const std::size_t uj = static_cast<std::size_t>(j);
      const int D = chosen[uj];
      CHECK(slots[uj].cand[static_cast<std::size_t>(D)]);
      index_set remaining(static_cast<std::size_t>(E), true);
      for (int l = 0; l < j; ++l) {
        const int prev = chosen[static_cast<std::size_t>(l)];
        CHECK(prev != D);
        CHECK_FALSE(slots[uj].cand[static_cast<std::size_t>(prev)]);
        remaining[static_cast<std::size_t>(prev)] = false;
      }
      const int best_left = argmax(z, remaining);
      CHECK(slots[uj].argmax == best_left);
      CHECK(slots[uj].cand[static_cast<std::size_t>(best_left)]);
      CHECK(std::fabs(std::accumulate(slots[uj].pi.begin(), slots[uj].pi.end(), 0.0) - 1.0) <
            1e-14);
    }
    // coin scales: 1 when D_j = a_j, else one of the rules' nodes
    vec scales;
    for (int j = 0; j < k; ++j) {
      const bool is_a =
          chosen[static_cast<std::size_t>(j)] == slots[static_cast<std::size_t>(j)].argmax;
      scales.push_back(is_a ? 1.0 : node_scales[node_pick(rng)]);
    }
    for (const rule& r : {euler_rule(), heun3_rule()}) {
      token_args a;
      a.estimator = kind::sparsemixer;
      a.r = r;
      a.z = z;
      a.k = k;
      a.eps = eps;
      a.chosen = chosen;
      a.scales = scales;
      // forward: g_j = c_j pi^(j)_{D_j}
      const token_forward fw = forward(a);
      for (std::size_t j = 0; j < static_cast<std::size_t>(k); ++j)
        CHECK(fw.gates[j] == scales[j] * slots[j].pi[static_cast<std::size_t>(chosen[j])]);
      // backward: w times the exact derivative of the unscaled gates (c does not enter it)
      token_args unit = a;
      unit.scales.clear();
      const vec fd =
          central_difference([&](const vec& x) { return gate_functional(unit, x, G); }, z, kH);
      vec expected = fd;
      for (double& v : expected) v *= r.w;
      CHECK(fd_close(backward(a, G), expected, kRel, kAbs));
      // renormalised gates with c = 1: a true gradient again (times w)
      token_args rn = unit;
      rn.renormalize = true;
      const token_forward fwr = forward(rn);
      double gsum = 0.0;
      for (double g : fwr.gates) gsum += g;
      CHECK(std::fabs(gsum - 1.0) < 1e-14);
      const vec fdr =
          central_difference([&](const vec& x) { return gate_functional(rn, x, G); }, z, kH);
      vec expr = fdr;
      for (double& v : expr) v *= r.w;
      CHECK(fd_close(backward(rn, G), expr, kRel, kAbs));
    }
    ++checked;
  }
  MESSAGE("sparsemixer FD checks: " << checked << " token cases, " << skipped
                                    << " skipped (mask boundary)");
  CHECK(checked >= 500);
}

TEST_CASE("ref: renormalised gates with zero sum give zero gates and gradients") {
  const double inf = std::numeric_limits<double>::infinity();
  token_args a;
  a.estimator = kind::topk_softmax;
  a.z = {0.0, -inf, -inf};
  a.k = 1;
  a.chosen = {1};  // a non-candidate: pi = 0, gate 0
  a.renormalize = true;
  const token_forward fw = forward(a);
  CHECK(fw.raw_gates[0] == 0.0);
  CHECK(fw.gates[0] == 0.0);
  CHECK(max_abs(backward(a, {1.0})) == 0.0);
}

TEST_CASE("ref: k = 1 sparsemixer token backward matches the problem-level estimate") {
  std::mt19937_64 rng(0x5eed0005ULL);
  int n = 0;
  for (int trial = 0; trial < 200; ++trial) {
    const int E = 2 + trial % 10;
    const double eps = (trial % 2 == 0) ? 0.1 : no_mask;
    const problem p = random_problem(rng, E, 3, static_cast<loss_type>(trial % 4), 1.5, eps);
    const index_set S = candidates(p);
    const vec pi = softmax(p.z, S);
    const int amax = argmax(p.z, S);
    for (const rule& r : {euler_rule(), midpoint_rule(), heun3_rule(), grad0_only_rule()}) {
      for (int D = 0; D < E; ++D) {
        if (!S[static_cast<std::size_t>(D)]) continue;
        for (const coin_outcome& o : coin_outcomes(p, r, D)) {
          if (D == amax) CHECK(o.scale == 1.0);
          token_args a;
          a.r = r;
          a.z = p.z;
          a.k = 1;
          a.eps = eps;
          a.chosen = {D};
          a.scales = {o.scale};
          const token_forward fw = forward(a);
          const double g = fw.gates[0];
          CHECK(g == o.scale * pi[static_cast<std::size_t>(D)]);
          const vec dz = backward(a, {p.gate_grad(D, g)});
          const vec est = estimate(p, r.w, D, o.scale);
          CHECK(max_abs_diff(dz, est) <= 1e-13 * (1.0 + max_abs(est)));
          ++n;
        }
      }
    }
  }
  CHECK(n > 1000);
}

TEST_CASE("ref: load-balancing and z-loss gradients (SPEC section 5) vs finite differences") {
  std::mt19937_64 rng(0x5eed0006ULL);
  std::uniform_real_distribution<double> coef(0.5, 2.0);
  for (int trial = 0; trial < 60; ++trial) {
    const int T = 1 + trial % 7;
    const int E = 2 + (trial / 7) % 7;
    const int k = 1 + trial % std::min(E, 3);
    const vec logits = random_normal(rng, static_cast<std::size_t>(T * E), 2.0);
    std::vector<int> chosen;
    for (int t = 0; t < T; ++t) {
      std::vector<int> perm(static_cast<std::size_t>(E));
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int j = 0; j < k; ++j) chosen.push_back(perm[static_cast<std::size_t>(j)]);
    }
    const double alpha = coef(rng);
    const double beta = coef(rng);
    const loss_and_grad aux = load_balancing_loss(logits, T, E, chosen, k, alpha);
    const vec fd_aux = central_difference(
        [&](const vec& x) { return load_balancing_loss(x, T, E, chosen, k, alpha).value; }, logits,
        kH);
    CHECK(fd_close(aux.grad, fd_aux, kRel, kAbs));
    const loss_and_grad zl = z_loss(logits, T, E, beta);
    const vec fd_z =
        central_difference([&](const vec& x) { return z_loss(x, T, E, beta).value; }, logits, kH);
    CHECK(fd_close(zl.grad, fd_z, kRel, kAbs));
    // values: aux is alpha when the router is uniform; z-loss of a row is beta * lse^2
    CHECK(std::fabs(load_balancing_loss(vec(logits.size(), 0.3), T, E, chosen, k, alpha).value -
                    alpha) < 1e-13 * alpha);
    double lse_sq = 0.0;
    for (int t = 0; t < T; ++t) {
      double s = 0.0;
      for (int e = 0; e < E; ++e) s += std::exp(logits[static_cast<std::size_t>(t * E + e)]);
      lse_sq += std::log(s) * std::log(s);
    }
    CHECK(std::fabs(zl.value - beta * lse_sq / T) <= 1e-12 * (1.0 + zl.value));
    // aux value from its definition computed another way: alpha E / T sum_t sum_e f_e p_te
    double alt = 0.0;
    vec f(static_cast<std::size_t>(E), 0.0);
    for (int c : chosen) f[static_cast<std::size_t>(c)] += 1.0;
    for (int t = 0; t < T; ++t) {
      const vec row(logits.begin() + t * E, logits.begin() + (t + 1) * E);
      const vec p = softmax(row, index_set(static_cast<std::size_t>(E), true));
      alt += dot(f, p);
    }
    alt *= alpha * E / (static_cast<double>(T) * T * k);
    CHECK(std::fabs(aux.value - alt) <= 1e-13 * (1.0 + std::fabs(alt)));
  }
  // T = 0 is valid and does nothing
  CHECK(load_balancing_loss({}, 0, 4, {}, 1, 1.0).value == 0.0);
  CHECK(z_loss({}, 0, 4, 1.0).value == 0.0);
}
