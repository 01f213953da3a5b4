// Each estimator's gates and logit gradients on the CPU against the double-precision SPEC
// reference (tests/common/estimator_reference.hpp), for the choices and coins the library drew:
// random inputs, E in {1, 2, 7, 8, 24, 64, 100}, k in {1, 2, 3}, contiguous and strided views,
// float and double, every output poisoned before the call. Also: replay of a hand-built state, the
// auxiliary losses, accumulate mode.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <routegrad/routegrad.hpp>
#include <vector>

#include "common/estimator_kinds.hpp"
#include "common/estimator_reference.hpp"

namespace {

using namespace routegrad;
namespace ref = routegrad::test::ref;

/// A [rows, cols] buffer viewed either contiguously or with padded rows and swapped layout
/// (column-major with a padded leading dimension), so strides are exercised.
template <class T>
struct matrix {
  index_t rows, cols;
  bool strided;
  std::vector<T> data;
  index_t s0, s1;

  matrix(index_t r, index_t c, bool str, T fill)
      : rows(r), cols(c), strided(str), data(), s0(c), s1(1) {
    if (strided) {  // column-major, leading dimension rows + 3
      s1 = r + 3;
      s0 = 1;
      data.assign(static_cast<std::size_t>((r + 3) * c + 1), fill);
    } else {
      data.assign(static_cast<std::size_t>(r * c + 1), fill);
    }
  }
  T& at(index_t i, index_t j) { return data[static_cast<std::size_t>(i * s0 + j * s1)]; }
  host_view<T, 2> view() { return host_view<T, 2>(data.data(), {rows, cols}, {s0, s1}); }
  host_view<const T, 2> cview() {
    return host_view<const T, 2>(data.data(), {rows, cols}, {s0, s1});
  }
};

using routegrad::test::kind_of;
using routegrad::test::rule_of;

template <class T>
double tolerance() {
  return std::is_same_v<T, double> ? 1e-11 : 3e-5;
}

/// Random logits: a cluster near `centre` (so the SparseMixer mask keeps several experts) and a
/// few outliers that the mask removes.
template <class T>
void fill_logits(matrix<T>& z, std::mt19937_64& gen, double centre) {
  std::normal_distribution<double> near(centre, 0.15 * std::abs(centre) + 0.05);
  std::normal_distribution<double> far(0.0, 1.5);
  std::uniform_real_distribution<double> pick(0.0, 1.0);
  for (index_t t = 0; t < z.rows; ++t)
    for (index_t e = 0; e < z.cols; ++e)
      z.at(t, e) = static_cast<T>(pick(gen) < 0.7 ? near(gen) : far(gen));
}

struct case_params {
  index_t E;
  int k;
  bool strided;
  bool renormalize;
  routing_mode mode;
};

template <class Est, class T>
void check_against_reference(const case_params& c, std::uint64_t seed) {
  const index_t T_rows = 37;  // not a multiple of anything the back end blocks by
  const index_t E = c.E;
  const int k = c.k;
  std::mt19937_64 gen(seed);
  matrix<T> z(T_rows, E, c.strided, T(0));
  fill_logits(z, gen, seed % 2 ? 2.0 : -1.5);
  const T poison = std::numeric_limits<T>::quiet_NaN();
  matrix<std::int32_t> experts(T_rows, k, c.strided, -7);
  matrix<std::uint8_t> coins(T_rows, k, c.strided, 0xEE);
  matrix<T> gates(T_rows, k, c.strided, poison);
  matrix<T> grad_gates(T_rows, k, c.strided, T(0));
  std::normal_distribution<double> normal(0.0, 1.0);
  for (index_t t = 0; t < T_rows; ++t)
    for (int j = 0; j < k; ++j) grad_gates.at(t, j) = static_cast<T>(normal(gen));
  matrix<T> grad_z(T_rows, E, c.strided, poison);

  routing_options opt;
  opt.k = k;
  opt.mode = c.mode;
  opt.renormalize = c.renormalize;
  opt.jitter_eps = 0.1;
  const host_routing_state state{experts.view(), coins.view(), {seed, 5, 100}};
  REQUIRE(route_forward<Est>(opt, z.cview(), state, gates.view()).is_ok());
  REQUIRE(route_backward<Est>(opt, z.cview(), state, grad_gates.cview(), grad_z.view()).is_ok());

  const double tol = tolerance<T>();
  for (index_t t = 0; t < T_rows; ++t) {
    ref::token_args a;
    a.estimator = kind_of<Est>();
    a.r = rule_of<Est>();
    a.k = k;
    a.eps = 0.1;
    a.renormalize = c.renormalize;
    for (index_t e = 0; e < E; ++e) a.z.push_back(static_cast<double>(z.at(t, e)));
    if constexpr (Est::noisy) {
      if (c.mode == routing_mode::train)
        for (index_t e = 0; e < E; ++e)
          a.noise.push_back(switch_noise<double>(state.rng, t, e, 0.1));
    }
    for (int j = 0; j < k; ++j) {
      const int d = experts.at(t, j);
      REQUIRE(d >= 0);
      REQUIRE(d < E);
      a.chosen.push_back(d);
      const int coin = coins.at(t, j);
      REQUIRE(coin <= Est::rule::num_nodes);
      a.scales.push_back(coin == 0 ? 1.0 : Est::rule::scale(coin - 1));
    }
    if (!Est::sampled) {  // deterministic routers: the choice itself is checked
      ref::token_args b = a;
      b.chosen.clear();
      const ref::token_forward expect = ref::forward(b);
      for (int j = 0; j < k; ++j)
        CHECK(a.chosen[static_cast<std::size_t>(j)] == expect.experts[static_cast<std::size_t>(j)]);
    }
    const ref::token_forward fw = ref::forward(a);
    for (int j = 0; j < k; ++j) {
      const std::size_t sj = static_cast<std::size_t>(j);
      if constexpr (Est::sampled) {
        // A sampled expert is a candidate of its slot; the most likely one always runs c = 1;
        // in eval mode the slot takes the argmax.
        CHECK(fw.slots[sj].cand[static_cast<std::size_t>(a.chosen[sj])]);
        if (a.chosen[sj] == fw.slots[sj].argmax) CHECK(coins.at(t, j) == 0);
        if (c.mode == routing_mode::eval) CHECK(a.chosen[sj] == fw.slots[sj].argmax);
      }
      CHECK(static_cast<double>(gates.at(t, j)) ==
            doctest::Approx(fw.gates[sj]).epsilon(tol).scale(1.0));
    }
    ref::vec G;
    for (int j = 0; j < k; ++j) G.push_back(static_cast<double>(grad_gates.at(t, j)));
    const ref::vec dz = ref::backward(a, G);
    for (index_t e = 0; e < E; ++e)
      CHECK(static_cast<double>(grad_z.at(t, e)) ==
            doctest::Approx(dz[static_cast<std::size_t>(e)]).epsilon(tol).scale(1.0));
  }
}

template <class Est, class T>
void sweep(std::uint64_t seed) {
  for (index_t E : {1, 2, 7, 8, 24, 64, 100})
    for (int k : {1, 2, 3}) {
      if (k > E) continue;
      for (bool strided : {false, true})
        for (bool renorm : {false, true})
          for (routing_mode mode : {routing_mode::train, routing_mode::eval}) {
            CAPTURE(E);
            CAPTURE(k);
            CAPTURE(strided);
            CAPTURE(renorm);
            CAPTURE(static_cast<int>(mode));
            check_against_reference<Est, T>({E, k, strided, renorm, mode}, seed++);
          }
    }
}

}  // namespace

