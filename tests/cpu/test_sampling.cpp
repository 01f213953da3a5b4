// Sampling (SPEC §2-4): the choices of every estimator in training and in eval mode.
//
// SparseMixer draws D from the masked softmax (k = 1) and sequentially without replacement with the
// mask recomputed per slot (k = 2); checked with chi-square goodness-of-fit tests over many tokens
// with identical logit rows (each token index is an independent draw). The coin of the reduced
// forward scale is checked with binomial tests. Critical values are for p = 1e-4, so with the
// fixed seeds used here a correct sampler passes and a wrong distribution fails by a wide margin.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "common/test_util.hpp"

namespace {

using namespace routegrad;
using namespace routegrad::test;

/// Upper 1e-4 quantile of chi-square with `df` degrees of freedom, Wilson–Hilferty approximation
/// (z_{1-1e-4} = 3.719016). Slightly conservative for small df (df = 3: 21.8 vs the exact 21.1).
double chi2_critical_1e4(int df) {
  const double z = 3.719016485455709;
  const double d = static_cast<double>(df);
  const double h = 2.0 / (9.0 * d);
  const double c = 1.0 - h + z * std::sqrt(h);
  return d * c * c * c;
}

/// The row every token of the chi-square tests routes on (eps = 0.1): slot 1 keeps z >= 2.4, i.e.
/// experts {0, 1, 4, 7}; expert 3 (2.3) is masked in slot 1 but survives slot 2's mask when the
/// top expert 1 was taken (m = 2.8: ratio 0.5 / 2.8 < 0.2); 0.5, -1 and 2.0 are always masked.
const std::vector<double> kRow = {2.5, 3.0, 0.5, 2.3, 2.8, -1.0, 2.0, 2.6};
constexpr double kEps = 0.1;

template <class T>
routing_batch<T> identical_rows(const std::vector<double>& z, index_t rows, int k) {
  std::vector<T> logits;
  logits.reserve(static_cast<std::size_t>(rows) * z.size());
  for (index_t t = 0; t < rows; ++t)
    for (double x : z) logits.push_back(static_cast<T>(x));
  return routing_batch<T>(std::move(logits), rows, static_cast<index_t>(z.size()), k);
}

template <class Est>
double reduced_scale() {
  return Est::rule::num_nodes > 0 ? Est::rule::scale(0) : 1.0;
}
template <class Est>
double reduced_probability() {
  return Est::rule::num_nodes > 0 ? Est::rule::probability(0) : 0.0;
}

/// Chi-square test of `rows` top-1 draws against the SPEC masked softmax of kRow.
template <class Est, class T>
void check_top1_distribution(std::uint64_t seed) {
  INFO(cat(estimator_name<Est>(), (sizeof(T) == 4 ? " float" : " double")));
  const index_t rows = 100000;
  routing_batch<T> b = identical_rows<T>(kRow, rows, 1);
  b.rng = rng_stream{seed, 3, 0};
  routing_options opt;
  opt.k = 1;
  opt.jitter_eps = kEps;
  REQUIRE(b.template forward<Est>(opt).is_ok());

  const std::vector<bool> S = spec_slot_candidates(kRow, {}, kEps);
  REQUIRE(S == std::vector<bool>{true, true, false, false, true, false, false, true});
  const dvec pi = spec_softmax(kRow, S);

  std::vector<std::int64_t> count(kRow.size(), 0);
  std::int64_t out_of_range = 0;
  for (index_t t = 0; t < rows; ++t) {
    const std::int32_t d = b.expert(t, 0);
    if (d < 0 || d >= static_cast<std::int32_t>(kRow.size())) {
      ++out_of_range;
      continue;
    }
    ++count[static_cast<std::size_t>(d)];
  }
  REQUIRE(out_of_range == 0);
  double chi2 = 0.0;
  int cells = 0;
  for (std::size_t e = 0; e < kRow.size(); ++e) {
    CAPTURE(e);
    if (!S[e]) {
      CHECK(count[e] == 0);  // masked experts are never chosen
      continue;
    }
    const double expected = pi[e] * static_cast<double>(rows);
    chi2 += (static_cast<double>(count[e]) - expected) *
            (static_cast<double>(count[e]) - expected) / expected;
    ++cells;
  }
  CAPTURE(chi2);
  CHECK(chi2 < chi2_critical_1e4(cells - 1));
  CHECK(b.nonfinite_rows == 0);
}

/// Chi-square test of the ordered pairs (D1, D2) for k = 2 against π1(D1)·π2(D2 | D1), slot 2's
/// mask recomputed over the experts left (m = their max, |z_i| the original logit).
template <class Est, class T>
void check_top2_distribution(std::uint64_t seed) {
  INFO(cat(estimator_name<Est>(), (sizeof(T) == 4 ? " float" : " double")));
  const index_t rows = 200000;
  routing_batch<T> b = identical_rows<T>(kRow, rows, 2);
  b.rng = rng_stream{seed, 0, 0};
  routing_options opt;
  opt.k = 2;
  opt.jitter_eps = kEps;
  REQUIRE(b.template forward<Est>(opt).is_ok());

  const std::vector<bool> S1 = spec_slot_candidates(kRow, {}, kEps);
  const dvec pi1 = spec_softmax(kRow, S1);
  std::map<std::pair<int, int>, double> prob;
  for (int d1 = 0; d1 < static_cast<int>(kRow.size()); ++d1) {
    if (!S1[static_cast<std::size_t>(d1)]) continue;
    const std::vector<bool> S2 = spec_slot_candidates(kRow, {d1}, kEps);
    const dvec pi2 = spec_softmax(kRow, S2);
    for (int d2 = 0; d2 < static_cast<int>(kRow.size()); ++d2)
      if (S2[static_cast<std::size_t>(d2)])
        prob[{d1, d2}] = pi1[static_cast<std::size_t>(d1)] * pi2[static_cast<std::size_t>(d2)];
  }
  // The setup exercises the slot-2 mask: after the top expert 1, expert 3 becomes a candidate;
  // after expert 0 it does not.
  REQUIRE(prob.count({1, 3}) == 1);
  REQUIRE(prob.count({0, 3}) == 0);
  REQUIRE(prob.size() == 13);

  std::map<std::pair<int, int>, std::int64_t> count;
  std::int64_t impossible = 0;
  for (index_t t = 0; t < rows; ++t) {
    const std::pair<int, int> cell{b.expert(t, 0), b.expert(t, 1)};
    if (prob.count(cell) == 0) ++impossible;
    ++count[cell];
  }
  CHECK(impossible == 0);  // masked experts (per slot) never chosen, never the same expert twice
  double chi2 = 0.0;
  for (const auto& [cell, p] : prob) {
    const double expected = p * static_cast<double>(rows);
    const double o = static_cast<double>(count[cell]);
    chi2 += (o - expected) * (o - expected) / expected;
  }
  CAPTURE(chi2);
  CHECK(chi2 < chi2_critical_1e4(static_cast<int>(prob.size()) - 1));
}

/// The coin: for D ≠ a (a = the slot's argmax) the reduced scale is drawn with the rule's
/// probability (binomial, 5 sigma, overall and per expert); for D = a the coin is always 0; the
/// gate is c·π_D with π over the slot's candidate set.
template <class Est, class T>
void check_coins(int k, std::uint64_t seed) {
  INFO(cat(estimator_name<Est>(), (sizeof(T) == 4 ? " float" : " double"), " k=", k));
  const index_t rows = 100000;
  routing_batch<T> b = identical_rows<T>(kRow, rows, k);
  b.rng = rng_stream{seed, 17, 0};
  routing_options opt;
  opt.k = k;
  opt.jitter_eps = kEps;
  REQUIRE(b.template forward<Est>(opt).is_ok());

  const double p_reduced = reduced_probability<Est>();
  const double tol = sizeof(T) == 4 ? 1e-5 : 1e-12;
  std::map<std::pair<int, int>, std::pair<std::int64_t, std::int64_t>>
      per_expert;  // (slot, D) -> (n, reduced)
  std::int64_t n_not_top = 0, n_reduced = 0, top_with_coin = 0, bad_coin_value = 0, bad_gate = 0;
  for (index_t t = 0; t < rows; ++t) {
    std::vector<int> chosen;
    for (int j = 0; j < k; ++j) {
      const std::vector<bool> S = spec_slot_candidates(kRow, chosen, kEps);
      const dvec pi = spec_softmax(kRow, S);
      const int a = spec_argmax(kRow, S);
      const int d = b.expert(t, j);
      const int coin = b.coin(t, j);
      if (coin > Est::rule::num_nodes) ++bad_coin_value;
      if (d == a) {
        if (coin != 0) ++top_with_coin;
      } else {
        ++n_not_top;
        auto& pe = per_expert[{j, d}];
        ++pe.first;
        if (coin == 1) {
          ++n_reduced;
          ++pe.second;
        }
      }
      const double c = coin == 0 ? 1.0 : reduced_scale<Est>();
      const double expected_gate = c * pi[static_cast<std::size_t>(d)];
      if (!(std::fabs(static_cast<double>(b.gate(t, j)) - expected_gate) <= tol * expected_gate))
        ++bad_gate;
      chosen.push_back(d);
    }
  }
  CHECK(bad_coin_value == 0);
  CHECK(top_with_coin == 0);
  CHECK(bad_gate == 0);
  REQUIRE(n_not_top > 10000);
  auto within_5_sigma = [&](std::int64_t n, std::int64_t hits) {
    const double nn = static_cast<double>(n);
    const double sd = std::sqrt(nn * p_reduced * (1.0 - p_reduced));
    return std::fabs(static_cast<double>(hits) - nn * p_reduced) <= 5.0 * sd + 1e-9;
  };
  CAPTURE(n_not_top);
  CAPTURE(n_reduced);
  CHECK(within_5_sigma(n_not_top, n_reduced));
  for (const auto& [key, v] : per_expert) {
    CAPTURE(key.first);
    CAPTURE(key.second);
    CAPTURE(v.first);
    CAPTURE(v.second);
    CHECK(within_5_sigma(v.first, v.second));
  }
}

}  // namespace

