// The CUDA routing entry points with bf16 and fp16 logits and logit gradients (math in fp32,
// gates in fp32) against the double-precision SPEC reference and the CPU back end: every
// estimator, k in {1, 2, 4}, E in {1, 7, 8, 64, 100, 128, 256, 1000}, strided and contiguous.
#include <utility>

#include "routing_check.cuh"

namespace {

using namespace routegrad;
using routegrad::test::gpu::check_case;

template <class Est, class T>
void sweep(std::uint64_t seed) {
  for (index_t E : {1, 7, 8, 64, 100, 128, 256, 1000})
    for (int k : {1, 2, 4}) {
      if (k > E) continue;
      const bool strided = (seed & 1) != 0;
      const routing_mode mode = (seed % 3 == 0) ? routing_mode::eval : routing_mode::train;
      check_case<Est, T>(
          {555, E, k, strided, mode, (seed % 4) == 1, (seed % 5 < 2) ? 0.05 : 0.0, 0.0}, seed++);
    }
}

}  // namespace

TEST_CASE_TEMPLATE("cuda routing low precision: SparseMixer's backward at 4 lanes x 32", T,
                   __nv_bfloat16, __half) {
  // lanes_for gives SparseMixer's backward of 2-byte logits at E = 65 ... 128 its own shape from
  // T = 12288 on (fp32 logits and the estimators that keep a row of weights: 8 x 16).
  using cuda::detail::lanes_for;
  using cuda::detail::shape_query_of;
  const auto backward_shape = [](const cuda::detail::shape_query& q, index_t rows, index_t cols) {
    const cuda::detail::lanes_shape s = lanes_for(rows, cols, true, q);
    return std::pair<int, int>{s.width, s.per_lane};
  };
  const std::pair<int, int> wide{4, 32}, narrow{8, 16};
  CHECK(backward_shape(shape_query_of<sparsemixer_midpoint, T>(), 12289, 128) == wide);
  CHECK(backward_shape(shape_query_of<sparsemixer_heun3, T>(), 12289, 65) == wide);
  CHECK(backward_shape(shape_query_of<sparsemixer_midpoint, T>(), 777, 128) == narrow);
  CHECK(backward_shape(shape_query_of<sparsemixer_midpoint, float>(), 12289, 128) == narrow);
  CHECK(backward_shape(shape_query_of<topk_softmax, T>(), 12289, 128) == narrow);
  CHECK(backward_shape(shape_query_of<switch_router, T>(), 12289, 128) == narrow);
  // Full rows and rows with idle steps, strided and contiguous, k past the slots in registers.
  check_case<sparsemixer_midpoint, T>(
      {12289, 128, 1, true, routing_mode::train, false, 0.05, 0.002}, 61);
  check_case<sparsemixer_heun3, T>({12289, 100, 2, false, routing_mode::train, true, 0.0, 0.0}, 62);
  check_case<sparsemixer_euler, T>({12289, 97, 4, true, routing_mode::eval, false, 0.05, 0.0}, 63);
  check_case<sparsemixer_midpoint, T>({12289, 128, 6, false, routing_mode::train, true, 0.0, 0.002},
                                      64);
}

TEST_CASE_TEMPLATE("cuda routing low precision: every estimator", T, __nv_bfloat16, __half) {
  sweep<switch_router, T>(11);
  sweep<topk_softmax, T>(22);
  sweep<sparsemixer_euler, T>(33);
  sweep<sparsemixer_midpoint, T>(44);
  sweep<sparsemixer_heun3, T>(55);
}
