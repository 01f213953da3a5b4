// The core and estimator headers compiled by nvcc: the per-token rules run in a kernel (one
// thread per token, serial lanes) and must reproduce the CPU back end exactly on the same inputs.
// Compiling this file is itself the check that the shared headers are device-clean; running it
// needs a GPU (the test main reports "skipped" without one).
#include <cuda_runtime.h>
#include <doctest/doctest.h>

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

#define CUDA_OK(x) REQUIRE((x) == cudaSuccess)

}  // namespace

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
