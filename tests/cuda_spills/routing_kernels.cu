// Compile-only check that the hot routing kernels keep every value in registers on sm_90 (CMake
// builds this with ptxas's -warn-spills turned into an error). The kernels are capped at 56 or 64
// registers (kernels.cuh forward_bounds, backward_bounds) and bound by latency: a spill at these
// shapes has cost 10-30% on an H200 (docs/performance.md, runs 6 and 9), and nothing else would
// show it before a GPU run. The list: the launch shapes lanes_for picks for E = 64 and 128, every
// estimator but Switch (whose backward spills a few bytes at 4 x 16 and was measured so), fp32 and
// bf16. A change that makes one of these spill and is worth it anyway (measured) takes that line
// out, with the figures, here. Out so far (H200, T = 131072, 2026-11-30 15:23-15:41 UTC):
// - the forward at 4 x 16 (E = 64), 56 registers: 8 bytes (top-k 4), and still faster than at 64
//   registers (midpoint 23.2 -> 21.5-21.8 us, heun3 top-2 39.8-40.2 -> 38.4-38.6; unrolled by 8
//   instead of 16 it does not spill but runs 22.1-22.2);
// - SparseMixer's backward at 8 x 16 (E = 128) in bf16, 56 registers: 4-8 bytes, faster than 64
//   registers with shared memory for fewer blocks (midpoint 45.7 -> 43.1, before the staging
//   change that brought fp32 to no spill at all).
#include <cuda_bf16.h>

#include <routegrad/cuda.cuh>

namespace routegrad::cuda::detail {

// The forward at 4 × 32 (E ≤ 128), the backward at 4 × 16 (E ≤ 64), in fp32 also at 8 × 16.
#define ROUTEGRAD_HOT_ROUTING_KERNELS(Est, T)                                       \
  template __global__ void forward_kernel<Est, warp_lanes<4, 32, 8>, T, float>(     \
      const forward_args<T, float>);                                                \
  template __global__ void backward_kernel<Est, warp_lanes<4, 16, 4>, T, float, T>( \
      const backward_args<T, float, T>);
#define ROUTEGRAD_HOT_ROUTING_KERNELS_FP32(Est)                                             \
  ROUTEGRAD_HOT_ROUTING_KERNELS(Est, float)                                                 \
  template __global__ void backward_kernel<Est, warp_lanes<8, 16, 4>, float, float, float>( \
      const backward_args<float, float, float>);

ROUTEGRAD_HOT_ROUTING_KERNELS_FP32(sparsemixer_midpoint)
ROUTEGRAD_HOT_ROUTING_KERNELS(sparsemixer_midpoint, __nv_bfloat16)
ROUTEGRAD_HOT_ROUTING_KERNELS_FP32(sparsemixer_heun3)
ROUTEGRAD_HOT_ROUTING_KERNELS(sparsemixer_heun3, __nv_bfloat16)
ROUTEGRAD_HOT_ROUTING_KERNELS_FP32(sparsemixer_euler)
ROUTEGRAD_HOT_ROUTING_KERNELS(sparsemixer_euler, __nv_bfloat16)
ROUTEGRAD_HOT_ROUTING_KERNELS_FP32(topk_softmax)
ROUTEGRAD_HOT_ROUTING_KERNELS(topk_softmax, __nv_bfloat16)

// Top-k's backward keeps 64 registers at 8 × 16 (it keeps a weights row), in bf16 too.
template __global__ void
backward_kernel<topk_softmax, warp_lanes<8, 16, 4>, __nv_bfloat16, float, __nv_bfloat16>(
    const backward_args<__nv_bfloat16, float, __nv_bfloat16>);

#undef ROUTEGRAD_HOT_ROUTING_KERNELS_FP32
#undef ROUTEGRAD_HOT_ROUTING_KERNELS

}  // namespace routegrad::cuda::detail
