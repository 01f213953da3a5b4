// routegrad from libtorch: a torch::autograd::Function whose forward and backward call routegrad's
// CPU entry points on the tensors' own memory (no copy for float32/float64 logits of any strides).
//
//   routegrad_torch::options opt;
//   opt.routing.k = 2;                 // routegrad::routing_options: k, mode, ε, renormalize, α, β
//   opt.rng = {seed, step, 0};         // a new offset (or seed) per training step
//   auto r = routegrad_torch::route(logits, opt, routegrad_torch::estimator::sparsemixer_heun3);
//   // r.gates [T,k] (differentiable), r.experts int32 [T,k], r.coins uint8 [T,k],
//   // r.load_balance_loss, r.z_loss: 0-dim float64, differentiable (0 when α, β are 0)
//
// Or, with the estimator as a type: RouteFunction<routegrad::sparsemixer_heun3>::apply(z, opt).
//
// Logits: a 2-D [T, E] CPU tensor. float32 and float64 are used in place (routegrad accepts any
// non-negative strides; libtorch never makes negative ones). float16 and bfloat16 are converted to
// float32 by route() (the gates are converted back); any other dtype, another rank, a sparse
// tensor or a CUDA tensor is rejected with a c10::Error that says why. routegrad's own validation
// (k against E, ε, ...) comes back as a c10::Error carrying routegrad's message.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/autograd.h>

#include <algorithm>
#include <cstdint>
#include <routegrad/routegrad.hpp>
#include <string>
#include <type_traits>

namespace routegrad_torch {

/// Everything one routing step needs besides the logits. Pass a new rng.offset every step.
struct options {
  routegrad::routing_options routing;  // k, mode, jitter_eps, renormalize, α, β
  routegrad::rng_stream rng;           // seed, offset, first_token
  int num_threads = 0;                 // routegrad's OpenMP threads (0: OpenMP's default)
};

/// The estimators, for run-time choice (route()); RouteFunction takes the types themselves.
enum class estimator {
  switch_router,
  topk_softmax,
  sparsemixer_euler,
  sparsemixer_midpoint,
  sparsemixer_heun3,
};

/// Runs `s` through routegrad::check and turns a routegrad::error into a c10::Error (what
/// TORCH_CHECK throws), so libtorch callers see one exception type with routegrad's message.
inline void check(const routegrad::status& s, const char* call) {
  try {
    routegrad::check(s);
  } catch (const routegrad::error& e) {
    TORCH_CHECK(false, "routegrad_torch: ", call, ": ", e.what());
  }
}

namespace detail {

template <class T>
constexpr c10::ScalarType scalar_type_of() {
  using U = std::remove_const_t<T>;
  if constexpr (std::is_same_v<U, float>) return c10::kFloat;
  if constexpr (std::is_same_v<U, double>) return c10::kDouble;
  if constexpr (std::is_same_v<U, std::int32_t>) return c10::kInt;
  if constexpr (std::is_same_v<U, std::int64_t>) return c10::kLong;
  if constexpr (std::is_same_v<U, std::uint8_t>) return c10::kByte;
}

inline void check_cpu_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "routegrad_torch: ", name, " is an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), "routegrad_torch: ", name, " is on ", t.device(),
              "; this libtorch Function runs routegrad's CPU back end only. For CUDA tensors use "
              "the PyTorch extension (examples/pytorch) or routegrad::cuda with device_views on "
              "the current stream (docs/integration.md)");
  TORCH_CHECK(t.layout() == c10::kStrided, "routegrad_torch: ", name,
              " must be a dense (strided) tensor, not ", t.layout());
  TORCH_CHECK(t.dim() == 2, "routegrad_torch: ", name, " must be 2-D, got ", t.dim(),
              "-D with sizes ", t.sizes(), " (reshape logits to [tokens, experts])");
}

}  // namespace detail

/// A routegrad host view of a 2-D CPU tensor's memory: data_ptr() (storage offset included),
/// sizes and strides in elements, no copy. The tensor must outlive the view.
template <class T>
routegrad::host_view<T, 2> host_view_of(const at::Tensor& t, const char* name) {
  detail::check_cpu_2d(t, name);
  constexpr c10::ScalarType want = detail::scalar_type_of<T>();
  TORCH_CHECK(t.scalar_type() == want, "routegrad_torch: ", name, " must be ", want, ", got ",
              t.scalar_type());
  // libtorch strides are never negative; routegrad checks them (and overlaps of outputs) anyway.
  return routegrad::host_view<T, 2>(t.data_ptr<std::remove_const_t<T>>(), {t.size(0), t.size(1)},
                                    {t.stride(0), t.stride(1)});
}