TEST_CASE("sampling: sparsemixer k = 1 draws from the masked softmax (chi-square)") {
  check_top1_distribution<sparsemixer_euler, float>(101);
  check_top1_distribution<sparsemixer_midpoint, float>(102);
  check_top1_distribution<sparsemixer_heun3, float>(103);
  check_top1_distribution<sparsemixer_midpoint, double>(104);
  check_top1_distribution<sparsemixer_heun3, double>(105);
}

TEST_CASE("sampling: sparsemixer k = 2 ordered pairs follow pi1(D1) pi2(D2|D1) (chi-square)") {
  check_top2_distribution<sparsemixer_euler, float>(201);
  check_top2_distribution<sparsemixer_midpoint, float>(202);
  check_top2_distribution<sparsemixer_heun3, float>(203);
  check_top2_distribution<sparsemixer_midpoint, double>(204);
  check_top2_distribution<sparsemixer_heun3, double>(205);
}

TEST_CASE(
    "sampling: the coin draws the reduced scale with the rule probability and never for D = a") {
  for (int k : {1, 2}) {
    check_coins<sparsemixer_midpoint, float>(k, 301);
    check_coins<sparsemixer_heun3, float>(k, 302);
    check_coins<sparsemixer_euler, float>(k, 303);  // euler: no reduced scale, coin always 0
    check_coins<sparsemixer_heun3, double>(k, 304);
  }
}

