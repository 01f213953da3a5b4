// Bad input to the CPU MoE layer (SPEC §7): one check per rule of moe/validate.hpp and of the
// layer's own checks (x, y, dy, dx, the context, grad_mode, overlapping outputs), each expecting
// the right status_code, a message naming the argument, and nothing written: every buffer the
// call could touch (parameters, x, dy, y, dx, gradients, the context, the statistics) is
// compared bytewise with a snapshot taken before the call. (Mismatched scalar types do not
// compile: the parameter set fixes T for every view.)
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "moe/moe_test_util.hpp"

namespace {

using namespace routegrad;
using namespace routegrad::test;

constexpr index_t kT = 5;

moe_options valid_options() {
  moe_options opt;
  opt.d_model = 4;
  opt.d_hidden = 3;
  opt.experts = 4;
  opt.act = activation::gelu;
  opt.use_omega = true;
  opt.capacity_factor = 1.0;
  opt.routing.k = 2;
  opt.routing.mode = routing_mode::train;
  opt.routing.load_balance_coef = 0.1;
  opt.routing.z_loss_coef = 0.1;
  return opt;
}

struct fwd_args {
  moe_options opt;
  host_moe_params<float> params;
  host_view<const float, 2> x;
  host_view<float, 2> y;
  rng_stream rng;
  host_view<std::byte> context;
  host_moe_stats stats;
};

struct bwd_args {
  moe_options opt;
  host_moe_params<float> params;
  host_view<const float, 2> x, dy;
  host_view<const std::byte> context;
  host_moe_grads<float> grads;
  host_view<float, 2> dx;
  grad_mode mode = grad_mode::overwrite;
};

/// A valid problem (the backward's context written by a forward), with a byte snapshot of every
/// buffer.
struct harness {
  moe_case<float> c{valid_options(), kT, 7};
  cpu::moe_context<float> spare{valid_options(), 2 * kT};  // larger, for misaligned views
  std::vector<std::vector<unsigned char>> before;

  explicit harness(bool run_forward) {
    if (run_forward) REQUIRE(c.forward<sparsemixer_heun3>().is_ok());
    c.poison_outputs();
    if (!run_forward) {
      std::memset(c.ctx.view().data_handle(), 0xA5, c.ctx.size());
    }
    before = bytes();
  }

  std::vector<std::vector<unsigned char>> bytes() const {
    std::vector<std::vector<unsigned char>> b;
    auto add = [&b](const void* p, std::size_t n) {
      const auto* q = static_cast<const unsigned char*>(p);
      b.emplace_back(q, q + n);
    };
    auto add_t = [&add](const auto& t) { add(t.buf.data(), t.buf.size() * sizeof(float)); };
    add_t(c.Wr), add_t(c.br), add_t(c.W1), add_t(c.b1), add_t(c.W2), add_t(c.b2), add_t(c.om);
    add_t(c.x), add_t(c.dy), add_t(c.y), add_t(c.dx);
    add_t(c.gWr), add_t(c.gbr), add_t(c.gW1), add_t(c.gb1), add_t(c.gW2), add_t(c.gb2);
    add_t(c.gom);
    add(c.ctx.cview().data_handle(), c.ctx.size());
    add(spare.cview().data_handle(), spare.size());
    add(c.counts.data(), c.counts.size() * 8);
    add(c.kept.data(), c.kept.size() * 8);
    add(&c.dropped, 8), add(&c.nonfinite, 8), add(&c.lb, 8), add(&c.zl, 8);
    return b;
  }
  bool unchanged() const { return bytes() == before; }

