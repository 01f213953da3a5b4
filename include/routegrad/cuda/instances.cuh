// Compiling the routing kernels once per program instead of once per file. nvcc compiles a kernel
// template in every .cu file that instantiates it, and one call of run_forward or run_backward
// (route_forward, route_backward) reaches a kernel per lanes shape: about 30 for the forward
// (forward and loss sums) and 15 for the backward: about 40 s of nvcc per estimator and types
// (fp32; fp64 takes about twice that) on a 2-core machine.
// A program that routes from several files can declare the entry points it uses with
// `extern` in a header those files include, and define them in one .cu file:
//
//   // routing_calls.cuh, included by every file that routes
//   #include <routegrad/cuda.cuh>
//   ROUTEGRAD_CUDA_ROUTE_STEP(extern, routegrad::sparsemixer_midpoint, const float, float,
//                             const float, float)
//
//   // routing_calls.cu: the kernels, compiled here only
//   #include "routing_calls.cuh"
//   ROUTEGRAD_CUDA_ROUTE_STEP(, routegrad::sparsemixer_midpoint, const float, float, const float,
//                             float)
//
// The types are those of the views passed (logits TL, gates G; grad_gates GG, grad_logits GL),
// const included: a call with other types compiles its own kernels, as without these macros.
// ROUTEGRAD_CUDA_ROUTE_FORWARD and ROUTEGRAD_CUDA_ROUTE_BACKWARD name one direction each.
// Use them at global scope (they name routegrad::cuda::run_forward / run_backward, which
// route_forward / route_backward call). Every file must see the same declarations of the
// library: compile them with the same routegrad version and macros.
#pragma once

#include "routing.cuh"

/// Declares (`Prefix` = extern) or defines (`Prefix` empty) the explicit instantiation of
/// routegrad::cuda::run_forward<Est, TL, G>.
#define ROUTEGRAD_CUDA_ROUTE_FORWARD(Prefix, Est, TL, G)                          \
  Prefix template routegrad::status routegrad::cuda::run_forward<Est, TL, G>(     \
      const routegrad::routing_options&, routegrad::device_view<TL, 2>,           \
      const routegrad::cuda::device_routing_state&, routegrad::device_view<G, 2>, \
      const routegrad::cuda::device_routing_stats&, const routegrad::cuda::execution&);

/// Declares (`Prefix` = extern) or defines (`Prefix` empty) the explicit instantiation of
/// routegrad::cuda::run_backward<Est, TL, GG, GL>.
#define ROUTEGRAD_CUDA_ROUTE_BACKWARD(Prefix, Est, TL, GG, GL)                      \
  Prefix template routegrad::status routegrad::cuda::run_backward<Est, TL, GG, GL>( \
      const routegrad::routing_options&, routegrad::device_view<TL, 2>,             \
      const routegrad::cuda::device_routing_state&, routegrad::device_view<GG, 2>,  \
      routegrad::device_view<GL, 2>, routegrad::grad_mode,                          \
      const routegrad::cuda::device_routing_stats&, const routegrad::cuda::execution&);

/// Both directions: ROUTEGRAD_CUDA_ROUTE_FORWARD(Prefix, Est, TL, G) and
/// ROUTEGRAD_CUDA_ROUTE_BACKWARD(Prefix, Est, TL, GG, GL).
#define ROUTEGRAD_CUDA_ROUTE_STEP(Prefix, Est, TL, G, GG, GL) \
  ROUTEGRAD_CUDA_ROUTE_FORWARD(Prefix, Est, TL, G)            \
  ROUTEGRAD_CUDA_ROUTE_BACKWARD(Prefix, Est, TL, GG, GL)
