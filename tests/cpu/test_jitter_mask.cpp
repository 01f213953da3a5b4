// The jitter mask's one-comparison form (jitter_mask_test, estimators/row_math.hpp, and the
// branch-free quick() that candidate_weights uses) against the mask's definition (jitter_masked:
// the rounded quotient against 2ε), on random rows, on logits placed within a few ulps of the
// threshold on both sides, and on the edge cases (m = 0, m < 0, tiny and huge logits, −inf, ε at
// and beyond the range the fast form covers).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "common/test_util.hpp"

namespace {

using namespace routegrad;

/// Values of z ≤ m to try for this slot max: random, near the threshold, and special.
template <class M>
std::vector<M> probes(M m, M two_eps, std::mt19937_64& gen) {
  std::vector<M> z;
  const M tau = m > M(0) ? m * (M(1) - two_eps) : m / (M(1) - two_eps);
  for (M centre : {tau, -m, m, M(0)}) {
    M x = centre;
    for (int s = 0; s < 40; ++s) x = std::nextafter(x, -std::numeric_limits<M>::infinity());
    for (int s = 0; s < 80; ++s) {
      z.push_back(x);
      x = std::nextafter(x, std::numeric_limits<M>::infinity());
    }
    for (M rel : {M(1e-7), M(1e-6), M(1e-5), M(3e-5), M(1e-4), M(1e-3)}) {
      z.push_back(centre * (M(1) + rel));
      z.push_back(centre * (M(1) - rel));
      z.push_back(centre + rel);
      z.push_back(centre - rel);
    }
  }
  std::uniform_real_distribution<double> u(-4.0, 1.0);
  const double scale = std::abs(static_cast<double>(m)) + 1e-3;
  for (int s = 0; s < 200; ++s) z.push_back(static_cast<M>(m - std::abs(u(gen)) * scale));
  z.push_back(-std::numeric_limits<M>::infinity());
  z.push_back(-std::numeric_limits<M>::max());
  z.push_back(std::numeric_limits<M>::denorm_min());
  z.push_back(-std::numeric_limits<M>::denorm_min());
  std::vector<M> kept;
  for (M x : z)
    if (!(x > m)) kept.push_back(x);  // the mask is only asked about z ≤ m
  kept.push_back(m);
  return kept;
}

template <class M>
void check_equivalence() {
  std::mt19937_64 gen(42);
  std::normal_distribution<double> normal(0.0, 3.0);
  std::vector<M> maxima = {M(0),
                           M(-0.0),
                           M(1),
                           M(-1),
                           M(1e-30),
                           M(-1e-30),
                           M(1e30),
                           M(-1e30),
                           M(0.125),
                           M(-7.5),
                           M(3.3),
                           M(-0.01),
                           std::numeric_limits<M>::denorm_min(),
                           M(65504),
                           M(-65504)};
  for (int s = 0; s < 60; ++s) maxima.push_back(static_cast<M>(normal(gen)));
  const M eps2_values[] = {M(0),    M(0.02), M(0.1),  M(0.2), M(0.25), M(0.3),
                           M(0.49), M(0.5),  M(0.75), M(1.0), M(2.5),  M(1e-6)};
  std::int64_t checked = 0, near = 0;
  for (M m : maxima)
    for (M two_eps : eps2_values) {
      const jitter_mask_test<M> fast(m, two_eps);
      for (M z : probes(m, two_eps, gen)) {
        const bool expected = jitter_masked(z, m, two_eps);
        const bool got = fast(z);
        if (got != expected)
          FAIL_CHECK("m = " << m << ", 2eps = " << two_eps << ", z = " << z << ": expected "
                            << expected << ", got " << got);
        // quick(): the comparisons alone, unsure exactly inside the band (then operator() asks
        // the quotient), and right wherever it is sure.
        const bool in_band = !(z < fast.masked_below) && !(z > fast.kept_above);
        bool unsure = false;
        const bool quick = fast.quick(z, unsure);
        if (unsure != in_band || (!unsure && quick != expected))
          FAIL_CHECK("quick: m = " << m << ", 2eps = " << two_eps << ", z = " << z << ": expected "
                                   << expected << ", got " << quick << " (unsure " << unsure
                                   << ")");
        if (fast.has_quick() != (two_eps > M(0) && two_eps < M(0.5)))
          FAIL_CHECK("has_quick: 2eps = " << two_eps);
        near += in_band;
        ++checked;
      }
    }
  CHECK(checked > 100000);
  CHECK(near > 0);  // some probes fall in the band around the threshold: both paths are checked
}

}  // namespace

TEST_CASE("jitter mask: the one-comparison form equals the quotient test (float)") {
  check_equivalence<float>();
}

TEST_CASE("jitter mask: the one-comparison form equals the quotient test (double)") {
  check_equivalence<double>();
}

TEST_CASE("jitter mask: candidate_weights redoes a row the quick test cannot decide") {
  // A row holding a logit just below the threshold τ — inside the band, where quick() answers
  // "kept" but the quotient test masks it — must come out as the quotient test says: weights,
  // their sum and the live-step bits. 2ε = 0 has no quick test at all (every logit exact).
  using M = float;
  using Row = staged_row<M, false>;
  std::mt19937_64 gen(9);
  std::uniform_real_distribution<M> below(-4.0f, 0.0f);
  for (const M two_eps : {M(0.2), M(0.02), M(0)}) {
    const M m = 3.0f;
    const jitter_mask_test<M> test(m, two_eps);
    std::vector<M> z = {m};
    for (int s = 0; s < 18; ++s) z.push_back(m + below(gen));
    int band = 0, redone = 0;
    if (test.has_quick()) {
      // The largest logit under τ that the quotient test masks: inside the band by construction.
      M x = m * (M(1) - two_eps);
      while (!jitter_masked(x, m, two_eps)) x = std::nextafter(x, -INFINITY);
      bool unsure = false;
      const bool guess = test.quick(x, unsure);
      band += unsure;
      redone += unsure && guess != jitter_masked(x, m, two_eps);
      z.push_back(x);
    }
    const int n = static_cast<int>(z.size());
    const Row row{z.data(), n, nullptr};
    const nothing_taken taken;
    const slot_candidates<sparsemixer_midpoint, M, Row, nothing_taken> candidate{row, taken, m,
                                                                                 two_eps};
    std::vector<M> weights(z.size(), M(-1));
    positive_elements<serial_lanes> live;
    const M sum = candidate_weights(serial_lanes{}, row, m, candidate, weights.data(), &live);
    M expect_sum = M(0);
    unsigned expect_live = 0;
    for (int i = 0; i < n; ++i) {
      // Every weight is written on the CPU (the sparse form is the GPU's: sparse_weights).
      const M w = jitter_masked(z[i], m, two_eps) ? M(0) : math::exp_fast(z[i] - m);
      CHECK(weights[static_cast<std::size_t>(i)] == w);
      expect_sum += w;
      if (w > M(0)) expect_live |= 1u << i;
    }
    CHECK(sum == expect_sum);
    CHECK(live.word[0] == expect_live);
    if (test.has_quick()) {
      CHECK(band == 1);
      CHECK(redone == 1);  // quick() alone would have kept that logit
    } else {
      CHECK(two_eps == M(0));
    }
  }
}
