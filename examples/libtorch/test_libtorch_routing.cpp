// routegrad_torch.hpp against pure-libtorch implementations of the same rules: for the experts and
// coins the routegrad forward chose, the gates and the logit gradients (through loss.backward())
// must equal those of the rule written here with libtorch operations and autograd — 1e-10 in
// float64, 1e-5 in float32. Also: strided and converted inputs, the fused auxiliary losses, and
// the error messages.
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "routegrad_torch.hpp"

// Debian's libtorch logs with glog, whose CHECK, CHECK_EQ, ... macros (included through c10)
// would silently replace doctest's: undefine them and include doctest last.
#undef CHECK
#undef CHECK_EQ
#undef CHECK_NE
#undef CHECK_LT
#undef CHECK_LE
#undef CHECK_GT
#undef CHECK_GE
#include <doctest/doctest.h>

namespace {

using routegrad_torch::options;

double tolerance(c10::ScalarType dt) { return dt == c10::kDouble ? 1e-10 : 1e-5; }

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  REQUIRE(a.sizes() == b.sizes());
  if (a.numel() == 0) return 0.0;
  return (a.to(c10::kDouble) - b.to(c10::kDouble)).abs().max().item<double>();
}

// Rows of two kinds: logits near 0 (scale 2) and logits around 5 (scale 1). The jitter mask
// (SPEC §2) is scale dependent, so the first kind keeps few candidates and the second many.
at::Tensor make_logits(c10::ScalarType dt, std::int64_t T, std::int64_t E, std::uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::Tensor z = at::randn({T, E}, gen, at::TensorOptions().dtype(c10::kDouble));
  at::Tensor shift = at::zeros({T, 1}, c10::kDouble);
  shift.slice(0, T / 2) += 5.0;
  z = z * at::where(shift > 0, at::full({}, 1.0, c10::kDouble), at::full({}, 2.0, c10::kDouble));
  return (z + shift).to(dt);
}

at::Tensor make_grad_gates(c10::ScalarType dt, std::int64_t T, std::int64_t k) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(77);
  return at::randn({T, k}, gen, at::TensorOptions().dtype(c10::kDouble)).to(dt);
}

struct reference {
  at::Tensor gates;        // [T, k]
  at::Tensor grad_logits;  // [T, E]
};

// SparseMixer top-k in pure libtorch, for given experts D [T,k] and coins [T,k]:
//   slot j: candidates = finite experts no earlier slot took, minus the jitter mask
//           (m − z_i) / max(|z_i|, m) > 2ε, m = max over the remaining experts (0/0 keeps);
//           π = softmax over the candidates; gate = c·π_D (c = 1 for coin 0, else the node scale).
//   backward: dL/dz = Σ_j w·G_j·∂π_D/∂z = Σ_j w·G_j·π_D(δ_iD − π_i) — autograd of Σ_j w·G_j·π_D.
reference sparsemixer_reference(const at::Tensor& logits, const at::Tensor& experts,
                                const at::Tensor& coins, const at::Tensor& grad_gates, double eps,
                                double weight, double node_scale) {
  const at::Tensor z = logits.detach().clone().requires_grad_(true);
  const at::Tensor zd = z.detach();
  const std::int64_t k = experts.size(1);
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor taken = at::zeros(zd.sizes(), zd.options().dtype(c10::kBool));
  std::vector<at::Tensor> gates;
  at::Tensor surrogate = at::zeros({}, zd.options());
  for (std::int64_t j = 0; j < k; ++j) {
    const at::Tensor avail = taken.logical_not().logical_and(zd.isfinite());
    const at::Tensor m = zd.masked_fill(avail.logical_not(), -inf).amax(1, true);
    const at::Tensor denom = at::maximum(zd.abs(), m);
    const at::Tensor ratio = at::where(denom == 0, at::zeros_like(zd), (m - zd) / denom);
    const at::Tensor keep = avail.logical_and((ratio > 2 * eps).logical_not());
    const at::Tensor pi = at::softmax(z.masked_fill(keep.logical_not(), -inf), 1);
    const at::Tensor d = experts.select(1, j).to(c10::kLong).unsqueeze(1);
    const at::Tensor pi_d = pi.gather(1, d).squeeze(1);
    const at::Tensor c = at::where(coins.select(1, j) == 0, at::full({}, 1.0, zd.options()),
                                   at::full({}, node_scale, zd.options()));
    gates.push_back((c * pi_d).detach());
    surrogate = surrogate + weight * (grad_gates.select(1, j) * pi_d).sum();
    taken.scatter_(1, d, true);
  }
  const at::Tensor grad = torch::autograd::grad({surrogate}, {z})[0];
  return {at::stack(gates, 1), grad};
}

