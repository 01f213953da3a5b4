// Quadrature rules for SparseMixer's integral ∫₀¹ G(s·π_D) ds (SPEC §4, docs/math.md).
//
// A rule is a type with
//   static constexpr double weight;            // backward weight w
//   static constexpr int num_nodes;            // reduced forward scales besides c = 1
//   ROUTEGRAD_HD static constexpr double scale(int n);        // c of node n (0 < c < 1)
//   ROUTEGRAD_HD static constexpr double probability(int n);  // P(coin picks node n)
// When D ≠ a the coin picks node n with probability(n); with the remaining probability (and
// always when D = a) the forward scale is c = 1. A user-supplied rule is a new type of this shape;
// the kernels need no change.
#pragma once

#include "../core/config.hpp"

namespace routegrad {

/// First order (Euler): ∫ ≈ G(π_D); weight 2, no reduced scale.
struct euler {
  static constexpr double weight = 2.0;
  static constexpr int num_nodes = 0;
  ROUTEGRAD_HD static constexpr double scale(int) { return 1.0; }
  ROUTEGRAD_HD static constexpr double probability(int) { return 0.0; }
};

/// Second order (midpoint): a fair coin runs c = ½ or c = 1, weight 2.
struct midpoint {
  static constexpr double weight = 2.0;
  static constexpr int num_nodes = 1;
  ROUTEGRAD_HD static constexpr double scale(int) { return 0.5; }
  ROUTEGRAD_HD static constexpr double probability(int) { return 0.5; }
};

/// Third order (Radau/Heun, GRIN/PhiMoE): c = ⅓ with probability ¾, else c = 1; weight 1.
struct heun3 {
  static constexpr double weight = 1.0;
  static constexpr int num_nodes = 1;
  ROUTEGRAD_HD static constexpr double scale(int) { return 1.0 / 3.0; }
  ROUTEGRAD_HD static constexpr double probability(int) { return 0.75; }
};

}  // namespace routegrad