TEST_CASE("sampling: sparsemixer never chooses a masked expert (random rows with k = 1..3)") {
  const index_t rows = 4000, E = 10;
  for (double eps : {0.1, 0.01, 0.3}) {
    for (int k = 1; k <= 3; ++k) {
      CAPTURE(eps);
      CAPTURE(k);
      // Logits in [1, 4]: close enough for several experts to survive the mask.
      routing_batch<float> b(
          random_logits<float>(500 + static_cast<std::uint64_t>(k), rows, E, 1.0, 4.0), rows, E, k);
      b.rng = rng_stream{77, 1, 0};
      routing_options opt;
      opt.k = k;
      opt.jitter_eps = eps;
      REQUIRE(b.forward<sparsemixer_heun3>(opt).is_ok());
      std::int64_t violations = 0, off_top = 0;
      for (index_t t = 0; t < rows; ++t) {
        const dvec z = row_as_double(b.logits, E, t);
        std::vector<int> chosen;
        for (int j = 0; j < k; ++j) {
          const int d = b.expert(t, j);
          if (d < 0 || d >= E) {
            ++violations;
            break;
          }
          const std::vector<bool> S = spec_slot_candidates(z, chosen, eps);
          if (!S[static_cast<std::size_t>(d)]) {
            // Tolerate only a float-vs-double disagreement right at the threshold.
            double m = -1e300;
            for (std::size_t i = 0; i < z.size(); ++i)
              if (std::find(chosen.begin(), chosen.end(), static_cast<int>(i)) == chosen.end())
                m = std::max(m, z[i]);
            const double ratio = (m - z[static_cast<std::size_t>(d)]) /
                                 std::max(std::fabs(z[static_cast<std::size_t>(d)]), m);
            if (std::fabs(ratio - 2.0 * eps) > 1e-5) ++violations;
          }
          if (d != spec_argmax(z, S)) ++off_top;
          chosen.push_back(d);
        }
      }
      CHECK(violations == 0);
      if (eps >= 0.1) CHECK(off_top > 0);  // the test routes randomly, not only to the argmax
    }
  }
}

