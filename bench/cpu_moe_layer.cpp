// CPU MoE layer benchmark (Google Benchmark): the layer's forward + backward, float, against
// Eigen float GEMMs of the same expert FLOPs measured in the same binary (PERFORMANCE.md: "CPU
// MoE layer, float: ≥ 70% of Eigen's GEMM rate for the same FLOPs").
//
//   routegrad_cpu_moe_bench [google benchmark flags]
//
// Names: moe/<op>/<estimator>/T:<T>/d:<d>/h:<h>/E:<E>/k:<k>/<act>/threads:<n>   (op: step =
//        forward + backward, fwd, bwd)
//        gemm/ffn/N:<N>/d:<d>/h:<h>/threads:<n>
// gemm/ffn is the dense two-layer FFN on N = T·k rows that the experts compute in pieces, as the
// six row-major Eigen products of its forward and backward (H = X W1ᵀ, F = H W2ᵀ, dA = dF W2,
// dW2 = dFᵀ H, dW1 = dHᵀ X, dX = dH W1): 12·N·d·h FLOPs, no activation, no routing, no gather.
// Counters: FLOP/s counts 12·N·d·h + 6·T·d·E for a layer step (PERFORMANCE.md's formula, N =
// T·k dropless, GELU/SiLU: W1 has h rows; fwd one third of it, bwd two thirds), 12·N·d·h for
// gemm/ffn; items/s counts tokens;
// flops = FLOPs per iteration; vs_gemm = the step's FLOP/s ÷ the FLOP/s of the gemm/ffn benchmark
// with the same N, d, h and threads in the same run; a summary of every pair (by wall time, and
// for one thread also by CPU time, which a shared machine disturbs less) is printed at the end.
// Timings are wall time (UseRealTime).
//
// Inputs: x, dy ~ N(0, 1), W_r ~ N(0, 1/d) (logits ~ N(0, 1)), W1 ~ N(0, 1/d), W2 ~ N(0, 1/h),
// training mode, ε = 0.1, dropless; the Philox offset rotates over 4 values across iterations.
// Eigen's own thread count: gemm/ffn/threads:n runs Eigen::setNbThreads(n); the layer runs with
// Eigen::setNbThreads(0) (the default), its cpu::execution{n} choosing the threads.
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <routegrad/estimators/estimators.hpp>
#include <routegrad/moe/api.hpp>

