// Compile-only check that the hot routing kernels keep every value in registers on sm_90 (CMake
// builds this with ptxas's -warn-spills turned into an error). The kernels are capped at 48, 56 or
// 64 registers (kernels.cuh forward_bounds, backward_bounds) and bound by latency: a spill at these
// shapes has cost 10-30% on an H200 (docs/performance.md, runs 6 and 9), and nothing else would
// show it before a GPU run. The list: the launch shapes lanes_for picks for E = 64 and 128, every
// estimator but Switch (whose backward spills a few bytes at 4 x 16 and was measured so), fp32 and
// bf16. A change that makes one of these spill and is worth it anyway (measured) takes that line
// out, with the figures, here. Out so far (H200, T = 131072, 2026-11-30 19:07 UTC): SparseMixer's
// bf16 backward at 4 x 16 (E = 64), 56 registers: 8-16 bytes, and still faster than at 64
// registers (midpoint 22.6 -> 21.6 us); the fp32 backward at 4 x 16 of midpoint and heun3 since
// the backward reads slots past the registers out of line (accessors.cuh
// load_slot_past_registers), 8 bytes (H200, 2026-11-30, docs/performance.md run 12: 131072 x 64
// fwd + bwd no slower, heun3 top-2 faster). (The forward at 4 x 16 and SparseMixer's bf16 backward
// at 8 x 16 spilled 4-8 bytes until 18:40 UTC that day, when the Philox block's adds of zero and
// the backward's per-token arithmetic before the row's loads went; docs/performance.md, run 11.)
#include <cuda_bf16.h>

#include <routegrad/cuda.cuh>

namespace routegrad::cuda::detail {

// The forward at 4 × 32 (E ≤ 128) and 4 × 16 (E ≤ 64), the backward at 8 × 16; in fp32 the
// backward at 4 × 16 too, except SparseMixer midpoint's and heun3's (above); in bf16 SparseMixer's
// backward at 4 × 32.
#define ROUTEGRAD_HOT_ROUTING_KERNELS(Est, T)                                       \
  template __global__ void forward_kernel<Est, warp_lanes<4, 32, 8>, T, float>(     \
      const forward_args<T, float>);                                                \
  template __global__ void forward_kernel<Est, warp_lanes<4, 16, 16>, T, float>(    \
      const forward_args<T, float>);                                                \
  template __global__ void backward_kernel<Est, warp_lanes<8, 16, 4>, T, float, T>( \
      const backward_args<T, float, T>);
#define ROUTEGRAD_HOT_ROUTING_KERNELS_BOTH_TYPES(Est) \
  ROUTEGRAD_HOT_ROUTING_KERNELS(Est, float)           \
  ROUTEGRAD_HOT_ROUTING_KERNELS(Est, __nv_bfloat16)
#define ROUTEGRAD_FP32_BACKWARD_4X16(Est)                                                   \
  template __global__ void backward_kernel<Est, warp_lanes<4, 16, 4>, float, float, float>( \
      const backward_args<float, float, float>);
// SparseMixer's backward of 2-byte logits at E = 65 ... 128 (72 registers).
#define ROUTEGRAD_BF16_BACKWARD_4X32(Est)                                          \
  template __global__ void                                                         \
  backward_kernel<Est, warp_lanes<4, 32, 4>, __nv_bfloat16, float, __nv_bfloat16>( \
      const backward_args<__nv_bfloat16, float, __nv_bfloat16>);

ROUTEGRAD_HOT_ROUTING_KERNELS_BOTH_TYPES(sparsemixer_midpoint)
ROUTEGRAD_HOT_ROUTING_KERNELS_BOTH_TYPES(sparsemixer_heun3)
ROUTEGRAD_HOT_ROUTING_KERNELS_BOTH_TYPES(sparsemixer_euler)
ROUTEGRAD_HOT_ROUTING_KERNELS_BOTH_TYPES(topk_softmax)
ROUTEGRAD_FP32_BACKWARD_4X16(sparsemixer_euler)
ROUTEGRAD_FP32_BACKWARD_4X16(topk_softmax)
ROUTEGRAD_BF16_BACKWARD_4X32(sparsemixer_midpoint)
ROUTEGRAD_BF16_BACKWARD_4X32(sparsemixer_heun3)
ROUTEGRAD_BF16_BACKWARD_4X32(sparsemixer_euler)

// Top-k's backward keeps 64 registers at 4 × 16 (it keeps a weights row), in bf16 too.
template __global__ void
backward_kernel<topk_softmax, warp_lanes<4, 16, 4>, __nv_bfloat16, float, __nv_bfloat16>(
    const backward_args<__nv_bfloat16, float, __nv_bfloat16>);

#undef ROUTEGRAD_BF16_BACKWARD_4X32
#undef ROUTEGRAD_FP32_BACKWARD_4X16
#undef ROUTEGRAD_HOT_ROUTING_KERNELS_BOTH_TYPES
#undef ROUTEGRAD_HOT_ROUTING_KERNELS

}  // namespace routegrad::cuda::detail
