// Bad input (SPEC §7): every rule of routing/validate.hpp and the backward's state checks
// (cpu/routing.hpp). Each violation must return the right status_code with a message naming the
// argument, and write nothing: every buffer is poisoned (outputs) or filled (inputs) before the
// call and compared bitwise afterwards. Also: routegrad::check throws routegrad::error, and the
// edge cases T = 0, k = E, E = 1 work.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "common/test_util.hpp"

namespace {

using namespace routegrad;
using namespace routegrad::test;

constexpr index_t kT = 5;
constexpr index_t kE = 6;
constexpr int kK = 2;
constexpr std::size_t kCap = 512;  // room for every view used below

/// All buffers of one call with valid views onto them. Outputs are poisoned, inputs filled with
/// valid data; a snapshot of every byte is taken before the call.
struct harness {
  std::vector<float> logits = random_logits<float>(1, 1, kCap, -2.0, 2.0);
  std::vector<float> gates = std::vector<float>(kCap);
  std::vector<float> grad_gates = random_logits<float>(2, 1, kCap, -1.0, 1.0);
  std::vector<float> grad_logits = std::vector<float>(kCap);
  std::vector<std::int32_t> experts = std::vector<std::int32_t>(kCap);
  std::vector<std::uint8_t> coins = std::vector<std::uint8_t>(kCap);
  std::vector<std::int64_t> counts = std::vector<std::int64_t>(kCap);
  double lb = 0, zl = 0;
  std::int64_t nonfinite = 0;

  routing_options opt;
  host_view<const float, 2> logits_v;
  host_routing_state state;
  host_view<float, 2> gates_v;
  host_view<const float, 2> grad_gates_v;
  host_view<float, 2> grad_logits_v;
  host_routing_stats stats;
  grad_mode mode = grad_mode::overwrite;

  // Snapshot.
  std::vector<float> s_logits, s_gates, s_grad_gates, s_grad_logits;
  std::vector<std::int32_t> s_experts;
  std::vector<std::uint8_t> s_coins;
  std::vector<std::int64_t> s_counts;
  double s_lb = 0, s_zl = 0;
  std::int64_t s_nonfinite = 0;

  /// for_backward: experts/coins hold a valid state (inputs of the backward); otherwise they
  /// are poisoned (outputs of the forward).
  explicit harness(bool for_backward) {
    opt.k = kK;
    opt.jitter_eps = 0.1;
    poison(gates);
    poison(grad_logits);
    poison(counts);
    poison_value(lb);
    poison_value(zl);
    poison_value(nonfinite);
    if (for_backward) {
      for (std::size_t i = 0; i < kCap; ++i) {
        experts[i] =
            static_cast<std::int32_t>((i % kK) + 2 * ((i / kK) % 3));  // distinct per row, < kE
        coins[i] = 0;
      }
    } else {
      poison(experts);
      poison(coins);
    }
    logits_v = host_matrix<const float>(logits.data(), kT, kE);
    state.experts = host_matrix(experts.data(), kT, kK);
    state.coins = host_matrix(coins.data(), kT, kK);
    state.rng = rng_stream{1, 2, 3};
    gates_v = host_matrix(gates.data(), kT, kK);
    grad_gates_v = host_matrix<const float>(grad_gates.data(), kT, kK);
    grad_logits_v = host_matrix(grad_logits.data(), kT, kE);
    stats.expert_counts = counts.data();
    stats.load_balance_loss = &lb;
    stats.z_loss = &zl;
    stats.nonfinite_rows = &nonfinite;
    snapshot();
  }

  void snapshot() {
    s_logits = logits;
    s_gates = gates;
    s_grad_gates = grad_gates;
    s_grad_logits = grad_logits;
    s_experts = experts;
    s_coins = coins;
    s_counts = counts;
    s_lb = lb;
    s_zl = zl;
    s_nonfinite = nonfinite;
  }

