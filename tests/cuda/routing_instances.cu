// The fp32 routing entry points the CUDA test files share (routing_instances.cuh).
#include "routing_instances.cuh"

ROUTEGRAD_TEST_FP32_ROUTING_ALL()
