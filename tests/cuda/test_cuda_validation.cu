// Bad input to the CUDA entry points: a status before any launch and nothing written; non-finite
// rows never produce an out-of-range index; T = 0.
#include "routing_check.cuh"

namespace {

using namespace routegrad;
using routegrad::test::gpu::device_buffer;

struct fixture {
  index_t T = 300, E = 16;
  int k = 2;
  std::vector<float> host_logits;
  device_buffer<float> logits;
  device_buffer<std::int32_t> experts;
  device_buffer<std::uint8_t> coins;
  device_buffer<float> gates;
  device_buffer<float> grad_gates;
  device_buffer<float> grad;
  fixture()
      : host_logits(static_cast<std::size_t>(300 * 16), 1.0f),
        logits(host_logits),
        experts(std::vector<std::int32_t>(600, -7)),
        coins(std::vector<std::uint8_t>(600, 0xEE)),
        gates(std::vector<float>(600, -3.0f)),
        grad_gates(std::vector<float>(600, 1.0f)),
        grad(std::vector<float>(300 * 16, -3.0f)) {}
  cuda::device_routing_state state() const {
    return {device_view<std::int32_t, 2>(experts.ptr, {T, k}),
            device_view<std::uint8_t, 2>(coins.ptr, {T, k}),
            {1, 2, 0}};
  }
  void require_untouched() const {
    for (std::int32_t x : experts.download()) REQUIRE(x == -7);
    for (std::uint8_t x : coins.download()) REQUIRE(x == 0xEE);
    for (float x : gates.download()) REQUIRE(x == -3.0f);
    for (float x : grad.download()) REQUIRE(x == -3.0f);
  }
};

}  // namespace

TEST_CASE("cuda validation: host pointers are rejected before any launch") {
  fixture f;
  routing_options opt;
  opt.k = f.k;
  // A host pointer disguised as a device view.
  const device_view<const float, 2> host_as_device(f.host_logits.data(), {f.T, f.E});
  const status s = route_forward<sparsemixer_heun3>(opt, host_as_device, f.state(),
                                                    device_view<float, 2>(f.gates.ptr, {f.T, f.k}));
  CHECK(s.code() == status_code::wrong_memory_space);
  CHECK(std::string(s.message()).find("logits") != std::string::npos);
  std::vector<float> host_grad(static_cast<std::size_t>(f.T * f.E), -3.0f);
  const status b = route_backward<sparsemixer_heun3>(
      opt, device_view<const float, 2>(f.logits.ptr, {f.T, f.E}), f.state(),
      device_view<const float, 2>(f.grad_gates.ptr, {f.T, f.k}),
      device_view<float, 2>(host_grad.data(), {f.T, f.E}));
  CHECK(b.code() == status_code::wrong_memory_space);
  CHECK(std::string(b.message()).find("grad_logits") != std::string::npos);
  for (float x : host_grad) REQUIRE(x == -3.0f);
  RG_CUDA_REQUIRE(cudaDeviceSynchronize());
  f.require_untouched();
}

TEST_CASE("cuda validation: shapes, k, eps, misalignment") {
  fixture f;
  routing_options opt;
  opt.k = f.E + 1;
  CHECK(route_forward<topk_softmax>(opt, device_view<const float, 2>(f.logits.ptr, {f.T, f.E}),
                                    f.state(), device_view<float, 2>(f.gates.ptr, {f.T, f.k}))
            .code() == status_code::invalid_argument);
  opt.k = f.k;
  opt.jitter_eps = 0.5;
  CHECK(route_forward<topk_softmax>(opt, device_view<const float, 2>(f.logits.ptr, {f.T, f.E}),
                                    f.state(), device_view<float, 2>(f.gates.ptr, {f.T, f.k}))
            .code() == status_code::invalid_argument);
  opt.jitter_eps = 0.1;
  CHECK(route_forward<topk_softmax>(opt, device_view<const float, 2>(f.logits.ptr, {f.T, f.E}),
                                    f.state(), device_view<float, 2>(f.gates.ptr, {f.T - 1, f.k}))
            .code() == status_code::invalid_shape);
  const float* odd =
      reinterpret_cast<const float*>(reinterpret_cast<const char*>(f.logits.ptr) + 2);
  CHECK(route_forward<topk_softmax>(opt, device_view<const float, 2>(odd, {f.T - 1, f.E}),
                                    {device_view<std::int32_t, 2>(f.experts.ptr, {f.T - 1, f.k}),
                                     device_view<std::uint8_t, 2>(f.coins.ptr, {f.T - 1, f.k}),
                                     {}},
                                    device_view<float, 2>(f.gates.ptr, {f.T - 1, f.k}))
            .code() == status_code::misaligned);
  RG_CUDA_REQUIRE(cudaDeviceSynchronize());
  f.require_untouched();
}