TEST_CASE(
    "sampling: eval mode routes to the argmax with ties to the lowest index and coin 0 for any "
    "seed") {
  const index_t E = 7;
  // Rows with ties at the top, ties further down, and random rows.
  std::vector<float> logits = {1.0f, 2.0f, 0.5f, 2.0f,  -1.0f, 2.0f, 0.0f,  //
                               3.0f, 3.0f, 3.0f, 3.0f,  3.0f,  3.0f, 3.0f,  //
                               -1.f, 0.5f, 0.5f, 0.25f, 0.25f, -2.f, 0.5f};
  const std::vector<float> more = random_logits<float>(9, 300, E);
  logits.insert(logits.end(), more.begin(), more.end());
  const index_t rows = static_cast<index_t>(logits.size()) / E;

  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    for (int k = 1; k <= 3; ++k) {
      INFO(cat(estimator_name<Est>(), " k=", k));
      routing_options opt;
      opt.k = k;
      opt.mode = routing_mode::eval;
      routing_batch<float> a(logits, rows, E, k), b(logits, rows, E, k), c(logits, rows, E, k);
      a.rng = rng_stream{1, 0, 0};
      b.rng = rng_stream{2, 99, 0};
      c.rng = rng_stream{1, 0, 0};
      REQUIRE(a.forward<Est>(opt).is_ok());
      REQUIRE(b.forward<Est>(opt).is_ok());
      REQUIRE(c.forward<Est>(opt).is_ok());
      CHECK(bitwise_equal(a.experts, b.experts));  // independent of seed and offset
      CHECK(bitwise_equal(a.gates, b.gates));
      CHECK(bitwise_equal(a.coins, b.coins));
      CHECK(bitwise_equal(a.experts, c.experts));  // deterministic
      CHECK(bitwise_equal(a.gates, c.gates));
      std::int64_t wrong_expert = 0, wrong_coin = 0, wrong_gate = 0;
      for (index_t t = 0; t < rows; ++t) {
        const dvec z = row_as_double(a.logits, E, t);
        const std::vector<int> top = spec_top_k(z, k);  // argmax per slot over the experts left
        std::vector<int> chosen;
        for (int j = 0; j < k; ++j) {
          if (a.expert(t, j) != top[static_cast<std::size_t>(j)]) ++wrong_expert;
          if (a.coin(t, j) != 0) ++wrong_coin;
          double pi;
          if (Est::per_slot_softmax) {
            const std::vector<bool> S = spec_slot_candidates(z, chosen, opt.jitter_eps);
            pi = spec_softmax(z, S)[static_cast<std::size_t>(top[static_cast<std::size_t>(j)])];
          } else {
            pi = spec_softmax(
                z, std::vector<bool>(
                       z.size(), true))[static_cast<std::size_t>(top[static_cast<std::size_t>(j)])];
          }
          if (!(std::fabs(static_cast<double>(a.gate(t, j)) - pi) <= 1e-5 * pi)) ++wrong_gate;
          chosen.push_back(top[static_cast<std::size_t>(j)]);
        }
      }
      CHECK(wrong_expert == 0);
      CHECK(wrong_coin == 0);
      CHECK(wrong_gate == 0);
      // The hand-written rows: ties go to the lowest index.
      CHECK(a.expert(0, 0) == 1);
      CHECK(a.expert(1, 0) == 0);
      CHECK(a.expert(2, 0) == 1);
      if (k >= 2) {
        CHECK(a.expert(0, 1) == 3);
        CHECK(a.expert(1, 1) == 1);
        CHECK(a.expert(2, 1) == 2);
      }
      if (k >= 3) {
        CHECK(a.expert(0, 2) == 5);
        CHECK(a.expert(2, 2) == 6);
      }
    }
  });
}