TEST_CASE_TEMPLATE("estimators: gates and gradients match the SPEC reference", T, float, double) {
  SUBCASE("switch") { sweep<switch_router, T>(1000); }
  SUBCASE("topk_softmax") { sweep<topk_softmax, T>(2000); }
  SUBCASE("sparsemixer euler") { sweep<sparsemixer_euler, T>(3000); }
  SUBCASE("sparsemixer midpoint") { sweep<sparsemixer_midpoint, T>(4000); }
  SUBCASE("sparsemixer heun3") { sweep<sparsemixer_heun3, T>(5000); }
}

namespace {

/// A user-supplied rule: the published GRIN code's constant 0.3333 for the reduced scale.
struct published_heun3 {
  static constexpr double weight = 1.0;
  static constexpr int num_nodes = 1;
  ROUTEGRAD_HD static constexpr double scale(int) { return 0.3333; }
  ROUTEGRAD_HD static constexpr double probability(int) { return 0.75; }
};

}  // namespace

TEST_CASE("estimators: a user-supplied quadrature rule changes only the scale") {
  const index_t T = 400, E = 16;
  const int k = 2;
  std::mt19937_64 gen(99);
  std::normal_distribution<double> near(2.0, 0.1);
  std::vector<double> z(static_cast<std::size_t>(T * E));
  for (double& x : z) x = near(gen);
  std::vector<std::int32_t> e1(T * k), e2(T * k);
  std::vector<std::uint8_t> c1(T * k), c2(T * k);
  std::vector<double> g1(T * k), g2(T * k);
  routing_options opt;
  opt.k = k;
  const rng_stream rng{4, 4, 0};
  REQUIRE(route_forward<sparsemixer_heun3>(
              opt, host_matrix<const double>(z.data(), T, E),
              {host_matrix(e1.data(), T, k), host_matrix(c1.data(), T, k), rng},
              host_matrix(g1.data(), T, k))
              .is_ok());
  REQUIRE(route_forward<sparsemixer<published_heun3>>(
              opt, host_matrix<const double>(z.data(), T, E),
              {host_matrix(e2.data(), T, k), host_matrix(c2.data(), T, k), rng},
              host_matrix(g2.data(), T, k))
              .is_ok());
  int reduced = 0;
  for (std::size_t i = 0; i < e1.size(); ++i) {
    CHECK(e1[i] == e2[i]);  // same draws
    CHECK(c1[i] == c2[i]);
    if (c1[i] == 1) {
      ++reduced;
      CHECK(g2[i] == doctest::Approx(g1[i] * 0.3333 * 3.0).epsilon(1e-12));
    } else {
      CHECK(g2[i] == g1[i]);
    }
  }
  CHECK(reduced > 50);
}

