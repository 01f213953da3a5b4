// Programmatic dependent launch (sm_90+): a routing kernel is scheduled as soon as every block of
// the kernel before it in the stream has finished, without waiting for that grid to be retired,
// so part of its launch latency hides behind the other's tail. A kernel launched this way calls
// wait_for_prior_grids() before its first access to global memory: it returns once the prior
// kernel has completed and its writes are visible. Without the launch attribute, or before sm_90,
// the wait is a no-op and the launch an ordinary stream-ordered one.
//
// Measured on an H200 (docs/performance.md, "Run 5"): forward + backward replayed from a graph
// 0.2–0.5 µs faster (T = 4096, E = 8: 9.47 → 9.22 µs). The kernels do not also trigger their
// dependents early (griddepcontrol.launch_dependents at the start): that let the next kernel's
// blocks be placed while this one still held the multiprocessors, and grids of under one wave
// then crowded onto part of the GPU (T = 32768, E = 32 with 2 lanes per token: 20.7 → 24.5 µs).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

#include "error.cuh"

namespace routegrad::cuda::detail {

__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaGridDependencySynchronize();
#endif
}

/// Whether the current device supports programmatic dependent launch (compute capability 9.0+).
inline status dependent_launch_supported(bool& supported) {
  int device = 0, major = 0;
  ROUTEGRAD_CUDA_TRY(cudaGetDevice(&device), "cudaGetDevice");
  ROUTEGRAD_CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
                     "cudaDeviceGetAttribute(compute capability)");
  supported = major >= 9;
  return status::ok();
}

/// Launches kernel<<<blocks, threads, shared, stream>>>(args...), as a programmatic dependent
/// launch where the device supports it. The kernel must begin with wait_for_prior_grids().
template <class... Params, class... Args>
status launch_dependent(void (*kernel)(Params...), unsigned blocks, int threads, std::size_t shared,
                        cudaStream_t stream, const char* what, Args&&... args) {
  bool supported = false;
  ROUTEGRAD_RETURN_IF_ERROR(dependent_launch_supported(supported));
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = supported ? 1 : 0;
  ROUTEGRAD_CUDA_TRY(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), what);
  return status::ok();
}

}  // namespace routegrad::cuda::detail
