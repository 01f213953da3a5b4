// CUDA MoE layer benchmarks (PERFORMANCE.md "MoE layer"): forward + backward of the whole layer,
// bf16, top-1, GELU, for each estimator, timed with CUDA events around the calls on the caller's
// stream (manual time; the layer's two host synchronisations and its host-side checks count).
//
// Counters, all measured in this binary and run:
//   FLOP/s       the layer's FLOPs ≈ 6·T·k·d·h·2 + 6·T·d·E (PERFORMANCE.md) per second
//   of_dense     that rate ÷ the rate of the same six GEMMs run dense (one expert, cublasGemmEx
//                bf16, fp32 accumulation; BM "dense_gemm6") — the stretch target is ≥ 0.6
//   vs_switch    this estimator's layer time ÷ the switch layer's (same shape; target ≤ 1.02 for
//                SparseMixer)
// and "sync_roundtrip" times the GPU idle gap one host synchronisation costs (a kernel, a
// device-to-host copy of the segment offsets, cudaStreamSynchronize, the next kernel), which
// each layer call pays once.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <routegrad/cuda.cuh>
#include <tuple>
#include <type_traits>
#include <vector>

#include "fp32_routing.cuh"

// Compiled in cuda_routing.cu (fp32_routing.cuh).
ROUTEGRAD_BENCH_FP32_ROUTING_SHARED(extern)

namespace {

using namespace routegrad;
using bf16 = __nv_bfloat16;

bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

/// v[i] = scale · (uniform(−√3, √3)) from Philox(seed, i): unit variance, filled on the device.
__global__ void fill_kernel(bf16* v, std::size_t n, std::uint64_t seed, float scale) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const philox4x32 r = philox4x32_10(
        {{static_cast<std::uint32_t>(i), static_cast<std::uint32_t>(i >> 32), 0u, 0u}},
        static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
    const float u = uniform_open01(r.v[0]);
    v[i] = __float2bfloat16_rn(scale * 1.7320508f * (2.0f * u - 1.0f));
  }
}

struct device_array {
  bf16* ptr = nullptr;
  std::size_t n = 0;
  device_array(std::size_t count, std::uint64_t seed, float scale) : n(count) {
    cudaMalloc(&ptr, n * sizeof(bf16));
    fill_kernel<<<1024, 256>>>(ptr, n, seed, scale);
  }
  device_array(const device_array&) = delete;
  device_array& operator=(const device_array&) = delete;
  ~device_array() { cudaFree(ptr); }
};

/// Everything one layer shape needs on the device.
struct layer_buffers {
  index_t T, d, h;
  int E, k;
  moe_options opt;
  device_array x, dy, y, dx, wr, br, w1, b1, w2, b2, gwr, gbr, gw1, gb1, gw2, gb2;
  void* context = nullptr;
  void* workspace = nullptr;
  std::size_t context_bytes = 0, workspace_bytes = 0;

  layer_buffers(index_t T_, index_t d_, index_t h_, int E_, int k_)
      : T(T_),
        d(d_),
        h(h_),
        E(E_),
        k(k_),
        opt(make_options(d_, h_, E_, k_)),
        x(sz(T_ * d_), 1, 1.0f),
        dy(sz(T_ * d_), 2, 1.0f),
        y(sz(T_ * d_), 3, 0.0f),
        dx(sz(T_ * d_), 4, 0.0f),
        wr(sz(E_ * d_), 5, 1.0f / std::sqrt(static_cast<float>(d_))),
        br(sz(E_), 6, 0.1f),
        w1(sz(E_ * h_ * d_), 7, 1.0f / std::sqrt(static_cast<float>(d_))),
        b1(sz(E_ * h_), 8, 0.1f),
        w2(sz(E_ * d_ * h_), 9, 1.0f / std::sqrt(static_cast<float>(h_))),
        b2(sz(E_ * d_), 10, 0.1f),
        gwr(sz(E_ * d_), 11, 0.0f),
        gbr(sz(E_), 12, 0.0f),
        gw1(sz(E_ * h_ * d_), 13, 0.0f),
        gb1(sz(E_ * h_), 14, 0.0f),
        gw2(sz(E_ * d_ * h_), 15, 0.0f),
        gb2(sz(E_ * d_), 16, 0.0f) {
    context_bytes = cuda::moe_context_bytes<bf16>(opt, T);
    workspace_bytes = cuda::moe_workspace_bytes<bf16>(opt, T);
    cudaMalloc(&context, context_bytes);
    cudaMalloc(&workspace, workspace_bytes);
    cudaDeviceSynchronize();
  }
  layer_buffers(const layer_buffers&) = delete;
  layer_buffers& operator=(const layer_buffers&) = delete;
  ~layer_buffers() {
    cudaFree(context);
    cudaFree(workspace);
  }

