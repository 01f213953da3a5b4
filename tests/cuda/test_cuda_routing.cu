// The CUDA routing entry points against the double-precision SPEC reference and the CPU back end:
// every estimator, k in {1, 2, 4}, E in {1, 7, 8, 64, 100, 128, 256, 1000}, T not a multiple of
// any block size (and every launch shape lanes_for picks), contiguous and strided, fp32
// here (bf16 / fp16 in test_cuda_routing_lowp.cu).
#include <algorithm>

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
TEST_CASE("cuda routing fp32: every launch shape") {
  // lanes_for (cuda/routing.cuh) picks the lanes per token by E, T, direction, the estimator and
  // the logits' type (2-byte logits: test_cuda_routing_lowp.cu); each shape is its own kernel
  // (bound checks, unrolling, shared-memory layout). One batch per shape pair, sized just past the
  // T thresholds, estimators rotating.
  using cuda::detail::lanes_shape;
  enum estimator_kind { by_midpoint, by_heun3, by_switch, by_euler, by_topk };
  struct shape_case {
    index_t rows, cols;
    estimator_kind estimator;
    lanes_shape forward, backward;
  };
  const shape_case cases[] = {
      {777, 7, by_midpoint, {8, 1}, {8, 1}},   {12289, 8, by_heun3, {4, 2}, {4, 2}},
      {24577, 8, by_switch, {1, 8}, {4, 2}},   {49153, 7, by_euler, {1, 8}, {2, 4}},
      {777, 16, by_topk, {8, 2}, {8, 2}},      {12289, 13, by_midpoint, {4, 4}, {4, 4}},
      {49153, 16, by_heun3, {2, 8}, {4, 4}},   {98305, 16, by_midpoint, {1, 16}, {4, 4}},
      {98305, 15, by_switch, {2, 8}, {2, 8}},  {777, 20, by_euler, {8, 4}, {8, 4}},
      {12289, 32, by_topk, {4, 8}, {4, 8}},    {777, 64, by_midpoint, {8, 8}, {8, 8}},
      {12289, 50, by_heun3, {4, 16}, {4, 16}}, {12289, 64, by_midpoint, {4, 16}, {4, 16}},
      {777, 128, by_switch, {4, 32}, {8, 16}}, {777, 256, by_euler, {32, 8}, {32, 8}},
      {300, 257, by_topk, {32, 0}, {32, 0}},
  };
  const auto query_of = [](estimator_kind e) {
    using cuda::detail::shape_query_of;
    switch (e) {
      case by_midpoint:
        return shape_query_of<sparsemixer_midpoint, float>();
      case by_heun3:
        return shape_query_of<sparsemixer_heun3, float>();
      case by_switch:
        return shape_query_of<switch_router, float>();
      case by_euler:
        return shape_query_of<sparsemixer_euler, float>();
      case by_topk:
        break;
    }
    return shape_query_of<topk_softmax, float>();
  };
  std::uint64_t seed = 930;
  for (const shape_case& c : cases) {
    CAPTURE(c.rows);
    CAPTURE(c.cols);
    const cuda::detail::shape_query query = query_of(c.estimator);
    const lanes_shape forward = cuda::detail::lanes_for(c.rows, c.cols, false, query);
    const lanes_shape backward = cuda::detail::lanes_for(c.rows, c.cols, true, query);
    CHECK(forward.width == c.forward.width);
    CHECK(forward.per_lane == c.forward.per_lane);
    CHECK(backward.width == c.backward.width);
    CHECK(backward.per_lane == c.backward.per_lane);
    const int k = static_cast<int>(seed % 3 == 0 ? 1 : seed % 3 == 1 ? 2 : 4);
    const bool strided = (seed & 1) != 0;
    const routing_mode mode = seed % 5 == 4 ? routing_mode::eval : routing_mode::train;
    const double alpha = seed % 2 == 0 ? 0.05 : 0.0, beta = seed % 3 == 0 ? 0.002 : 0.0;
    const case_spec spec{c.rows, c.cols, k, strided, mode, seed % 2 == 1, alpha, beta};
    switch (c.estimator) {
      case by_midpoint:
        check_case<sparsemixer_midpoint, float>(spec, seed);
        break;
      case by_heun3:
        check_case<sparsemixer_heun3, float>(spec, seed);
        break;
      case by_switch:
        check_case<switch_router, float>(spec, seed);
        break;
      case by_euler:
        check_case<sparsemixer_euler, float>(spec, seed);
        break;
      case by_topk:
        check_case<topk_softmax, float>(spec, seed);
        break;
    }
    ++seed;
  }
}
TEST_CASE("cuda routing fp32: k beyond the slots kept in registers") {
  // The kernels keep the first cuda::detail::register_slots choices of a token in registers and
  // read later ones back from the caller's buffers.
  static_assert(cuda::detail::register_slots < 6, "k = 6 must exceed the register slots");
  check_case<sparsemixer_heun3, float>({777, 64, 6, true, routing_mode::train, true, 0.05, 0.002},
                                       910);
  check_case<switch_router, float>({1234, 100, 6, false, routing_mode::train, false, 0.0, 0.0},
                                   911);
  check_case<sparsemixer_euler, float>({40000, 8, 6, false, routing_mode::train, false, 0.0, 0.0},
                                       912);
  check_case<topk_softmax, float>({300, 256, 6, true, routing_mode::eval, true, 0.05, 0.0}, 913);
}
TEST_CASE("cuda routing fp32: rows of more than 32 steps per lane (E = 1500)") {
  // 32 lanes per token and 47 steps each: the inverse CDF scans every step and the taken-expert
  // test compares expert indices (the bit masks cover rows of at most 32 steps).
  check_case<sparsemixer_midpoint, float>(
      {301, 1500, 2, false, routing_mode::train, false, 0.05, 0.002}, 920);
  check_case<sparsemixer_heun3, float>({257, 1500, 4, true, routing_mode::train, true, 0.0, 0.0},
                                       921);
  check_case<topk_softmax, float>({123, 1500, 2, false, routing_mode::eval, false, 0.0, 0.0}, 922);
}
TEST_CASE("cuda routing: a gradient type wider than the logits' (float logits, double gradient)") {
  // The gradient is computed in float either way: written as double it must be the float
  // gradient exactly (a contiguous row whose output pieces are wider than the math type's).
  using routegrad::test::gpu::device_buffer;
  const index_t T = 1000, E = 64;
  const int k = 2;
  std::mt19937_64 gen(31);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> logits(static_cast<std::size_t>(T * E)),
      grad_gates(static_cast<std::size_t>(T * k));
  for (float& x : logits) x = normal(gen);
  for (float& x : grad_gates) x = normal(gen);
  device_buffer<float> d_logits(logits), d_grad_gates(grad_gates);
  device_buffer<float> d_gates(std::vector<float>(grad_gates.size(), 0.0f));
  device_buffer<std::int32_t> d_experts(std::vector<std::int32_t>(grad_gates.size(), -1));
  device_buffer<std::uint8_t> d_coins(std::vector<std::uint8_t>(grad_gates.size(), 0));
  device_buffer<float> d_grad_f(std::vector<float>(logits.size(), std::nanf("")));
  device_buffer<double> d_grad_d(std::vector<double>(logits.size(), std::nan("")));
  routing_options opt;
  opt.k = k;
  const device_view<const float, 2> z(d_logits.ptr, {T, E});
  const cuda::device_routing_state state{device_view<std::int32_t, 2>(d_experts.ptr, {T, k}),
                                         device_view<std::uint8_t, 2>(d_coins.ptr, {T, k}),
                                         {5, 1, 0}};
  const device_view<const float, 2> gg(d_grad_gates.ptr, {T, k});
  REQUIRE(
      route_forward<sparsemixer_heun3>(opt, z, state, device_view<float, 2>(d_gates.ptr, {T, k}))
          .is_ok());
  REQUIRE(route_backward<sparsemixer_heun3>(opt, z, state, gg,
                                            device_view<float, 2>(d_grad_f.ptr, {T, E}))
              .is_ok());
  REQUIRE(route_backward<sparsemixer_heun3>(opt, z, state, gg,
                                            device_view<double, 2>(d_grad_d.ptr, {T, E}))
              .is_ok());
  RG_CUDA_REQUIRE(cudaDeviceSynchronize());
  const std::vector<float> as_float = d_grad_f.download();
  const std::vector<double> as_double = d_grad_d.download();
  std::size_t differ = 0;
  for (std::size_t i = 0; i < as_float.size(); ++i)
    differ += !(as_double[i] == static_cast<double>(as_float[i]));
  CHECK(differ == 0);
}
TEST_CASE("cuda routing fp32: a chosen expert whose fast-exp weight underflows keeps its δ term") {
  // SparseMixer's sparse backward (rows of ≥ 16 steps per lane) visits the positive weights
  // alone. A chosen expert 90 below a max of 10^4 is a candidate (90 / 10^4 < 2ε), its π_D is
  // subnormal (exp(−90) ≈ 8e−40), and the GPU's flushing ex2.approx gives it weight 0: the δ
  // term of the Jacobian, coef = w·G·π_D, must still be written there. G = 10^30 makes it 8e−10.
  using routegrad::test::gpu::device_buffer;
  const index_t T = 40, E = 128;  // the backward's shape: 8 lanes × 16 steps (sparse)
  const int chosen = 77;
  std::vector<float> logits(static_cast<std::size_t>(T * E), 0.0f);
  for (index_t t = 0; t < T; ++t) {
    logits[static_cast<std::size_t>(t * E + t % 5)] = 1e4f;
    logits[static_cast<std::size_t>(t * E + chosen)] = 1e4f - 90.0f;
  }
  std::vector<std::int32_t> experts(static_cast<std::size_t>(T), chosen);
  std::vector<std::uint8_t> coins(static_cast<std::size_t>(T), 0);
  std::vector<float> grad_gates(static_cast<std::size_t>(T), 1e30f);
  routing_options opt;
  opt.k = 1;
  opt.jitter_eps = 0.01;
  device_buffer<float> d_logits(logits), d_grad_gates(grad_gates);
  device_buffer<std::int32_t> d_experts(experts);
  device_buffer<std::uint8_t> d_coins(coins);
  device_buffer<float> d_grad(std::vector<float>(logits.size(), std::nanf("")));
  const cuda::device_routing_state state{device_view<std::int32_t, 2>(d_experts.ptr, {T, 1}),
                                         device_view<std::uint8_t, 2>(d_coins.ptr, {T, 1}),
                                         {5, 1, 0}};
  REQUIRE(route_backward<sparsemixer_midpoint>(
              opt, device_view<const float, 2>(d_logits.ptr, {T, E}), state,
              device_view<const float, 2>(d_grad_gates.ptr, {T, 1}),
              device_view<float, 2>(d_grad.ptr, {T, E}))
              .is_ok());
  RG_CUDA_REQUIRE(cudaDeviceSynchronize());
  const std::vector<float> grad = d_grad.download();
  std::vector<float> cpu(logits.size(), std::nanf(""));
  REQUIRE(route_backward<sparsemixer_midpoint>(
              opt, host_matrix<const float>(logits.data(), T, E),
              host_routing_state{
                  host_matrix(experts.data(), T, 1), host_matrix(coins.data(), T, 1), {5, 1, 0}},
              host_matrix<const float>(grad_gates.data(), T, 1), host_matrix(cpu.data(), T, E))
              .is_ok());
  for (index_t t = 0; t < T; ++t) {
    CAPTURE(t);
    const float expect = cpu[static_cast<std::size_t>(t * E + chosen)];
    REQUIRE(expect > 1e-10f);  // the CPU's exact exp keeps π_D and the weight
    CHECK(grad[static_cast<std::size_t>(t * E + chosen)] == doctest::Approx(expect).epsilon(1e-3));
    for (index_t e = 0; e < E; ++e)
      if (e != chosen)
        CHECK(std::abs(grad[static_cast<std::size_t>(t * E + e)] -
                       cpu[static_cast<std::size_t>(t * E + e)]) <= 1e-3f * expect);
  }
}

