// Compile-only check that the hot routing kernels keep every value in registers on sm_90 (CMake
// builds this with ptxas's -warn-spills turned into an error). The kernels are capped at 64
// registers (kernels.cuh min_resident_blocks) and bound by latency: a spill at these shapes has
// cost 10-30% on an H200 (docs/performance.md, runs 6 and 9), and nothing else would show it
// before a GPU run. The list: the launch shapes lanes_for picks for E = 64 and 128 (forward 4 x 16
// and 4 x 32, backward 4 x 16 and 8 x 16), every estimator but Switch (whose backward spills a
// few bytes at 4 x 16 and was measured so), fp32 and bf16. A change that makes one of these spill
// and is worth it anyway (measured) takes that line out, with the figures, here.
#include <cuda_bf16.h>

#include <routegrad/cuda.cuh>

namespace routegrad::cuda::detail {

// The forward at 4 × 32 (E ≤ 128) and 4 × 16 (E ≤ 64), the backward at 8 × 16 and 4 × 16.
#define ROUTEGRAD_HOT_ROUTING_KERNELS(Est, T)                                       \
  template __global__ void forward_kernel<Est, warp_lanes<4, 32, 8>, T, float>(     \
      const forward_args<T, float>);                                                \
  template __global__ void forward_kernel<Est, warp_lanes<4, 16, 16>, T, float>(    \
      const forward_args<T, float>);                                                \
  template __global__ void backward_kernel<Est, warp_lanes<8, 16, 4>, T, float, T>( \
      const backward_args<T, float, T>);                                            \
  template __global__ void backward_kernel<Est, warp_lanes<4, 16, 4>, T, float, T>( \
      const backward_args<T, float, T>);

ROUTEGRAD_HOT_ROUTING_KERNELS(sparsemixer_midpoint, float)
ROUTEGRAD_HOT_ROUTING_KERNELS(sparsemixer_midpoint, __nv_bfloat16)
ROUTEGRAD_HOT_ROUTING_KERNELS(sparsemixer_heun3, float)
ROUTEGRAD_HOT_ROUTING_KERNELS(sparsemixer_heun3, __nv_bfloat16)
ROUTEGRAD_HOT_ROUTING_KERNELS(sparsemixer_euler, float)
ROUTEGRAD_HOT_ROUTING_KERNELS(sparsemixer_euler, __nv_bfloat16)
ROUTEGRAD_HOT_ROUTING_KERNELS(topk_softmax, float)
ROUTEGRAD_HOT_ROUTING_KERNELS(topk_softmax, __nv_bfloat16)

#undef ROUTEGRAD_HOT_ROUTING_KERNELS

}  // namespace routegrad::cuda::detail
