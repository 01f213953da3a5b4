// routegrad: routing-gradient estimators for sparse Mixture-of-Experts training.
// Umbrella header for the core and the CPU back end (never pulls in CUDA).
#pragma once

#include "core/config.hpp"
#include "core/math.hpp"
#include "core/philox.hpp"
#include "core/status.hpp"
#include "core/view.hpp"
#include "estimators/estimators.hpp"
#include "estimators/lanes.hpp"
#include "estimators/quadrature_rules.hpp"
#include "estimators/token_backward.hpp"
#include "estimators/token_forward.hpp"
#include "moe/activation.hpp"
#include "moe/options.hpp"
#include "moe/validate.hpp"
#include "routing/api.hpp"
#include "routing/options.hpp"
#include "routing/validate.hpp"

// The CPU MoE layer computes with Eigen: it comes with this header when <Eigen/Core> is on the
// include path (the routegrad::cpu / routegrad::routegrad CMake targets put it there). Builds
// that only add include/ (e.g. torch.utils.cpp_extension) get the routing API alone, or include
// <routegrad/moe/api.hpp> themselves with Eigen's directory added.
#if defined(__has_include)
#if __has_include(<Eigen/Core>)
#include "moe/api.hpp"
#endif
#endif