namespace {

/// SparseMixer midpoint's forward and backward on float logits [T, E], on the GPU and on the CPU
/// with the same options and stream; each side's backward uses its own choices.
struct both_sides {
  std::vector<std::int32_t> experts, cpu_experts;
  std::vector<std::uint8_t> coins, cpu_coins;
  std::vector<float> gates, cpu_gates, grad, cpu_grad;
};

both_sides midpoint_on_both(const routing_options& opt, const std::vector<float>& logits,
                            const std::vector<float>& grad_gates, index_t T, index_t E,
                            const rng_stream& rng) {
  using routegrad::test::gpu::device_buffer;
  using Est = sparsemixer_midpoint;
  const index_t k = opt.k;
  const auto n = static_cast<std::size_t>(T * k);
  device_buffer<float> d_logits(logits), d_grad_gates(grad_gates);
  device_buffer<std::int32_t> d_experts(std::vector<std::int32_t>(n, -9));
  device_buffer<std::uint8_t> d_coins(std::vector<std::uint8_t>(n, 0xEE));
  device_buffer<float> d_gates(std::vector<float>(n, std::nanf("")));
  device_buffer<float> d_grad(std::vector<float>(logits.size(), std::nanf("")));
  const cuda::device_routing_state state{device_view<std::int32_t, 2>(d_experts.ptr, {T, k}),
                                         device_view<std::uint8_t, 2>(d_coins.ptr, {T, k}), rng};
  const device_view<const float, 2> z(d_logits.ptr, {T, E});
  REQUIRE(route_forward<Est>(opt, z, state, device_view<float, 2>(d_gates.ptr, {T, k})).is_ok());
  REQUIRE(route_backward<Est>(opt, z, state, device_view<const float, 2>(d_grad_gates.ptr, {T, k}),
                              device_view<float, 2>(d_grad.ptr, {T, E}))
              .is_ok());
  RG_CUDA_REQUIRE(cudaDeviceSynchronize());
  both_sides r{d_experts.download(), std::vector<std::int32_t>(n, -9),
               d_coins.download(),   std::vector<std::uint8_t>(n, 0xEE),
               d_gates.download(),   std::vector<float>(n, std::nanf("")),
               d_grad.download(),    std::vector<float>(logits.size(), std::nanf(""))};
  const host_routing_state cpu_state{host_matrix(r.cpu_experts.data(), T, k),
                                     host_matrix(r.cpu_coins.data(), T, k), rng};
  const auto host_z = host_matrix<const float>(logits.data(), T, E);
  REQUIRE(
      route_forward<Est>(opt, host_z, cpu_state, host_matrix(r.cpu_gates.data(), T, k)).is_ok());
  REQUIRE(route_backward<Est>(opt, host_z, cpu_state,
                              host_matrix<const float>(grad_gates.data(), T, k),
                              host_matrix(r.cpu_grad.data(), T, E))
              .is_ok());
  return r;
}

/// Tokens whose every slot has the CPU's expert and coin; for those, gates and gradients agree
/// within float tolerance (the GPU's fast exp against the CPU's exp).
index_t agreeing_tokens(const both_sides& r, index_t T, index_t E, int k) {
  index_t same_rows = 0;
  for (index_t t = 0; t < T; ++t) {
    CAPTURE(t);
    bool same = true;
    for (int j = 0; j < k; ++j) {
      const auto i = static_cast<std::size_t>(t * k + j);
      same = same && r.experts[i] == r.cpu_experts[i] && r.coins[i] == r.cpu_coins[i];
    }
    if (!same) continue;  // (a draw at a near-tie of the running sums)
    ++same_rows;
    for (int j = 0; j < k; ++j) {
      const auto i = static_cast<std::size_t>(t * k + j);
      CHECK(r.gates[i] == doctest::Approx(r.cpu_gates[i]).epsilon(2e-5));
    }
    for (index_t e = 0; e < E; ++e) {
      const auto i = static_cast<std::size_t>(t * E + e);
      CHECK(r.grad[i] == doctest::Approx(r.cpu_grad[i]).epsilon(2e-5).scale(1.0));
    }
  }
  return same_rows;
}

}  // namespace