  bool untouched() const {
    return bitwise_equal(logits, s_logits) && bitwise_equal(gates, s_gates) &&
           bitwise_equal(grad_gates, s_grad_gates) && bitwise_equal(grad_logits, s_grad_logits) &&
           bitwise_equal(experts, s_experts) && bitwise_equal(coins, s_coins) &&
           bitwise_equal(counts, s_counts) && bitwise_equal_value(lb, s_lb) &&
           bitwise_equal_value(zl, s_zl) && bitwise_equal_value(nonfinite, s_nonfinite);
  }

  template <class Est>
  status forward() {
    return routegrad::route_forward<Est>(opt, logits_v, state, gates_v, stats);
  }
  template <class Est>
  status backward() {
    return routegrad::route_backward<Est>(opt, logits_v, state, grad_gates_v, grad_logits_v, mode,
                                          stats);
  }
};

enum class pass { forward, backward };

/// Runs `pass` of Est on a fresh harness modified by `mutate`, and checks the status code, that
/// the message names `argument`, that nothing was written, and that check() throws it.
template <class Est, class Mutate>
void expect_rejected(pass which, Mutate mutate, status_code code, const std::string& argument) {
  harness h(which == pass::backward);
  mutate(h);
  h.snapshot();
  const status s = which == pass::forward ? h.forward<Est>() : h.backward<Est>();
  INFO(cat(estimator_name<Est>(), which == pass::forward ? " forward" : " backward", ": ",
           s.message()));
  CHECK_FALSE(s.is_ok());
  CHECK(s.code() == code);
  CHECK(names_argument(s.message(), argument));
  CHECK(h.untouched());
  bool thrown = false;
  try {
    routegrad::check(s);
  } catch (const routegrad::error& e) {
    thrown = true;
    CHECK(e.get_status().code() == code);
    CHECK(std::string(e.what()).find(s.message()) != std::string::npos);
  }
  CHECK(thrown);
}

/// expect_rejected for every estimator, forward and backward.
template <class Mutate>
void expect_rejected_everywhere(Mutate mutate, status_code code, const std::string& argument,
                                bool forward = true, bool backward = true) {
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    if (forward) expect_rejected<Est>(pass::forward, mutate, code, argument);
    if (backward) expect_rejected<Est>(pass::backward, mutate, code, argument);
  });
}

template <class Est, class Mutate>
void expect_accepted(pass which, Mutate mutate) {
  harness h(which == pass::backward);
  mutate(h);
  const status s = which == pass::forward ? h.forward<Est>() : h.backward<Est>();
  INFO(cat(estimator_name<Est>(), which == pass::forward ? " forward" : " backward", ": ",
           s.message()));
  CHECK(s.is_ok());
}

const double kNaN = std::numeric_limits<double>::quiet_NaN();
const double kInf = std::numeric_limits<double>::infinity();

}  // namespace

TEST_CASE("validation: the unmodified harness is valid (forward and backward of every estimator)") {
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    INFO(cat(estimator_name<Est>()));
    harness f(false);
    CHECK(f.forward<Est>().is_ok());
    CHECK_FALSE(f.untouched());  // the harness can see writes
    harness b(true);
    CHECK(b.backward<Est>().is_ok());
    CHECK_FALSE(b.untouched());
    CHECK_NOTHROW(routegrad::check(status::ok()));
  });
}

TEST_CASE("validation: k = 0 and k < 0 and k > E are rejected (options.k)") {
  for (int k : {0, -1, static_cast<int>(kE) + 1, 1000}) {
    CAPTURE(k);
    expect_rejected_everywhere([k](harness& h) { h.opt.k = k; }, status_code::invalid_argument,
                               "options.k");
  }
}

TEST_CASE("validation: E = 0 and E >= 2^24 and negative extents are rejected (logits)") {
  expect_rejected_everywhere(
      [](harness& h) { h.logits_v = host_matrix<const float>(h.logits.data(), kT, 0); },
      status_code::invalid_shape, "logits");
  expect_rejected_everywhere(
      [](harness& h) {
        h.logits_v = host_matrix<const float>(h.logits.data(), kT, index_t(1) << 24, 1, 0);
      },
      status_code::invalid_shape, "logits");
  expect_rejected_everywhere(
      [](harness& h) { h.logits_v = host_matrix<const float>(h.logits.data(), -1, kE); },
      status_code::invalid_shape, "logits");
  expect_rejected_everywhere(
      [](harness& h) { h.logits_v = host_matrix<const float>(h.logits.data(), kT, -kE, 1, 1); },
      status_code::invalid_shape, "logits");
}

