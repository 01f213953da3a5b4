// Compile-only check for GPUs older than the sm_90 the project is measured on (CMake builds this
// for sm_75 as part of the default build): the routing kernels must still compile where neither
// REDUX (sm_80+) nor programmatic dependent launch (sm_90+) exists. Nothing here runs. Two
// estimators (one sampled with coins, one noisy) with bf16 logits and gates reach every lanes
// policy (2-byte logits get every shape fp32 logits get, and SparseMixer's backward at 4 x 32)
// and every arch-dependent path (the bf16 conversions; REDUX and the dependent launch, which take
// the math type, fp32 for both). All five estimators would take 2.5x the compile time, and fp32
// logits as well (as this file had until 2026-12-01) 2x, for no other code path.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <routegrad/cuda.cuh>

namespace routegrad::arch_check {

template <class Est, class T>
status route_step(const routing_options& opt, device_view<const T, 2> logits,
                  const cuda::device_routing_state& state, device_view<T, 2> gates,
                  device_view<const T, 2> grad_gates, device_view<T, 2> grad_logits) {
  ROUTEGRAD_RETURN_IF_ERROR(route_forward<Est>(opt, logits, state, gates));
  return route_backward<Est>(opt, logits, state, grad_gates, grad_logits);
}

template <class T>
status two_estimators(const routing_options& opt, device_view<const T, 2> logits,
                      const cuda::device_routing_state& state, device_view<T, 2> gates,
                      device_view<const T, 2> grad_gates, device_view<T, 2> grad_logits) {
  ROUTEGRAD_RETURN_IF_ERROR(
      route_step<switch_router>(opt, logits, state, gates, grad_gates, grad_logits));
  return route_step<sparsemixer_heun3>(opt, logits, state, gates, grad_gates, grad_logits);
}

// Explicit instantiation: the compiler must generate every kernel it reaches.
template status two_estimators<__nv_bfloat16>(const routing_options&,
                                              device_view<const __nv_bfloat16, 2>,
                                              const cuda::device_routing_state&,
                                              device_view<__nv_bfloat16, 2>,
                                              device_view<const __nv_bfloat16, 2>,
                                              device_view<__nv_bfloat16, 2>);

}  // namespace routegrad::arch_check