TEST_CASE("cuda routing fp32: ties at a slot's max go to the lowest index, as on the CPU") {
  // Logits on a grid of 17 levels: a row of E ≥ 64 holds several copies of its max. Where
  // SparseMixer's sparse form runs (E = 64, 128), the forward finds the max alone and takes the
  // slot's argmax from its candidates; the argmax must still be the lowest index holding it (eval:
  // the choice itself; train: whether a coin is drawn), exactly as the CPU's keep_larger pass.
  const index_t T = 333;
  for (const index_t E : {64, 128, 256, 1000})
    for (const int k : {1, 3})
      for (const routing_mode mode : {routing_mode::eval, routing_mode::train}) {
        CAPTURE(E);
        CAPTURE(k);
        CAPTURE(static_cast<int>(mode));
        std::mt19937_64 gen(static_cast<std::uint64_t>(E * 10 + k));
        std::uniform_int_distribution<int> level(0, 16);
        std::normal_distribution<float> normal(0.0f, 1.0f);
        std::vector<float> logits(static_cast<std::size_t>(T * E));
        for (float& z : logits) z = static_cast<float>(level(gen)) / 8.0f;
        std::vector<float> grad_gates(static_cast<std::size_t>(T * k));
        for (float& g : grad_gates) g = normal(gen);
        int ties = 0;  // rows whose max appears more than once (the case under test)
        for (index_t t = 0; t < T; ++t) {
          const float* row = logits.data() + t * E;
          ties += std::count(row, row + E, *std::max_element(row, row + E)) > 1;
        }
        CHECK(ties > T / 2);
        routing_options opt;
        opt.k = k;
        opt.mode = mode;
        const both_sides r = midpoint_on_both(opt, logits, grad_gates, T, E, {0x7135ull, 3, 0});
        const index_t same = agreeing_tokens(r, T, E, k);
        // Eval mode has no draw: every token the same. Train mode: the draws' running sums of
        // fast-exp weights may cross a target on one side only (near-ties), rarely.
        if (mode == routing_mode::eval)
          CHECK(same == T);
        else
          CHECK(static_cast<double>(same) >= 0.98 * static_cast<double>(T));
      }
}