/// The autograd Function. forward(logits, options) returns {gates, experts, coins,
/// load_balance_loss, z_loss}; experts and coins are not differentiable. The backward runs
/// route_backward from the saved logits, experts, coins (and expert counts when α ≠ 0).
template <class Estimator>
struct RouteFunction : torch::autograd::Function<RouteFunction<Estimator>> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& logits, const options& opt) {
    detail::check_cpu_2d(logits, "logits");
    TORCH_CHECK(logits.scalar_type() == c10::kFloat || logits.scalar_type() == c10::kDouble,
                "routegrad_torch: logits must be float32 or float64, got ", logits.scalar_type(),
                " (route() converts float16 and bfloat16 to float32)");
    // routegrad validates k against E (and everything else) before writing anything.
    const std::int64_t T = logits.size(0), E = logits.size(1);
    const std::int64_t k = std::max<std::int64_t>(opt.routing.k, 0);

    const auto cpu = logits.options().device(c10::kCPU);
    at::Tensor gates = at::empty({T, k}, cpu.dtype(logits.scalar_type()));
    at::Tensor experts = at::empty({T, k}, cpu.dtype(c10::kInt));
    at::Tensor coins = at::empty({T, k}, cpu.dtype(c10::kByte));
    at::Tensor counts = at::zeros({E}, cpu.dtype(c10::kLong));
    double lb_loss = 0.0, z_loss = 0.0;
    std::int64_t unroutable = 0;

    const routegrad::host_routing_state state{host_view_of<std::int32_t>(experts, "experts"),
                                              host_view_of<std::uint8_t>(coins, "coins"), opt.rng};
    const routegrad::host_routing_stats stats{counts.data_ptr<std::int64_t>(), &lb_loss, &z_loss,
                                              &unroutable};
    const routegrad::cpu::execution exec{opt.num_threads};
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "routegrad_torch::forward", [&] {
      check(routegrad::route_forward<Estimator>(
                opt.routing, host_view_of<const scalar_t>(logits, "logits"), state,
                host_view_of<scalar_t>(gates, "gates"), stats, exec),
            "route_forward");
    });

    ctx->save_for_backward({logits, experts, coins, counts});
    ctx->saved_data["k"] = k;
    ctx->saved_data["mode"] = static_cast<std::int64_t>(opt.routing.mode);
    ctx->saved_data["jitter_eps"] = opt.routing.jitter_eps;
    ctx->saved_data["renormalize"] = opt.routing.renormalize;
    ctx->saved_data["alpha"] = opt.routing.load_balance_coef;
    ctx->saved_data["beta"] = opt.routing.z_loss_coef;
    ctx->saved_data["seed"] = static_cast<std::int64_t>(opt.rng.seed);  // bit pattern kept
    ctx->saved_data["offset"] = static_cast<std::int64_t>(opt.rng.offset);
    ctx->saved_data["first_token"] = static_cast<std::int64_t>(opt.rng.first_token);
    ctx->saved_data["num_threads"] = static_cast<std::int64_t>(opt.num_threads);
    ctx->mark_non_differentiable({experts, coins});

    const auto f64 = cpu.dtype(c10::kDouble);
    return {gates, experts, coins, at::full({}, lb_loss, f64), at::full({}, z_loss, f64)};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    const auto& d = ctx->saved_data;
    options opt;
    opt.routing.k = static_cast<int>(d.at("k").toInt());
    opt.routing.mode = static_cast<routegrad::routing_mode>(d.at("mode").toInt());
    opt.routing.jitter_eps = d.at("jitter_eps").toDouble();
    opt.routing.renormalize = d.at("renormalize").toBool();
    opt.rng = {static_cast<std::uint64_t>(d.at("seed").toInt()),
               static_cast<std::uint64_t>(d.at("offset").toInt()),
               static_cast<std::uint64_t>(d.at("first_token").toInt())};
    opt.num_threads = static_cast<int>(d.at("num_threads").toInt());

    at::Tensor grad_gates = grads[0];
    // routegrad's fused auxiliary gradients assume dL/d(loss) = 1; scaling α and β by the
    // incoming gradients makes them exact for any weight (and zero for a loss that is not used).
    const auto scale_of = [](const at::Tensor& g) { return g.defined() ? g.item<double>() : 0.0; };
    opt.routing.load_balance_coef = d.at("alpha").toDouble() * scale_of(grads[3]);
    opt.routing.z_loss_coef = d.at("beta").toDouble() * scale_of(grads[4]);

    if (!grad_gates.defined() && opt.routing.load_balance_coef == 0.0 &&
        opt.routing.z_loss_coef == 0.0) {
      return {at::Tensor(), at::Tensor()};
    }
    if (!grad_gates.defined()) {
      grad_gates = at::zeros({logits.size(0), opt.routing.k}, logits.options());
    } else if (grad_gates.scalar_type() != logits.scalar_type()) {
      grad_gates = grad_gates.to(logits.scalar_type());
    }
    // Incoming gradients often have zero strides (expand); routegrad reads those as broadcasts.
    at::Tensor grad_logits = at::empty_like(logits, at::MemoryFormat::Contiguous);

    std::int64_t* counts =
        opt.routing.load_balance_coef != 0.0 ? saved[3].data_ptr<std::int64_t>() : nullptr;
    const routegrad::host_routing_state state{host_view_of<std::int32_t>(saved[1], "experts"),
                                              host_view_of<std::uint8_t>(saved[2], "coins"),
                                              opt.rng};
    const routegrad::host_routing_stats stats{counts, nullptr, nullptr, nullptr};
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "routegrad_torch::backward", [&] {
      check(routegrad::route_backward<Estimator>(
                opt.routing, host_view_of<const scalar_t>(logits, "logits"), state,
                host_view_of<const scalar_t>(grad_gates, "grad_gates"),
                host_view_of<scalar_t>(grad_logits, "grad_logits"), routegrad::grad_mode::overwrite,
                stats, routegrad::cpu::execution{opt.num_threads}),
            "route_backward");
    });
    return {grad_logits, at::Tensor()};  // one per forward input; options get none
  }
};

