// CUDA routing benchmarks: forward, backward and forward + backward of each estimator, timed with
// CUDA events (manual time), with the byte floor of PERFORMANCE.md as a counter:
//   bytes = 3·T·E·sizeof(logit) + T·k·(4 + 2·sizeof(gate))
// floor_us = bytes / (device-to-device copy bandwidth measured in this binary, BM_copy_floor).
#include <benchmark/benchmark.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <random>
#include <routegrad/cuda.cuh>
#include <vector>

#include "fp32_routing.cuh"

// Defined here, linked to by cuda_moe_layer.cu as well (fp32_routing.cuh).
ROUTEGRAD_BENCH_FP32_ROUTING_SHARED()

namespace {

using namespace routegrad;

bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

/// Copy bandwidth (bytes read + written per second), measured once per process.
double copy_bandwidth() {
  static double bw = [] {
    const std::size_t n = std::size_t(1) << 28;  // 1 GiB of floats... 256 Mi floats
    float *a = nullptr, *b = nullptr;
    if (cudaMalloc(&a, n * sizeof(float)) != cudaSuccess) return 0.0;
    if (cudaMalloc(&b, n * sizeof(float)) != cudaSuccess) return 0.0;
    cudaMemset(a, 1, n * sizeof(float));
    cudaEvent_t s, e;
    cudaEventCreate(&s);
    cudaEventCreate(&e);
    std::vector<float> ms;
    for (int i = 0; i < 13; ++i) {
      cudaEventRecord(s);
      cudaMemcpyAsync(b, a, n * sizeof(float), cudaMemcpyDeviceToDevice);
      cudaEventRecord(e);
      cudaEventSynchronize(e);
      float t = 0;
      cudaEventElapsedTime(&t, s, e);
      if (i >= 3) ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    cudaFree(a);
    cudaFree(b);
    return 2.0 * static_cast<double>(n * sizeof(float)) / (ms[ms.size() / 2] * 1e-3);
  }();
  return bw;
}

template <class T>
T convert(float x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __float2bfloat16_rn(x);
  else
    return static_cast<T>(x);
}

// graph: fwd + bwd replayed from a CUDA graph (the draws it was captured with, every replay);
// graph_counter: the same with an offset counter advanced by a kernel captured ahead of them, so
// that every replay draws anew (what training from a graph needs; a third launch).
enum class phase { forward, backward, both, graph, graph_counter };

template <class Est, class T>
void BM_routing(benchmark::State& state, phase what) {
  if (!have_gpu()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const index_t rows = state.range(0), cols = state.range(1);
  const int k = static_cast<int>(state.range(2));
  std::mt19937_64 gen(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);  // as the PyTorch peers: torch.randn
  std::vector<T> host(static_cast<std::size_t>(rows * cols));
  for (T& x : host) x = convert<T>(normal(gen));
  std::vector<float> host_gg(static_cast<std::size_t>(rows * k));
  for (float& x : host_gg) x = normal(gen);
  T *logits = nullptr, *grad = nullptr;
  float *gates = nullptr, *grad_gates = nullptr;
  std::int32_t* experts = nullptr;
  std::uint8_t* coins = nullptr;
  std::uint64_t* counter = nullptr;
  cudaMalloc(&logits, host.size() * sizeof(T));
  cudaMalloc(&grad, host.size() * sizeof(T));
  cudaMalloc(&gates, host_gg.size() * sizeof(float));
  cudaMalloc(&grad_gates, host_gg.size() * sizeof(float));
  cudaMalloc(&experts, host_gg.size() * sizeof(std::int32_t));
  cudaMalloc(&coins, host_gg.size());
  cudaMalloc(&counter, sizeof(std::uint64_t));
  cudaMemset(counter, 0, sizeof(std::uint64_t));
  cudaMemcpy(logits, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  cudaMemcpy(grad_gates, host_gg.data(), host_gg.size() * sizeof(float), cudaMemcpyHostToDevice);
  routing_options opt;
  opt.k = k;
  const device_view<const T, 2> z(logits, {rows, cols});
  cuda::device_routing_state st{device_view<std::int32_t, 2>(experts, {rows, k}),
                                device_view<std::uint8_t, 2>(coins, {rows, k}),
                                {7, 0, 0}};
  cudaStream_t stream = nullptr;
  cudaStreamCreate(&stream);
  const cuda::execution exec{stream, nullptr, 0};
  auto fwd = [&] {
    check(route_forward<Est>(opt, z, st, device_view<float, 2>(gates, {rows, k}), {}, exec));
  };
  auto bwd = [&] {
    check(route_backward<Est>(opt, z, st, device_view<const float, 2>(grad_gates, {rows, k}),
                              device_view<T, 2>(grad, {rows, cols}), grad_mode::overwrite, {},
                              exec));
  };
  fwd();
  bwd();
  cudaStreamSynchronize(stream);
  // Graph replay: the GPU time of the two kernels alone, without the host-side checks.
  cudaGraphExec_t graph_exec = nullptr;
  if (what == phase::graph || what == phase::graph_counter) {
    cudaGraph_t graph = nullptr;
    cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal);
    if (what == phase::graph_counter) {
      st.offset_counter = counter;
      check(cuda::advance_offset_counter(counter, 1, stream));
    }
    fwd();
    bwd();
    cudaStreamEndCapture(stream, &graph);
    cudaGraphInstantiate(&graph_exec, graph, 0);
    cudaGraphDestroy(graph);
  }
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::uint64_t step = 0;
  for (auto _ : state) {
    st.rng.offset = ++step;  // a new draw every step, as in training (the graph keeps its own)
    cudaEventRecord(start, stream);
    if (graph_exec) cudaGraphLaunch(graph_exec, stream);
    if (what == phase::forward || what == phase::both) fwd();
    if (what == phase::backward || what == phase::both) bwd();
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(static_cast<double>(ms) * 1e-3);
  }
  if (graph_exec) cudaGraphExecDestroy(graph_exec);
  cudaStreamDestroy(stream);
  if (cudaGetLastError() != cudaSuccess) state.SkipWithError("CUDA error");
  const double floor_bytes = 3.0 * static_cast<double>(rows * cols) * sizeof(T) +
                             static_cast<double>(rows * k) * (4.0 + 2.0 * sizeof(float));
  state.counters["floor_us"] = floor_bytes / copy_bandwidth() * 1e6;
  state.counters["bytes_per_second"] =
      benchmark::Counter(floor_bytes, benchmark::Counter::kIsIterationInvariantRate);
  state.SetItemsProcessed(state.iterations() * rows);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(logits);
  cudaFree(grad);
  cudaFree(gates);
  cudaFree(grad_gates);
  cudaFree(experts);
  cudaFree(coins);
  cudaFree(counter);
}

void BM_copy_floor(benchmark::State& state) {
  if (!have_gpu()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  for (auto _ : state) state.SetIterationTime(1.0);
  state.counters["copy_GBps"] = copy_bandwidth() / 1e9;
}

void sizes(benchmark::internal::Benchmark* b) {
  b->UseManualTime()->Unit(benchmark::kMicrosecond);
  for (auto te : {std::pair<int, int>{4096, 8},
                  {32768, 8},
                  {32768, 16},
                  {131072, 16},
                  {32768, 32},
                  {131072, 32},
                  {32768, 64},
                  {131072, 64},
                  {32768, 128},
                  {131072, 128}})
    b->Args({te.first, te.second, 1});
}
void sizes_top2(benchmark::internal::Benchmark* b) {  // 16 experts top-2: PhiMoE / GRIN
  b->UseManualTime()->Unit(benchmark::kMicrosecond);
  for (auto te : {std::pair<int, int>{4096, 8},
                  {32768, 16},
                  {131072, 16},
                  {32768, 64},
                  {131072, 64},
                  {32768, 128},
                  {131072, 128}})
    b->Args({te.first, te.second, 2});
}

template <class Est, class T>
void add(const char* name, phase what, void (*shape)(benchmark::internal::Benchmark*)) {
  shape(benchmark::RegisterBenchmark(
      name, [what](benchmark::State& st) { BM_routing<Est, T>(st, what); }));
}

const bool registered = [] {
  benchmark::RegisterBenchmark("copy_floor", BM_copy_floor)->UseManualTime()->Iterations(1);
  add<switch_router, float>("switch/fp32/fwd+bwd", phase::both, sizes);
  add<topk_softmax, float>("topk_softmax/fp32/fwd+bwd", phase::both, sizes);
  add<sparsemixer_midpoint, float>("midpoint/fp32/fwd+bwd", phase::both, sizes);
  add<sparsemixer_midpoint, float>("midpoint/fp32/fwd", phase::forward, sizes);
  add<sparsemixer_midpoint, float>("midpoint/fp32/bwd", phase::backward, sizes);
  add<sparsemixer_midpoint, float>("midpoint/fp32/graph", phase::graph, sizes);
  add<sparsemixer_midpoint, float>("midpoint/fp32/graph_counter", phase::graph_counter, sizes);
  add<switch_router, float>("switch/fp32/graph", phase::graph, sizes);
  add<switch_router, __nv_bfloat16>("switch/bf16/fwd+bwd", phase::both, sizes);
  add<sparsemixer_midpoint, __nv_bfloat16>("midpoint/bf16/fwd+bwd", phase::both, sizes);
  add<sparsemixer_midpoint, __nv_bfloat16>("midpoint/bf16/fwd", phase::forward, sizes);
  add<sparsemixer_midpoint, __nv_bfloat16>("midpoint/bf16/bwd", phase::backward, sizes);
  add<sparsemixer_midpoint, __nv_bfloat16>("midpoint/bf16/graph", phase::graph, sizes);
  add<sparsemixer_heun3, float>("heun3_top2/fp32/fwd+bwd", phase::both, sizes_top2);
  add<sparsemixer_heun3, __nv_bfloat16>("heun3_top2/bf16/fwd+bwd", phase::both, sizes_top2);
  return true;
}();

}  // namespace