TEST_CASE("sampling: switch noise changes the choices between seeds when logits are close") {
  const index_t rows = 2000, E = 4;
  std::vector<float> logits;
  for (index_t t = 0; t < rows; ++t)
    for (float x : {1.0f, 1.01f, 0.99f, 1.005f}) logits.push_back(x);
  routing_options opt;
  opt.k = 1;
  opt.jitter_eps = 0.1;
  routing_batch<float> a(logits, rows, E, 1), b(logits, rows, E, 1);
  a.rng = rng_stream{1, 0, 0};
  b.rng = rng_stream{2, 0, 0};
  REQUIRE(a.forward<switch_router>(opt).is_ok());
  REQUIRE(b.forward<switch_router>(opt).is_ok());
  std::set<int> used;
  std::int64_t differ = 0;
  for (index_t t = 0; t < rows; ++t) {
    used.insert(a.expert(t, 0));
    if (a.expert(t, 0) != b.expert(t, 0)) ++differ;
  }
  CHECK(used.size() == 4);   // every expert wins on some token
  CHECK(differ > rows / 2);  // ~3/4 of the tokens change with the seed
}

TEST_CASE("sampling: switch routes on the documented Philox jitter (argmax of the noisy logits)") {
  // SPEC §4 switch: noise_e = U(1 - eps, 1 + eps), drawn as 1 + eps (2u - 1) with
  // u = uniform_open01(word e % 4 of the block (token, purpose switch_noise, sub e / 4)).
  const index_t rows = 1500, E = 9;
  const double eps = 0.2;
  for (int k : {1, 2, 3}) {
    CAPTURE(k);
    routing_batch<double> b(random_logits<double>(31, rows, E, 0.5, 2.0), rows, E, k);
    b.rng = rng_stream{0xABCDEF12345ull, 0x1234ull << 32, 100};
    routing_options opt;
    opt.k = k;
    opt.jitter_eps = eps;
    REQUIRE(b.forward<switch_router>(opt).is_ok());
    std::int64_t wrong_expert = 0, wrong_gate = 0, wrong_coin = 0, near_ties = 0,
                 differs_from_clean = 0;
    for (index_t t = 0; t < rows; ++t) {
      dvec z = row_as_double(b.logits, E, t);
      const std::vector<int> clean_top = spec_top_k(z, k);
      for (index_t e = 0; e < E; ++e) {
        const philox4x32 blk = b.rng.block(static_cast<std::uint64_t>(t), rng_purpose::switch_noise,
                                           static_cast<std::uint32_t>(e / 4));
        const double u = static_cast<double>(uniform_open01(blk.v[e % 4]));
        z[static_cast<std::size_t>(e)] *= 1.0 + eps * (2.0 * u - 1.0);
      }
      const std::vector<int> top = spec_top_k(z, k + 1 < E ? k + 1 : k);
      // Skip tokens whose ranking is decided by less than 1e-9 (rounding of the noise).
      bool near_tie = false;
      for (std::size_t j = 0; j + 1 < top.size(); ++j)
        if (std::fabs(z[static_cast<std::size_t>(top[j])] -
                      z[static_cast<std::size_t>(top[j + 1])]) < 1e-9)
          near_tie = true;
      if (near_tie) {
        ++near_ties;
        continue;
      }
      const dvec p = spec_softmax(z, std::vector<bool>(z.size(), true));
      for (int j = 0; j < k; ++j) {
        const int d = top[static_cast<std::size_t>(j)];
        if (b.expert(t, j) != d) ++wrong_expert;
        if (b.coin(t, j) != 0) ++wrong_coin;
        if (!(std::fabs(b.gate(t, j) - p[static_cast<std::size_t>(d)]) <= 1e-12)) ++wrong_gate;
        if (d != clean_top[static_cast<std::size_t>(j)]) ++differs_from_clean;
      }
    }
    CHECK(near_ties < 5);
    CHECK(wrong_expert == 0);
    CHECK(wrong_gate == 0);
    CHECK(wrong_coin == 0);
    CHECK(differs_from_clean > 0);  // the noise matters on this batch
  }
}