/// route()'s result. gates keep the logits' dtype.
struct routed {
  at::Tensor gates;              // [T, k], differentiable
  at::Tensor experts;            // int32 [T, k]
  at::Tensor coins;              // uint8 [T, k]: 0 = c 1, n = the rule's node n−1
  at::Tensor load_balance_loss;  // 0-dim float64: α·E·Σ_e f_e·P_e, differentiable
  at::Tensor z_loss;             // 0-dim float64: β·mean_t logsumexp(z_t)², differentiable
};

template <class Estimator>
routed route(const at::Tensor& logits, const options& opt) {
  detail::check_cpu_2d(logits, "logits");
  const c10::ScalarType dt = logits.scalar_type();
  TORCH_CHECK(at::isFloatingType(dt),
              "routegrad_torch: logits must be a floating-point tensor "
              "(float32 or float64; float16/bfloat16 are converted), got ",
              dt);
  const bool convert = dt != c10::kFloat && dt != c10::kDouble;
  auto out = RouteFunction<Estimator>::apply(convert ? logits.to(c10::kFloat) : logits, opt);
  return {convert ? out[0].to(dt) : out[0], out[1], out[2], out[3], out[4]};
}

/// The same, with the estimator chosen at run time.
inline routed route(const at::Tensor& logits, const options& opt, estimator est) {
  switch (est) {
    case estimator::switch_router:
      return route<routegrad::switch_router>(logits, opt);
    case estimator::topk_softmax:
      return route<routegrad::topk_softmax>(logits, opt);
    case estimator::sparsemixer_euler:
      return route<routegrad::sparsemixer_euler>(logits, opt);
    case estimator::sparsemixer_midpoint:
      return route<routegrad::sparsemixer_midpoint>(logits, opt);
    case estimator::sparsemixer_heun3:
      return route<routegrad::sparsemixer_heun3>(logits, opt);
  }
  TORCH_CHECK(false, "routegrad_torch: unknown estimator ", static_cast<int>(est));
}

}  // namespace routegrad_torch
