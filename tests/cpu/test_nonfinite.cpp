// Non-finite logits (SPEC §7) for every estimator. The documented outcome:
// - an unroutable row (any NaN or +inf logit, or no finite logit) gets experts 0..k-1, gates 0,
//   coins 0 and a zero gradient (overwrite writes 0, accumulate adds nothing), and
//   stats.nonfinite_rows counts it;
// - -inf logits are valid: those experts are never chosen;
// - a row with fewer finite logits than k routes its finite experts, and each slot with no finite
//   candidate left gets the lowest free expert with gate 0; the row is counted in nonfinite_rows;
// - the other rows of the batch are unaffected (bitwise).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <vector>

#include "common/test_util.hpp"

namespace {

using namespace routegrad;
using namespace routegrad::test;

constexpr index_t kE = 6;
const double NaN = std::numeric_limits<double>::quiet_NaN();
const double Inf = std::numeric_limits<double>::infinity();

struct special_row {
  index_t row;
  std::vector<double> z;
};

/// Rows planted into a batch of random logits; which of them is unroutable or partial depends on
/// their content and on k.
const std::vector<special_row>& special_rows() {
  static const std::vector<special_row> rows = {
      {3, {1.0, 2.0, NaN, 1.5, 2.5, 0.0}},         // one NaN
      {7, {Inf, 1.0, 2.0, 3.0, 1.0, 1.0}},         // one +inf
      {11, {-Inf, -Inf, -Inf, -Inf, -Inf, -Inf}},  // all -inf
      {15, {-Inf, NaN, -Inf, -Inf, -Inf, -Inf}},   // NaN among -inf
      {19, {-Inf, -Inf, Inf, -Inf, -Inf, -Inf}},   // +inf among -inf
      {23, {NaN, Inf, 1.0, 1.0, 1.0, 1.0}},        // NaN and +inf
      {27, {-Inf, -Inf, -Inf, 2.0, -Inf, -Inf}},   // one finite logit
      {31, {-Inf, 1.7, -Inf, -Inf, 2.1, -Inf}},    // two finite logits
      {35, {2.0, -Inf, 2.4, -Inf, 2.2, 2.6}},      // mixed -inf, four finite (valid for k <= 4)
      {38, {NaN, NaN, NaN, NaN, NaN, NaN}},        // all NaN
      {63, {-Inf, 0.0, -Inf, -Inf, -0.0, -Inf}},   // zeros among -inf (jitter mask with m = 0)
  };
  return rows;
}

bool unroutable(const std::vector<double>& z) {
  bool any_finite = false;
  for (double x : z) {
    if (std::isnan(x) || x == Inf) return true;
    any_finite = any_finite || std::isfinite(x);
  }
  return !any_finite;
}

int finite_count(const std::vector<double>& z) {
  int n = 0;
  for (double x : z) n += std::isfinite(x);
  return n;
}

constexpr index_t kRows = 64;

template <class T>
std::vector<T> clean_logits() {
  return random_logits<T>(2024, kRows, kE, 1.5, 3.0);
}

template <class T>
std::vector<T> planted_logits() {
  std::vector<T> z = clean_logits<T>();
  for (const special_row& s : special_rows())
    for (index_t e = 0; e < kE; ++e)
      z[static_cast<std::size_t>(s.row * kE + e)] =
          static_cast<T>(s.z[static_cast<std::size_t>(e)]);
  return z;
}

bool is_special(index_t t) {
  for (const special_row& s : special_rows())
    if (s.row == t) return true;
  return false;
}

template <class Est, class T>
void check_batch(int k, routing_mode mode, bool aux) {
  INFO(cat(estimator_name<Est>(), sizeof(T) == 4 ? " float" : " double", " k=", k,
           mode == routing_mode::eval ? " eval" : " train", aux ? " aux" : ""));
  routing_options opt;
  opt.k = k;
  opt.mode = mode;
  opt.jitter_eps = 0.1;
  if (aux) {
    opt.load_balance_coef = 0.05;
    opt.z_loss_coef = 0.01;
  }
  const rng_stream rng{42, 7, 1000};

  // The batch with the special rows, overwrite and accumulate.
  routing_batch<T> bad(planted_logits<T>(), kRows, kE, k);
  bad.rng = rng;
  poison(bad.grad_logits);
  REQUIRE(bad.template forward<Est>(opt).is_ok());
  REQUIRE(bad.template backward<Est>(opt).is_ok());
  routing_batch<T> acc = bad;
  acc.grad_logits = random_logits<T>(77, kRows, kE);
  const std::vector<T> acc_before = acc.grad_logits;
  REQUIRE(acc.template backward<Est>(opt, grad_mode::accumulate).is_ok());

  // The same batch without them.
  routing_batch<T> clean(clean_logits<T>(), kRows, kE, k);
  clean.rng = rng;
  REQUIRE(clean.template forward<Est>(opt).is_ok());
  REQUIRE(clean.template backward<Est>(opt).is_ok());
  CHECK(clean.nonfinite_rows == 0);

  std::int64_t expected_nonfinite = 0;
  std::vector<std::int64_t> histogram(static_cast<std::size_t>(kE), 0);
  for (index_t t = 0; t < kRows; ++t) {
    CAPTURE(t);
    // Every index in range, distinct within the row.
    std::set<int> distinct;
    for (int j = 0; j < k; ++j) {
      REQUIRE(bad.expert(t, j) >= 0);
      REQUIRE(bad.expert(t, j) < kE);
      distinct.insert(bad.expert(t, j));
    }
    CHECK(static_cast<int>(distinct.size()) == k);
    for (index_t e = 0; e < kE; ++e) CHECK_FALSE(std::isnan(bad.grad(t, e)));

    if (!is_special(t)) {
      if (!aux) {  // the auxiliary terms depend on the whole batch
        for (int j = 0; j < k; ++j) {
          CHECK(bad.expert(t, j) == clean.expert(t, j));
          CHECK(bad.coin(t, j) == clean.coin(t, j));
          CHECK(bitwise_equal_value(bad.gate(t, j), clean.gate(t, j)));
        }
        for (index_t e = 0; e < kE; ++e)
          CHECK(bitwise_equal_value(bad.grad(t, e), clean.grad(t, e)));
      }
      for (int j = 0; j < k; ++j) ++histogram[static_cast<std::size_t>(bad.expert(t, j))];
      continue;
    }
    const std::vector<double> z = row_as_double(bad.logits, kE, t);
    if (unroutable(z)) {
      ++expected_nonfinite;
      for (int j = 0; j < k; ++j) {
        CHECK(bad.expert(t, j) == j);
        CHECK(bad.gate(t, j) == T(0));
        CHECK(bad.coin(t, j) == 0);
      }
      for (index_t e = 0; e < kE; ++e) {
        CHECK(bad.grad(t, e) == T(0));  // overwrite writes 0
        CHECK(bitwise_equal_value(
            acc.grad(t, e), acc_before[static_cast<std::size_t>(t * kE + e)]));  // adds nothing
      }
      continue;
    }
    // Routable: -inf experts are never chosen with a positive gate; slots past the finite
    // logits get the lowest free expert with gate 0.
    const int f = finite_count(z);
    const int real = std::min(f, k);
    if (f < k) ++expected_nonfinite;
    std::set<int> finite_chosen;
    for (int j = 0; j < real; ++j) {
      const int d = bad.expert(t, j);
      CHECK(std::isfinite(z[static_cast<std::size_t>(d)]));
      finite_chosen.insert(d);
      CHECK(bad.gate(t, j) > T(0));
      CHECK(bad.gate(t, j) <= T(1));
    }
    CHECK(static_cast<int>(finite_chosen.size()) == real);
    std::vector<int> taken(bad.experts.begin() + static_cast<std::ptrdiff_t>(t * k),
                           bad.experts.begin() + static_cast<std::ptrdiff_t>(t * k + real));
    for (int j = real; j < k; ++j) {
      int lowest = 0;
      while (std::find(taken.begin(), taken.end(), lowest) != taken.end()) ++lowest;
      CHECK(bad.expert(t, j) == lowest);
      CHECK(bad.gate(t, j) == T(0));
      CHECK(bad.coin(t, j) == 0);
      taken.push_back(lowest);
    }
    for (index_t e = 0; e < kE; ++e) {
      CHECK(std::isfinite(bad.grad(t, e)));
      if (!std::isfinite(z[static_cast<std::size_t>(e)])) CHECK(bad.grad(t, e) == T(0));
    }
    for (int j = 0; j < real; ++j) ++histogram[static_cast<std::size_t>(bad.expert(t, j))];
  }
  CHECK(bad.nonfinite_rows == expected_nonfinite);
  CHECK(expected_nonfinite >= 7);
  // The counts cover every slot routed to a finite logit: unroutable rows and the gate-0 slots of
  // partly routed rows are left out (cpu/routing.hpp).
  CHECK(bad.counts == histogram);
  CHECK(std::isfinite(bad.load_balance_loss));
  CHECK(std::isfinite(bad.z_loss));
}

}  // namespace