// top-k of softmax(z) over all experts, pure libtorch: softmax, topk, gather; autograd.
struct topk_reference {
  at::Tensor experts, gates, grad_logits;
};
topk_reference topk_softmax_reference(const at::Tensor& logits, std::int64_t k,
                                      const at::Tensor& grad_gates) {
  const at::Tensor z = logits.detach().clone().requires_grad_(true);
  const at::Tensor pi = at::softmax(z, 1);
  const at::Tensor idx = std::get<1>(z.detach().topk(k, 1, /*largest=*/true, /*sorted=*/true));
  const at::Tensor gates = pi.gather(1, idx);
  const at::Tensor grad = torch::autograd::grad({(gates * grad_gates).sum()}, {z})[0];
  return {idx.to(c10::kInt), gates.detach(), grad};
}

// Runs route<Est> with autograd and returns gates, experts, coins, and dL/dlogits for
// L = Σ gates ⊙ G (+ lb_weight·load_balance_loss + z_weight·z_loss) through loss.backward().
struct routed_with_grad {
  routegrad_torch::routed r;
  at::Tensor grad_logits;
};
template <class Est>
routed_with_grad route_and_backward(const at::Tensor& logits_in, const options& opt,
                                    const at::Tensor& grad_gates, double lb_weight = 0.0,
                                    double z_weight = 0.0) {
  at::Tensor logits = logits_in.detach().requires_grad_(true);
  routed_with_grad out{routegrad_torch::route<Est>(logits, opt), {}};
  at::Tensor loss = (out.r.gates * grad_gates).sum();
  if (lb_weight != 0.0) loss = loss + lb_weight * out.r.load_balance_loss;
  if (z_weight != 0.0) loss = loss + z_weight * out.r.z_loss;
  loss.backward();
  out.grad_logits = logits.grad();
  return out;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "(no error)";
}

const c10::ScalarType kDtypes[] = {c10::kDouble, c10::kFloat};

}  // namespace

