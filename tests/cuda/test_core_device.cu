// The core and estimator headers compiled by nvcc: the per-token rules run in a kernel (one
// thread per token, serial lanes) and must reproduce the CPU back end exactly on the same inputs.
// Compiling this file is itself the check that the shared headers are device-clean; running it
// needs a GPU (the test main reports "skipped" without one).
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <routegrad/routegrad.hpp>
#include <vector>

namespace {

using namespace routegrad;

struct device_row {
  const float* data;
  index_t n;
  ROUTEGRAD_HD index_t size() const { return n; }
  ROUTEGRAD_HD float clean(index_t i) const { return data[i]; }
  ROUTEGRAD_HD float logit(index_t i) const { return data[i]; }
};

struct device_slots {
  std::int32_t* experts;
  std::uint8_t* coins;
  float* gates;
  ROUTEGRAD_HD index_t expert(int j) const { return experts[j]; }
  ROUTEGRAD_HD void record(int j, index_t e, float g, int c) {
    experts[j] = static_cast<std::int32_t>(e);
    gates[j] = g;
    coins[j] = static_cast<std::uint8_t>(c);
  }
  ROUTEGRAD_HD float gate(int j) const { return gates[j]; }
  ROUTEGRAD_HD void set_gate(int j, float g) { gates[j] = g; }
};

template <class Est>
__global__ void forward_kernel(const float* logits, index_t T, index_t E, int k, rng_stream rng,
                               std::int32_t* experts, std::uint8_t* coins, float* gates) {
  const index_t t = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x;
  if (t >= T) return;
  const device_row row{logits + t * E, E};
  device_slots slots{experts + t * k, coins + t * k, gates + t * k};
  const token_params<float> p{k, true, 0.1f, false};
  float weights[16];  // E ≤ 16 here
  token_forward<Est, float>(serial_lanes{}, row, slots, weights, p, rng, t);
}

/// The jitter mask on the device, three ways, for probe i: the quotient test (jitter_masked), the
/// threshold test (jitter_mask_test, τ by the GPU's fast division) and its quick() (bit 2: unsure).
__global__ void mask_kernel(const float* m, const float* two_eps, const float* z, int n,
                            std::uint8_t* out) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  const jitter_mask_test<float> test(m[i], two_eps[i]);
  bool unsure = false;
  const bool quick = test.quick(z[i], unsure);
  out[i] = static_cast<std::uint8_t>((jitter_masked(z[i], m[i], two_eps[i]) ? 1 : 0) |
                                     (test(z[i]) ? 2 : 0) | (quick ? 4 : 0) | (unsure ? 8 : 0));
}

#define CUDA_OK(x) REQUIRE((x) == cudaSuccess)

}  // namespace

TEST_CASE("cuda core: the jitter mask's threshold test on the device equals the quotient test") {
  // Probes within a few hundred ulps of the threshold τ on both sides (where the GPU's fast
  // division of τ could matter), at −m, at m, and random logits below m.
  std::vector<float> ms = {0.0f,  1.0f,   -1.0f, 1e-30f, -1e-30f,
                           1e30f, -1e30f, 3.3f,  -7.5f,  65504.0f};
  std::mt19937_64 gen(5);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int s = 0; s < 40; ++s) ms.push_back(normal(gen));
  const float eps2s[] = {0.02f, 0.1f, 0.2f, 0.3f, 0.49f, 0.0f, 0.5f, 1.0f};
  std::vector<float> pm, pe, pz;
  for (float m : ms)
    for (float e2 : eps2s) {
      const double tau = m > 0 ? double(m) * (1.0 - e2) : double(m) / (1.0 - e2);
      for (float centre : {static_cast<float>(tau), -m, m}) {
        if (!std::isfinite(centre)) continue;
        float z = centre;
        for (int u = 0; u < 300; ++u) z = std::nextafter(z, -INFINITY);
        for (int u = 0; u < 600; ++u, z = std::nextafter(z, INFINITY))
          if (!(z > m)) {
            pm.push_back(m);
            pe.push_back(e2);
            pz.push_back(z);
          }
      }
      std::uniform_real_distribution<float> below(-4.0f, 0.0f);
      for (int u = 0; u < 50; ++u) {
        pm.push_back(m);
        pe.push_back(e2);
        pz.push_back(m + below(gen) * (std::abs(m) + 1e-3f));
      }
    }
  const int n = static_cast<int>(pz.size());
  float *d_m = nullptr, *d_e = nullptr, *d_z = nullptr;
  std::uint8_t* d_out = nullptr;
  CUDA_OK(cudaMalloc(&d_m, n * sizeof(float)));
  CUDA_OK(cudaMalloc(&d_e, n * sizeof(float)));
  CUDA_OK(cudaMalloc(&d_z, n * sizeof(float)));
  CUDA_OK(cudaMalloc(&d_out, n));
  CUDA_OK(cudaMemcpy(d_m, pm.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_e, pe.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_z, pz.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(d_out, 0xFF, n));  // poison
  mask_kernel<<<(n + 255) / 256, 256>>>(d_m, d_e, d_z, n, d_out);
  CUDA_OK(cudaGetLastError());
  std::vector<std::uint8_t> out(static_cast<std::size_t>(n));
  CUDA_OK(cudaMemcpy(out.data(), d_out, n, cudaMemcpyDeviceToHost));
  cudaFree(d_m);
  cudaFree(d_e);
  cudaFree(d_z);
  cudaFree(d_out);
  int wrong = 0, unsure = 0;
  for (int i = 0; i < n; ++i) {
    const bool host = jitter_masked(pz[i], pm[i], pe[i]);
    const bool quotient = out[i] & 1, threshold = out[i] & 2, quick = out[i] & 4;
    const bool quick_unsure = out[i] & 8;
    unsure += quick_unsure;
    if (out[i] > 15 || quotient != host || threshold != host || (!quick_unsure && quick != host)) {
      if (++wrong <= 10)
        FAIL_CHECK("m = " << pm[i] << ", 2eps = " << pe[i] << ", z = " << pz[i] << ": host " << host
                          << ", device bits " << int(out[i]));
    }
  }
  CHECK(wrong == 0);
  CHECK(n > 100000);
  CHECK(unsure > 0);  // the band around τ is probed: both of the threshold test's paths ran
}