TEST_CASE("nonfinite: NaN and +inf and -inf rows get the documented outcome (every estimator)") {
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    for (int k : {1, 2, 3}) {
      for (routing_mode mode : {routing_mode::train, routing_mode::eval}) {
        check_batch<Est, float>(k, mode, false);
        check_batch<Est, double>(k, mode, false);
      }
    }
  });
}

TEST_CASE(
    "nonfinite: with the auxiliary losses on bad rows stay at zero and the losses stay finite") {
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    for (int k : {1, 3}) {
      check_batch<Est, float>(k, routing_mode::train, true);
      check_batch<Est, double>(k, routing_mode::eval, true);
    }
  });
}

TEST_CASE("nonfinite: a batch of only unroutable rows") {
  const index_t rows = 4;
  std::vector<float> z;
  for (const special_row& s : special_rows())
    if (unroutable(s.z) && static_cast<index_t>(z.size()) < rows * kE)
      for (double x : s.z) z.push_back(static_cast<float>(x));
  REQUIRE(static_cast<index_t>(z.size()) == rows * kE);
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    INFO(cat(estimator_name<Est>()));
    routing_options opt;
    opt.k = 2;
    opt.load_balance_coef = 0.1;
    opt.z_loss_coef = 0.1;
    routing_batch<float> b(z, rows, kE, 2);
    poison(b.grad_logits);
    REQUIRE(b.forward<Est>(opt).is_ok());
    REQUIRE(b.backward<Est>(opt).is_ok());
    CHECK(b.nonfinite_rows == rows);
    for (index_t e = 0; e < kE; ++e) CHECK(b.counts[static_cast<std::size_t>(e)] == 0);
    CHECK(b.load_balance_loss == 0.0);
    CHECK(b.z_loss == 0.0);
    for (float g : b.gates) CHECK(g == 0.0f);
    for (float g : b.grad_logits) CHECK(g == 0.0f);
  });
}