TEST_CASE("cuda routing fp32: a logit inside the jitter mask's margin takes the exact test") {
  // One logit per row sits just under the mask's threshold τ, inside the margin where the quick
  // comparison cannot decide: the exact (quotient) test masks it. The sparse form then redoes the
  // lane's marks exactly — in the forward at E = 64 and 128 without a row of weights (they are
  // recomputed by the draw), in the backward through its weights row. A kept band element would
  // add exp(τ − m) ≈ 0.55 to the softmax's normaliser: gates and gradients would not match the CPU.
  const index_t T = 257;
  const float m = 3.0f;
  const float two_eps = 0.2f;
  float x = m * (1.0f - two_eps);
  while (!jitter_masked(x, m, two_eps)) x = std::nextafter(x, -INFINITY);
  REQUIRE(jitter_mask_test<float>(m, two_eps).has_quick());
  bool unsure = false;
  (void)jitter_mask_test<float>(m, two_eps).quick(x, unsure);
  REQUIRE(unsure);  // the case under test: quick() cannot decide x
  for (const index_t E : {64, 128, 256})
    for (const routing_mode mode : {routing_mode::train, routing_mode::eval}) {
      CAPTURE(E);
      CAPTURE(static_cast<int>(mode));
      const int k = 2;
      std::mt19937_64 gen(static_cast<std::uint64_t>(E));
      std::uniform_real_distribution<float> below(m - 0.55f, m - 0.01f), far(-4.0f, 2.0f);
      std::uniform_int_distribution<int> where(0, static_cast<int>(E) - 1);
      std::vector<float> logits(static_cast<std::size_t>(T * E));
      for (index_t t = 0; t < T; ++t) {
        float* row = logits.data() + t * E;
        for (index_t e = 0; e < E; ++e) row[e] = far(gen);
        for (int c = 0; c < 3; ++c) row[where(gen)] = below(gen);  // a few candidates
        row[where(gen)] = x;                                       // inside the margin
        row[(t * 7) % E] = m;                                      // the max
      }
      std::normal_distribution<float> normal(0.0f, 1.0f);
      std::vector<float> grad_gates(static_cast<std::size_t>(T * k));
      for (float& g : grad_gates) g = normal(gen);
      routing_options opt;
      opt.k = k;
      opt.mode = mode;
      opt.jitter_eps = two_eps / 2;
      const both_sides r = midpoint_on_both(opt, logits, grad_gates, T, E, {0xBA2Dull, 5, 0});
      CHECK(static_cast<double>(agreeing_tokens(r, T, E, k)) >= 0.98 * static_cast<double>(T));
    }
}