TEST_CASE("validation: jitter_eps must satisfy 0 <= eps < 0.5 (options.jitter_eps)") {
  for (double eps : {-0.1, -1e-300, 0.5, 0.7, kNaN, kInf, -kInf}) {
    CAPTURE(eps);
    expect_rejected_everywhere([eps](harness& h) { h.opt.jitter_eps = eps; },
                               status_code::invalid_argument, "options.jitter_eps");
  }
  // The closed lower end and values just below 0.5 are valid.
  for (double eps : {0.0, -0.0, 0.4999999}) {
    CAPTURE(eps);
    for_each_estimator([&](auto tag) {
      using Est = typename decltype(tag)::type;
      expect_accepted<Est>(pass::forward, [eps](harness& h) { h.opt.jitter_eps = eps; });
      expect_accepted<Est>(pass::backward, [eps](harness& h) { h.opt.jitter_eps = eps; });
    });
  }
}

TEST_CASE("validation: non-finite loss coefficients are rejected") {
  for (double c : {kNaN, kInf, -kInf}) {
    CAPTURE(c);
    expect_rejected_everywhere([c](harness& h) { h.opt.load_balance_coef = c; },
                               status_code::invalid_argument, "options.load_balance_coef");
    expect_rejected_everywhere([c](harness& h) { h.opt.z_loss_coef = c; },
                               status_code::invalid_argument, "options.z_loss_coef");
  }
}

TEST_CASE("validation: an unknown routing mode is rejected (options.mode)") {
  expect_rejected_everywhere([](harness& h) { h.opt.mode = static_cast<routing_mode>(7); },
                             status_code::invalid_argument, "options.mode");
}

TEST_CASE("validation: first_token + T must not exceed 2^32 (state.rng.first_token)") {
  const std::uint64_t two32 = std::uint64_t(1) << 32;
  for (std::uint64_t ft :
       {two32 - kT + 1, two32, two32 + 1, ~std::uint64_t(0), ~std::uint64_t(0) - 2}) {
    CAPTURE(ft);
    expect_rejected_everywhere([ft](harness& h) { h.state.rng.first_token = ft; },
                               status_code::invalid_argument, "state.rng.first_token");
  }
  // The last valid start: tokens 2^32 - T .. 2^32 - 1.
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    expect_accepted<Est>(pass::forward,
                         [two32](harness& h) { h.state.rng.first_token = two32 - kT; });
    expect_accepted<Est>(pass::backward,
                         [two32](harness& h) { h.state.rng.first_token = two32 - kT; });
  });
}

TEST_CASE("validation: negative strides are rejected for every view") {
  expect_rejected_everywhere(
      [](harness& h) {
        h.logits_v = host_matrix<const float>(h.logits.data() + 100, kT, kE, -kE, 1);
      },
      status_code::invalid_stride, "logits");
  expect_rejected_everywhere(
      [](harness& h) {
        h.logits_v = host_matrix<const float>(h.logits.data() + 100, kT, kE, kE, -1);
      },
      status_code::invalid_stride, "logits");
  expect_rejected_everywhere(
      [](harness& h) { h.state.experts = host_matrix(h.experts.data() + 100, kT, kK, -kK, 1); },
      status_code::invalid_stride, "state.experts");
  expect_rejected_everywhere(
      [](harness& h) { h.state.experts = host_matrix(h.experts.data() + 100, kT, kK, kK, -1); },
      status_code::invalid_stride, "state.experts");
  expect_rejected_everywhere(
      [](harness& h) { h.state.coins = host_matrix(h.coins.data() + 100, kT, kK, -kK, 1); },
      status_code::invalid_stride, "state.coins");
  expect_rejected_everywhere(
      [](harness& h) { h.state.coins = host_matrix(h.coins.data() + 100, kT, kK, kK, -1); },
      status_code::invalid_stride, "state.coins");
  expect_rejected_everywhere(
      [](harness& h) { h.gates_v = host_matrix(h.gates.data() + 100, kT, kK, -kK, 1); },
      status_code::invalid_stride, "gates", true, false);
  expect_rejected_everywhere(
      [](harness& h) {
        h.grad_gates_v = host_matrix<const float>(h.grad_gates.data() + 100, kT, kK, kK, -1);
      },
      status_code::invalid_stride, "grad_gates", false, true);
  expect_rejected_everywhere(
      [](harness& h) { h.grad_logits_v = host_matrix(h.grad_logits.data() + 100, kT, kE, -kE, 1); },
      status_code::invalid_stride, "grad_logits", false, true);
}

