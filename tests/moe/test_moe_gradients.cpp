// Gradients of the CPU MoE layer.
//
// 1. Central finite differences in double of every parameter's gradient and of dx, with
//    eval-mode routing (the layer is then a smooth function of every input away from ties):
//    k = 1, 2; GELU, SiLU, SwiGLU; with and without ω; α and β non-zero (the objective is
//    L = Σ dy·y + load-balancing loss + z-loss, the values the forward reports); plus capacity
//    drops, renormalised gates, E = 1, and the dense mode (eval, and train with β only).
//    Only estimators with backward weight 1 (switch, topk_softmax, heun3) give the exact gradient
//    of the eval-mode forward; euler and midpoint use weight 2 by design (SPEC §4), so they are
//    checked by 2. instead.
// 2. Train mode: the router gradient equals the estimator's rule (tests/common/
//    estimator_reference.hpp) applied to the gate gradients of an independent double reference
//    of the layer (tests/common/moe_reference.hpp), plus the α/β terms; and every other
//    gradient, y, the gates, the capacity admission and the statistics agree with that reference.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/estimator_kinds.hpp"
#include "moe/moe_test_util.hpp"

namespace {

using namespace routegrad;
using namespace routegrad::test;

struct routing_snapshot {
  std::vector<std::int32_t> experts;
  std::vector<index_t> rows;
  bool operator==(const routing_snapshot& o) const {
    return experts == o.experts && rows == o.rows;
  }
};

template <class Est>
routing_snapshot snapshot_of(const moe_case<double>& c) {
  const cpu::moe_saved_state<double> s = c.saved<Est>();
  routing_snapshot r;
  for (index_t t = 0; t < s.experts.extent(0); ++t)
    for (index_t j = 0; j < s.experts.extent(1); ++j) r.experts.push_back(s.experts(t, j));
  for (index_t t = 0; t < s.rows.extent(0); ++t)
    for (index_t j = 0; j < s.rows.extent(1); ++j) r.rows.push_back(s.rows(t, j));
  return r;
}

/// Compares the layer's gradient of every parameter and of x with central differences of the
/// objective. Fails (rather than skips) if a perturbation changes the routing.
template <class Est>
void fd_check(const moe_options& opt, index_t T, std::uint64_t seed,
              layout params_layout = layout::contiguous) {
  moe_case<double> c(opt, T, seed, params_layout);
  REQUIRE(c.forward<Est>().is_ok());
  const routing_snapshot base = snapshot_of<Est>(c);
  REQUIRE(c.backward<Est>().is_ok());
  const double h = 1e-6;
  bool routing_changed = false;
  auto derivative = [&](auto& tensor, index_t i) {
    const double v0 = static_cast<double>(tensor[i]);
    tensor[i] = v0 + h;
    REQUIRE(c.template forward<Est>().is_ok());
    routing_changed |= !(snapshot_of<Est>(c) == base);
    const double lp = c.objective();
    tensor[i] = v0 - h;
    REQUIRE(c.template forward<Est>().is_ok());
    routing_changed |= !(snapshot_of<Est>(c) == base);
    const double lm = c.objective();
    tensor[i] = v0;
    return (lp - lm) / (2 * h);
  };
  auto check = [&](auto& param, const auto& grad, const char* name) {
    const std::vector<double> analytic = grad.values();
    std::vector<double> numeric(analytic.size());
    for (index_t i = 0; i < param.count(); ++i)
      numeric[static_cast<std::size_t>(i)] = derivative(param, i);
    check_close(analytic, numeric, 1e-6, 1e-7, name);
  };
  check(c.Wr, c.gWr, "router_weight");
  check(c.br, c.gbr, "router_bias");
  check(c.W1, c.gW1, "w1");
  check(c.b1, c.gb1, "b1");
  check(c.W2, c.gW2, "w2");
  check(c.b2, c.gb2, "b2");
  if (opt.use_omega) check(c.om, c.gom, "omega");
  check(c.x, c.dx, "dx");
  CHECK_MESSAGE(!routing_changed, "a perturbation changed the routing: pick another seed");
}

moe_options small_options(int k, activation act, bool omega) {
  moe_options opt;
  opt.d_model = 4;
  opt.d_hidden = 3;
  opt.experts = 4;
  opt.act = act;
  opt.use_omega = omega;
  opt.routing.k = k;
  opt.routing.mode = routing_mode::eval;
  opt.routing.jitter_eps = 0.1;
  opt.routing.load_balance_coef = 0.05;
  opt.routing.z_loss_coef = 0.02;
  return opt;
}

const char* act_name(activation a) {
  return a == activation::gelu ? "gelu" : a == activation::silu ? "silu" : "swiglu";
}

TEST_SUITE("moe") {
  TEST_CASE("finite differences: every gradient, eval routing, k = 1, 2, every activation, ω") {
    std::uint64_t seed = 100;
    int i = 0;
    for (int k : {1, 2})
      for (activation act : {activation::gelu, activation::silu, activation::swiglu})
        for (bool omega : {false, true}) {
          const moe_options opt = small_options(k, act, omega);
          CAPTURE(k);
          CAPTURE(act_name(act));
          CAPTURE(omega);
          CAPTURE(i);
          // The estimators differ in eval mode by the SparseMixer mask only; cover all three
          // kinds of router.
          switch (i++ % 3) {
            case 0:
              fd_check<topk_softmax>(opt, 6, ++seed);
              break;
            case 1:
              fd_check<sparsemixer_heun3>(opt, 6, ++seed);
              break;
            default:
              fd_check<switch_router>(opt, 6, ++seed);
              break;
          }
        }
  }

  TEST_CASE("finite differences: capacity drops, renormalised gates, strided parameters") {
    moe_options opt = small_options(2, activation::gelu, true);
    opt.capacity_factor = 0.5;  // ceil(0.5·8·2/4) = 2 slots per expert for 16 pairs
    SUBCASE("capacity") {
      moe_case<double> probe(opt, 8, 7);
      REQUIRE(probe.forward<topk_softmax>().is_ok());
      CHECK(probe.dropped > 0);  // the case exercises drops
      fd_check<topk_softmax>(opt, 8, 7);
    }
    SUBCASE("renormalised, permuted parameter layouts") {
      opt.capacity_factor = 0.0;
      opt.routing.renormalize = true;
      opt.act = activation::swiglu;
      fd_check<sparsemixer_heun3>(opt, 6, 8, layout::permuted);
    }
  }

  TEST_CASE("finite differences: E = 1") {
    moe_options opt = small_options(1, activation::silu, true);
    opt.experts = 1;
    fd_check<sparsemixer_heun3>(opt, 5, 9);
  }

  TEST_CASE("finite differences: dense mode (exact gradient of the dense objective)") {
    for (activation act : {activation::gelu, activation::swiglu}) {
      CAPTURE(act_name(act));
      moe_options opt = small_options(2, act, true);
      opt.mix = mixing::dense;
      fd_check<sparsemixer_heun3>(opt, 5, 11);  // eval routing, α and β
      // Train routing, β only (α's counts would follow the sampled choices).
      opt.routing.mode = routing_mode::train;
      opt.routing.load_balance_coef = 0.0;
      fd_check<sparsemixer_heun3>(opt, 5, 12);
    }
  }

  TEST_CASE("dense mode: output, counts and no drops") {
    moe_options opt = small_options(1, activation::gelu, true);
    opt.mix = mixing::dense;
    opt.capacity_factor = 0.25;  // ignored by the dense mode
    moe_case<double> c(opt, 7, 13);
    REQUIRE(c.forward<topk_softmax>().is_ok());
    const moe_ref::layer L = c.ref_layer();
    check_close(c.y.values(), moe_ref::dense_forward(L, c.x.values(), 7), 1e-12, 1e-13, "y");
    for (int e = 0; e < opt.experts; ++e) CHECK(c.kept[static_cast<std::size_t>(e)] == 7);
    CHECK(c.dropped == 0);
    std::int64_t routed = 0;
    for (std::int64_t n : c.counts) routed += n;
    CHECK(routed == 7);  // the routing still ran (k = 1)
  }
}

// ---------------------------------------------------------------------------------------------
// Train mode against the independent reference.
// ---------------------------------------------------------------------------------------------

struct train_case {
  int k;
  double capacity_factor;
  bool omega;
  activation act;
  bool renormalize;
};

template <class Est>
void train_reference(const train_case& tc, std::uint64_t seed) {
  const int T = 24, E = 4, k = tc.k;
  moe_options opt;
  opt.d_model = 5;
  opt.d_hidden = 3;
  opt.experts = E;
  opt.act = tc.act;
  opt.use_omega = tc.omega;
  opt.capacity_factor = tc.capacity_factor;
  opt.routing.k = k;
  opt.routing.mode = routing_mode::train;
  opt.routing.jitter_eps = 0.3;  // a wide SparseMixer mask: several candidates per slot
  opt.routing.renormalize = tc.renormalize;
  opt.routing.load_balance_coef = 0.04;
  opt.routing.z_loss_coef = 0.03;
  moe_case<double> c(opt, T, seed);
  c.rng = rng_stream{seed, 3, 17};
  REQUIRE(c.forward<Est>().is_ok());
  REQUIRE(c.backward<Est>().is_ok());
  const reference_summary r = check_against_reference<Est>(c);
  if (Est::sampled) CHECK(r.sampled_off_argmax > 0);  // the case really samples
  if (tc.capacity_factor > 0) CHECK(r.kept < T * k);  // the case really drops
}

TEST_SUITE("moe") {
  TEST_CASE("train mode: router gradient = estimator rule on the layer's gate gradients") {
    const train_case cases[] = {
        {1, 0.0, true, activation::gelu, false},    {2, 0.0, false, activation::silu, false},
        {2, 0.75, true, activation::swiglu, false},  // drops
        {2, 0.0, true, activation::gelu, true},      // renormalised gates
        {1, 0.6, false, activation::gelu, false},    // drops, k = 1
    };
    std::uint64_t seed = 500;
    for (const train_case& tc : cases) {
      CAPTURE(tc.k);
      CAPTURE(tc.capacity_factor);
      CAPTURE(tc.omega);
      CAPTURE(act_name(tc.act));
      CAPTURE(tc.renormalize);
      ++seed;
      for_each_estimator([&](auto tag) {
        using Est = typename decltype(tag)::type;
        CAPTURE(estimator_name<Est>());
        train_reference<Est>(tc, seed);
      });
    }
  }
}

}  // namespace
