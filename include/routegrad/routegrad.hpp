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
#include "routing/api.hpp"
#include "routing/options.hpp"
#include "routing/validate.hpp"