TEST_CASE("sampling: switch with jitter_eps = 0 is topk_softmax (bitwise forward and backward)") {
  const index_t rows = 700, E = 6;
  for (int k : {1, 2, 4}) {
    CAPTURE(k);
    const std::vector<float> z = random_logits<float>(41, rows, E);
    routing_batch<float> s(z, rows, E, k), t(z, rows, E, k);
    s.rng = t.rng = rng_stream{5, 6, 0};
    routing_options opt;
    opt.k = k;
    opt.jitter_eps = 0.0;
    REQUIRE(s.forward<switch_router>(opt).is_ok());
    REQUIRE(t.forward<topk_softmax>(opt).is_ok());
    CHECK(bitwise_equal(s.experts, t.experts));
    CHECK(bitwise_equal(s.gates, t.gates));
    REQUIRE(s.backward<switch_router>(opt).is_ok());
    REQUIRE(t.backward<topk_softmax>(opt).is_ok());
    CHECK(bitwise_equal(s.grad_logits, t.grad_logits));
  }
}

TEST_CASE(
    "sampling: topk_softmax chooses the k largest in order with gates from the full softmax") {
  const index_t rows = 1000, E = 8;
  for (int k = 1; k <= E; k += 1 + (k / 3)) {
    for (bool renorm : {false, true}) {
      CAPTURE(k);
      CAPTURE(renorm);
      routing_batch<double> b(random_logits<double>(61, rows, E), rows, E, k);
      // A few exact ties.
      for (index_t t = 0; t < rows; t += 7)
        b.logits[static_cast<std::size_t>(t * E + 5)] =
            b.logits[static_cast<std::size_t>(t * E + 2)];
      b.rng = rng_stream{8, 0, 0};
      routing_options opt;
      opt.k = k;
      opt.renormalize = renorm;
      REQUIRE(b.forward<topk_softmax>(opt).is_ok());
      std::int64_t wrong_expert = 0, wrong_gate = 0;
      for (index_t t = 0; t < rows; ++t) {
        const dvec z = row_as_double(b.logits, E, t);
        const std::vector<int> top = spec_top_k(z, k);
        const dvec p = spec_softmax(z, std::vector<bool>(z.size(), true));
        double sum = 0.0;
        for (int j = 0; j < k; ++j)
          sum += p[static_cast<std::size_t>(top[static_cast<std::size_t>(j)])];
        for (int j = 0; j < k; ++j) {
          if (b.expert(t, j) != top[static_cast<std::size_t>(j)]) ++wrong_expert;
          const double g =
              p[static_cast<std::size_t>(top[static_cast<std::size_t>(j)])] / (renorm ? sum : 1.0);
          if (!(std::fabs(b.gate(t, j) - g) <= 1e-12)) ++wrong_gate;
        }
      }
      CHECK(wrong_expert == 0);
      CHECK(wrong_gate == 0);
    }
  }
}