TEST_CASE("cuda core: per-token forward in a kernel matches the CPU back end") {
  const index_t T = 1000, E = 13;
  const int k = 2;
  std::mt19937_64 gen(7);
  std::normal_distribution<float> normal(2.0f, 0.2f);
  std::vector<float> z(static_cast<std::size_t>(T * E));
  for (float& x : z) x = normal(gen);

  std::vector<std::int32_t> cpu_experts(static_cast<std::size_t>(T * k));
  std::vector<std::uint8_t> cpu_coins(cpu_experts.size());
  std::vector<float> cpu_gates(cpu_experts.size());
  routing_options opt;
  opt.k = k;
  const rng_stream rng{11, 3, 0};
  check(
      route_forward<sparsemixer_heun3>(opt, host_matrix<const float>(z.data(), T, E),
                                       host_routing_state{host_matrix(cpu_experts.data(), T, k),
                                                          host_matrix(cpu_coins.data(), T, k), rng},
                                       host_matrix(cpu_gates.data(), T, k)));

  float* d_z = nullptr;
  std::int32_t* d_experts = nullptr;
  std::uint8_t* d_coins = nullptr;
  float* d_gates = nullptr;
  CUDA_OK(cudaMalloc(&d_z, z.size() * sizeof(float)));
  CUDA_OK(cudaMalloc(&d_experts, cpu_experts.size() * sizeof(std::int32_t)));
  CUDA_OK(cudaMalloc(&d_coins, cpu_coins.size()));
  CUDA_OK(cudaMalloc(&d_gates, cpu_gates.size() * sizeof(float)));
  CUDA_OK(cudaMemcpy(d_z, z.data(), z.size() * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(d_gates, 0xFF, cpu_gates.size() * sizeof(float)));  // poison: NaN
  forward_kernel<sparsemixer_heun3><<<static_cast<unsigned>((T + 127) / 128), 128>>>(
      d_z, T, E, k, rng, d_experts, d_coins, d_gates);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());

  std::vector<std::int32_t> gpu_experts(cpu_experts.size());
  std::vector<std::uint8_t> gpu_coins(cpu_coins.size());
  std::vector<float> gpu_gates(cpu_gates.size());
  CUDA_OK(cudaMemcpy(gpu_experts.data(), d_experts, gpu_experts.size() * sizeof(std::int32_t),
                     cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(gpu_coins.data(), d_coins, gpu_coins.size(), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(gpu_gates.data(), d_gates, gpu_gates.size() * sizeof(float),
                     cudaMemcpyDeviceToHost));
  cudaFree(d_z);
  cudaFree(d_experts);
  cudaFree(d_coins);
  cudaFree(d_gates);

  std::size_t same = 0;
  for (std::size_t i = 0; i < gpu_experts.size(); ++i) {
    if (gpu_experts[i] == cpu_experts[i] && gpu_coins[i] == cpu_coins[i]) {
      ++same;
      CHECK(gpu_gates[i] == doctest::Approx(cpu_gates[i]).epsilon(1e-5));
    }
  }
  // Identical serial arithmetic except exp's last bit: only near-ties may differ.
  CHECK(same >= gpu_experts.size() - 2);
}