TEST_CASE("validation: overlapping output strides are rejected (gates experts coins grad_logits)") {
  // Rows on top of each other, a zero stride, and columns overlapping the next row.
  const index_t bad[][2] = {{1, 1}, {0, 1}, {kK, 0}, {1, 2}};
  for (const auto& s : bad) {
    CAPTURE(s[0]);
    CAPTURE(s[1]);
    const index_t s0 = s[0], s1 = s[1];
    expect_rejected_everywhere(
        [=](harness& h) { h.gates_v = host_matrix(h.gates.data(), kT, kK, s0, s1); },
        status_code::invalid_stride, "gates", true, false);
    expect_rejected_everywhere(
        [=](harness& h) { h.state.experts = host_matrix(h.experts.data(), kT, kK, s0, s1); },
        status_code::invalid_stride, "state.experts", true, false);
    expect_rejected_everywhere(
        [=](harness& h) { h.state.coins = host_matrix(h.coins.data(), kT, kK, s0, s1); },
        status_code::invalid_stride, "state.coins", true, false);
  }
  const index_t bad_grad[][2] = {{1, 1}, {0, 1}, {kE, 0}, {kE - 1, 1}, {1, kT - 1}};
  for (const auto& s : bad_grad) {
    CAPTURE(s[0]);
    CAPTURE(s[1]);
    const index_t s0 = s[0], s1 = s[1];
    expect_rejected_everywhere(
        [=](harness& h) { h.grad_logits_v = host_matrix(h.grad_logits.data(), kT, kE, s0, s1); },
        status_code::invalid_stride, "grad_logits", false, true);
  }
  // Non-overlapping layouts are fine: transposed and padded.
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    expect_accepted<Est>(pass::forward, [](harness& h) {
      h.gates_v = host_matrix(h.gates.data(), kT, kK, 1, kT);
      h.state.experts = host_matrix(h.experts.data(), kT, kK, kK + 3, 1);
      h.state.coins = host_matrix(h.coins.data(), kT, kK, 1, kT + 1);
    });
    expect_accepted<Est>(pass::backward, [](harness& h) {
      h.grad_logits_v = host_matrix(h.grad_logits.data(), kT, kE, 1, kT);
    });
  });
}

TEST_CASE("validation: inputs may overlap or broadcast (stride 0)") {
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    // Logits: every token reads the same row.
    expect_accepted<Est>(pass::forward, [](harness& h) {
      h.logits_v = host_matrix<const float>(h.logits.data(), kT, kE, 0, 1);
    });
    expect_accepted<Est>(pass::backward, [](harness& h) {
      h.logits_v = host_matrix<const float>(h.logits.data(), kT, kE, 0, 1);
    });
    // The backward only reads the state and the gate gradients.
    expect_accepted<Est>(pass::backward, [](harness& h) {
      h.state.experts = host_matrix(h.experts.data(), kT, kK, 0, 1);
      h.state.coins = host_matrix(h.coins.data(), kT, kK, 0, 1);
      h.grad_gates_v = host_matrix<const float>(h.grad_gates.data(), kT, kK, 0, 1);
    });
  });
}

