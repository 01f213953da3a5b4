// The fp32 routing entry points the CUDA test files share (routing_instances.cuh).
#include "routing_instances.cuh"

ROUTEGRAD_TEST_FP32_ROUTING(, routegrad::switch_router)
ROUTEGRAD_TEST_FP32_ROUTING(, routegrad::topk_softmax)
ROUTEGRAD_TEST_FP32_ROUTING(, routegrad::sparsemixer_euler)
ROUTEGRAD_TEST_FP32_ROUTING(, routegrad::sparsemixer_midpoint)
ROUTEGRAD_TEST_FP32_ROUTING(, routegrad::sparsemixer_heun3)