namespace {

using routegrad::index_t;

std::vector<float> normal_vector(std::size_t n, double scale, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> dist(0.0f, static_cast<float>(scale));
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

/// Forward: 2·T·d·E (router) + 2·N·d·(h1 + h) (W1, W2); backward twice that (every product has
/// two gradient products). A step is their sum, 6·T·d·E + 6·N·d·(h1 + h).
double layer_flops(index_t T, index_t d, index_t h, index_t h1, index_t E, int k, int parts) {
  const double N = static_cast<double>(T) * k;
  return parts * (2.0 * N * static_cast<double>(d) * static_cast<double>(h + h1) +
                  2.0 * static_cast<double>(T * d * E));
}
double ffn_flops(index_t N, index_t d, index_t h) {
  return 12.0 * static_cast<double>(N) * static_cast<double>(d) * static_cast<double>(h);
}

bool threads_available(benchmark::State& st, int threads) {
#if defined(ROUTEGRAD_HAS_OPENMP)
  (void)st, (void)threads;
  return true;
#else
  if (threads > 1) {
    st.SkipWithError("built without OpenMP: only one thread");
    return false;
  }
  return true;
#endif
}

// ---------------------------------------------------------------------------------------------
// The floor: a dense FFN's six GEMMs (Eigen, float, row-major), the shapes the experts run.
// ---------------------------------------------------------------------------------------------

void bm_gemm_ffn(benchmark::State& st, index_t N, index_t d, index_t h, int threads) {
  if (!threads_available(st, threads)) return;
  using mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  auto fill = [](index_t r, index_t c, double scale, std::uint64_t seed) {
    const std::vector<float> v = normal_vector(static_cast<std::size_t>(r * c), scale, seed);
    return mat(Eigen::Map<const mat>(v.data(), r, c));
  };
  const mat X = fill(N, d, 1.0, 1), W1 = fill(h, d, 0.06, 2), W2 = fill(d, h, 0.04, 3),
            dF = fill(N, d, 1.0, 4);
  mat H(N, h), F(N, d), dA(N, h), dW2(d, h), dW1(h, d), dX(N, d);
  Eigen::setNbThreads(threads);
  auto step = [&] {
    H.noalias() = X * W1.transpose();
    F.noalias() = H * W2.transpose();
    dA.noalias() = dF * W2;
    dW2.noalias() = dF.transpose() * H;
    dW1.noalias() = dA.transpose() * X;
    dX.noalias() = dA * W1;
  };
  step();  // warm up
  for (auto _ : st) {
    step();
    benchmark::DoNotOptimize(dX.data());
    benchmark::DoNotOptimize(F.data());
    benchmark::ClobberMemory();
  }
  Eigen::setNbThreads(0);
  const double flops = ffn_flops(N, d, h);
  st.counters["FLOP/s"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["flops"] = benchmark::Counter(flops);
  st.SetItemsProcessed(st.iterations() * N);
}

// ---------------------------------------------------------------------------------------------
// The layer.
// ---------------------------------------------------------------------------------------------

enum class op { step, fwd, bwd };

const char* op_name(op o) { return o == op::step ? "step" : o == op::fwd ? "fwd" : "bwd"; }
const char* act_name(routegrad::activation a) {
  return a == routegrad::activation::gelu   ? "gelu"
         : a == routegrad::activation::silu ? "silu"
                                            : "swiglu";
}

struct layer_buffers {
  routegrad::moe_options opt;
  index_t T;
  std::vector<float> Wr, br, W1, b1, W2, b2, x, dy, y, dx, gWr, gbr, gW1, gb1, gW2, gb2;
  routegrad::cpu::moe_context<float> ctx;

  layer_buffers(const routegrad::moe_options& o, index_t tokens) : opt(o), T(tokens) {
    const index_t E = o.experts, d = o.d_model, h = o.d_hidden, h1 = routegrad::w1_rows(o);
    const double sd = 1.0 / std::sqrt(static_cast<double>(d));
    const double sh = 1.0 / std::sqrt(static_cast<double>(h));
    Wr = normal_vector(static_cast<std::size_t>(E * d), sd, 11);
    br = normal_vector(static_cast<std::size_t>(E), 0.1, 12);
    W1 = normal_vector(static_cast<std::size_t>(E * h1 * d), sd, 13);
    b1 = normal_vector(static_cast<std::size_t>(E * h1), 0.1, 14);
    W2 = normal_vector(static_cast<std::size_t>(E * d * h), sh, 15);
    b2 = normal_vector(static_cast<std::size_t>(E * d), 0.1, 16);
    x = normal_vector(static_cast<std::size_t>(T * d), 1.0, 17);
    dy = normal_vector(static_cast<std::size_t>(T * d), 1.0, 18);
    y.assign(static_cast<std::size_t>(T * d), 0.0f);
    dx.assign(y.size(), 0.0f);
    gWr.assign(Wr.size(), 0.0f), gbr.assign(br.size(), 0.0f), gW1.assign(W1.size(), 0.0f);
    gb1.assign(b1.size(), 0.0f), gW2.assign(W2.size(), 0.0f), gb2.assign(b2.size(), 0.0f);
    ctx.resize(o, T);
  }
  routegrad::host_moe_params<float> params() const {
    using namespace routegrad;
    const index_t E = opt.experts, d = opt.d_model, h = opt.d_hidden, h1 = w1_rows(opt);
    return {host_matrix<const float>(Wr.data(), E, d),
            host_vector<const float>(br.data(), E),
            host_view<const float, 3>(W1.data(), {E, h1, d}),
            host_matrix<const float>(b1.data(), E, h1),
            host_view<const float, 3>(W2.data(), {E, d, h}),
            host_matrix<const float>(b2.data(), E, d),
            {}};
  }
  routegrad::host_moe_grads<float> grads() {
    using namespace routegrad;
    const index_t E = opt.experts, d = opt.d_model, h = opt.d_hidden, h1 = w1_rows(opt);
    return {host_matrix(gWr.data(), E, d),
            host_vector(gbr.data(), E),
            host_view<float, 3>(gW1.data(), {E, h1, d}),
            host_matrix(gb1.data(), E, h1),
            host_view<float, 3>(gW2.data(), {E, d, h}),
            host_matrix(gb2.data(), E, d),
            {}};
  }
};

template <class Est>
void bm_layer(benchmark::State& st, op o, index_t T, index_t d, index_t h, int E, int k,
              routegrad::activation act, int threads) {
  if (!threads_available(st, threads)) return;
  using namespace routegrad;
  moe_options opt;
  opt.d_model = d;
  opt.d_hidden = h;
  opt.experts = E;
  opt.act = act;
  opt.routing.k = k;
  opt.routing.mode = routing_mode::train;
  opt.routing.jitter_eps = 0.1;
  opt.routing.load_balance_coef = 0.01;
  opt.routing.z_loss_coef = 0.001;
  layer_buffers b(opt, T);
  Eigen::setNbThreads(0);
  const cpu::execution exec{threads};
  const auto x = host_matrix<const float>(b.x.data(), T, d);
  const auto dy = host_matrix<const float>(b.dy.data(), T, d);
  const auto y = host_matrix(b.y.data(), T, d);
  const auto dx = host_matrix(b.dx.data(), T, d);
  std::vector<std::int64_t> kept(static_cast<std::size_t>(E));
  host_moe_stats stats;
  stats.kept_counts = kept.data();
  auto forward = [&](std::uint64_t r) {
    return moe_forward<Est>(opt, b.params(), x, y, rng_stream{7, r, 0}, b.ctx.view(), stats, exec);
  };
  auto backward = [&] {
    return moe_backward<Est>(opt, b.params(), x, dy, b.ctx.cview(), b.grads(), dx,
                             grad_mode::overwrite, exec);
  };
  status s = forward(0);  // warm up (and the state the bwd benchmark replays)
  if (s) s = backward();
  if (!s) {
    st.SkipWithError(s.message());
    return;
  }
  std::uint64_t r = 0;
  bool failed = false;
  for (auto _ : st) {
    status si;
    if (o != op::bwd) si = forward(++r % 4);
    if (si && o != op::fwd) si = backward();
    failed |= !si;
    benchmark::DoNotOptimize(b.y.data());
    benchmark::DoNotOptimize(b.dx.data());
    benchmark::ClobberMemory();
  }
  if (failed) {
    st.SkipWithError("a layer call failed inside the timed loop");
    return;
  }
  const double flops = layer_flops(T, d, h, w1_rows(opt), E, k,
                                   o == op::fwd   ? 1
                                   : o == op::bwd ? 2
                                                  : 3);
  st.counters["FLOP/s"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["flops"] = benchmark::Counter(flops);
  st.SetItemsProcessed(st.iterations() * T);
  std::int64_t min_kept = kept[0], max_kept = kept[0];
  for (std::int64_t n : kept) min_kept = std::min(min_kept, n), max_kept = std::max(max_kept, n);
  st.counters["min_kept"] = static_cast<double>(min_kept);
  st.counters["max_kept"] = static_cast<double>(max_kept);
}

// ---------------------------------------------------------------------------------------------
// vs_gemm: a reporter that pairs every layer step with the gemm/ffn benchmark of the same N, d,
// h and threads (and the same aggregate: mean, median, or a plain run), adds the ratio of their
// FLOP/s to the layer's row when the GEMM was reported first, and prints a summary of all pairs
// at the end (any order, e.g. with --benchmark_enable_random_interleaving).
// ---------------------------------------------------------------------------------------------

class ratio_reporter : public benchmark::ConsoleReporter {
 public:
  explicit ratio_reporter(OutputOptions o) : ConsoleReporter(o) {}

  void ReportRuns(const std::vector<Run>& runs) override {
    std::vector<Run> out = runs;
    for (Run& run : out) {
      if (run.error_occurred || run.aggregate_name == "stddev" || run.aggregate_name == "cv")
        continue;
      const std::string name = run.benchmark_name();
      auto f = run.counters.find("flops");
      if (f == run.counters.end()) continue;
      const double unit = benchmark::GetTimeUnitMultiplier(run.time_unit);
      const timing tm{name, f->second.value / (run.GetAdjustedRealTime() / unit),
                      f->second.value / (run.GetAdjustedCPUTime() / unit),
                      run.GetAdjustedRealTime(), run.GetAdjustedCPUTime()};
      const std::string key = shape_key(name) + "|" + run.aggregate_name;
      if (name.rfind("gemm/", 0) == 0) {
        gemm_[key] = tm;
      } else if (name.rfind("moe/step/", 0) == 0) {
        steps_.emplace_back(key, tm);
        auto g = gemm_.find(key);
        if (g != gemm_.end() && g->second.real_rate > 0)
          run.counters["vs_gemm"] = benchmark::Counter(tm.real_rate / g->second.real_rate);
      }
    }
    ConsoleReporter::ReportRuns(out);
  }

  void Finalize() override {
    ConsoleReporter::Finalize();
    std::FILE* o = stdout;
    std::fprintf(o, "\nvs_gemm: layer step FLOP/s / gemm/ffn FLOP/s (same N, d, h, threads)\n");
    std::fprintf(o, "%-80s %9s %9s %8s %8s\n", "layer step", "layer ms", "gemm ms", "real", "cpu");
    for (const auto& [key, tm] : steps_) {
      auto g = gemm_.find(key);
      if (g == gemm_.end()) continue;
      const bool one_thread = key.find("/threads:1|") != std::string::npos;
      std::fprintf(o, "%-80s %9.1f %9.1f %8.3f", tm.name.c_str(), tm.real, g->second.real,
                   tm.real_rate / g->second.real_rate);
      if (one_thread)  // CPU time is the main thread's: comparable with one thread only
        std::fprintf(o, " %8.3f\n", tm.cpu_rate / g->second.cpu_rate);
      else
        std::fprintf(o, " %8s\n", "-");
    }
    std::fflush(o);
  }

  /// "N:<T·k>/d:<d>/h:<h>/threads:<n>" of either kind of name.
  static std::string shape_key(const std::string& name) {
    auto field = [&](const std::string& tag) {
      const std::size_t p = name.find(tag);
      if (p == std::string::npos) return std::string();
      const std::size_t e = name.find('/', p + tag.size());
      return name.substr(p + tag.size(), e == std::string::npos ? e : e - p - tag.size());
    };
    std::string n = field("/N:");
    if (n.empty()) {
      const std::string t = field("/T:"), k = field("/k:");
      if (t.empty() || k.empty()) return name;
      n = std::to_string(std::stoll(t) * std::stoll(k));
    }
    std::string threads = field("/threads:");
    threads = threads.substr(0, threads.find('_'));
    return "N:" + n + "/d:" + field("/d:") + "/h:" + field("/h:") + "/threads:" + threads;
  }

 private:
  struct timing {
    std::string name;
    double real_rate, cpu_rate;  // FLOP/s by wall time and by the main thread's CPU time
    double real, cpu;            // per iteration, in the run's time unit
  };
  std::map<std::string, timing> gemm_;
  std::vector<std::pair<std::string, timing>> steps_;
};

// ---------------------------------------------------------------------------------------------
// Registration.
// ---------------------------------------------------------------------------------------------

constexpr index_t kT = 2048, kD = 256, kH = 512;
constexpr int kE = 8;

std::string layer_name(op o, const char* est, int k, routegrad::activation act, int threads) {
  return std::string("moe/") + op_name(o) + "/" + est + "/T:" + std::to_string(kT) +
         "/d:" + std::to_string(kD) + "/h:" + std::to_string(kH) + "/E:" + std::to_string(kE) +
         "/k:" + std::to_string(k) + "/" + act_name(act) + "/threads:" + std::to_string(threads);
}

template <class Est>
void register_layer(const char* est, op o, int k, routegrad::activation act, int threads) {
  benchmark::RegisterBenchmark(
      layer_name(o, est, k, act, threads).c_str(),
      [=](benchmark::State& st) { bm_layer<Est>(st, o, kT, kD, kH, kE, k, act, threads); })
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
}

void register_all() {
  using routegrad::activation;
  for (int threads : {1, 2})
    for (int k : {1, 2})
      benchmark::RegisterBenchmark(
          ("gemm/ffn/N:" + std::to_string(kT * k) + "/d:" + std::to_string(kD) +
           "/h:" + std::to_string(kH) + "/threads:" + std::to_string(threads))
              .c_str(),
          [=](benchmark::State& st) { bm_gemm_ffn(st, kT * k, kD, kH, threads); })
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
  for (int threads : {1, 2})
    for (int k : {1, 2}) {
      register_layer<routegrad::switch_router>("switch", op::step, k, activation::gelu, threads);
      register_layer<routegrad::sparsemixer_heun3>("sparsemixer_heun3", op::step, k,
                                                   activation::gelu, threads);
    }
  // Where the time goes (one thread, k = 2): forward and backward alone, other activations,
  // the other estimators.
  register_layer<routegrad::sparsemixer_heun3>("sparsemixer_heun3", op::fwd, 2, activation::gelu,
                                               1);
  register_layer<routegrad::sparsemixer_heun3>("sparsemixer_heun3", op::bwd, 2, activation::gelu,
                                               1);
  register_layer<routegrad::sparsemixer_heun3>("sparsemixer_heun3", op::step, 2, activation::silu,
                                               1);
  register_layer<routegrad::topk_softmax>("topk_softmax", op::step, 2, activation::gelu, 1);
  register_layer<routegrad::sparsemixer_midpoint>("sparsemixer_midpoint", op::step, 2,
                                                  activation::gelu, 1);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
#if defined(ROUTEGRAD_HAS_OPENMP)
  benchmark::AddCustomContext("openmp", "yes");
#else
  benchmark::AddCustomContext("openmp", "no");
#endif
  benchmark::AddCustomContext("eigen", std::to_string(EIGEN_WORLD_VERSION) + "." +
                                           std::to_string(EIGEN_MAJOR_VERSION) + "." +
                                           std::to_string(EIGEN_MINOR_VERSION));
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::AddCustomContext("routegrad_version", routegrad::version_string());
  register_all();
  // Colour only on a terminal (a custom display reporter does not read --benchmark_color).
  ratio_reporter reporter(isatty(fileno(stdout)) ? benchmark::ConsoleReporter::OO_Defaults
                                                 : benchmark::ConsoleReporter::OO_Tabular);
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}