TEST_CASE(
    "nonfinite: the auxiliary-loss gradients are those of the reported losses with bad rows "
    "included") {
  // Central differences of the losses the forward reports (load balancing + z-loss, SPEC §5)
  // against the backward's logit gradient with zero gate gradients, on a batch with unroutable
  // rows, a row with fewer finite logits than k, and a row with -inf entries. Eval mode keeps the
  // choices (and so f_e, which carries no gradient) fixed under the perturbation.
  const index_t rows = 6, E = 5;
  const int k = 2;
  std::vector<double> z = random_logits<double>(5, rows, E, -1.0, 2.0);
  auto set_row = [&](index_t t, std::vector<double> v) {
    for (index_t e = 0; e < E; ++e)
      z[static_cast<std::size_t>(t * E + e)] = v[static_cast<std::size_t>(e)];
  };
  set_row(1, {0.7, -Inf, -Inf, -Inf, -Inf});  // one finite logit, k = 2: partly routed
  set_row(3, {NaN, 1.0, 2.0, 0.0, 1.0});      // unroutable
  set_row(4, {1.2, -Inf, 0.4, -Inf, 1.9});    // -inf entries, fully routable
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    INFO(cat(estimator_name<Est>()));
    routing_options opt;
    opt.k = k;
    opt.mode = routing_mode::eval;
    opt.load_balance_coef = 0.3;
    opt.z_loss_coef = 0.2;
    auto loss_at = [&](const std::vector<double>& x) {
      routing_batch<double> b(x, rows, E, k);
      REQUIRE(b.forward<Est>(opt).is_ok());
      return b.load_balance_loss + b.z_loss;
    };
    routing_batch<double> b(z, rows, E, k);
    REQUIRE(b.forward<Est>(opt).is_ok());
    std::fill(b.grad_gates.begin(), b.grad_gates.end(), 0.0);
    REQUIRE(b.backward<Est>(opt).is_ok());
    const double h = 1e-5;
    for (index_t t = 0; t < rows; ++t) {
      for (index_t e = 0; e < E; ++e) {
        const std::size_t i = static_cast<std::size_t>(t * E + e);
        if (!std::isfinite(z[i]) || t == 3) continue;
        CAPTURE(t);
        CAPTURE(e);
        std::vector<double> zp = z, zm = z;
        zp[i] += h;
        zm[i] -= h;
        const double fd = (loss_at(zp) - loss_at(zm)) / (2.0 * h);
        CHECK(b.grad(t, e) == doctest::Approx(fd).epsilon(1e-6).scale(1.0));
      }
    }
  });
}

