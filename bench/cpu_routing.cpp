// CPU routing benchmarks (Google Benchmark): forward, backward and forward + backward ("step",
// what the eager PyTorch peer measures) of every estimator, beside the plain read/write pass that
// gives the machine's copy bandwidth (the CPU byte floor of docs/performance.md).
//
//   routegrad_cpu_bench [google benchmark flags]
//
// Names: route/<op>/<estimator>/T:<T>/E:<E>/k:<k>/threads:<n>   (op: fwd, bwd, step)
//        floor/copy/T:<T>/E:<E>/threads:<n>
// Counters: items/s = tokens per second. bytes/s counts the fused byte floor of one step
// (PERFORMANCE.md): 3·T·E·sizeof(logit) + T·k·(4 + 2·sizeof(gate)), split as
//   fwd  = T·E·sizeof(logit) + T·k·(4 + sizeof(gate))    (read logits, write experts and gates)
//   bwd  = 2·T·E·sizeof(logit) + T·k·sizeof(gate)        (read logits and grad gates, write grads)
// and for floor/copy the bytes it really moves, 2·T·E·sizeof(logit). Every timing is wall time
// (UseRealTime), since the routing calls run on OpenMP threads.
//
// Inputs follow the peer (../shared/peers/routing_peers_cpu.py): logits ~ N(0, 1) like
// torch.randn, grad gates ~ N(0, 1). Training mode, jitter_eps = 0.1. Each iteration rotates
// the Philox offset over kRotations values, so consecutive iterations route differently.
// With N(0, 1) logits and ε = 0.1 the SparseMixer jitter mask keeps only the few experts whose
// logit is within ~20% of the row's max; the counter `cand` reports the mean candidate count
// of slot 0 over the first 4096 rows (computed outside the timed loop).
//
// Defaults to --benchmark_min_time=0.05 (a later flag wins) so the whole grid (232 benchmarks)
// takes about 1.5 minutes with --benchmark_repetitions=3 on a 2-vCPU machine. scripts/bench-cpu
// runs it with 3 repetitions together with the PyTorch peer and writes the tables of
// docs/performance.md. This file defines the binary's main() (to set those defaults), so no
// other bench/cpu_*.cpp may define one.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#if defined(ROUTEGRAD_HAS_OPENMP)
#include <omp.h>
#endif

#include <routegrad/estimators/estimators.hpp>
#include <routegrad/routing/api.hpp>

