// The CUDA path of the routegrad PyTorch extension: routegrad's device API on CUDA tensors
// (fp32, fp64, fp16, bf16 logits; gates and gradients in the logits' type), on the current CUDA
// stream of the logits' device, with no host synchronisation. Compiled only when torch has CUDA
// and nvcc is found (routegrad_torch/__init__.py); routegrad_ext.cpp calls it for CUDA tensors
// after its own argument checks. This file allocates the outputs and picks the logits' type; the
// routing calls of each type are compiled in their own file (routegrad_ext_cuda.cuh).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstddef>
#include <cstdint>

#include "routegrad_ext_cuda.cuh"

namespace routegrad_ext {
namespace {

template <class T>
struct tag {
  using type = T;
};

/// Calls f(tag<T>{}) with T the device storage type of the logits.
template <class F>
void with_device_float(const at::Tensor& logits, F&& f) {
  switch (logits.scalar_type()) {
    case at::kFloat:
      f(tag<float>{});
      break;
    case at::kDouble:
      f(tag<double>{});
      break;
    case at::kHalf:
      f(tag<__half>{});
      break;
    case at::kBFloat16:
      f(tag<__nv_bfloat16>{});
      break;
    default:
      fail(std::string("logits: must be float32, float64, float16 or bfloat16, got ") +
           c10::toString(logits.scalar_type()));
  }
}

routegrad::cuda::device_routing_state device_state(const at::Tensor& experts,
                                                   const at::Tensor& coins, const call_options& o) {
  routegrad::cuda::device_routing_state state;
  state.experts = view2<std::int32_t, kDevice>(experts);
  if (coins.defined()) state.coins = view2<std::uint8_t, kDevice>(coins);
  state.rng = o.rng;
  state.offset_counter = o.offset_counter;
  return state;
}

}  // namespace

forward_result forward_cuda(const at::Tensor& logits, const call_options& o) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const std::int64_t rows = logits.size(0), cols = logits.size(1);
  const std::int64_t k = slots_to_allocate(o.routing.k, cols);
  const at::Tensor gates = at::empty({rows, k}, logits.options());
  const at::Tensor experts = at::empty({rows, k}, logits.options().dtype(at::kInt));
  const at::Tensor coins = at::empty({rows, k}, logits.options().dtype(at::kByte));
  const at::Tensor counts = at::empty({cols}, logits.options().dtype(at::kLong));
  const at::Tensor lb_loss = at::zeros({}, logits.options().dtype(at::kDouble));
  const at::Tensor z_loss = at::zeros({}, logits.options().dtype(at::kDouble));
  const at::Tensor nonfinite = at::zeros({}, logits.options().dtype(at::kLong));
  const routegrad::cuda::device_routing_stats stats{
      counts.data_ptr<std::int64_t>(), loss_pointer(lb_loss, o.routing.load_balance_coef),
      loss_pointer(z_loss, o.routing.z_loss_coef), nonfinite.data_ptr<std::int64_t>()};
  // Scratch for the loss values from torch's caching allocator (stream-ordered on this stream).
  const std::size_t bytes = routegrad::cuda::forward_workspace_bytes(rows, cols, stats);
  const at::Tensor workspace =
      at::empty({static_cast<std::int64_t>(bytes)}, logits.options().dtype(at::kByte));
  const routegrad::cuda::execution exec{stream, bytes > 0 ? workspace.data_ptr() : nullptr, bytes};
  const routegrad::cuda::device_routing_state state = device_state(experts, coins, o);
  with_device_float(logits, [&](auto t) {
    forward_as<typename decltype(t)::type>(o, logits, state, gates, stats, exec);
  });
  return {gates, experts, coins, counts, lb_loss, z_loss, nonfinite};
}

at::Tensor backward_cuda(const at::Tensor& logits, const at::Tensor& experts,
                         const at::Tensor& coins, const at::Tensor& grad_gates,
                         const call_options& o, const at::Tensor& expert_counts) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());
  routegrad::cuda::device_routing_stats stats;
  if (expert_counts.defined()) stats.expert_counts = expert_counts.data_ptr<std::int64_t>();
  const routegrad::cuda::device_routing_state state = device_state(experts, coins, o);
  const routegrad::cuda::execution exec{stream};
  with_device_float(logits, [&](auto t) {
    backward_as<typename decltype(t)::type>(o, logits, state, grad_gates, grad_logits, stats, exec);
  });
  return grad_logits;
}

}  // namespace routegrad_ext
