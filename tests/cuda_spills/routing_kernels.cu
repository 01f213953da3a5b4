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

template __global__ void forward_kernel<sparsemixer_midpoint, warp_lanes<4, 32, 8>, float, float>(
    const forward_args<float, float>);
template __global__ void forward_kernel<sparsemixer_midpoint, warp_lanes<4, 16, 16>, float, float>(
    const forward_args<float, float>);
template __global__ void backward_kernel<sparsemixer_midpoint, warp_lanes<8, 16, 4>, float, float,
                                         float>(const backward_args<float, float, float>);
template __global__ void backward_kernel<sparsemixer_midpoint, warp_lanes<4, 16, 4>, float, float,
                                         float>(const backward_args<float, float, float>);
template __global__ void forward_kernel<sparsemixer_midpoint, warp_lanes<4, 32, 8>, __nv_bfloat16,
                                        float>(const forward_args<__nv_bfloat16, float>);
template __global__ void forward_kernel<sparsemixer_midpoint, warp_lanes<4, 16, 16>, __nv_bfloat16,
                                        float>(const forward_args<__nv_bfloat16, float>);
template __global__ void
backward_kernel<sparsemixer_midpoint, warp_lanes<8, 16, 4>, __nv_bfloat16, float, __nv_bfloat16>(
    const backward_args<__nv_bfloat16, float, __nv_bfloat16>);
template __global__ void
backward_kernel<sparsemixer_midpoint, warp_lanes<4, 16, 4>, __nv_bfloat16, float, __nv_bfloat16>(
    const backward_args<__nv_bfloat16, float, __nv_bfloat16>);
template __global__ void forward_kernel<sparsemixer_heun3, warp_lanes<4, 32, 8>, float, float>(
    const forward_args<float, float>);
template __global__ void forward_kernel<sparsemixer_heun3, warp_lanes<4, 16, 16>, float, float>(
    const forward_args<float, float>);
template __global__ void backward_kernel<sparsemixer_heun3, warp_lanes<8, 16, 4>, float, float,
                                         float>(const backward_args<float, float, float>);
template __global__ void backward_kernel<sparsemixer_heun3, warp_lanes<4, 16, 4>, float, float,
                                         float>(const backward_args<float, float, float>);
template __global__ void forward_kernel<sparsemixer_heun3, warp_lanes<4, 32, 8>, __nv_bfloat16,
                                        float>(const forward_args<__nv_bfloat16, float>);
template __global__ void forward_kernel<sparsemixer_heun3, warp_lanes<4, 16, 16>, __nv_bfloat16,
                                        float>(const forward_args<__nv_bfloat16, float>);
template __global__ void
backward_kernel<sparsemixer_heun3, warp_lanes<8, 16, 4>, __nv_bfloat16, float, __nv_bfloat16>(
    const backward_args<__nv_bfloat16, float, __nv_bfloat16>);
template __global__ void
backward_kernel<sparsemixer_heun3, warp_lanes<4, 16, 4>, __nv_bfloat16, float, __nv_bfloat16>(
    const backward_args<__nv_bfloat16, float, __nv_bfloat16>);
template __global__ void forward_kernel<sparsemixer_euler, warp_lanes<4, 32, 8>, float, float>(
    const forward_args<float, float>);
template __global__ void forward_kernel<sparsemixer_euler, warp_lanes<4, 16, 16>, float, float>(
    const forward_args<float, float>);
template __global__ void backward_kernel<sparsemixer_euler, warp_lanes<8, 16, 4>, float, float,
                                         float>(const backward_args<float, float, float>);
template __global__ void backward_kernel<sparsemixer_euler, warp_lanes<4, 16, 4>, float, float,
                                         float>(const backward_args<float, float, float>);
template __global__ void forward_kernel<sparsemixer_euler, warp_lanes<4, 32, 8>, __nv_bfloat16,
                                        float>(const forward_args<__nv_bfloat16, float>);
template __global__ void forward_kernel<sparsemixer_euler, warp_lanes<4, 16, 16>, __nv_bfloat16,
                                        float>(const forward_args<__nv_bfloat16, float>);
template __global__ void
backward_kernel<sparsemixer_euler, warp_lanes<8, 16, 4>, __nv_bfloat16, float, __nv_bfloat16>(
    const backward_args<__nv_bfloat16, float, __nv_bfloat16>);
template __global__ void
backward_kernel<sparsemixer_euler, warp_lanes<4, 16, 4>, __nv_bfloat16, float, __nv_bfloat16>(
    const backward_args<__nv_bfloat16, float, __nv_bfloat16>);
template __global__ void forward_kernel<topk_softmax, warp_lanes<4, 32, 8>, float, float>(
    const forward_args<float, float>);
template __global__ void forward_kernel<topk_softmax, warp_lanes<4, 16, 16>, float, float>(
    const forward_args<float, float>);
template __global__ void backward_kernel<topk_softmax, warp_lanes<8, 16, 4>, float, float, float>(
    const backward_args<float, float, float>);
template __global__ void backward_kernel<topk_softmax, warp_lanes<4, 16, 4>, float, float, float>(
    const backward_args<float, float, float>);
template __global__ void forward_kernel<topk_softmax, warp_lanes<4, 32, 8>, __nv_bfloat16, float>(
    const forward_args<__nv_bfloat16, float>);
template __global__ void forward_kernel<topk_softmax, warp_lanes<4, 16, 16>, __nv_bfloat16, float>(
    const forward_args<__nv_bfloat16, float>);
template __global__ void
backward_kernel<topk_softmax, warp_lanes<8, 16, 4>, __nv_bfloat16, float, __nv_bfloat16>(
    const backward_args<__nv_bfloat16, float, __nv_bfloat16>);
template __global__ void
backward_kernel<topk_softmax, warp_lanes<4, 16, 4>, __nv_bfloat16, float, __nv_bfloat16>(
    const backward_args<__nv_bfloat16, float, __nv_bfloat16>);

}  // namespace routegrad::cuda::detail
