// routegrad's CUDA back end: the routing entry points for device memory (plus everything in
// routegrad.hpp). Link routegrad::cuda.
#pragma once

#include "cuda/accessors.cuh"
#include "cuda/convert.cuh"
#include "cuda/error.cuh"
#include "cuda/kernels.cuh"
#include "cuda/lanes.cuh"
#include "cuda/routing.cuh"
#include "routegrad.hpp"
