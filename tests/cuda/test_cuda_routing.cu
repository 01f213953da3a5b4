// The CUDA routing entry points against the double-precision SPEC reference and the CPU back end:
// every estimator, k in {1, 2, 4}, E in {1, 7, 8, 64, 100, 128, 256, 1000}, T not a multiple of
// any block size, contiguous and strided, fp32 here (bf16 / fp16 in test_cuda_routing_lowp.cu).
#include "routing_check.cuh"

namespace {

using namespace routegrad;
using routegrad::test::gpu::case_spec;
using routegrad::test::gpu::check_case;

template <class Est, class T>
void sweep(std::uint64_t seed, bool wide) {
  const index_t widths_all[] = {1, 7, 8, 64, 100, 128, 256, 1000};
  const index_t widths_few[] = {7, 64, 256};
  const index_t* widths = wide ? widths_all : widths_few;
  const int n_widths = wide ? 8 : 3;
  for (int w = 0; w < n_widths; ++w)
    for (int k : {1, 2, 4}) {
      const index_t E = widths[w];
      if (k > E) continue;
      const bool strided = (seed & 1) != 0;
      const routing_mode mode = (seed % 3 == 0) ? routing_mode::eval : routing_mode::train;
      const bool renorm = (seed % 4) == 1;
      const double alpha = (seed % 5 < 2) ? 0.05 : 0.0;
      const double beta = (seed % 7 < 3) ? 0.002 : 0.0;
      check_case<Est, T>({777, E, k, strided, mode, renorm, alpha, beta}, seed++);
    }
}

}  // namespace

TEST_CASE("cuda routing fp32: switch") { sweep<switch_router, float>(100, true); }
TEST_CASE("cuda routing fp32: topk_softmax") { sweep<topk_softmax, float>(200, true); }
TEST_CASE("cuda routing fp32: sparsemixer euler") { sweep<sparsemixer_euler, float>(300, true); }
TEST_CASE("cuda routing fp32: sparsemixer midpoint") {
  sweep<sparsemixer_midpoint, float>(400, true);
}
TEST_CASE("cuda routing fp32: sparsemixer heun3") { sweep<sparsemixer_heun3, float>(500, true); }
TEST_CASE("cuda routing fp32: strided and contiguous, train and eval, every estimator") {
  for (bool strided : {false, true})
    for (routing_mode mode : {routing_mode::train, routing_mode::eval}) {
      check_case<sparsemixer_heun3, float>({1234, 100, 2, strided, mode, false, 0.0, 0.0}, 7);
      check_case<switch_router, float>({1234, 100, 2, strided, mode, true, 0.01, 0.001}, 8);
    }
}
TEST_CASE("cuda routing fp64: sparsemixer midpoint and topk_softmax") {
  sweep<sparsemixer_midpoint, double>(600, false);
  sweep<topk_softmax, double>(700, false);
}