namespace {

using routegrad::index_t;

constexpr index_t kMaxT = 65536;
constexpr index_t kMaxE = 128;
constexpr int kMaxK = 2;
constexpr int kRotations = 4;
constexpr double kJitterEps = 0.1;
constexpr std::uint64_t kSeed = 0x5eedULL;

using logit_t = float;
using gate_t = float;

// ---------------------------------------------------------------------------------------------
// Shared random inputs (generated once: N(0, 1) draws are slow next to a routing pass).
// ---------------------------------------------------------------------------------------------

std::vector<float> normal_vector(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

/// kMaxT·kMaxE N(0, 1) values; a [T, E] benchmark views the first T·E of them as contiguous rows.
const std::vector<logit_t>& shared_logits() {
  static const std::vector<logit_t> v = normal_vector(static_cast<std::size_t>(kMaxT * kMaxE), 1);
  return v;
}

/// kMaxT·kMaxK N(0, 1) gate gradients.
const std::vector<gate_t>& shared_grad_gates() {
  static const std::vector<gate_t> v = normal_vector(static_cast<std::size_t>(kMaxT * kMaxK), 2);
  return v;
}

double fused_floor_bytes(index_t T, index_t E, int k) {
  return 3.0 * static_cast<double>(T * E) * sizeof(logit_t) +
         static_cast<double>(T * k) * (4.0 + 2.0 * sizeof(gate_t));
}
double forward_bytes(index_t T, index_t E, int k) {
  return static_cast<double>(T * E) * sizeof(logit_t) +
         static_cast<double>(T * k) * (4.0 + sizeof(gate_t));
}
double backward_bytes(index_t T, index_t E, int k) {
  return 2.0 * static_cast<double>(T * E) * sizeof(logit_t) +
         static_cast<double>(T * k) * sizeof(gate_t);
}

void set_rates(benchmark::State& st, index_t T, double bytes_per_iter) {
  st.SetItemsProcessed(st.iterations() * T);
  st.SetBytesProcessed(
      static_cast<std::int64_t>(static_cast<double>(st.iterations()) * bytes_per_iter));
}

bool threads_available(benchmark::State& st, int threads) {
#if defined(ROUTEGRAD_HAS_OPENMP)
  (void)threads;
  (void)st;
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
// The floor: a plain read/write pass over [T, E] (out = 2·in + 1, which the compiler cannot
// elide or turn into memcpy), split over `threads` OpenMP threads like the routing calls.
// ---------------------------------------------------------------------------------------------

__attribute__((noinline)) void copy_pass(const logit_t* __restrict in, logit_t* __restrict out,
                                         index_t n, int threads) {
#if defined(ROUTEGRAD_HAS_OPENMP)
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (index_t i = 0; i < n; ++i) out[i] = in[i] * 2.0f + 1.0f;
#else
  (void)threads;
  for (index_t i = 0; i < n; ++i) out[i] = in[i] * 2.0f + 1.0f;
#endif
}

void bm_floor_copy(benchmark::State& st, index_t T, index_t E, int threads) {
  if (!threads_available(st, threads)) return;
  const index_t n = T * E;
  const logit_t* in = shared_logits().data();
  std::vector<logit_t> out(static_cast<std::size_t>(n), 0.0f);
  copy_pass(in, out.data(), n, threads);  // warm the pages and the thread pool
  for (auto _ : st) {
    copy_pass(in, out.data(), n, threads);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_rates(st, T, 2.0 * static_cast<double>(n) * sizeof(logit_t));
  st.counters["fused_floor_bytes"] = benchmark::Counter(fused_floor_bytes(T, E, 1));
}

// ---------------------------------------------------------------------------------------------
// Routing.
// ---------------------------------------------------------------------------------------------

enum class op { fwd, bwd, step };

const char* op_name(op o) {
  switch (o) {
    case op::fwd:
      return "fwd";
    case op::bwd:
      return "bwd";
    case op::step:
      return "step";
  }
  return "?";
}

/// The routing states a forward produced for each of the kRotations Philox offsets, kept for the
/// whole run (keyed by estimator and shape) so that the backward benchmarks' repetitions and
/// thread counts replay the same states without routing them again.
struct saved_states {
  std::vector<std::int32_t> experts;  // [kRotations][T, k]
  std::vector<std::uint8_t> coins;    // [kRotations][T, k]
  bool complete = false;              // every rotation holds a forward's state
};

/// Caller-owned buffers of one benchmark.
struct routing_buffers {
  index_t T, E;
  int k;
  std::shared_ptr<saved_states> saved;
  std::vector<gate_t> gates;         // [T, k]
  std::vector<logit_t> grad_logits;  // [T, E] (value-initialised: every page is touched)

  routing_buffers(std::shared_ptr<saved_states> s, index_t t, index_t e, int kk)
      : T(t),
        E(e),
        k(kk),
        saved(std::move(s)),
        gates(static_cast<std::size_t>(t * kk), 0.0f),
        grad_logits(static_cast<std::size_t>(t * e), 0.0f) {}

  routegrad::host_routing_state state(int r) {
    routegrad::host_routing_state s;
    s.experts = routegrad::host_matrix(saved->experts.data() + r * T * k, T, k);
    s.coins = routegrad::host_matrix(saved->coins.data() + r * T * k, T, k);
    s.rng = {kSeed, static_cast<std::uint64_t>(r), 0};
    return s;
  }
};

/// The saved states of (estimator, T, E, k). The forward and step benchmarks write the same
/// values into them (same seed and offsets), so they may share them.
std::shared_ptr<saved_states> saved_states_for(const std::string& key, index_t T, int k) {
  static std::map<std::string, std::shared_ptr<saved_states>> cache;
  auto& slot = cache[key];
  if (!slot) {
    slot = std::make_shared<saved_states>();
    slot->experts.assign(static_cast<std::size_t>(kRotations * T * k), 0);
    slot->coins.assign(static_cast<std::size_t>(kRotations * T * k), 0);
  }
  return slot;
}

/// Mean size of slot 0's SparseMixer candidate set (the experts the jitter mask keeps).
double mean_candidates(const logit_t* x, index_t T, index_t E) {
  double total = 0.0;
  for (index_t t = 0; t < T; ++t) {
    const logit_t* row = x + t * E;
    const float m = *std::max_element(row, row + E);
    for (index_t e = 0; e < E; ++e)
      total += routegrad::jitter_masked(row[e], m, static_cast<float>(2 * kJitterEps)) ? 0.0 : 1.0;
  }
  return total / static_cast<double>(T);
}

template <class Est>
void bm_route(benchmark::State& st, const char* name, op o, index_t T, index_t E, int k,
              int threads) {
  if (!threads_available(st, threads)) return;
  routegrad::routing_options opt;
  opt.k = k;
  opt.mode = routegrad::routing_mode::train;
  opt.jitter_eps = kJitterEps;
  const routegrad::cpu::execution exec{threads};

  const auto logits = routegrad::host_matrix<const logit_t>(shared_logits().data(), T, E);
  const auto grad_gates = routegrad::host_matrix<const gate_t>(shared_grad_gates().data(), T, k);
  routing_buffers buf(saved_states_for(std::string(name) + "/" + std::to_string(T) + "/" +
                                           std::to_string(E) + "/" + std::to_string(k),
                                       T, k),
                      T, E, k);
  const auto gates = routegrad::host_matrix(buf.gates.data(), T, k);
  const auto grad_logits = routegrad::host_matrix(buf.grad_logits.data(), T, E);

  auto forward = [&](int r) {
    return routegrad::route_forward<Est>(opt, logits, buf.state(r), gates, {}, exec);
  };
  auto backward = [&](int r) {
    return routegrad::route_backward<Est>(opt, logits, buf.state(r), grad_gates, grad_logits,
                                          routegrad::grad_mode::overwrite, {}, exec);
  };

  // Untimed, once per (estimator, shape): one forward per rotation, whose states the backward
  // benchmark replays (the results do not depend on the thread count).
  if (o == op::bwd && !buf.saved->complete) {
    for (int r = 0; r < kRotations; ++r) {
      const routegrad::status s = forward(r);
      if (!s) {
        st.SkipWithError(s.message());
        return;
      }
    }
    buf.saved->complete = true;
  }

  int r = 0;
  bool failed = false;
  for (auto _ : st) {
    routegrad::status s;
    if (o != op::bwd) s = forward(r);
    if (s && o != op::fwd) s = backward(r);
    failed |= !s;
    benchmark::DoNotOptimize(buf.gates.data());
    benchmark::DoNotOptimize(buf.grad_logits.data());
    benchmark::ClobberMemory();
    r = (r + 1) % kRotations;
  }
  if (failed) {
    st.SkipWithError("a routing call failed inside the timed loop");
    return;
  }
  const double bytes = o == op::fwd   ? forward_bytes(T, E, k)
                       : o == op::bwd ? backward_bytes(T, E, k)
                                      : fused_floor_bytes(T, E, k);
  set_rates(st, T, bytes);
  if constexpr (Est::jitter_mask)
    st.counters["cand"] =
        benchmark::Counter(mean_candidates(shared_logits().data(), std::min<index_t>(T, 4096), E));
}

// ---------------------------------------------------------------------------------------------
// Registration.
// ---------------------------------------------------------------------------------------------

constexpr index_t kTs[] = {4096, 65536};
constexpr index_t kEs[] = {8, 64, 128};
constexpr int kKs[] = {1, 2};
constexpr op kOps[] = {op::fwd, op::bwd, op::step};

std::string route_name(op o, const char* est, index_t T, index_t E, int k, int threads) {
  return std::string("route/") + op_name(o) + "/" + est + "/T:" + std::to_string(T) +
         "/E:" + std::to_string(E) + "/k:" + std::to_string(k) +
         "/threads:" + std::to_string(threads);
}

template <class Est>
void register_estimator(const char* name) {
  for (op o : kOps)
    for (index_t T : kTs)
      for (index_t E : kEs)
        for (int k : kKs) {
          // One thread everywhere; two threads for the step at T = 65536 (every E and k), and
          // for the forward and the backward alone at the scaling target's size (E = 64, k = 1).
          const bool two = T == 65536 && (o == op::step || (E == 64 && k == 1));
          for (int threads = 1; threads <= (two ? 2 : 1); ++threads)
            benchmark::RegisterBenchmark(
                route_name(o, name, T, E, k, threads).c_str(),
                [=](benchmark::State& st) { bm_route<Est>(st, name, o, T, E, k, threads); })
                ->UseRealTime()
                ->Unit(benchmark::kMicrosecond);
        }
}

void register_all() {
  for (index_t T : kTs)
    for (index_t E : kEs)
      for (int threads = 1; threads <= 2; ++threads)
        benchmark::RegisterBenchmark(
            ("floor/copy/T:" + std::to_string(T) + "/E:" + std::to_string(E) +
             "/threads:" + std::to_string(threads))
                .c_str(),
            [=](benchmark::State& st) { bm_floor_copy(st, T, E, threads); })
            ->UseRealTime()
            ->Unit(benchmark::kMicrosecond);
  register_estimator<routegrad::switch_router>("switch_router");
  register_estimator<routegrad::topk_softmax>("topk_softmax");
  register_estimator<routegrad::sparsemixer_euler>("sparsemixer_euler");
  register_estimator<routegrad::sparsemixer_midpoint>("sparsemixer_midpoint");
  register_estimator<routegrad::sparsemixer_heun3>("sparsemixer_heun3");
}

}  // namespace

int main(int argc, char** argv) {
  // Defaults that keep the whole grid short on a small machine; flags given on the command line
  // come later and win.
  std::vector<char*> args;
  args.push_back(argv[0]);
  static char min_time[] = "--benchmark_min_time=0.05";
  args.push_back(min_time);
  for (int i = 1; i < argc; ++i) args.push_back(argv[i]);
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
#if defined(ROUTEGRAD_HAS_OPENMP)
  benchmark::AddCustomContext("openmp_max_threads", std::to_string(omp_get_max_threads()));
#else
  benchmark::AddCustomContext("openmp_max_threads", "none (built without OpenMP)");
#endif
  benchmark::AddCustomContext("routegrad_version", routegrad::version_string());
  benchmark::AddCustomContext("jitter_eps", "0.1");
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
