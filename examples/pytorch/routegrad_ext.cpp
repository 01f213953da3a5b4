// routegrad as a PyTorch extension: forward() and backward() of one routing step on CPU tensors
// (routegrad's host API) and, when built with ROUTEGRAD_EXT_CUDA, on CUDA tensors
// (routegrad_ext_cuda.cu, on the current CUDA stream). routegrad_torch/__init__.py builds it with
// torch.utils.cpp_extension.load and wraps it in a torch.autograd.Function.
//
// A routegrad::error (a failed status: the argument and the rule) is a std::runtime_error, which
// pybind11 turns into a Python RuntimeError with the same message; so are the extension's own
// checks (fail()).
#include <torch/extension.h>

#include <cstdint>
#include <string>

#include "routegrad_ext.hpp"

namespace routegrad_ext {

#if defined(ROUTEGRAD_EXT_CUDA)
forward_result forward_cuda(const at::Tensor& logits, const call_options& o);
at::Tensor backward_cuda(const at::Tensor& logits, const at::Tensor& experts,
                         const at::Tensor& coins, const at::Tensor& grad_gates,
                         const call_options& o, const at::Tensor& expert_counts);
#endif

namespace {

constexpr routegrad::memory_space kHost = routegrad::memory_space::host;

/// Calls f(T{}) with T = float or double, the logits' type (the host API's two).
template <class F>
void with_host_float(const at::Tensor& logits, F&& f) {
  if (logits.scalar_type() == at::kFloat)
    f(float{});
  else if (logits.scalar_type() == at::kDouble)
    f(double{});
  else
    fail(std::string("logits: must be float32 or float64 on the CPU (float16 and bfloat16 only on "
                     "CUDA), got ") +
         c10::toString(logits.scalar_type()));
}

routegrad::host_routing_state host_state(const at::Tensor& experts, const at::Tensor& coins,
                                         const call_options& o) {
  routegrad::host_routing_state state;
  state.experts = view2<std::int32_t, kHost>(experts);
  if (coins.defined()) state.coins = view2<std::uint8_t, kHost>(coins);
  state.rng = o.rng;
  state.offset_counter = o.offset_counter;
  return state;
}

forward_result forward_cpu(const at::Tensor& logits, const call_options& o) {
  const std::int64_t rows = logits.size(0), cols = logits.size(1);
  const std::int64_t k = slots_to_allocate(o.routing.k, cols);
  const at::Tensor gates = at::empty({rows, k}, logits.options());
  const at::Tensor experts = at::empty({rows, k}, logits.options().dtype(at::kInt));
  const at::Tensor coins = at::empty({rows, k}, logits.options().dtype(at::kByte));
  const at::Tensor counts = at::zeros({cols}, logits.options().dtype(at::kLong));
  const at::Tensor lb_loss = at::zeros({}, logits.options().dtype(at::kDouble));
  const at::Tensor z_loss = at::zeros({}, logits.options().dtype(at::kDouble));
  const at::Tensor nonfinite = at::zeros({}, logits.options().dtype(at::kLong));
  const routegrad::host_routing_stats stats{
      counts.data_ptr<std::int64_t>(), loss_pointer(lb_loss, o.routing.load_balance_coef),
      loss_pointer(z_loss, o.routing.z_loss_coef), nonfinite.data_ptr<std::int64_t>()};
  const routegrad::host_routing_state state = host_state(experts, coins, o);
  const routegrad::cpu::execution exec{at::get_num_threads()};
  with_host_float(logits, [&](auto t) {
    using T = decltype(t);
    with_estimator(o.estimator, [&](auto est) {
      using Est = decltype(est);
      routegrad::check(routegrad::route_forward<Est>(o.routing, view2<const T, kHost>(logits),
                                                     state, view2<T, kHost>(gates), stats, exec));
    });
  });
  return {gates, experts, coins, counts, lb_loss, z_loss, nonfinite};
}

at::Tensor backward_cpu(const at::Tensor& logits, const at::Tensor& experts,
                        const at::Tensor& coins, const at::Tensor& grad_gates,
                        const call_options& o, const at::Tensor& expert_counts) {
  const at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());
  routegrad::host_routing_stats stats;
  if (expert_counts.defined()) stats.expert_counts = expert_counts.data_ptr<std::int64_t>();
  const routegrad::host_routing_state state = host_state(experts, coins, o);
  const routegrad::cpu::execution exec{at::get_num_threads()};
  with_host_float(logits, [&](auto t) {
    using T = decltype(t);
    with_estimator(o.estimator, [&](auto est) {
      using Est = decltype(est);
      routegrad::check(routegrad::route_backward<Est>(
          o.routing, view2<const T, kHost>(logits), state, view2<const T, kHost>(grad_gates),
          view2<T, kHost>(grad_logits), routegrad::grad_mode::overwrite, stats, exec));
    });
  });
  return grad_logits;
}

/// forward(logits [T, E], k, estimator, mode, jitter_eps, seed, offset, renormalize,
///         load_balance_coef, z_loss_coef, offset_counter=None) -> (gates [T, k],
///         experts int32 [T, k], coins uint8 [T, k], stats: dict of expert_counts int64 [E],
///         load_balance_loss, z_loss (float64 scalars; 0 unless their coefficient is non-zero),
///         nonfinite_rows (int64 scalar)), on the logits' device. offset_counter: see
///         counter_pointer (routegrad_ext.hpp).
py::tuple forward(const at::Tensor& logits, std::int64_t k, const std::string& estimator,
                  const std::string& mode, double jitter_eps, std::int64_t seed,
                  std::int64_t offset, bool renormalize, double load_balance_coef,
                  double z_loss_coef, const c10::optional<at::Tensor>& offset_counter) {
  call_options o = make_options(k, estimator, mode, jitter_eps, seed, offset, renormalize,
                                load_balance_coef, z_loss_coef);
  require_2d(logits, "logits");
  o.offset_counter = counter_pointer(offset_counter, logits);
  forward_result r;
  if (logits.is_cuda()) {
#if defined(ROUTEGRAD_EXT_CUDA)
    r = forward_cuda(logits, o);
#else
    fail("logits: a CUDA tensor, but this build of the extension has no CUDA path");
#endif
  } else {
    if (!logits.is_cpu())
      fail("logits: must be a CPU or CUDA tensor, got " + logits.device().str());
    r = forward_cpu(logits, o);
  }
  py::dict stats;
  stats["expert_counts"] = r[3];
  stats["load_balance_loss"] = r[4];
  stats["z_loss"] = r[5];
  stats["nonfinite_rows"] = r[6];
  return py::make_tuple(r[0], r[1], r[2], stats);
}

/// backward(logits, experts, coins, grad_gates, <the forward's options>, expert_counts=None,
/// offset_counter=None) -> grad_logits [T, E] (the logits' dtype). expert_counts (the forward's
/// stats) is needed when load_balance_coef != 0; coins may be None for estimators without a coin;
/// offset_counter must hold the value the forward saw (Switch's backward redraws its noise).
at::Tensor backward(const at::Tensor& logits, const at::Tensor& experts,
                    const c10::optional<at::Tensor>& coins_in, const at::Tensor& grad_gates_in,
                    std::int64_t k, const std::string& estimator, const std::string& mode,
                    double jitter_eps, std::int64_t seed, std::int64_t offset, bool renormalize,
                    double load_balance_coef, double z_loss_coef,
                    const c10::optional<at::Tensor>& counts_in,
                    const c10::optional<at::Tensor>& offset_counter) {
  call_options o = make_options(k, estimator, mode, jitter_eps, seed, offset, renormalize,
                                load_balance_coef, z_loss_coef);
  require_2d(logits, "logits");
  o.offset_counter = counter_pointer(offset_counter, logits);
  require_2d(experts, "experts");
  require_dtype(experts, at::kInt, "experts");
  require_device(experts, logits, "experts");
  const at::Tensor coins = coins_in.has_value() ? *coins_in : at::Tensor();
  if (coins.defined()) {
    require_2d(coins, "coins");
    require_dtype(coins, at::kByte, "coins");
    require_device(coins, logits, "coins");
  }
  require_2d(grad_gates_in, "grad_gates");
  require_device(grad_gates_in, logits, "grad_gates");
  if (!at::isFloatingType(grad_gates_in.scalar_type()))
    fail(std::string("grad_gates: must be a floating-point tensor, got ") +
         c10::toString(grad_gates_in.scalar_type()));
  const at::Tensor grad_gates = grad_gates_in.to(logits.scalar_type());
  const at::Tensor counts = counts_in.has_value() ? *counts_in : at::Tensor();
  if (counts.defined()) {
    require_dtype(counts, at::kLong, "expert_counts");
    require_device(counts, logits, "expert_counts");
    if (!(counts.dim() == 1 && counts.size(0) == logits.size(1) && counts.is_contiguous()))
      fail("expert_counts: must be a contiguous int64 tensor [E] (the forward's counts)");
  }
  if (logits.is_cuda()) {
#if defined(ROUTEGRAD_EXT_CUDA)
    return backward_cuda(logits, experts, coins, grad_gates, o, counts);
#else
    fail("logits: a CUDA tensor, but this build of the extension has no CUDA path");
#endif
  }
  if (!logits.is_cpu()) fail("logits: must be a CPU or CUDA tensor, got " + logits.device().str());
  return backward_cpu(logits, experts, coins, grad_gates, o, counts);
}

}  // namespace
}  // namespace routegrad_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "routegrad routing-gradient estimators (CPU and CUDA tensors)";
  m.def("forward", &routegrad_ext::forward, py::arg("logits"), py::arg("k"), py::arg("estimator"),
        py::arg("mode") = "train", py::arg("jitter_eps") = 0.1, py::arg("seed") = 0,
        py::arg("offset") = 0, py::arg("renormalize") = false, py::arg("load_balance_coef") = 0.0,
        py::arg("z_loss_coef") = 0.0, py::arg("offset_counter") = py::none());
  m.def("backward", &routegrad_ext::backward, py::arg("logits"), py::arg("experts"),
        py::arg("coins"), py::arg("grad_gates"), py::arg("k"), py::arg("estimator"),
        py::arg("mode") = "train", py::arg("jitter_eps") = 0.1, py::arg("seed") = 0,
        py::arg("offset") = 0, py::arg("renormalize") = false, py::arg("load_balance_coef") = 0.0,
        py::arg("z_loss_coef") = 0.0, py::arg("expert_counts") = py::none(),
        py::arg("offset_counter") = py::none());
#if defined(ROUTEGRAD_EXT_CUDA)
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