TEST_CASE("nonfinite: huge finite logits give finite gates and gradients") {
  // Finite rows are routable rows: whatever the estimator does with them (noise, masks,
  // softmax), the gates and gradients it returns must be finite.
  const float big = std::numeric_limits<float>::max();
  const std::vector<float> z = {
      big,   big / 2, 1.0f,  -big,   0.0f,    2.0f,      //
      -big,  -big,    -big,  -big,   -big,    -big / 2,  //
      big,   big,     big,   big,    big,     big,       //
      3e38f, -3e38f,  3e38f, 1e-38f, -1e-38f, 0.0f,      //
  };
  const index_t rows = static_cast<index_t>(z.size()) / kE;
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    for (routing_mode mode : {routing_mode::train, routing_mode::eval}) {
      for (int k : {1, 2}) {
        INFO(cat(estimator_name<Est>(), mode == routing_mode::eval ? " eval" : " train", " k=", k));
        routing_options opt;
        opt.k = k;
        opt.mode = mode;
        routing_batch<float> b(z, rows, kE, k);
        b.rng = rng_stream{3, 0, 0};
        REQUIRE(b.forward<Est>(opt).is_ok());
        REQUIRE(b.backward<Est>(opt).is_ok());
        for (index_t t = 0; t < rows; ++t) {
          CAPTURE(t);
          for (int j = 0; j < k; ++j) {
            CHECK(b.expert(t, j) >= 0);
            CHECK(b.expert(t, j) < kE);
            CHECK(std::isfinite(b.gate(t, j)));
            CHECK(b.gate(t, j) >= 0.0f);
            CHECK(b.gate(t, j) <= 1.0f);
          }
          for (index_t e = 0; e < kE; ++e) CHECK(std::isfinite(b.grad(t, e)));
        }
      }
    }
  });
}