TEST_CASE("validation: null pointers are rejected (logits experts gates grad_gates grad_logits)") {
  expect_rejected_everywhere(
      [](harness& h) { h.logits_v = host_matrix<const float>(nullptr, kT, kE); },
      status_code::null_pointer, "logits");
  expect_rejected_everywhere(
      [](harness& h) { h.state.experts = host_matrix<std::int32_t>(nullptr, kT, kK); },
      status_code::null_pointer, "state.experts");
  expect_rejected_everywhere([](harness& h) { h.gates_v = host_matrix<float>(nullptr, kT, kK); },
                             status_code::null_pointer, "gates", true, false);
  expect_rejected_everywhere(
      [](harness& h) { h.grad_gates_v = host_matrix<const float>(nullptr, kT, kK); },
      status_code::null_pointer, "grad_gates", false, true);
  expect_rejected_everywhere(
      [](harness& h) { h.grad_logits_v = host_matrix<float>(nullptr, kT, kE); },
      status_code::null_pointer, "grad_logits", false, true);
}

TEST_CASE("validation: coins are required by midpoint and heun3 only") {
  auto no_coins = [](harness& h) { h.state.coins = host_view<std::uint8_t, 2>(); };
  for (pass p : {pass::forward, pass::backward}) {
    expect_rejected<sparsemixer_midpoint>(p, no_coins, status_code::null_pointer, "state.coins");
    expect_rejected<sparsemixer_heun3>(p, no_coins, status_code::null_pointer, "state.coins");
    expect_accepted<sparsemixer_euler>(p, no_coins);
    expect_accepted<switch_router>(p, no_coins);
    expect_accepted<topk_softmax>(p, no_coins);
  }
  // A null pointer with the right shape is "no coins" too.
  auto null_coins = [](harness& h) { h.state.coins = host_matrix<std::uint8_t>(nullptr, kT, kK); };
  expect_rejected<sparsemixer_heun3>(pass::forward, null_coins, status_code::null_pointer,
                                     "state.coins");
  expect_accepted<sparsemixer_euler>(pass::forward, null_coins);
}

TEST_CASE("validation: wrong shapes are rejected for every view") {
  const index_t bad_tk[][2] = {{kT, kK + 1}, {kT, kK - 1}, {kT - 1, kK}, {kT + 1, kK}};
  for (const auto& s : bad_tk) {
    CAPTURE(s[0]);
    CAPTURE(s[1]);
    const index_t r = s[0], c = s[1];
    expect_rejected_everywhere(
        [=](harness& h) { h.state.experts = host_matrix(h.experts.data(), r, c); },
        status_code::invalid_shape, "state.experts");
    expect_rejected_everywhere(
        [=](harness& h) { h.state.coins = host_matrix(h.coins.data(), r, c); },
        status_code::invalid_shape, "state.coins");
    expect_rejected_everywhere([=](harness& h) { h.gates_v = host_matrix(h.gates.data(), r, c); },
                               status_code::invalid_shape, "gates", true, false);
    expect_rejected_everywhere(
        [=](harness& h) { h.grad_gates_v = host_matrix<const float>(h.grad_gates.data(), r, c); },
        status_code::invalid_shape, "grad_gates", false, true);
  }
  const index_t bad_te[][2] = {{kT, kE + 1}, {kT, kE - 1}, {kT - 1, kE}, {kT + 1, kE}, {kT, kK}};
  for (const auto& s : bad_te) {
    CAPTURE(s[0]);
    CAPTURE(s[1]);
    const index_t r = s[0], c = s[1];
    expect_rejected_everywhere(
        [=](harness& h) { h.grad_logits_v = host_matrix(h.grad_logits.data(), r, c); },
        status_code::invalid_shape, "grad_logits", false, true);
  }
}

TEST_CASE("validation: the load-balancing gradient needs stats.expert_counts") {
  expect_rejected_everywhere(
      [](harness& h) {
        h.opt.load_balance_coef = 0.01;
        h.stats.expert_counts = nullptr;
      },
      status_code::null_pointer, "stats.expert_counts", false, true);
  // Without the load-balancing term, or in the forward, the counts are optional.
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    expect_accepted<Est>(pass::backward, [](harness& h) {
      h.opt.z_loss_coef = 0.01;
      h.stats = host_routing_stats{};
    });
    expect_accepted<Est>(pass::forward, [](harness& h) {
      h.opt.load_balance_coef = 0.01;
      h.stats = host_routing_stats{};
    });
  });
}

