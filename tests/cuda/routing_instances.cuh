// The fp32 routing entry points every CUDA test file uses, compiled once (routing_instances.cu)
// instead of once per test file (routegrad/cuda/instances.cuh says why; four test files used
// these, and compiling their kernels in each was most of those files' compile time).
#pragma once

#include <routegrad/cuda.cuh>

// `Prefix`: extern (the declarations every test file sees) or nothing (the definitions).
#define ROUTEGRAD_TEST_FP32_ROUTING(Prefix, Est) \
  ROUTEGRAD_CUDA_ROUTE_STEP(Prefix, Est, const float, float, const float, float)

ROUTEGRAD_TEST_FP32_ROUTING(extern, routegrad::switch_router)
ROUTEGRAD_TEST_FP32_ROUTING(extern, routegrad::topk_softmax)
ROUTEGRAD_TEST_FP32_ROUTING(extern, routegrad::sparsemixer_euler)
ROUTEGRAD_TEST_FP32_ROUTING(extern, routegrad::sparsemixer_midpoint)
ROUTEGRAD_TEST_FP32_ROUTING(extern, routegrad::sparsemixer_heun3)