TEST_CASE_TEMPLATE("estimators: replaying a hand-built state gives the SPEC gradient", T, float,
                   double) {
  // Decisions made elsewhere: any candidate of each slot, any coin. The backward must equal the
  // reference formula for those choices and coins (the coin matters only with renormalisation).
  const index_t T_rows = 50, E = 9;
  const int k = 3;
  std::mt19937_64 gen(123);
  std::normal_distribution<double> near(1.0, 0.08);
  for (bool renorm : {false, true}) {
    std::vector<T> z(static_cast<std::size_t>(T_rows * E));
    for (T& x : z) x = static_cast<T>(near(gen));
    std::vector<std::int32_t> experts(static_cast<std::size_t>(T_rows * k));
    std::vector<std::uint8_t> coins(experts.size());
    std::vector<T> grad_gates(experts.size());
    std::normal_distribution<double> normal(0.0, 1.0);
    for (T& g : grad_gates) g = static_cast<T>(normal(gen));
    std::vector<ref::token_args> args(static_cast<std::size_t>(T_rows));
    for (index_t t = 0; t < T_rows; ++t) {
      ref::token_args& a = args[static_cast<std::size_t>(t)];
      a.estimator = ref::kind::sparsemixer;
      a.r = ref::midpoint_rule();
      a.k = k;
      a.eps = 0.1;
      a.renormalize = renorm;
      for (index_t e = 0; e < E; ++e)
        a.z.push_back(static_cast<double>(z[static_cast<std::size_t>(t * E + e)]));
      for (int j = 0; j < k; ++j) {
        const ref::index_set cand = ref::slot_candidates(a.z, a.eps, a.chosen);
        std::vector<int> options;
        for (int e = 0; e < E; ++e)
          if (cand[static_cast<std::size_t>(e)]) options.push_back(e);
        REQUIRE(!options.empty());
        const int d = options[gen() % options.size()];
        const int coin = static_cast<int>(gen() % 2);
        a.chosen.push_back(d);
        a.scales.push_back(coin ? 0.5 : 1.0);
        experts[static_cast<std::size_t>(t * k + j)] = d;
        coins[static_cast<std::size_t>(t * k + j)] = static_cast<std::uint8_t>(coin);
      }
    }
    std::vector<T> grad_z(static_cast<std::size_t>(T_rows * E),
                          std::numeric_limits<T>::quiet_NaN());
    routing_options opt;
    opt.k = k;
    opt.renormalize = renorm;
    const host_routing_state state{
        host_matrix(experts.data(), T_rows, k), host_matrix(coins.data(), T_rows, k), {0, 0, 0}};
    REQUIRE(route_backward<sparsemixer_midpoint>(opt, host_matrix<const T>(z.data(), T_rows, E),
                                                 state,
                                                 host_matrix<const T>(grad_gates.data(), T_rows, k),
                                                 host_matrix(grad_z.data(), T_rows, E))
                .is_ok());
    for (index_t t = 0; t < T_rows; ++t) {
      ref::vec G;
      for (int j = 0; j < k; ++j)
        G.push_back(static_cast<double>(grad_gates[static_cast<std::size_t>(t * k + j)]));
      const ref::vec dz = ref::backward(args[static_cast<std::size_t>(t)], G);
      for (index_t e = 0; e < E; ++e)
        CHECK(static_cast<double>(grad_z[static_cast<std::size_t>(t * E + e)]) ==
              doctest::Approx(dz[static_cast<std::size_t>(e)]).epsilon(tolerance<T>()).scale(1.0));
    }
  }
}

