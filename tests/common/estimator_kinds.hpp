// Maps the library's estimator types to the reference's kinds and rules
// (tests/common/estimator_reference.hpp), for the tests of every back end.
#pragma once

#include <routegrad/estimators/estimators.hpp>
#include <type_traits>

#include "common/estimator_reference.hpp"

namespace routegrad::test {

template <class Est>
ref::kind kind_of() {
  if constexpr (std::is_same_v<Est, switch_router>)
    return ref::kind::switch_;
  else if constexpr (std::is_same_v<Est, topk_softmax>)
    return ref::kind::topk_softmax;
  else
    return ref::kind::sparsemixer;
}

template <class Est>
ref::rule rule_of() {
  if constexpr (std::is_same_v<Est, sparsemixer_midpoint>)
    return ref::midpoint_rule();
  else if constexpr (std::is_same_v<Est, sparsemixer_heun3>)
    return ref::heun3_rule();
  else
    return ref::euler_rule();
}

}  // namespace routegrad::test