TEST_CASE("validation: the backward rejects out-of-range experts in a hand-built state") {
  for (std::int32_t bad :
       {-1, static_cast<std::int32_t>(kE), static_cast<std::int32_t>(kE) + 100,
        std::numeric_limits<std::int32_t>::min(), std::numeric_limits<std::int32_t>::max()}) {
    CAPTURE(bad);
    for (grad_mode m : {grad_mode::overwrite, grad_mode::accumulate}) {
      // In the last token's last slot, so that a check made while writing would be too late.
      expect_rejected_everywhere(
          [=](harness& h) {
            h.mode = m;
            h.experts[static_cast<std::size_t>((kT - 1) * kK + kK - 1)] = bad;
          },
          status_code::invalid_argument, "state.experts", false, true);
    }
  }
}

TEST_CASE("validation: the backward rejects a coin that names no node of the rule") {
  auto set_last_coin = [](std::uint8_t c) {
    return [c](harness& h) { h.coins[static_cast<std::size_t>((kT - 1) * kK + kK - 1)] = c; };
  };
  for (std::uint8_t c : {std::uint8_t(2), std::uint8_t(3), std::uint8_t(255)}) {
    CAPTURE(int(c));
    expect_rejected<sparsemixer_midpoint>(pass::backward, set_last_coin(c),
                                          status_code::invalid_argument, "state.coins");
    expect_rejected<sparsemixer_heun3>(pass::backward, set_last_coin(c),
                                       status_code::invalid_argument, "state.coins");
  }
  // Euler, switch and topk have no reduced scale: a non-zero coin names nothing.
  expect_rejected<sparsemixer_euler>(pass::backward, set_last_coin(1),
                                     status_code::invalid_argument, "state.coins");
  expect_rejected<switch_router>(pass::backward, set_last_coin(1), status_code::invalid_argument,
                                 "state.coins");
  expect_rejected<topk_softmax>(pass::backward, set_last_coin(1), status_code::invalid_argument,
                                "state.coins");
  // Coin 1 is midpoint's and heun3's reduced scale.
  expect_accepted<sparsemixer_midpoint>(pass::backward, set_last_coin(1));
  expect_accepted<sparsemixer_heun3>(pass::backward, set_last_coin(1));
}

TEST_CASE("validation: T = 0 is valid and writes nothing") {
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    INFO(cat(estimator_name<Est>()));
    // Views of zero rows onto poisoned buffers, and views with null pointers.
    for (bool null_pointers : {false, true}) {
      CAPTURE(null_pointers);
      harness h(false);
      h.opt.load_balance_coef = 0.01;
      h.opt.z_loss_coef = 0.01;
      h.logits_v = host_matrix<const float>(null_pointers ? nullptr : h.logits.data(), 0, kE);
      h.state.experts =
          host_matrix<std::int32_t>(null_pointers ? nullptr : h.experts.data(), 0, kK);
      h.state.coins = host_matrix<std::uint8_t>(null_pointers ? nullptr : h.coins.data(), 0, kK);
      h.gates_v = host_matrix<float>(null_pointers ? nullptr : h.gates.data(), 0, kK);
      h.grad_gates_v =
          host_matrix<const float>(null_pointers ? nullptr : h.grad_gates.data(), 0, kK);
      h.grad_logits_v = host_matrix<float>(null_pointers ? nullptr : h.grad_logits.data(), 0, kE);
      h.snapshot();
      REQUIRE(h.forward<Est>().is_ok());
      for (grad_mode m : {grad_mode::overwrite, grad_mode::accumulate}) {
        h.mode = m;
        REQUIRE(h.backward<Est>().is_ok());
      }
      CHECK(bitwise_equal(h.logits, h.s_logits));
      CHECK(bitwise_equal(h.experts, h.s_experts));
      CHECK(bitwise_equal(h.coins, h.s_coins));
      CHECK(bitwise_equal(h.gates, h.s_gates));
      CHECK(bitwise_equal(h.grad_logits, h.s_grad_logits));
      // The stats of an empty batch: nothing counted, zero losses (never NaN from 0/0).
      for (index_t e = 0; e < kE; ++e) CHECK(h.counts[static_cast<std::size_t>(e)] == 0);
      CHECK(bitwise_equal(std::vector<std::int64_t>(h.counts.begin() + kE, h.counts.end()),
                          std::vector<std::int64_t>(h.s_counts.begin() + kE, h.s_counts.end())));
      CHECK(h.lb == 0.0);
      CHECK(h.zl == 0.0);
      CHECK(h.nonfinite == 0);
      // And with no stats at all.
      h.stats = host_routing_stats{};
      h.opt.load_balance_coef = 0.0;
      CHECK(h.forward<Est>().is_ok());
      CHECK(h.backward<Est>().is_ok());
    }
  });
}