  fwd_args forward_args() {
    return {c.opt, c.params(), c.x.cview(), c.y.view(), c.rng, c.ctx.view(), c.stats()};
  }
  bwd_args backward_args() {
    return {c.opt,         c.params(), c.x.cview(), c.dy.cview(),
            c.ctx.cview(), c.grads(),  c.dx.view(), grad_mode::overwrite};
  }
};

void expect_forward_error(const std::function<void(fwd_args&, harness&)>& mutate, status_code code,
                          const std::string& name) {
  CAPTURE(name);
  harness hs(false);
  fwd_args a = hs.forward_args();
  mutate(a, hs);
  const status s =
      moe_forward<sparsemixer_heun3>(a.opt, a.params, a.x, a.y, a.rng, a.context, a.stats);
  CHECK(s.code() == code);
  CHECK_MESSAGE(names_argument(s.message(), name), s.message());
  CHECK_MESSAGE(hs.unchanged(), "a failed forward wrote to a buffer");
}

void expect_backward_error(const std::function<void(bwd_args&, harness&)>& mutate, status_code code,
                           const std::string& name) {
  CAPTURE(name);
  harness hs(true);
  bwd_args a = hs.backward_args();
  mutate(a, hs);
  const status s =
      moe_backward<sparsemixer_heun3>(a.opt, a.params, a.x, a.dy, a.context, a.grads, a.dx, a.mode);
  CHECK(s.code() == code);
  CHECK_MESSAGE(names_argument(s.message(), name), s.message());
  CHECK_MESSAGE(hs.unchanged(), "a failed backward wrote to a buffer");
}

/// v with extent(0) + 1 (shape), null data (null), or stride(0) negated / zeroed (stride).
enum class flaw { shape, null, stride };

template <class T, int R>
host_view<T, R> flawed(const host_view<T, R>& v, flaw f, bool writing) {
  index_t e[R], s[R];
  for (int i = 0; i < R; ++i) e[i] = v.extent(i), s[i] = v.stride(i);
  T* data = v.data_handle();
  if (f == flaw::shape) e[0] += 1;
  if (f == flaw::null) data = nullptr;
  if (f == flaw::stride) {
    // An output must give every element its own address: a zero stride on a dimension of
    // extent > 1 breaks it. An input may broadcast, so a negative stride is the flaw there.
    int dim = 0;
    while (dim < R - 1 && e[dim] <= 1) ++dim;
    s[dim] = writing ? 0 : -s[dim];
  }
  return host_view<T, R>(data, e, s);
}

TEST_SUITE("moe") {
  TEST_CASE("validation: options") {
    using F = std::function<void(moe_options&)>;
    const std::pair<F, const char*> rules[] = {
        {[](moe_options& o) { o.d_model = 0; }, "options.d_model"},
        {[](moe_options& o) { o.d_hidden = 0; }, "options.d_hidden"},
        {[](moe_options& o) { o.experts = 0; }, "options.experts"},
        {[](moe_options& o) { o.act = static_cast<activation>(9); }, "options.act"},
        {[](moe_options& o) { o.mix = static_cast<mixing>(9); }, "options.mix"},
        {[](moe_options& o) { o.capacity_factor = -1.0; }, "options.capacity_factor"},
        {[](moe_options& o) { o.capacity_factor = std::nan(""); }, "options.capacity_factor"},
        {[](moe_options& o) { o.capacity_factor = INFINITY; }, "options.capacity_factor"},
        {[](moe_options& o) { o.routing.k = 0; }, "options.routing.k"},
        {[](moe_options& o) { o.routing.k = 5; }, "options.routing.k"},  // k > E = 4
        {[](moe_options& o) { o.routing.jitter_eps = 0.5; }, "options.routing.jitter_eps"},
        {[](moe_options& o) { o.routing.load_balance_coef = std::nan(""); }, "options.routing"},
        {[](moe_options& o) { o.routing.z_loss_coef = INFINITY; }, "options.routing"},
        {[](moe_options& o) { o.routing.mode = static_cast<routing_mode>(9); },
         "options.routing.mode"},
    };
    for (const auto& [rule, name] : rules) {
      const status_code code = status_code::invalid_argument;
      expect_forward_error([&](fwd_args& a, harness&) { rule(a.opt); }, code, name);
      expect_backward_error([&](bwd_args& a, harness&) { rule(a.opt); }, code, name);
    }
  }

  TEST_CASE("validation: parameters and gradients, every field") {
    const char* names[] = {"router_weight", "router_bias", "w1", "b1", "w2", "b2", "omega"};
    for (int field = 0; field < 7; ++field)
      for (flaw f : {flaw::shape, flaw::null, flaw::stride}) {
        const status_code code = f == flaw::shape  ? status_code::invalid_shape
                                 : f == flaw::null ? status_code::null_pointer
                                                   : status_code::invalid_stride;
        auto on_set = [field, f](auto& set, bool writing) {
          switch (field) {
            case 0:
              set.router_weight = flawed(set.router_weight, f, writing);
              break;
            case 1:
              set.router_bias = flawed(set.router_bias, f, writing);
              break;
            case 2:
              set.w1 = flawed(set.w1, f, writing);
              break;
            case 3:
              set.b1 = flawed(set.b1, f, writing);
              break;
            case 4:
              set.w2 = flawed(set.w2, f, writing);
              break;
            case 5:
              set.b2 = flawed(set.b2, f, writing);
              break;
            default:
              set.omega = flawed(set.omega, f, writing);
              break;
          }
        };
        const std::string param = std::string("params.") + names[field];
        const std::string grad = std::string("grads.") + names[field];
        expect_forward_error([&](fwd_args& a, harness&) { on_set(a.params, false); }, code, param);
        expect_backward_error([&](bwd_args& a, harness&) { on_set(a.params, false); }, code, param);
        expect_backward_error([&](bwd_args& a, harness&) { on_set(a.grads, true); }, code, grad);
      }
    // ω is required with use_omega (and ignored without it).
    expect_forward_error([](fwd_args& a, harness&) { a.params.omega = {}; },
                         status_code::invalid_shape, "params.omega");
    expect_backward_error([](bwd_args& a, harness&) { a.grads.omega = {}; },
                          status_code::invalid_shape, "grads.omega");
    harness hs(false);
    fwd_args a = hs.forward_args();
    a.opt.use_omega = false;
    a.params.omega = {};
    hs.c.ctx.resize(a.opt, kT);
    CHECK(
        moe_forward<sparsemixer_heun3>(a.opt, a.params, a.x, a.y, a.rng, hs.c.ctx.view()).is_ok());
  }

  TEST_CASE("validation: x, y, dy, dx") {
    for (flaw f : {flaw::shape, flaw::null, flaw::stride}) {
      const status_code code = f == flaw::shape  ? status_code::invalid_shape
                               : f == flaw::null ? status_code::null_pointer
                                                 : status_code::invalid_stride;
      // x sets T: a wrong x shape is a wrong column count.
      auto bad_x = [f](const host_view<const float, 2>& x) {
        if (f != flaw::shape) return flawed(x, f, false);
        return host_view<const float, 2>(x.data_handle(), {x.extent(0), x.extent(1) + 1},
                                         {x.stride(0), x.stride(1)});
      };
      expect_forward_error([&](fwd_args& a, harness&) { a.x = bad_x(a.x); }, code, "x");
      expect_forward_error([&](fwd_args& a, harness&) { a.y = flawed(a.y, f, true); }, code, "y");
      expect_backward_error([&](bwd_args& a, harness&) { a.x = bad_x(a.x); }, code, "x");
      expect_backward_error([&](bwd_args& a, harness&) { a.dy = flawed(a.dy, f, false); }, code,
                            "dy");
      expect_backward_error([&](bwd_args& a, harness&) { a.dx = flawed(a.dx, f, true); }, code,
                            "dx");
    }
  }

  TEST_CASE("validation: forward context and rng") {
    expect_forward_error(
        [](fwd_args& a, harness&) {
          a.context = host_view<std::byte>(nullptr, {a.context.extent(0)});
        },
        status_code::null_pointer, "context");
    expect_forward_error(
        [](fwd_args& a, harness&) {
          a.context = host_view<std::byte>(a.context.data_handle(), {a.context.extent(0) - 1});
        },
        status_code::workspace_too_small, "context");
    expect_forward_error(
        [](fwd_args& a, harness& hs) {
          a.context =
              host_view<std::byte>(hs.spare.view().data_handle() + 8, {a.context.extent(0)});
        },
        status_code::misaligned, "context");
    expect_forward_error(
        [](fwd_args& a, harness& hs) {
          a.context = host_view<std::byte>(hs.spare.view().data_handle(), {a.context.extent(0)},
                                           {index_t(2)});
        },
        status_code::invalid_stride, "context");
    expect_forward_error(
        [](fwd_args& a, harness&) { a.rng.first_token = (std::uint64_t(1) << 32) - kT + 1; },
        status_code::invalid_argument, "rng.first_token");
  }

  TEST_CASE("validation: backward context and mode") {
    expect_backward_error([](bwd_args& a, harness&) { a.mode = static_cast<grad_mode>(7); },
                          status_code::invalid_argument, "mode");
    expect_backward_error(
        [](bwd_args& a, harness&) {
          a.context = host_view<const std::byte>(nullptr, {a.context.extent(0)});
        },
        status_code::null_pointer, "context");
    expect_backward_error(
        [](bwd_args& a, harness&) {
          a.context =
              host_view<const std::byte>(a.context.data_handle(), {a.context.extent(0) - 1});
        },
        status_code::workspace_too_small, "context");
    expect_backward_error(
        [](bwd_args& a, harness& hs) {
          a.context = host_view<const std::byte>(hs.spare.cview().data_handle() + 64,
                                                 {a.context.extent(0)});
        },
        status_code::misaligned, "context");
    // Never written by a forward (the spare buffer holds zeros / garbage).
    expect_backward_error(
        [](bwd_args& a, harness& hs) {
          a.context =
              host_view<const std::byte>(hs.spare.cview().data_handle(), {a.context.extent(0)});
        },
        status_code::invalid_argument, "context");
    // Written with other options of the same size (SiLU instead of GELU).
    expect_backward_error([](bwd_args& a, harness&) { a.opt.act = activation::silu; },
                          status_code::invalid_argument, "context");
    // Written for more tokens than this x has.
    expect_backward_error(
        [](bwd_args& a, harness&) {
          a.x = host_view<const float, 2>(a.x.data_handle(), {kT - 1, a.x.extent(1)},
                                          {a.x.stride(0), a.x.stride(1)});
          a.dy = host_view<const float, 2>(a.dy.data_handle(), {kT - 1, a.dy.extent(1)},
                                           {a.dy.stride(0), a.dy.stride(1)});
          a.dx = host_view<float, 2>(a.dx.data_handle(), {kT - 1, a.dx.extent(1)},
                                     {a.dx.stride(0), a.dx.stride(1)});
        },
        status_code::invalid_argument, "context");
    // Written by another estimator.
    {
      harness hs(true);
      bwd_args a = hs.backward_args();
      const status s = moe_backward<sparsemixer_euler>(a.opt, a.params, a.x, a.dy, a.context,
                                                       a.grads, a.dx, a.mode);
      CHECK(s.code() == status_code::invalid_argument);
      CHECK(names_argument(s.message(), "context"));
      CHECK(hs.unchanged());
    }
    // A corrupt dispatch index.
    {
      harness hs(true);
      cpu::moe_saved_state<float> saved;
      REQUIRE(cpu::read_moe_context<sparsemixer_heun3, float>(hs.c.opt, kT, hs.c.ctx.cview(), saved)
                  .is_ok());
      auto* row = const_cast<index_t*>(saved.rows.data_handle());
      *row = 1 << 20;
      hs.before = hs.bytes();
      bwd_args a = hs.backward_args();
      const status s = moe_backward<sparsemixer_heun3>(a.opt, a.params, a.x, a.dy, a.context,
                                                       a.grads, a.dx, a.mode);
      CHECK(s.code() == status_code::invalid_argument);
      CHECK(names_argument(s.message(), "context"));
      CHECK(hs.unchanged());
    }
  }

  TEST_CASE("validation: outputs may not overlap inputs or each other") {
    expect_forward_error([](fwd_args& a, harness& hs) { a.y = hs.c.x.view(); },
                         status_code::invalid_argument, "y");
    expect_forward_error(
        [](fwd_args& a, harness& hs) {
          a.y = host_view<float, 2>(hs.c.W1.buf.data(), {kT, index_t(4)});  // W1 holds 24+ floats
        },
        status_code::invalid_argument, "y");
    expect_forward_error(
        [](fwd_args& a, harness&) {
          a.x = host_view<const float, 2>(reinterpret_cast<const float*>(a.context.data_handle()),
                                          {kT, index_t(4)});
        },
        status_code::invalid_argument, "context");
    expect_backward_error([](bwd_args& a, harness& hs) { a.dx = hs.c.dy.view(); },
                          status_code::invalid_argument, "dx");
    expect_backward_error(
        [](bwd_args& a, harness& hs) {
          a.dx = host_view<float, 2>(hs.c.gW1.buf.data(), {kT, index_t(4)});
        },
        status_code::invalid_argument, "dx");
    expect_backward_error(
        [](bwd_args& a, harness& hs) {
          a.grads.w1 = host_view<float, 3>(hs.c.W1.buf.data(), {4, 3, 4});
        },
        status_code::invalid_argument, "grads");
    expect_backward_error(
        [](bwd_args& a, harness& hs) {
          a.grads.b1 = host_view<float, 2>(hs.c.gW1.buf.data(), {4, 3});
        },
        status_code::invalid_argument, "grads");
  }
}

}  // namespace