TEST_CASE_TEMPLATE("estimators: fused load-balancing and z-loss match the SPEC reference", T, float,
                   double) {
  const index_t T_rows = 300, E = 7;  // T spans two reduction blocks, not a multiple of either
  const int k = 2;
  const double alpha = 0.37, beta = 0.011;
  std::mt19937_64 gen(77);
  std::normal_distribution<double> normal(0.0, 2.0);
  std::vector<T> z(static_cast<std::size_t>(T_rows * E));
  for (T& x : z) x = static_cast<T>(normal(gen));
  std::vector<std::int32_t> experts(static_cast<std::size_t>(T_rows * k));
  std::vector<std::uint8_t> coins(experts.size());
  std::vector<T> gates(experts.size()), grad_gates(experts.size(), T(0));
  std::vector<T> grad_z(static_cast<std::size_t>(T_rows * E), std::numeric_limits<T>::quiet_NaN());
  std::vector<std::int64_t> counts(static_cast<std::size_t>(E), -1);
  double lb = -1, zl = -1;
  std::int64_t bad = -1;
  routing_options opt;
  opt.k = k;
  opt.load_balance_coef = alpha;
  opt.z_loss_coef = beta;
  const host_routing_state state{
      host_matrix(experts.data(), T_rows, k), host_matrix(coins.data(), T_rows, k), {8, 0, 0}};
  const host_routing_stats stats{counts.data(), &lb, &zl, &bad};
  const auto logits = host_matrix<const T>(z.data(), T_rows, E);
  REQUIRE(route_forward<sparsemixer_heun3>(opt, logits, state, host_matrix(gates.data(), T_rows, k),
                                           stats)
              .is_ok());
  // Gate gradients are zero: the logit gradient is the auxiliary losses' alone.
  REQUIRE(route_backward<sparsemixer_heun3>(
              opt, logits, state, host_matrix<const T>(grad_gates.data(), T_rows, k),
              host_matrix(grad_z.data(), T_rows, E), grad_mode::overwrite, stats)
              .is_ok());
  ref::vec zd(z.begin(), z.end());
  const std::vector<int> chosen(experts.begin(), experts.end());
  const ref::loss_and_grad lbr =
      ref::load_balancing_loss(zd, static_cast<int>(T_rows), static_cast<int>(E), chosen, k, alpha);
  const ref::loss_and_grad zlr =
      ref::z_loss(zd, static_cast<int>(T_rows), static_cast<int>(E), beta);
  CHECK(bad == 0);
  std::int64_t total = 0;
  for (index_t e = 0; e < E; ++e) {
    std::int64_t expect = 0;
    for (int d : chosen) expect += d == e;
    CHECK(counts[static_cast<std::size_t>(e)] == expect);
    total += counts[static_cast<std::size_t>(e)];
  }
  CHECK(total == T_rows * k);
  CHECK(lb == doctest::Approx(lbr.value).epsilon(tolerance<T>()));
  CHECK(zl == doctest::Approx(zlr.value).epsilon(tolerance<T>()));
  for (std::size_t i = 0; i < grad_z.size(); ++i)
    CHECK(static_cast<double>(grad_z[i]) ==
          doctest::Approx(lbr.grad[i] + zlr.grad[i]).epsilon(tolerance<T>()).scale(1e-3));

  // Accumulate mode adds the same gradient on top of what is there.
  std::vector<T> before(grad_z.size());
  for (std::size_t i = 0; i < before.size(); ++i)
    before[i] = static_cast<T>(static_cast<double>(i % 13) - 6.0);
  std::vector<T> acc = before;
  REQUIRE(route_backward<sparsemixer_heun3>(
              opt, logits, state, host_matrix<const T>(grad_gates.data(), T_rows, k),
              host_matrix(acc.data(), T_rows, E), grad_mode::accumulate, stats)
              .is_ok());
  for (std::size_t i = 0; i < acc.size(); ++i)
    CHECK(static_cast<double>(acc[i]) ==
          doctest::Approx(static_cast<double>(before[i]) + static_cast<double>(grad_z[i]))
              .epsilon(tolerance<T>()));
}
