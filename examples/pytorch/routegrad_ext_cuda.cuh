// The CUDA path's routing calls for one logits type T. Each type is instantiated in its own file
// (routegrad_ext_cuda_<type>.cu: ROUTEGRAD_EXT_CUDA_INSTANTIATE) so that ninja compiles the
// four types in parallel: nvcc compiles one file on one core, and with every estimator, launch
// shape and type in one file the extension's CUDA build ran past 9 minutes on the GPU machine.
#pragma once

#include <ATen/ATen.h>

#include <routegrad/cuda.cuh>

#include "routegrad_ext.hpp"

namespace routegrad_ext {

inline constexpr routegrad::memory_space kDevice = routegrad::memory_space::device;

/// routegrad's forward of the estimator o.estimator on logits of type T into `gates`.
template <class T>
void forward_as(const call_options& o, const at::Tensor& logits,
                const routegrad::cuda::device_routing_state& state, const at::Tensor& gates,
                const routegrad::cuda::device_routing_stats& stats,
                const routegrad::cuda::execution& exec);

/// routegrad's backward (overwriting `grad_logits`) of the estimator o.estimator.
template <class T>
void backward_as(const call_options& o, const at::Tensor& logits,
                 const routegrad::cuda::device_routing_state& state, const at::Tensor& grad_gates,
                 const at::Tensor& grad_logits, const routegrad::cuda::device_routing_stats& stats,
                 const routegrad::cuda::execution& exec);

}  // namespace routegrad_ext

#ifdef ROUTEGRAD_EXT_CUDA_DEFINE_CALLS  // only in the per-type files
namespace routegrad_ext {

template <class T>
void forward_as(const call_options& o, const at::Tensor& logits,
                const routegrad::cuda::device_routing_state& state, const at::Tensor& gates,
                const routegrad::cuda::device_routing_stats& stats,
                const routegrad::cuda::execution& exec) {
  with_estimator(o.estimator, [&](auto est) {
    routegrad::check(routegrad::route_forward<decltype(est)>(
        o.routing, view2<const T, kDevice>(logits), state, view2<T, kDevice>(gates), stats, exec));
  });
}

template <class T>
void backward_as(const call_options& o, const at::Tensor& logits,
                 const routegrad::cuda::device_routing_state& state, const at::Tensor& grad_gates,
                 const at::Tensor& grad_logits, const routegrad::cuda::device_routing_stats& stats,
                 const routegrad::cuda::execution& exec) {
  with_estimator(o.estimator, [&](auto est) {
    routegrad::check(routegrad::route_backward<decltype(est)>(
        o.routing, view2<const T, kDevice>(logits), state, view2<const T, kDevice>(grad_gates),
        view2<T, kDevice>(grad_logits), routegrad::grad_mode::overwrite, stats, exec));
  });
}

}  // namespace routegrad_ext

/// Instantiates forward_as<T> and backward_as<T> (once per type, in its own file).
#define ROUTEGRAD_EXT_CUDA_INSTANTIATE(T)                                                   \
  template void routegrad_ext::forward_as<T>(                                               \
      const call_options&, const at::Tensor&, const routegrad::cuda::device_routing_state&, \
      const at::Tensor&, const routegrad::cuda::device_routing_stats&,                      \
      const routegrad::cuda::execution&);                                                   \
  template void routegrad_ext::backward_as<T>(                                              \
      const call_options&, const at::Tensor&, const routegrad::cuda::device_routing_state&, \
      const at::Tensor&, const at::Tensor&, const routegrad::cuda::device_routing_stats&,   \
      const routegrad::cuda::execution&);
#endif
