// Shared machinery of the CUDA routing tests: run the device forward and backward on random
// inputs (outputs poisoned), and compare with the double-precision SPEC reference for the choices
// and coins the GPU drew, and with the CPU back end's choices for the same seed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <routegrad/cuda.cuh>
#include <type_traits>
#include <vector>

#include "common/estimator_kinds.hpp"
#include "common/estimator_reference.hpp"
#include "routing_instances.cuh"

namespace routegrad::test::gpu {

namespace ref = routegrad::test::ref;

#define RG_CUDA_REQUIRE(x) REQUIRE_MESSAGE((x) == cudaSuccess, #x)

/// A device buffer holding a copy of a host vector.
template <class T>
struct device_buffer {
  T* ptr = nullptr;
  std::size_t n = 0;
  explicit device_buffer(const std::vector<T>& host) : n(host.size()) {
    RG_CUDA_REQUIRE(cudaMalloc(&ptr, std::max<std::size_t>(n, 1) * sizeof(T)));
    if (n) RG_CUDA_REQUIRE(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  ~device_buffer() { cudaFree(ptr); }
  std::vector<T> download() const {
    std::vector<T> host(n);
    if (n) RG_CUDA_REQUIRE(cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
};

template <class T>
double to_double(T x) {
  if constexpr (std::is_same_v<T, __half>)
    return static_cast<double>(__half2float(x));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return static_cast<double>(__bfloat162float(x));
  else
    return static_cast<double>(x);
}
template <class T>
T from_double(double x) {
  if constexpr (std::is_same_v<T, __half>)
    return __float2half_rn(static_cast<float>(x));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __float2bfloat16_rn(static_cast<float>(x));
  else
    return static_cast<T>(x);
}
template <class T>
T poison() {
  return from_double<T>(std::nan(""));
}

/// Relative tolerance of a value stored as T and computed in float.
template <class T>
double tolerance() {
  if constexpr (std::is_same_v<T, double>)
    return 1e-10;
  else if constexpr (std::is_same_v<T, float>)
    return 2e-5;
  else if constexpr (std::is_same_v<T, __half>)
    return 2e-3;
  else
    return 1.6e-2;  // bf16: 8 bits of mantissa
}

using routegrad::test::kind_of;
using routegrad::test::rule_of;

struct case_spec {
  index_t rows;
  index_t cols;
  int k;
  bool strided;  // logits and grad_logits with padded rows, state/gates column-major
  routing_mode mode;
  bool renormalize;
  double alpha;  // load-balancing coefficient
  double beta;   // z-loss coefficient
};

/// Runs one case and checks it. Returns the number of slots where CPU and GPU chose differently.
template <class Est, class T>
void check_case(const case_spec& c, std::uint64_t seed) {
  CAPTURE(c.rows);
  CAPTURE(c.cols);
  CAPTURE(c.k);
  CAPTURE(c.strided);
  CAPTURE(static_cast<int>(c.mode));
  CAPTURE(c.renormalize);
  const index_t T_rows = c.rows, E = c.cols;
  const int k = c.k;
  std::mt19937_64 gen(seed);
  // Logits: a cluster near 2 (several experts survive SparseMixer's mask) plus outliers.
  std::normal_distribution<double> near(2.0, 0.3), far(0.0, 2.0);
  std::uniform_real_distribution<double> pick(0.0, 1.0);
  const index_t ld = c.strided ? E + 5 : E;  // padded rows
  std::vector<T> logits(static_cast<std::size_t>(T_rows * ld + 1), from_double<T>(-123.0));
  for (index_t t = 0; t < T_rows; ++t)
    for (index_t e = 0; e < E; ++e)
      logits[static_cast<std::size_t>(t * ld + e)] =
          from_double<T>(pick(gen) < 0.7 ? near(gen) : far(gen));
  // State and gates: column-major when strided.
  const auto at_k = [&](index_t t, int j) -> std::size_t {
    return static_cast<std::size_t>(c.strided ? j * T_rows + t : t * k + j);
  };
  const index_t ks0 = c.strided ? 1 : k, ks1 = c.strided ? T_rows : 1;
  std::vector<float> grad_gates(static_cast<std::size_t>(T_rows * k));
  std::normal_distribution<double> normal(0.0, 1.0);
  for (float& g : grad_gates) g = static_cast<float>(normal(gen));

  device_buffer<T> d_logits(logits);
  device_buffer<std::int32_t> d_experts(
      std::vector<std::int32_t>(static_cast<std::size_t>(T_rows * k), -99));
  device_buffer<std::uint8_t> d_coins(
      std::vector<std::uint8_t>(static_cast<std::size_t>(T_rows * k), 0xEE));
  device_buffer<float> d_gates(
      std::vector<float>(static_cast<std::size_t>(T_rows * k), std::nanf("")));
  device_buffer<float> d_grad_gates(grad_gates);
  device_buffer<T> d_grad(std::vector<T>(static_cast<std::size_t>(T_rows * ld + 1), poison<T>()));
  device_buffer<std::int64_t> d_counts(std::vector<std::int64_t>(static_cast<std::size_t>(E), -5));
  device_buffer<double> d_losses(std::vector<double>(2, -1.0));
  device_buffer<std::int64_t> d_bad(std::vector<std::int64_t>(1, -5));

  routing_options opt;
  opt.k = k;
  opt.mode = c.mode;
  opt.renormalize = c.renormalize;
  opt.load_balance_coef = c.alpha;
  opt.z_loss_coef = c.beta;
  const rng_stream rng{seed, 17, 1000};
  const device_view<const T, 2> z(d_logits.ptr, {T_rows, E}, {ld, 1});
  const cuda::device_routing_state state{
      device_view<std::int32_t, 2>(d_experts.ptr, {T_rows, k}, {ks0, ks1}),
      device_view<std::uint8_t, 2>(d_coins.ptr, {T_rows, k}, {ks0, ks1}), rng};
  const cuda::device_routing_stats stats{d_counts.ptr, d_losses.ptr, d_losses.ptr + 1, d_bad.ptr};
  cudaStream_t stream = nullptr;
  RG_CUDA_REQUIRE(cudaStreamCreate(&stream));
  const cuda::execution exec{stream, nullptr, 0};
  REQUIRE(route_forward<Est>(opt, z, state,
                             device_view<float, 2>(d_gates.ptr, {T_rows, k}, {ks0, ks1}), stats,
                             exec)
              .is_ok());
  REQUIRE(route_backward<Est>(
              opt, z, state, device_view<const float, 2>(d_grad_gates.ptr, {T_rows, k}, {ks0, ks1}),
              device_view<T, 2>(d_grad.ptr, {T_rows, E}, {ld, 1}), grad_mode::overwrite, stats,
              exec)
              .is_ok());
  RG_CUDA_REQUIRE(cudaStreamSynchronize(stream));
  RG_CUDA_REQUIRE(cudaGetLastError());

  const std::vector<std::int32_t> experts = d_experts.download();
  const std::vector<std::uint8_t> coins = d_coins.download();
  const std::vector<float> gates = d_gates.download();
  const std::vector<T> grad = d_grad.download();
  const std::vector<std::int64_t> counts = d_counts.download();
  const std::vector<double> losses = d_losses.download();
  CHECK(d_bad.download()[0] == 0);

  // Padding of the gradient rows is never written.
  for (index_t t = 0; t < T_rows; ++t)
    for (index_t e = E; e < ld; ++e)
      CHECK(std::isnan(to_double(grad[static_cast<std::size_t>(t * ld + e)])));

  const double tol = tolerance<T>();
  index_t boundary = 0;  // tokens whose float mask or order disagrees with double (rounding)
  std::vector<int> all_chosen;
  for (index_t t = 0; t < T_rows; ++t)
    for (int j = 0; j < k; ++j) all_chosen.push_back(experts[at_k(t, j)]);
  ref::vec dense_logits;
  for (index_t t = 0; t < T_rows; ++t)
    for (index_t e = 0; e < E; ++e)
      dense_logits.push_back(to_double(logits[static_cast<std::size_t>(t * ld + e)]));
  const ref::loss_and_grad lb = ref::load_balancing_loss(
      dense_logits, static_cast<int>(T_rows), static_cast<int>(E), all_chosen, k, c.alpha);
  const ref::loss_and_grad zl =
      ref::z_loss(dense_logits, static_cast<int>(T_rows), static_cast<int>(E), c.beta);
  if (c.alpha != 0.0) CHECK(losses[0] == doctest::Approx(lb.value).epsilon(1e-5));
  if (c.beta != 0.0) CHECK(losses[1] == doctest::Approx(zl.value).epsilon(1e-5));

  // The CPU back end draws the same experts for the same seed (up to near-ties in rounding).
  {
    using H = std::conditional_t<std::is_same_v<T, double>, double, float>;
    std::vector<H> host_logits(static_cast<std::size_t>(T_rows * E));
    for (std::size_t i = 0; i < host_logits.size(); ++i)
      host_logits[i] = static_cast<H>(dense_logits[i]);
    std::vector<std::int32_t> cpu_experts(static_cast<std::size_t>(T_rows * k));
    std::vector<std::uint8_t> cpu_coins(cpu_experts.size());
    std::vector<float> cpu_gates(cpu_experts.size());
    REQUIRE(route_forward<Est>(opt, host_matrix<const H>(host_logits.data(), T_rows, E),
                               host_routing_state{host_matrix(cpu_experts.data(), T_rows, k),
                                                  host_matrix(cpu_coins.data(), T_rows, k), rng},
                               host_matrix(cpu_gates.data(), T_rows, k))
                .is_ok());
    index_t same = 0;
    for (index_t t = 0; t < T_rows; ++t)
      for (int j = 0; j < k; ++j)
        same += cpu_experts[static_cast<std::size_t>(t * k + j)] == experts[at_k(t, j)] &&
                cpu_coins[static_cast<std::size_t>(t * k + j)] == coins[at_k(t, j)];
    CHECK(static_cast<double>(same) >= 0.9999 * static_cast<double>(T_rows * k) - 1.0);
  }
  for (index_t t = 0; t < T_rows; ++t) {
    ref::token_args a;
    a.estimator = kind_of<Est>();
    a.r = rule_of<Est>();
    a.k = k;
    a.eps = opt.jitter_eps;
    a.renormalize = c.renormalize;
    for (index_t e = 0; e < E; ++e)
      a.z.push_back(to_double(logits[static_cast<std::size_t>(t * ld + e)]));
    if (Est::noisy && c.mode == routing_mode::train)
      for (index_t e = 0; e < E; ++e)
        a.noise.push_back(static_cast<double>(switch_noise<float>(rng, t, e, 0.1f)));
    bool in_range = true;
    for (int j = 0; j < k; ++j) {
      const int d = experts[at_k(t, j)];
      in_range = in_range && d >= 0 && d < E;
      const int coin = coins[at_k(t, j)];
      in_range = in_range && coin <= Est::rule::num_nodes;
      a.chosen.push_back(d);
      a.scales.push_back(coin == 0 ? 1.0 : Est::rule::scale(coin - 1));
    }
    REQUIRE(in_range);
    const ref::token_forward fw = ref::forward(a);
    bool consistent = true;
    for (int j = 0; j < k; ++j) {
      const std::size_t sj = static_cast<std::size_t>(j);
      if (!fw.slots[sj].cand[static_cast<std::size_t>(a.chosen[sj])]) consistent = false;
      if (!Est::sampled || c.mode == routing_mode::eval)
        if (a.chosen[sj] !=
            (Est::per_slot_softmax ? fw.slots[sj].argmax : ref::top_k(fw.slots[0].pi, k)[sj]))
          consistent = false;
    }
    if (!consistent) {
      ++boundary;
      continue;
    }
    for (int j = 0; j < k; ++j)
      CHECK(static_cast<double>(gates[at_k(t, j)]) ==
            doctest::Approx(fw.gates[static_cast<std::size_t>(j)]).epsilon(2e-5).scale(1.0));
    ref::vec G;
    for (int j = 0; j < k; ++j) G.push_back(static_cast<double>(grad_gates[at_k(t, j)]));
    const ref::vec dz = ref::backward(a, G);
    for (index_t e = 0; e < E; ++e)
      CHECK(to_double(grad[static_cast<std::size_t>(t * ld + e)]) ==
            doctest::Approx(dz[static_cast<std::size_t>(e)] +
                            lb.grad[static_cast<std::size_t>(t * E + e)] +
                            zl.grad[static_cast<std::size_t>(t * E + e)])
                .epsilon(tol)
                .scale(1.0));
  }
  CHECK(boundary <= 1 + T_rows * k / 10000);

  // Counts: every slot of a routable row is counted.
  for (index_t e = 0; e < E; ++e) {
    std::int64_t expect = 0;
    for (int d : all_chosen) expect += d == e;
    CHECK(counts[static_cast<std::size_t>(e)] == expect);
  }
  cudaStreamDestroy(stream);

  // Bitwise reproducible: a second run gives the same bytes.
  device_buffer<float> d_gates2(std::vector<float>(static_cast<std::size_t>(T_rows * k), 0.0f));
  device_buffer<T> d_grad2(std::vector<T>(static_cast<std::size_t>(T_rows * ld + 1), poison<T>()));
  device_buffer<double> d_losses2(std::vector<double>(2, 0.0));
  const cuda::device_routing_stats stats2{d_counts.ptr, d_losses2.ptr, d_losses2.ptr + 1, nullptr};
  REQUIRE(route_forward<Est>(opt, z, state,
                             device_view<float, 2>(d_gates2.ptr, {T_rows, k}, {ks0, ks1}), stats2)
              .is_ok());
  REQUIRE(route_backward<Est>(
              opt, z, state, device_view<const float, 2>(d_grad_gates.ptr, {T_rows, k}, {ks0, ks1}),
              device_view<T, 2>(d_grad2.ptr, {T_rows, E}, {ld, 1}), grad_mode::overwrite, stats2)
              .is_ok());
  RG_CUDA_REQUIRE(cudaDeviceSynchronize());
  const std::vector<float> gates2 = d_gates2.download();
  const std::vector<T> grad2 = d_grad2.download();
  const std::vector<double> losses2 = d_losses2.download();
  CHECK(std::memcmp(gates.data(), gates2.data(), gates.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(grad.data(), grad2.data(), grad.size() * sizeof(T)) == 0);
  CHECK(std::memcmp(losses.data(), losses2.data(), 2 * sizeof(double)) == 0);

  // Accumulate: every gradient element becomes its old value plus this call's gradient (exactly in
  // fp32 / fp64, where the overwritten gradient is the value added; else to the storage rounding).
  std::vector<T> base(static_cast<std::size_t>(T_rows * ld + 1), poison<T>());
  for (index_t t = 0; t < T_rows; ++t)
    for (index_t e = 0; e < E; ++e)
      base[static_cast<std::size_t>(t * ld + e)] = from_double<T>(normal(gen));
  device_buffer<T> d_grad3(base);
  REQUIRE(route_backward<Est>(
              opt, z, state, device_view<const float, 2>(d_grad_gates.ptr, {T_rows, k}, {ks0, ks1}),
              device_view<T, 2>(d_grad3.ptr, {T_rows, E}, {ld, 1}), grad_mode::accumulate, stats2)
              .is_ok());
  RG_CUDA_REQUIRE(cudaDeviceSynchronize());
  const std::vector<T> grad3 = d_grad3.download();
  constexpr bool exact = std::is_same_v<T, float> || std::is_same_v<T, double>;
  index_t wrong = 0;
  for (index_t t = 0; t < T_rows; ++t)
    for (index_t e = 0; e < ld; ++e) {
      const std::size_t i = static_cast<std::size_t>(t * ld + e);
      const double got = to_double(grad3[i]), b = to_double(base[i]), g = to_double(grad[i]);
      bool ok = false;
      if (e >= E)
        ok = std::isnan(got);  // padding untouched
      else if constexpr (exact)
        ok = grad3[i] == static_cast<T>(base[i] + grad[i]);
      else
        ok = std::abs(got - (b + g)) <= tol * (1.0 + std::abs(b) + std::abs(g));
      if (!ok && ++wrong <= 5)
        FAIL_CHECK("accumulate: t = " << t << ", e = " << e << ": " << b << " + " << g << " -> "
                                      << got);
    }
  CHECK(wrong == 0);
}

}  // namespace routegrad::test::gpu
