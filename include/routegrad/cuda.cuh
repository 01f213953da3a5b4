// routegrad's CUDA back end: the routing entry points and the MoE layer for device memory (plus
// everything in routegrad.hpp). Link routegrad::cuda (CUDA runtime and cuBLAS).
#pragma once

#include "cuda/accessors.cuh"
#include "cuda/blas.cuh"
#include "cuda/convert.cuh"
#include "cuda/error.cuh"
#include "cuda/instances.cuh"
#include "cuda/kernels.cuh"
#include "cuda/lanes.cuh"
#include "cuda/moe_kernels.cuh"
#include "cuda/moe_layer.cuh"
#include "cuda/routing.cuh"
#include "routegrad.hpp"
