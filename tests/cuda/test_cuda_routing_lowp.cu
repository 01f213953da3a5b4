// The CUDA routing entry points with bf16 and fp16 logits and logit gradients (math in fp32,
// gates in fp32) against the double-precision SPEC reference and the CPU back end.
#include "routing_check.cuh"

namespace {

using namespace routegrad;
using routegrad::test::gpu::check_case;

template <class Est, class T>
void sweep(std::uint64_t seed) {
  for (index_t E : {7, 8, 64, 128, 1000})
    for (int k : {1, 2, 4}) {
      if (k > E) continue;
      const bool strided = (seed & 1) != 0;
      const routing_mode mode = (seed % 3 == 0) ? routing_mode::eval : routing_mode::train;
      check_case<Est, T>(
          {555, E, k, strided, mode, (seed % 4) == 1, (seed % 5 < 2) ? 0.05 : 0.0, 0.0}, seed++);
    }
}

}  // namespace

TEST_CASE_TEMPLATE("cuda routing low precision: every estimator", T, __nv_bfloat16, __half) {
  sweep<switch_router, T>(11);
  sweep<topk_softmax, T>(22);
  sweep<sparsemixer_euler, T>(33);
  sweep<sparsemixer_midpoint, T>(44);
  sweep<sparsemixer_heun3, T>(55);
}
