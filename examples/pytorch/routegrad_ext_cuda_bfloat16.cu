// The CUDA routing calls for __nv_bfloat16 logits (see routegrad_ext_cuda.cuh).
#define ROUTEGRAD_EXT_CUDA_DEFINE_CALLS
#include "routegrad_ext_cuda.cuh"

ROUTEGRAD_EXT_CUDA_INSTANTIATE(__nv_bfloat16)