  static std::size_t sz(index_t n) { return static_cast<std::size_t>(n); }
  static moe_options make_options(index_t d, index_t h, int E, int k) {
    moe_options o;
    o.d_model = d;
    o.d_hidden = h;
    o.experts = E;
    o.routing.k = k;
    o.act = activation::gelu;
    return o;
  }

  cuda::device_moe_params<bf16> params() const {
    return {device_view<const bf16, 2>(wr.ptr, {E, d}),
            device_view<const bf16, 1>(br.ptr, {E}),
            device_view<const bf16, 3>(w1.ptr, {E, h, d}),
            device_view<const bf16, 2>(b1.ptr, {E, h}),
            device_view<const bf16, 3>(w2.ptr, {E, d, h}),
            device_view<const bf16, 2>(b2.ptr, {E, d}),
            {}};
  }
  cuda::device_moe_grads<bf16> grads() const {
    return {device_view<bf16, 2>(gwr.ptr, {E, d}),
            device_view<bf16, 1>(gbr.ptr, {E}),
            device_view<bf16, 3>(gw1.ptr, {E, h, d}),
            device_view<bf16, 2>(gb1.ptr, {E, h}),
            device_view<bf16, 3>(gw2.ptr, {E, d, h}),
            device_view<bf16, 2>(gb2.ptr, {E, d}),
            {}};
  }
  double flops() const {
    return 6.0 * static_cast<double>(T) * k * static_cast<double>(d) * static_cast<double>(h) *
               2.0 +
           6.0 * static_cast<double>(T) * static_cast<double>(d) * E;
  }
};

/// One layer shape's buffers, kept across the benchmarks of that shape (the largest is a few
/// GiB); a new shape frees the previous one.
layer_buffers& buffers_for(index_t T, index_t d, index_t h, int E, int k) {
  static std::unique_ptr<layer_buffers> current;
  if (!current || current->T != T || current->d != d || current->h != h || current->E != E ||
      current->k != k) {
    current.reset();
    current = std::make_unique<layer_buffers>(T, d, h, E, k);
  }
  return *current;
}

using shape_key = std::tuple<index_t, index_t, index_t, int, int>;
std::map<shape_key, double>& dense_rate() {  // FLOP/s of dense_gemm6 per shape
  static std::map<shape_key, double> m;
  return m;
}
std::map<shape_key, double>& switch_seconds() {  // switch layer fwd+bwd per shape
  static std::map<shape_key, double> m;
  return m;
}

enum class phase { both, forward, backward };

struct timer {
  cudaEvent_t start{}, stop{};
  timer() {
    cudaEventCreate(&start);
    cudaEventCreate(&stop);
  }
  timer(const timer&) = delete;
  timer& operator=(const timer&) = delete;
  ~timer() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  double seconds() {
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    return static_cast<double>(ms) * 1e-3;
  }
};