TEST_CASE("validation: k = E routes every expert exactly once") {
  const index_t rows = 50, E = 5;
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    for (routing_mode mode : {routing_mode::train, routing_mode::eval}) {
      INFO(cat(estimator_name<Est>(), mode == routing_mode::eval ? " eval" : " train"));
      routing_batch<double> b(random_logits<double>(3, rows, E, 1.0, 2.0), rows, E,
                              static_cast<int>(E));
      routing_options opt;
      opt.k = static_cast<int>(E);
      opt.mode = mode;
      REQUIRE(b.forward<Est>(opt).is_ok());
      REQUIRE(b.backward<Est>(opt).is_ok());
      CHECK(b.nonfinite_rows == 0);
      std::int64_t not_permutation = 0, bad_gate = 0, nonfinite_grad = 0;
      for (index_t t = 0; t < rows; ++t) {
        std::vector<int> seen(static_cast<std::size_t>(E), 0);
        for (int j = 0; j < E; ++j) {
          const int d = b.expert(t, j);
          if (d < 0 || d >= E || seen[static_cast<std::size_t>(d)]++) ++not_permutation;
          if (!(b.gate(t, j) > 0.0 && b.gate(t, j) <= 1.0)) ++bad_gate;
        }
        // The last slot has one candidate left: pi = 1, and it is that slot's argmax.
        if (Est::per_slot_softmax && !(b.gate(t, static_cast<int>(E) - 1) == 1.0)) ++bad_gate;
        for (index_t e = 0; e < E; ++e)
          if (!std::isfinite(b.grad(t, e))) ++nonfinite_grad;
      }
      CHECK(not_permutation == 0);
      CHECK(bad_gate == 0);
      CHECK(nonfinite_grad == 0);
      for (index_t e = 0; e < E; ++e) CHECK(b.counts[static_cast<std::size_t>(e)] == rows);
    }
  });
}

TEST_CASE("validation: E = 1 gives gate 1 and coin 0 and a zero gradient") {
  const index_t rows = 40;
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    for (routing_mode mode : {routing_mode::train, routing_mode::eval}) {
      INFO(cat(estimator_name<Est>(), mode == routing_mode::eval ? " eval" : " train"));
      routing_batch<float> b(random_logits<float>(4, rows, 1, -5.0, 5.0), rows, 1, 1);
      b.grad_logits.assign(static_cast<std::size_t>(rows), 123.0f);  // overwrite must replace it
      routing_options opt;
      opt.mode = mode;
      REQUIRE(b.forward<Est>(opt).is_ok());
      REQUIRE(b.backward<Est>(opt).is_ok());
      for (index_t t = 0; t < rows; ++t) {
        CAPTURE(t);
        CHECK(b.expert(t, 0) == 0);
        CHECK(b.coin(t, 0) == 0);
        CHECK(b.gate(t, 0) == 1.0f);
        CHECK(b.grad(t, 0) == 0.0f);
      }
      CHECK(b.counts[0] == rows);
      CHECK(b.nonfinite_rows == 0);
    }
  });
}
