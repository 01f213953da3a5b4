// CUDA errors as routegrad statuses.
#pragma once

#include <cuda_runtime.h>

#include "../core/status.hpp"

namespace routegrad::cuda {

inline status from_cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return status::ok();
  return {status_code::cuda_error, what, static_cast<int>(e)};
}

}  // namespace routegrad::cuda

/// Returns a cuda_error status naming `what` when the CUDA call fails.
#define ROUTEGRAD_CUDA_TRY(call, what)                                                            \
  do {                                                                                            \
    const cudaError_t rg_cuda_error_ = (call);                                                    \
    if (rg_cuda_error_ != cudaSuccess) return ::routegrad::cuda::from_cuda(rg_cuda_error_, what); \
  } while (0)