/// The same six GEMMs as the layer's experts, dense (one expert holding every token).
double run_dense_gemm6(cublasHandle_t handle, const layer_buffers& b, cudaStream_t s, bf16* a,
                       bf16* c, bf16* e) {
  const int N = static_cast<int>(b.T * b.k), d = static_cast<int>(b.d), h = static_cast<int>(b.h);
  const float one = 1.0f, zero = 0.0f;
  cublasSetStream(handle, s);
  // Column-major calls for the row-major products (see cuda/blas.cuh):
  //   pre[N,h] = x[N,d] W1ᵀ          f[N,d] = act[N,h] W2ᵀ       da[N,h] = df[N,d] W2
  //   dW2[d,h] = dfᵀ act             dW1[h,d] = dpreᵀ x          dx[N,d] = dpre W1
  const auto gemm = [&](cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                        const bf16* A, int lda, const bf16* B, int ldb, bf16* C, int ldc) {
    cublasGemmEx(handle, ta, tb, m, n, k, &one, A, CUDA_R_16BF, lda, B, CUDA_R_16BF, ldb, &zero, C,
                 CUDA_R_16BF, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  };
  gemm(CUBLAS_OP_T, CUBLAS_OP_N, h, N, d, b.w1.ptr, d, b.x.ptr, d, a, h);
  gemm(CUBLAS_OP_T, CUBLAS_OP_N, d, N, h, b.w2.ptr, h, a, h, c, d);
  gemm(CUBLAS_OP_N, CUBLAS_OP_N, h, N, d, b.w2.ptr, h, b.dy.ptr, d, e, h);
  gemm(CUBLAS_OP_N, CUBLAS_OP_T, h, d, N, a, h, b.dy.ptr, d, b.gw2.ptr, h);
  gemm(CUBLAS_OP_N, CUBLAS_OP_T, d, h, N, b.x.ptr, d, e, h, b.gw1.ptr, d);
  gemm(CUBLAS_OP_N, CUBLAS_OP_N, d, N, h, b.w1.ptr, d, e, h, c, d);
  return 6.0 * 2.0 * N * static_cast<double>(d) * h;
}

void BM_dense_gemm6(benchmark::State& state) {
  if (!have_gpu()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  layer_buffers& b = buffers_for(state.range(0), state.range(1), state.range(2),
                                 static_cast<int>(state.range(3)), 1);
  const std::size_t N = static_cast<std::size_t>(b.T * b.k);
  bf16 *a = nullptr, *c = nullptr, *e = nullptr;
  cudaMalloc(&a, N * static_cast<std::size_t>(b.h) * sizeof(bf16));
  cudaMalloc(&c, N * static_cast<std::size_t>(b.d) * sizeof(bf16));
  cudaMalloc(&e, N * static_cast<std::size_t>(b.h) * sizeof(bf16));
  cublasHandle_t handle = nullptr;
  cublasCreate(&handle);
  cudaStream_t s = nullptr;
  cudaStreamCreate(&s);
  double flops = run_dense_gemm6(handle, b, s, a, c, e);  // warm-up
  cudaStreamSynchronize(s);
  timer tm;
  double total = 0.0;
  for (auto _ : state) {
    cudaEventRecord(tm.start, s);
    flops = run_dense_gemm6(handle, b, s, a, c, e);
    cudaEventRecord(tm.stop, s);
    const double sec = tm.seconds();
    total += sec;
    state.SetIterationTime(sec);
  }
  if (cudaGetLastError() != cudaSuccess) state.SkipWithError("CUDA error");
  dense_rate()[{b.T, b.d, b.h, b.E, b.k}] = flops * static_cast<double>(state.iterations()) / total;
  state.counters["FLOP/s"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  cublasDestroy(handle);
  cudaStreamDestroy(s);
  cudaFree(a);
  cudaFree(c);
  cudaFree(e);
}

template <class Est>
void BM_layer(benchmark::State& state, phase what, cuda::expert_gemm gemm) {
  if (!have_gpu()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  layer_buffers& b = buffers_for(state.range(0), state.range(1), state.range(2),
                                 static_cast<int>(state.range(3)), 1);
  cudaStream_t s = nullptr;
  cudaStreamCreate(&s);
  cublasHandle_t handle = nullptr;
  cublasCreate(&handle);
  const cuda::execution exec{s, b.workspace, b.workspace_bytes, handle, gemm};
  rng_stream rng{42, 0, 0};
  const device_view<const bf16, 2> x(b.x.ptr, {b.T, b.d}), dy(b.dy.ptr, {b.T, b.d});
  const device_view<bf16, 2> y(b.y.ptr, {b.T, b.d}), dx(b.dx.ptr, {b.T, b.d});
  const device_view<std::byte> ctx(static_cast<std::byte*>(b.context),
                                   {static_cast<index_t>(b.context_bytes)});
  const device_view<const std::byte> cctx(static_cast<const std::byte*>(b.context),
                                          {static_cast<index_t>(b.context_bytes)});
  const auto fwd = [&] { check(moe_forward<Est>(b.opt, b.params(), x, y, rng, ctx, {}, exec)); };
  const auto bwd = [&] {
    check(moe_backward<Est>(b.opt, b.params(), x, dy, cctx, b.grads(), dx, grad_mode::overwrite,
                            exec));
  };
  fwd();  // warm-up (cuBLAS heuristics, lazy module loading)
  bwd();
  cudaStreamSynchronize(s);
  timer tm;
  double total = 0.0;
  for (auto _ : state) {
    ++rng.offset;  // a new draw every step, as in training
    if (what == phase::backward) fwd();
    cudaEventRecord(tm.start, s);
    if (what != phase::backward) fwd();
    if (what != phase::forward) bwd();
    cudaEventRecord(tm.stop, s);
    const double sec = tm.seconds();
    total += sec;
    state.SetIterationTime(sec);
  }
  if (cudaGetLastError() != cudaSuccess) state.SkipWithError("CUDA error");
  const shape_key key{b.T, b.d, b.h, b.E, b.k};
  const double mean = total / static_cast<double>(state.iterations());
  if (what == phase::both) {
    state.counters["FLOP/s"] =
        benchmark::Counter(b.flops(), benchmark::Counter::kIsIterationInvariantRate);
    const auto dense = dense_rate().find(key);
    if (dense != dense_rate().end()) state.counters["of_dense"] = b.flops() / mean / dense->second;
    if (std::is_same_v<Est, switch_router> && gemm == cuda::expert_gemm::automatic)
      switch_seconds()[key] = mean;
    const auto sw = switch_seconds().find(key);
    if (sw != switch_seconds().end()) state.counters["vs_switch"] = mean / sw->second;
  }
  state.SetItemsProcessed(state.iterations() * b.T);
  cublasDestroy(handle);
  cudaStreamDestroy(s);
}

__global__ void tick_kernel(std::int64_t* v) { v[threadIdx.x] += 1; }

/// The GPU idle gap of one host synchronisation as the layer does it (E + 18 int64 copied back).
void BM_sync_roundtrip(benchmark::State& state) {
  if (!have_gpu()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const int words = static_cast<int>(state.range(0)) + 18;
  std::int64_t* dev = nullptr;
  cudaMalloc(&dev, static_cast<std::size_t>(words) * sizeof(std::int64_t));
  cudaMemset(dev, 0, static_cast<std::size_t>(words) * sizeof(std::int64_t));
  std::vector<std::int64_t> host(static_cast<std::size_t>(words));
  cudaStream_t s = nullptr;
  cudaStreamCreate(&s);
  timer tm;
  for (auto _ : state) {
    cudaEventRecord(tm.start, s);
    tick_kernel<<<1, 32, 0, s>>>(dev);
    cudaMemcpyAsync(host.data(), dev, host.size() * sizeof(std::int64_t), cudaMemcpyDeviceToHost,
                    s);
    cudaStreamSynchronize(s);
    tick_kernel<<<1, 32, 0, s>>>(dev);
    cudaEventRecord(tm.stop, s);
    state.SetIterationTime(tm.seconds());
  }
  cudaStreamDestroy(s);
  cudaFree(dev);
}

/// PERFORMANCE.md's three layer shapes (T, d, h, E), top-1.
void shapes(benchmark::internal::Benchmark* b) {
  b->UseManualTime()->Unit(benchmark::kMillisecond);
  b->Args({16384, 1024, 4096, 8});
  b->Args({16384, 1024, 1024, 64});
  b->Args({32768, 2048, 1408, 64});
}

template <class Est>
void add(const char* name, phase what, cuda::expert_gemm gemm = cuda::expert_gemm::automatic) {
  shapes(benchmark::RegisterBenchmark(
      name, [what, gemm](benchmark::State& st) { BM_layer<Est>(st, what, gemm); }));
}

// Registered shape by shape (Google Benchmark runs in registration order): the dense GEMMs and
// switch first, so that of_dense and vs_switch can be computed for the others.
const bool registered = [] {
  benchmark::RegisterBenchmark("sync_roundtrip", BM_sync_roundtrip)
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond)
      ->Arg(8)
      ->Arg(64);
  shapes(benchmark::RegisterBenchmark("dense_gemm6/bf16", BM_dense_gemm6));
  add<switch_router>("moe_layer/switch/bf16/fwd+bwd", phase::both);
  add<sparsemixer_heun3>("moe_layer/sparsemixer_heun3/bf16/fwd+bwd", phase::both);
  add<sparsemixer_midpoint>("moe_layer/midpoint/bf16/fwd+bwd", phase::both);
  add<sparsemixer_euler>("moe_layer/euler/bf16/fwd+bwd", phase::both);
  add<topk_softmax>("moe_layer/topk_softmax/bf16/fwd+bwd", phase::both);
  add<sparsemixer_heun3>("moe_layer/sparsemixer_heun3/bf16/fwd", phase::forward);
  add<sparsemixer_heun3>("moe_layer/sparsemixer_heun3/bf16/bwd", phase::backward);
  add<switch_router>("moe_layer/switch/bf16/fwd+bwd/grouped_gemm", phase::both,
                     cuda::expert_gemm::grouped);
  add<sparsemixer_heun3>("moe_layer/sparsemixer_heun3/bf16/fwd+bwd/grouped_gemm", phase::both,
                         cuda::expert_gemm::grouped);
  add<switch_router>("moe_layer/switch/bf16/fwd+bwd/per_expert_gemm", phase::both,
                     cuda::expert_gemm::per_expert);
  add<sparsemixer_heun3>("moe_layer/sparsemixer_heun3/bf16/fwd+bwd/per_expert_gemm", phase::both,
                         cuda::expert_gemm::per_expert);
  return true;
}();

}  // namespace
