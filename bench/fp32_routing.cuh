// The fp32 routing entry points both CUDA benchmark files call: cuda_routing.cu defines them
// (explicit instantiations), cuda_moe_layer.cu (whose layer routes fp32 logits) declares them
// extern and links to those kernels instead of compiling them again (about 40 s of nvcc per
// estimator; routegrad/cuda/instances.cuh). Euler is timed in the layer only: it stays there.
#pragma once

#include <routegrad/cuda.cuh>

#define ROUTEGRAD_BENCH_FP32_ROUTING_SHARED(Prefix)                                                \
  ROUTEGRAD_CUDA_ROUTE_STEP(Prefix, routegrad::switch_router, const float, float, const float,     \
                            float)                                                                 \
  ROUTEGRAD_CUDA_ROUTE_STEP(Prefix, routegrad::topk_softmax, const float, float, const float,      \
                            float)                                                                 \
  ROUTEGRAD_CUDA_ROUTE_STEP(Prefix, routegrad::sparsemixer_midpoint, const float, float,           \
                            const float, float)                                                    \
  ROUTEGRAD_CUDA_ROUTE_STEP(Prefix, routegrad::sparsemixer_heun3, const float, float, const float, \
                            float)