TEST_CASE("cuda validation: T = 0 does nothing and succeeds") {
  routing_options opt;
  const status s = route_forward<sparsemixer_euler>(
      opt, device_view<const float, 2>(nullptr, {0, 8}),
      cuda::device_routing_state{device_view<std::int32_t, 2>(nullptr, {0, 1}), {}, {}},
      device_view<float, 2>(nullptr, {0, 1}));
  CHECK(s.is_ok());
}

TEST_CASE("cuda nonfinite: NaN, +inf and all -inf rows route to experts 0..k-1 with gate 0") {
  const index_t T = 64, E = 40;
  const int k = 3;
  std::vector<float> z(static_cast<std::size_t>(T * E), 1.0f);
  for (index_t e = 0; e < E; ++e)
    z[static_cast<std::size_t>(e)] = 1.0f + 0.01f * static_cast<float>(e);
  z[static_cast<std::size_t>(1 * E + 5)] = std::nanf("");
  z[static_cast<std::size_t>(2 * E + 9)] = INFINITY;
  for (index_t e = 0; e < E; ++e) z[static_cast<std::size_t>(3 * E + e)] = -INFINITY;
  for (index_t e = 2; e < E; ++e)
    z[static_cast<std::size_t>(4 * E + e)] = -INFINITY;  // 2 finite < k
  device_buffer<float> logits(z);
  device_buffer<std::int32_t> experts(
      std::vector<std::int32_t>(static_cast<std::size_t>(T * k), -7));
  device_buffer<std::uint8_t> coins(
      std::vector<std::uint8_t>(static_cast<std::size_t>(T * k), 0xEE));
  device_buffer<float> gates(std::vector<float>(static_cast<std::size_t>(T * k), -3.0f));
  device_buffer<float> grad_gates(std::vector<float>(static_cast<std::size_t>(T * k), 1.0f));
  device_buffer<float> grad(std::vector<float>(static_cast<std::size_t>(T * E), -3.0f));
  device_buffer<std::int64_t> bad(std::vector<std::int64_t>(1, -1));
  routing_options opt;
  opt.k = k;
  opt.z_loss_coef = 0.01;
  const cuda::device_routing_state state{device_view<std::int32_t, 2>(experts.ptr, {T, k}),
                                         device_view<std::uint8_t, 2>(coins.ptr, {T, k}),
                                         {3, 0, 0}};
  const cuda::device_routing_stats stats{nullptr, nullptr, nullptr, bad.ptr};
  REQUIRE(route_forward<sparsemixer_midpoint>(opt, device_view<const float, 2>(logits.ptr, {T, E}),
                                              state, device_view<float, 2>(gates.ptr, {T, k}),
                                              stats)
              .is_ok());
  REQUIRE(route_backward<sparsemixer_midpoint>(opt, device_view<const float, 2>(logits.ptr, {T, E}),
                                               state,
                                               device_view<const float, 2>(grad_gates.ptr, {T, k}),
                                               device_view<float, 2>(grad.ptr, {T, E}))
              .is_ok());
  RG_CUDA_REQUIRE(cudaDeviceSynchronize());
  const auto ex = experts.download();
  const auto g = gates.download();
  const auto dz = grad.download();
  for (std::int32_t x : ex) CHECK((x >= 0 && x < E));
  CHECK(bad.download()[0] == 4);  // rows 1, 2, 3 unroutable; row 4 incomplete
  for (index_t t : {1, 2, 3}) {
    for (int j = 0; j < k; ++j) {
      CHECK(ex[static_cast<std::size_t>(t * k + j)] == j);
      CHECK(g[static_cast<std::size_t>(t * k + j)] == 0.0f);
    }
    for (index_t e = 0; e < E; ++e) CHECK(dz[static_cast<std::size_t>(t * E + e)] == 0.0f);
  }
  // Row 4: two finite experts fill slots 0 and 1; slot 2 takes the lowest free expert, gate 0.
  CHECK(ex[static_cast<std::size_t>(4 * k + 2)] == 2);
  CHECK(g[static_cast<std::size_t>(4 * k + 2)] == 0.0f);
  for (float x : dz) CHECK(std::isfinite(x));
}
