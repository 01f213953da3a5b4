// Behaviour of the CPU MoE layer: capacity (deterministic (slot, token) drop order, dropped pairs
// contribute 0 and get no gradient, counts), an expert with no tokens, T = 0, E = 1, strided
// inputs, outputs and parameters, accumulate mode, bit-identical results for any thread count,
// float against double, non-finite inputs, and the owning context. Every output is poisoned
// (NaN) before each call, so an element the layer forgets to write fails the comparison.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "moe/moe_test_util.hpp"

namespace {

using namespace routegrad;
using namespace routegrad::test;

moe_options base_options(int k, index_t E) {
  moe_options opt;
  opt.d_model = 4;
  opt.d_hidden = 3;
  opt.experts = static_cast<int>(E);
  opt.routing.k = k;
  opt.routing.mode = routing_mode::eval;
  return opt;
}

bool all_finite(const std::vector<double>& v) {
  for (double x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

/// Everything a forward + backward wrote, for bitwise comparison.
struct outputs {
  std::vector<double> y, dx, gWr, gbr, gW1, gb1, gW2, gb2, gom;
  std::vector<std::int64_t> counts, kept;
  std::int64_t dropped, nonfinite;
  double lb, zl;

  template <class T>
  static outputs of(const moe_case<T>& c) {
    return {c.y.values(),   c.dx.values(),  c.gWr.values(), c.gbr.values(), c.gW1.values(),
            c.gb1.values(), c.gW2.values(), c.gb2.values(), c.gom.values(), c.counts,
            c.kept,         c.dropped,      c.nonfinite,    c.lb,           c.zl};
  }
  bool operator==(const outputs& o) const {
    return bitwise_equal(y, o.y) && bitwise_equal(dx, o.dx) && bitwise_equal(gWr, o.gWr) &&
           bitwise_equal(gbr, o.gbr) && bitwise_equal(gW1, o.gW1) && bitwise_equal(gb1, o.gb1) &&
           bitwise_equal(gW2, o.gW2) && bitwise_equal(gb2, o.gb2) && bitwise_equal(gom, o.gom) &&
           counts == o.counts && kept == o.kept && dropped == o.dropped &&
           nonfinite == o.nonfinite && bitwise_equal_value(lb, o.lb) &&
           bitwise_equal_value(zl, o.zl);
  }
};

TEST_SUITE("moe") {
  TEST_CASE("capacity: (slot, token) admission order, drops contribute 0 and get no gradient") {
    // Expert i is fed by feature i: W_r = 10·I, x_t = e_{a_t} + ½ e_{b_t}, so in eval mode with
    // top-2 softmax slot 0 takes a_t and slot 1 takes b_t.
    moe_options opt = base_options(2, 3);
    opt.d_model = 3;
    opt.use_omega = true;
    opt.capacity_factor = 0.5;  // ceil(0.5 · 6·2 / 3) = 2 pairs per expert
    const int a[] = {0, 1, 0, 0, 1, 0}, b[] = {1, 0, 1, 2, 0, 1};
    const index_t T = 6;
    moe_case<double> c(opt, T, 21);
    for (index_t i = 0; i < c.Wr.count(); ++i) c.Wr[i] = (i / 3 == i % 3) ? 10.0 : 0.0;
    for (index_t e = 0; e < 3; ++e) c.br[e] = 0.0;
    for (index_t t = 0; t < T; ++t)
      for (index_t f = 0; f < 3; ++f) c.x[t * 3 + f] = f == a[t] ? 1.0 : f == b[t] ? 0.5 : 0.0;
    REQUIRE(expert_capacity(opt, T) == 2);
    REQUIRE(c.forward<topk_softmax>().is_ok());
    REQUIRE(c.backward<topk_softmax>().is_ok());
    const cpu::moe_saved_state<double> s = c.saved<topk_softmax>();
    for (index_t t = 0; t < T; ++t) {
      CHECK(s.experts(t, 0) == a[t]);
      CHECK(s.experts(t, 1) == b[t]);
    }
    // Slot 0 first: tokens 0, 2 fill expert 0, tokens 1, 4 fill expert 1; token 3's and 5's slot
    // 0 are dropped. Then slot 1: only token 3's (expert 2) finds room; token 0's slot 1 is
    // dropped although token 0 comes first, because slot 0 of every token came before it.
    CHECK(s.rows(0, 0) >= 0);
    CHECK(s.rows(3, 0) == -1);
    CHECK(s.rows(0, 1) == -1);
    CHECK(s.rows(3, 1) >= 0);
    CHECK(c.kept == std::vector<std::int64_t>{2, 2, 1});
    CHECK(c.counts == std::vector<std::int64_t>{6, 5, 1});  // before capacity
    CHECK(c.dropped == 7);
    // Token 5 lost both pairs: exactly zero output and, with α = β = 0, zero input gradient.
    for (index_t col = 0; col < 3; ++col) {
      CHECK(c.y[5 * 3 + col] == 0.0);
      CHECK(c.dx[5 * 3 + col] == 0.0);
    }
    // Everything (gate gradients of dropped pairs are 0) against the reference.
    check_against_reference<topk_softmax>(c);
    // A train-mode run of the same kind admits exactly what the reference admits.
    opt.routing.mode = routing_mode::train;
    opt.routing.load_balance_coef = 0.1;
    opt.capacity_factor = 0.7;
    moe_case<double> t(opt, 10, 22);
    REQUIRE(t.forward<sparsemixer_heun3>().is_ok());
    REQUIRE(t.backward<sparsemixer_heun3>().is_ok());
    const reference_summary r = check_against_reference<sparsemixer_heun3>(t);
    CHECK(r.kept < 20);
  }

  TEST_CASE("an expert with no tokens: zero gradients, zero count") {
    moe_options opt = base_options(2, 4);
    opt.use_omega = true;
    opt.routing.load_balance_coef = 0.1;
    opt.routing.z_loss_coef = 0.1;
    moe_case<double> c(opt, 9, 31);
    c.br[3] = -60.0;  // never chosen
    REQUIRE(c.forward<topk_softmax>().is_ok());
    REQUIRE(c.backward<topk_softmax>().is_ok());
    CHECK(c.counts[3] == 0);
    CHECK(c.kept[3] == 0);
    const index_t h1 = w1_rows(opt), d = opt.d_model, h = opt.d_hidden;
    for (index_t i = 0; i < h1 * d; ++i) CHECK(c.gW1[3 * h1 * d + i] == 0.0);
    for (index_t i = 0; i < h1; ++i) CHECK(c.gb1[3 * h1 + i] == 0.0);
    for (index_t i = 0; i < d * h; ++i) CHECK(c.gW2[3 * d * h + i] == 0.0);
    for (index_t i = 0; i < d; ++i) CHECK(c.gb2[3 * d + i] == 0.0);
    check_against_reference<topk_softmax>(c);
  }

  TEST_CASE("T = 0: valid, no context needed, overwrite zeroes the gradients") {
    for (mixing mix : {mixing::sparse, mixing::dense}) {
      moe_options opt = base_options(2, 3);
      opt.mix = mix;
      opt.use_omega = true;
      opt.routing.load_balance_coef = 0.1;
      CHECK(cpu::moe_context_bytes<float>(opt, 0) == 0);
      moe_case<float> c(opt, 0, 41);
      const host_view<const float, 2> x(nullptr, {index_t(0), opt.d_model});
      const host_view<float, 2> y(nullptr, {index_t(0), opt.d_model});
      CHECK(moe_forward<sparsemixer_heun3>(opt, c.params(), x, y, c.rng, host_view<std::byte>(),
                                           c.stats())
                .is_ok());
      CHECK(c.counts == std::vector<std::int64_t>{0, 0, 0});
      CHECK(c.kept == std::vector<std::int64_t>{0, 0, 0});
      CHECK(c.dropped == 0);
      CHECK(c.lb == 0.0);
      CHECK(c.zl == 0.0);
      CHECK(c.nonfinite == 0);
      CHECK(moe_backward<sparsemixer_heun3>(opt, c.params(), x, x, host_view<const std::byte>(),
                                            c.grads(), y)
                .is_ok());
      for (const auto& v : {c.gWr.values(), c.gbr.values(), c.gW1.values(), c.gb1.values(),
                            c.gW2.values(), c.gb2.values(), c.gom.values()})
        for (double g : v) CHECK(g == 0.0);
      // accumulate: nothing changes
      c.gW1.fill_all(2.5f);
      CHECK(moe_backward<sparsemixer_heun3>(opt, c.params(), x, x, host_view<const std::byte>(),
                                            c.grads(), y, grad_mode::accumulate)
                .is_ok());
      for (double g : c.gW1.values()) CHECK(g == 2.5);
    }
  }

  TEST_CASE("E = 1: every token to the one expert with gate 1") {
    moe_options opt = base_options(1, 1);
    opt.routing.mode = routing_mode::train;
    opt.routing.z_loss_coef = 0.1;
    moe_case<double> c(opt, 5, 51);
    REQUIRE(c.forward<sparsemixer_heun3>().is_ok());
    REQUIRE(c.backward<sparsemixer_heun3>().is_ok());
    CHECK(c.kept == std::vector<std::int64_t>{5});
    const cpu::moe_saved_state<double> s = c.saved<sparsemixer_heun3>();
    for (index_t t = 0; t < 5; ++t) CHECK(s.gates(t, 0) == 1.0);
    check_against_reference<sparsemixer_heun3>(c);
  }

  TEST_CASE("strided inputs, outputs and parameters give the contiguous results") {
    moe_options opt = base_options(2, 5);
    opt.use_omega = true;
    opt.act = activation::swiglu;
    opt.capacity_factor = 0.8;
    opt.routing.mode = routing_mode::train;
    opt.routing.load_balance_coef = 0.1;
    opt.routing.z_loss_coef = 0.01;
    moe_case<double> ref(opt, 11, 61);
    REQUIRE(ref.forward<sparsemixer_midpoint>().is_ok());
    REQUIRE(ref.backward<sparsemixer_midpoint>().is_ok());
    const outputs want = outputs::of(ref);
    for (layout pl : {layout::contiguous, layout::padded, layout::permuted})
      for (layout bl : {layout::contiguous, layout::padded, layout::permuted}) {
        CAPTURE(static_cast<int>(pl));
        CAPTURE(static_cast<int>(bl));
        moe_case<double> c(opt, 11, 61, pl, bl);
        // The same numbers as `ref` (the random fill follows the logical order).
        CHECK(c.W1.values() == ref.W1.values());
        CHECK(c.x.values() == ref.x.values());
        REQUIRE(c.forward<sparsemixer_midpoint>().is_ok());
        REQUIRE(c.backward<sparsemixer_midpoint>().is_ok());
        const outputs got = outputs::of(c);
        check_close(got.y, want.y, 1e-14, 1e-15, "y");
        check_close(got.dx, want.dx, 1e-14, 1e-15, "dx");
        check_close(got.gW1, want.gW1, 1e-14, 1e-15, "w1");
        check_close(got.gW2, want.gW2, 1e-14, 1e-15, "w2");
        check_close(got.gWr, want.gWr, 1e-14, 1e-15, "router_weight");
        check_close(got.gb1, want.gb1, 1e-14, 1e-15, "b1");
        check_close(got.gb2, want.gb2, 1e-14, 1e-15, "b2");
        check_close(got.gbr, want.gbr, 1e-14, 1e-15, "router_bias");
        check_close(got.gom, want.gom, 1e-14, 1e-15, "omega");
        CHECK(got.kept == want.kept);
      }
  }

  TEST_CASE("accumulate mode adds to every gradient output") {
    moe_options opt = base_options(2, 4);
    opt.use_omega = true;
    opt.capacity_factor = 0.9;
    opt.routing.load_balance_coef = 0.1;
    moe_case<float> c(opt, 13, 71);
    REQUIRE(c.forward<sparsemixer_euler>().is_ok());
    REQUIRE(c.backward<sparsemixer_euler>().is_ok());
    auto fresh = [](auto& t, std::uint64_t seed) {
      const std::vector<float> v = random_logits<float>(seed, 1, t.count());
      for (index_t i = 0; i < t.count(); ++i) t[i] = v[static_cast<std::size_t>(i)];
    };
    // Expected: float(start + overwrite result), element by element.
    std::vector<std::vector<float>> expect;
    std::uint64_t seed = 1;
    auto prepare = [&](auto& t) {
      std::vector<float> g(static_cast<std::size_t>(t.count()));
      for (index_t i = 0; i < t.count(); ++i) g[static_cast<std::size_t>(i)] = t[i];
      fresh(t, ++seed);
      std::vector<float> e(g.size());
      for (index_t i = 0; i < t.count(); ++i)
        e[static_cast<std::size_t>(i)] = t[i] + g[static_cast<std::size_t>(i)];
      expect.push_back(e);
    };
    prepare(c.gWr), prepare(c.gbr), prepare(c.gW1), prepare(c.gb1), prepare(c.gW2);
    prepare(c.gb2), prepare(c.gom), prepare(c.dx);
    REQUIRE(c.backward<sparsemixer_euler>(grad_mode::accumulate).is_ok());
    std::size_t i = 0;
    auto compare = [&](auto& t, const char* name) {
      CAPTURE(name);
      std::vector<float> got(static_cast<std::size_t>(t.count()));
      for (index_t j = 0; j < t.count(); ++j) got[static_cast<std::size_t>(j)] = t[j];
      CHECK(bitwise_equal(got, expect[i++]));
    };
    compare(c.gWr, "router_weight"), compare(c.gbr, "router_bias"), compare(c.gW1, "w1");
    compare(c.gb1, "b1"), compare(c.gW2, "w2"), compare(c.gb2, "b2"), compare(c.gom, "omega");
    compare(c.dx, "dx");
  }

  TEST_CASE("bit-identical results for 1, 2 and 3 threads") {
    for (mixing mix : {mixing::sparse, mixing::dense}) {
      moe_options opt = base_options(2, 3);
      opt.mix = mix;
      opt.d_model = 8;
      opt.d_hidden = 300;  // more than one weight-gradient block (cpu::moe_tile_rows rows)
      opt.use_omega = true;
      opt.capacity_factor = 1.0;
      opt.routing.mode = routing_mode::train;
      opt.routing.load_balance_coef = 0.05;
      opt.routing.z_loss_coef = 0.01;
      // Several token tiles, and experts with more than one row tile (~267 rows each).
      const index_t T = 400;
      REQUIRE(T * 2 / 3 > cpu::moe_tile_rows);
      std::vector<outputs> runs;
      for (int threads : {1, 2, 3}) {
        CAPTURE(threads);
        moe_case<float> c(opt, T, 81);
        REQUIRE(c.forward<sparsemixer_midpoint>({threads}).is_ok());
        REQUIRE(c.backward<sparsemixer_midpoint>(grad_mode::overwrite, {threads}).is_ok());
        runs.push_back(outputs::of(c));
      }
      CHECK(runs[0] == runs[1]);
      CHECK(runs[0] == runs[2]);
      CHECK(all_finite(runs[0].gW1));
    }
  }

  TEST_CASE("float agrees with double") {
    moe_options opt = base_options(2, 4);
    opt.use_omega = true;
    opt.act = activation::gelu;
    opt.routing.load_balance_coef = 0.05;
    opt.routing.z_loss_coef = 0.01;
    moe_case<float> f(opt, 17, 91);
    moe_case<double> d(opt, 17, 91);
    d.Wr.assign(f.Wr.values()), d.br.assign(f.br.values()), d.W1.assign(f.W1.values());
    d.b1.assign(f.b1.values()), d.W2.assign(f.W2.values()), d.b2.assign(f.b2.values());
    d.om.assign(f.om.values()), d.x.assign(f.x.values()), d.dy.assign(f.dy.values());
    REQUIRE(f.forward<sparsemixer_heun3>().is_ok());
    REQUIRE(f.backward<sparsemixer_heun3>().is_ok());
    REQUIRE(d.forward<sparsemixer_heun3>().is_ok());
    REQUIRE(d.backward<sparsemixer_heun3>().is_ok());
    const outputs a = outputs::of(f), b = outputs::of(d);
    check_close(a.y, b.y, 1e-4, 1e-5, "y");
    check_close(a.dx, b.dx, 1e-4, 1e-5, "dx");
    check_close(a.gW1, b.gW1, 1e-4, 1e-5, "w1");
    check_close(a.gWr, b.gWr, 1e-4, 1e-5, "router_weight");
    check_close(a.gom, b.gom, 1e-4, 1e-5, "omega");
    CHECK(a.kept == b.kept);
  }

  TEST_CASE("non-finite input rows are not routed and poison nothing else") {
    for (mixing mix : {mixing::sparse, mixing::dense}) {
      moe_options opt = base_options(2, 3);
      opt.mix = mix;
      opt.use_omega = true;
      opt.routing.load_balance_coef = 0.1;
      opt.routing.z_loss_coef = 0.1;
      moe_case<double> c(opt, 6, 101);
      c.x[2 * 4 + 1] = std::numeric_limits<double>::quiet_NaN();  // token 2
      REQUIRE(c.forward<topk_softmax>().is_ok());
      REQUIRE(c.backward<topk_softmax>().is_ok());
      CHECK(c.nonfinite == 1);
      for (index_t col = 0; col < 4; ++col) {
        CHECK(c.y[2 * 4 + col] == 0.0);
        CHECK(c.dx[2 * 4 + col] == 0.0);
      }
      std::int64_t routed = 0;
      for (std::int64_t n : c.counts) routed += n;
      CHECK(routed == 5 * 2);
      if (mix == mixing::sparse) {
        std::int64_t kept = 0;
        for (std::int64_t n : c.kept) kept += n;
        CHECK(kept == 5 * 2);
      }
      for (const auto& v : {c.gWr.values(), c.gbr.values(), c.gW1.values(), c.gb1.values(),
                            c.gW2.values(), c.gb2.values(), c.gom.values()})
        CHECK(all_finite(v));
      std::vector<double> y = c.y.values();
      CHECK(all_finite(y));
    }
  }

  TEST_CASE("moe_context: 256-byte aligned, sized by moe_context_bytes, reusable") {
    moe_options opt = base_options(2, 4);
    cpu::moe_context<float> ctx(opt, 100);
    CHECK(ctx.size() == cpu::moe_context_bytes<float>(opt, 100));
    CHECK(ctx.size() > 0);
    CHECK(reinterpret_cast<std::uintptr_t>(ctx.view().data_handle()) % 256 == 0);
    const std::byte* p = ctx.view().data_handle();
    ctx.resize(opt, 10);  // smaller: same storage
    CHECK(ctx.view().data_handle() == p);
    CHECK(ctx.size() == cpu::moe_context_bytes<float>(opt, 10));
    CHECK(cpu::moe_context_bytes<double>(opt, 100) > cpu::moe_context_bytes<float>(opt, 100));
    opt.capacity_factor = 0.5;  // fewer rows can be kept: a smaller context
    CHECK(cpu::moe_context_bytes<float>(opt, 100) <
          cpu::moe_context_bytes<float>(base_options(2, 4), 100));
    opt.experts = 0;  // invalid options: 0 (the forward reports them)
    CHECK(cpu::moe_context_bytes<float>(opt, 100) == 0);
    cpu::moe_context<float> moved(std::move(ctx));
    CHECK(moved.view().data_handle() == p);
  }
}

}  // namespace