TEST_SUITE("libtorch") {
  TEST_CASE_TEMPLATE("SparseMixer top-2 matches a pure-libtorch implementation", Est,
                     routegrad::sparsemixer_heun3, routegrad::sparsemixer_midpoint,
                     routegrad::sparsemixer_euler) {
    using rule = typename Est::rule;
    constexpr std::int64_t T = 128, E = 8, k = 2;
    for (const c10::ScalarType dt : kDtypes) {
      CAPTURE(dt);
      options opt;
      opt.routing.k = k;
      opt.routing.jitter_eps = 0.1;
      opt.rng = {0xC0FFEE, 42, 0};
      const at::Tensor logits = make_logits(dt, T, E, 1);
      const at::Tensor gg = make_grad_gates(dt, T, k);

      const routed_with_grad got = route_and_backward<Est>(logits, opt, gg);
      CHECK((got.r.gates.scalar_type() == dt));
      CHECK((got.r.experts.scalar_type() == c10::kInt));
      CHECK((got.grad_logits.scalar_type() == dt));
      // Distinct, in-range experts per row.
      CHECK(got.r.experts.min().item<int>() >= 0);
      CHECK(got.r.experts.max().item<int>() < E);
      CHECK((got.r.experts.select(1, 0) != got.r.experts.select(1, 1)).all().item<bool>());

      const reference ref =
          sparsemixer_reference(logits, got.r.experts, got.r.coins, gg, opt.routing.jitter_eps,
                                rule::weight, rule::scale(0));
      CHECK(max_abs_diff(got.r.gates, ref.gates) <= tolerance(dt));
      CHECK(max_abs_diff(got.grad_logits, ref.grad_logits) <= tolerance(dt));
      CHECK(got.grad_logits.abs().max().item<double>() > 0.1);  // not trivially zero

      if (rule::num_nodes > 0) {  // the data exercises both coin outcomes
        CHECK(got.r.coins.eq(0).any().item<bool>());
        CHECK(got.r.coins.eq(1).any().item<bool>());
      }
    }
  }

  TEST_CASE("the test data exercises the jitter mask of both slots") {
    // With these logits some rows keep a single candidate in slot 1 (gate = c) and others keep
    // several; both kinds matter for the comparison above.
    const at::Tensor z = make_logits(c10::kDouble, 128, 8, 1);
    const at::Tensor m = z.amax(1, true);
    const at::Tensor kept = ((m - z) / at::maximum(z.abs(), m) <= 0.2).sum(1);
    CHECK(kept.eq(1).any().item<bool>());
    CHECK(kept.ge(3).any().item<bool>());
    CHECK(kept.lt(8).any().item<bool>());
  }

  TEST_CASE("topk_softmax top-k matches softmax + topk + gather with autograd") {
    constexpr std::int64_t T = 96, E = 10;
    for (const std::int64_t k : {1, 2, 3}) {
      for (const c10::ScalarType dt : kDtypes) {
        CAPTURE(dt);
        CAPTURE(k);
        options opt;
        opt.routing.k = static_cast<int>(k);
        const at::Tensor logits = make_logits(dt, T, E, 2);
        const at::Tensor gg = make_grad_gates(dt, T, k);
        const routed_with_grad got = route_and_backward<routegrad::topk_softmax>(logits, opt, gg);
        const topk_reference ref = topk_softmax_reference(logits, k, gg);
        CHECK(at::equal(got.r.experts, ref.experts));
        CHECK(max_abs_diff(got.r.gates, ref.gates) <= tolerance(dt));
        CHECK(max_abs_diff(got.grad_logits, ref.grad_logits) <= tolerance(dt));
      }
    }
  }

  TEST_CASE("strided logits and gradients are read in place and give the contiguous results") {
    constexpr std::int64_t T = 64, E = 8;
    for (const c10::ScalarType dt : kDtypes) {
      CAPTURE(dt);
      options opt;
      opt.routing.k = 2;
      opt.rng = {7, 3, 0};
      const at::Tensor base = make_logits(dt, T, E, 3);
      const at::Tensor gg = make_grad_gates(dt, T, 2);
      const routed_with_grad want = route_and_backward<routegrad::sparsemixer_heun3>(base, opt, gg);

      const at::Tensor transposed = base.t().contiguous().t();  // strides {1, T}
      const at::Tensor every_other =
          at::stack({base, at::zeros_like(base)}, 2).view({T, 2 * E}).slice(1, 0, 2 * E, 2);
      const at::Tensor with_offset = at::cat({at::zeros({3, E}, base.options()), base}).slice(0, 3);
      for (const at::Tensor& z : {transposed, every_other, with_offset}) {
        CAPTURE(z.strides());
        REQUIRE(at::equal(z, base));
        const routed_with_grad got = route_and_backward<routegrad::sparsemixer_heun3>(z, opt, gg);
        CHECK(at::equal(got.r.experts, want.r.experts));
        CHECK(at::equal(got.r.gates, want.r.gates));
        CHECK(at::equal(got.grad_logits, want.grad_logits));
      }

      // A zero-stride (expanded) logits row and zero-stride incoming gradients.
      const at::Tensor row = base.slice(0, 0, 1).expand({T, E});
      REQUIRE(row.stride(0) == 0);
      const at::Tensor ones = at::ones({}, base.options()).expand({T, 2});
      const routed_with_grad got = route_and_backward<routegrad::sparsemixer_heun3>(row, opt, ones);
      const reference ref = sparsemixer_reference(row.contiguous(), got.r.experts, got.r.coins,
                                                  ones.contiguous(), 0.1, 1.0, 1.0 / 3.0);
      CHECK(max_abs_diff(got.r.gates, ref.gates) <= tolerance(dt));
      CHECK(max_abs_diff(got.grad_logits, ref.grad_logits) <= tolerance(dt));
    }
  }

  TEST_CASE("float16 and bfloat16 logits are routed in float32 and keep their dtype") {
    constexpr std::int64_t T = 32, E = 8;
    options opt;
    opt.routing.k = 2;
    opt.rng = {11, 0, 0};
    for (const c10::ScalarType dt : {c10::kHalf, c10::kBFloat16}) {
      CAPTURE(dt);
      const at::Tensor z = make_logits(dt, T, E, 4);
      const at::Tensor gg = make_grad_gates(dt, T, 2);
      const routed_with_grad low = route_and_backward<routegrad::sparsemixer_heun3>(z, opt, gg);
      const routed_with_grad f32 = route_and_backward<routegrad::sparsemixer_heun3>(
          z.to(c10::kFloat), opt, gg.to(c10::kFloat));
      CHECK((low.r.gates.scalar_type() == dt));
      CHECK((low.grad_logits.scalar_type() == dt));
      CHECK(at::equal(low.r.experts, f32.r.experts));
      CHECK(at::equal(low.r.gates, f32.r.gates.to(dt)));
      CHECK(at::equal(low.grad_logits, f32.grad_logits.to(dt)));
    }
  }

  TEST_CASE("fused auxiliary losses: value and gradient match libtorch, scaled by their weight") {
    constexpr std::int64_t T = 64, E = 8, k = 2;
    constexpr double alpha = 0.01, beta = 0.001, lb_weight = 0.5, z_weight = 3.0;
    for (const c10::ScalarType dt : kDtypes) {
      CAPTURE(dt);
      options opt;
      opt.routing.k = k;
      opt.routing.load_balance_coef = alpha;
      opt.routing.z_loss_coef = beta;
      opt.rng = {5, 9, 0};
      const at::Tensor logits = make_logits(dt, T, E, 5);
      const at::Tensor gg = make_grad_gates(dt, T, k);
      const routed_with_grad got =
          route_and_backward<routegrad::sparsemixer_heun3>(logits, opt, gg, lb_weight, z_weight);

      // L_aux = α·E·Σ_e f_e·P_e (f_e = n_e/(T·k), no gradient; P_e = mean_t softmax(z_t)_e),
      // L_z = β·mean_t logsumexp(z_t)².
      const at::Tensor z = logits.detach().to(c10::kDouble).requires_grad_(true);
      const at::Tensor counts =
          at::one_hot(got.r.experts.to(c10::kLong).flatten(), E).sum(0).to(c10::kDouble);
      const at::Tensor lb = alpha * E * (counts / (T * k) * at::softmax(z, 1).mean(0)).sum();
      const at::Tensor zl = beta * at::logsumexp(z, 1).pow(2).mean();
      const at::Tensor aux_grad = torch::autograd::grad({lb_weight * lb + z_weight * zl}, {z})[0];
      const reference ref =
          sparsemixer_reference(logits, got.r.experts, got.r.coins, gg, 0.1, 1.0, 1.0 / 3.0);

      CHECK(std::abs(got.r.load_balance_loss.item<double>() - lb.item<double>()) <= tolerance(dt));
      CHECK(std::abs(got.r.z_loss.item<double>() - zl.item<double>()) <= tolerance(dt));
      CHECK(max_abs_diff(got.grad_logits, ref.grad_logits + aux_grad.to(dt)) <= tolerance(dt));
    }
  }

  TEST_CASE("run-time estimator choice, eval mode and empty batches") {
    options opt;
    opt.routing.k = 2;
    opt.routing.mode = routegrad::routing_mode::eval;
    const at::Tensor z = make_logits(c10::kDouble, 16, 6, 6);
    const at::Tensor top2 = std::get<1>(z.topk(2, 1)).to(c10::kInt);
    for (const auto est :
         {routegrad_torch::estimator::switch_router, routegrad_torch::estimator::topk_softmax,
          routegrad_torch::estimator::sparsemixer_euler,
          routegrad_torch::estimator::sparsemixer_midpoint,
          routegrad_torch::estimator::sparsemixer_heun3}) {
      CAPTURE(static_cast<int>(est));
      const routegrad_torch::routed r = routegrad_torch::route(z, opt, est);
      if (est == routegrad_torch::estimator::switch_router ||
          est == routegrad_torch::estimator::topk_softmax) {
        CHECK(at::equal(r.experts, top2));  // eval: no noise, the top-2 logits
      } else {
        CHECK(at::equal(r.experts.select(1, 0), top2.select(1, 0)));  // argmax of slot 1
      }
    }
    const at::Tensor empty = at::zeros({0, 6}, c10::kFloat).requires_grad_(true);
    const routegrad_torch::routed r =
        routegrad_torch::route(empty, opt, routegrad_torch::estimator::sparsemixer_heun3);
    CHECK(r.gates.sizes() == at::IntArrayRef({0, 2}));
    r.gates.sum().backward();
    CHECK(empty.grad().sizes() == at::IntArrayRef({0, 6}));
  }

  TEST_CASE("unsupported inputs are rejected with a message that says why") {
    options opt;
    opt.routing.k = 2;
    const auto heun3 = routegrad_torch::estimator::sparsemixer_heun3;
    CHECK(error_of([&] {
            routegrad_torch::route(at::zeros({4, 8}, c10::kLong), opt, heun3);
          }).find("logits must be a floating-point tensor") != std::string::npos);
    CHECK(error_of([&] {
            routegrad_torch::route(at::zeros({2, 4, 8}), opt, heun3);
          }).find("logits must be 2-D") != std::string::npos);
    CHECK(error_of([&] {
            routegrad_torch::RouteFunction<routegrad::sparsemixer_heun3>::apply(
                at::zeros({4, 8}, c10::kHalf), opt);
          }).find("logits must be float32 or float64") != std::string::npos);
    // routegrad's own validation comes back as a c10::Error with routegrad's message.
    opt.routing.k = 9;
    const std::string k_msg = error_of([&] {
      routegrad_torch::route(at::zeros({4, 8}), opt, heun3);
    });
    CHECK(k_msg.find("route_forward: routegrad: invalid argument: options.k") != std::string::npos);
    opt.routing.k = 2;
    opt.routing.jitter_eps = 0.7;
    CHECK(error_of([&] {
            routegrad_torch::route(at::zeros({4, 8}), opt, heun3);
          }).find("jitter_eps") != std::string::npos);
  }
}
