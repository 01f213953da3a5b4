// The CUDA MoE layer against the CPU layer (moe_cpu_bridge.hpp) on random inputs: every
// estimator, k = 1, 2, 3, every activation, ω on and off, capacity with drops, dense mode,
// auxiliary losses, NaN rows, strided batches and parameters (including layouts cuBLAS cannot
// read directly), fp64 (Switch and heun3) / fp32 / fp16 / bf16; the same routing decisions as the
// CPU for the same seed; bitwise reproducibility; grouped and per-expert GEMMs; T = 0; and bad
// input (a status before anything is written). Every output starts poisoned (NaN), and what a view
// does not cover (padding) must stay poisoned.
#include <cublas_v2.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>

#include "cuda/moe_cpu_bridge.hpp"
#include "routing_check.cuh"

namespace {

using namespace routegrad;
namespace gpu = routegrad::test::gpu;
using gpu::device_buffer;
using gpu::from_double;
using gpu::to_double;

/// How a test tensor is laid out in device memory.
enum class lay {
  contiguous,  // row-major
  padded,      // row-major with padded rows (and slabs)
  transposed,  // column-major (rank 3: each slab column-major); cuBLAS reads it with op T
  skip,        // every other element: no unit stride, cuBLAS cannot read it
};

/// A tensor in device memory with a host mirror; elements outside the view (padding) hold
/// `fill` and are checked to keep it.
template <class T, int R>
struct dtensor {
  std::array<index_t, R> ext{}, str{};
  std::vector<T> host;
  T* dev = nullptr;

  dtensor(std::array<index_t, R> e, lay l, T fill) : ext(e) {
    if constexpr (R == 1) {
      str[0] = l == lay::contiguous ? 1 : (l == lay::transposed ? 3 : 2);
    } else if constexpr (R == 2) {
      const index_t a = ext[0], b = ext[1];
      if (l == lay::contiguous) str = {b, 1};
      if (l == lay::padded) str = {b + 3, 1};
      if (l == lay::transposed) str = {1, a};
      if (l == lay::skip) str = {2 * b, 2};
    } else {
      const index_t a = ext[1], b = ext[2];
      if (l == lay::contiguous) str = {a * b, b, 1};
      if (l == lay::padded) str = {a * (b + 2) + 5, b + 2, 1};
      if (l == lay::transposed) str = {a * b + 7, 1, a};
      if (l == lay::skip) str = {2 * a * b, 2 * b, 2};
    }
    index_t span = 2;
    for (int i = 0; i < R; ++i) span += (ext[i] > 0 ? ext[i] - 1 : 0) * str[i];
    host.assign(static_cast<std::size_t>(span), fill);
    RG_CUDA_REQUIRE(cudaMalloc(&dev, host.size() * sizeof(T)));
    upload();
  }
  dtensor(const dtensor&) = delete;
  dtensor& operator=(const dtensor&) = delete;
  ~dtensor() { cudaFree(dev); }

  index_t count() const {
    index_t n = 1;
    for (int i = 0; i < R; ++i) n *= ext[i];
    return n;
  }
  /// Storage offset of the flat-th element in logical row-major order.
  index_t offset(index_t flat) const {
    index_t o = 0;
    for (int i = R - 1; i >= 0; --i) {
      o += (flat % ext[i]) * str[i];
      flat /= ext[i];
    }
    return o;
  }
  void upload() {
    RG_CUDA_REQUIRE(cudaMemcpy(dev, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  void download() {
    RG_CUDA_REQUIRE(cudaMemcpy(host.data(), dev, host.size() * sizeof(T), cudaMemcpyDeviceToHost));
  }
  /// Sets the logical elements (rounded to T) and uploads; returns the rounded values.
  std::vector<double> assign(const std::vector<double>& v) {
    std::vector<double> rounded(v.size());
    for (index_t i = 0; i < count(); ++i) {
      const T x = from_double<T>(v[static_cast<std::size_t>(i)]);
      host[static_cast<std::size_t>(offset(i))] = x;
      rounded[static_cast<std::size_t>(i)] = to_double(x);
    }
    upload();
    return rounded;
  }
  void fill_all(T v) {
    std::fill(host.begin(), host.end(), v);
    upload();
  }
  /// Downloads and returns the logical elements.
  std::vector<double> values() {
    download();
    std::vector<double> v(static_cast<std::size_t>(count()));
    for (index_t i = 0; i < count(); ++i)
      v[static_cast<std::size_t>(i)] = to_double(host[static_cast<std::size_t>(offset(i))]);
    return v;
  }
  /// Whether every element outside the view still holds NaN (after values()).
  bool padding_is_nan() const {
    std::vector<char> inside(host.size(), 0);
    for (index_t i = 0; i < count(); ++i) inside[static_cast<std::size_t>(offset(i))] = 1;
    for (std::size_t i = 0; i < host.size(); ++i)
      if (!inside[i] && !std::isnan(to_double(host[i]))) return false;
    return true;
  }
  device_view<T, R> view() const {
    index_t e[R], s[R];
    for (int i = 0; i < R; ++i) e[i] = ext[i], s[i] = str[i];
    return device_view<T, R>(dev, e, s);
  }
  device_view<const T, R> cview() const { return view(); }
};

template <class T>
T nan_t() {
  return from_double<T>(std::numeric_limits<double>::quiet_NaN());
}

/// Normwise closeness: |got − want| ≤ rtol · max |want| element by element (NaN matches NaN).
void check_close(const std::vector<double>& got, const std::vector<double>& want, double rtol,
                 const char* what) {
  REQUIRE_MESSAGE(got.size() == want.size(), what);
  double scale = 0.0;
  for (double w : want)
    if (std::isfinite(w)) scale = std::max(scale, std::fabs(w));
  const double tol = rtol * std::max(scale, 1e-30);
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i]) && std::isnan(want[i])) continue;
    if (!(std::fabs(got[i] - want[i]) <= tol)) {
      FAIL_CHECK(what << "[" << i << "]: GPU " << got[i] << ", CPU " << want[i] << " (tolerance "
                      << tol << ")");
      return;
    }
  }
}

template <class T>
double layer_tolerance() {
  if constexpr (std::is_same_v<T, double>)
    return 1e-9;
  else if constexpr (std::is_same_v<T, float>)
    return 2e-4;
  else if constexpr (std::is_same_v<T, __half>)
    return 1.5e-2;
  else
    return 6e-2;  // bf16: every intermediate (pre, act, f, df, da, ...) is rounded to 8 bits
}

/// Every buffer of one layer problem on the GPU, with the same values for the CPU layer.
template <class T>
struct gpu_layer {
  using M = cuda::math_t<T>;
  moe_options opt;
  index_t n;
  rng_stream rng{0x5eed, 11, 3};
  dtensor<T, 2> x, dy, y, dx, Wr, b1, b2, gWr, gb1, gb2;
  dtensor<T, 1> br, om, gbr, gom;
  dtensor<T, 3> W1, W2, gW1, gW2;
  std::vector<double> vx, vdy, vWr, vbr, vW1, vb1, vW2, vb2, vom;  // the rounded inputs
  std::byte* context = nullptr;
  std::size_t context_bytes = 0;
  device_buffer<std::int64_t> counts;  // expert_counts [E], kept_counts [E], dropped, nonfinite
  device_buffer<double> losses;        // load balance, z-loss

  /// `exact`: x, W_r and b_r on coarse dyadic grids (d ≤ 16), so that every back end computes
  /// bit-identical logits and routes identically even at near-ties (used for the large cases).
  gpu_layer(const moe_options& o, index_t tokens, std::uint64_t seed, lay batch = lay::contiguous,
            lay params = lay::contiguous, bool exact = false)
      : opt(o),
        n(tokens),
        x({tokens, o.d_model}, batch, nan_t<T>()),
        dy({tokens, o.d_model}, batch, nan_t<T>()),
        y({tokens, o.d_model}, batch, nan_t<T>()),
        dx({tokens, o.d_model}, batch, nan_t<T>()),
        Wr({o.experts, o.d_model}, params, nan_t<T>()),
        b1({o.experts, w1_rows(o)}, params, nan_t<T>()),
        b2({o.experts, o.d_model}, params, nan_t<T>()),
        gWr({o.experts, o.d_model}, params, nan_t<T>()),
        gb1({o.experts, w1_rows(o)}, params, nan_t<T>()),
        gb2({o.experts, o.d_model}, params, nan_t<T>()),
        br({o.experts}, params, nan_t<T>()),
        om({o.d_model}, params, nan_t<T>()),
        gbr({o.experts}, params, nan_t<T>()),
        gom({o.d_model}, params, nan_t<T>()),
        W1({o.experts, w1_rows(o), o.d_model}, params, nan_t<T>()),
        W2({o.experts, o.d_model, o.d_hidden}, params, nan_t<T>()),
        gW1({o.experts, w1_rows(o), o.d_model}, params, nan_t<T>()),
        gW2({o.experts, o.d_model, o.d_hidden}, params, nan_t<T>()),
        counts(std::vector<std::int64_t>(static_cast<std::size_t>(2 * o.experts + 2), -7)),
        losses(std::vector<double>(2, std::nan(""))) {
    std::mt19937_64 gen(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    std::uniform_real_distribution<double> uni(0.5, 1.5);
    const auto random = [&](index_t count, double scale) {
      std::vector<double> v(static_cast<std::size_t>(count));
      for (double& e : v) e = scale * normal(gen);
      return v;
    };
    const auto grid = [](std::vector<double> v, double step, double bound) {
      for (double& e : v) e = std::max(-bound, std::min(bound, std::round(e / step) * step));
      return v;
    };
    const double d = static_cast<double>(o.d_model), h = static_cast<double>(o.d_hidden);
    std::vector<double> wr = random(Wr.count(), 1.0 / std::sqrt(d)), b = random(br.count(), 0.3);
    if (exact) {
      wr = grid(wr, 1.0 / 16, 2.0);
      b = grid(b, 1.0 / 8, 1.0);
    }
    vWr = Wr.assign(wr);
    vbr = br.assign(b);
    vW1 = W1.assign(random(W1.count(), 1.0 / std::sqrt(d)));
    vb1 = b1.assign(random(b1.count(), 0.2));
    vW2 = W2.assign(random(W2.count(), 1.0 / std::sqrt(h)));
    vb2 = b2.assign(random(b2.count(), 0.2));
    std::vector<double> w(static_cast<std::size_t>(om.count()));
    for (double& e : w) e = uni(gen);
    vom = om.assign(w);
    vx = x.assign(exact ? grid(random(x.count(), 1.0), 0.25, 4.0) : random(x.count(), 1.0));
    vdy = dy.assign(random(dy.count(), 1.0));
    context_bytes = cuda::moe_context_bytes<T>(o, tokens);
    if (context_bytes) RG_CUDA_REQUIRE(cudaMalloc(&context, context_bytes));
  }
  gpu_layer(const gpu_layer&) = delete;
  gpu_layer& operator=(const gpu_layer&) = delete;
  ~gpu_layer() { cudaFree(context); }

  /// x row t set to NaN (a row the router cannot route).
  void nan_row(index_t t) {
    for (index_t c = 0; c < opt.d_model; ++c)
      vx[static_cast<std::size_t>(t * opt.d_model + c)] = std::numeric_limits<double>::quiet_NaN();
    x.assign(vx);
  }

  cuda::device_moe_params<T> params() const {
    cuda::device_moe_params<T> p{Wr.cview(), br.cview(), W1.cview(), b1.cview(),
                                 W2.cview(), b2.cview(), {}};
    if (opt.use_omega) p.omega = om.cview();
    return p;
  }
  cuda::device_moe_grads<T> grads() const {
    cuda::device_moe_grads<T> g{gWr.view(), gbr.view(), gW1.view(), gb1.view(),
                                gW2.view(), gb2.view(), {}};
    if (opt.use_omega) g.omega = gom.view();
    return g;
  }
  cuda::device_moe_stats stats() const {
    const index_t E = opt.experts;
    return {counts.ptr, counts.ptr + E, counts.ptr + 2 * E,
            losses.ptr, losses.ptr + 1, counts.ptr + 2 * E + 1};
  }
  device_view<std::byte> ctx() const {
    return device_view<std::byte>(context, {static_cast<index_t>(context_bytes)});
  }

  template <class Est>
  status forward(const cuda::execution& exec = {}) {
    return moe_forward<Est>(opt, params(), x.cview(), y.view(), rng, ctx(), stats(), exec);
  }
  template <class Est>
  status backward(grad_mode mode = grad_mode::overwrite, const cuda::execution& exec = {}) {
    return moe_backward<Est>(
        opt, params(), x.cview(), dy.cview(),
        device_view<const std::byte>(context, {static_cast<index_t>(context_bytes)}), grads(),
        dx.view(), mode, exec);
  }

  void poison_outputs() {
    for (auto* t : {&y, &dx, &gWr, &gb1, &gb2}) t->fill_all(nan_t<T>());
    for (auto* t : {&gbr, &gom}) t->fill_all(nan_t<T>());
    for (auto* t : {&gW1, &gW2}) t->fill_all(nan_t<T>());
  }

  /// The gradients' logical values in cpu_problem::grad_init's order.
  std::vector<double> gradient_values() {
    std::vector<double> all;
    for (const std::vector<double>& v :
         {gWr.values(), gbr.values(), gW1.values(), gb1.values(), gW2.values(), gb2.values()})
      all.insert(all.end(), v.begin(), v.end());
    if (opt.use_omega) {
      const std::vector<double> v = gom.values();
      all.insert(all.end(), v.begin(), v.end());
    }
    return all;
  }

  template <class Est>
  gpu::cpu_problem problem(grad_mode mode) const {
    gpu::cpu_problem p;
    p.opt = opt;
    p.estimator = gpu::estimator_id_of<Est>();
    p.rng = rng;
    p.tokens = n;
    p.in_double = std::is_same_v<T, double>;
    p.mode = mode;
    p.x = vx;
    p.dy = vdy;
    p.router_weight = vWr;
    p.router_bias = vbr;
    p.w1 = vW1;
    p.b1 = vb1;
    p.w2 = vW2;
    p.b2 = vb2;
    if (opt.use_omega) p.omega = vom;
    return p;
  }

  /// The routing decisions the forward left in the context ([T, k] row-major, as the CPU's).
  struct decisions {
    std::vector<double> logits, gates;
    std::vector<std::int32_t> experts;
    std::vector<std::uint8_t> coins;
    std::vector<std::int64_t> rows;
  };
  decisions saved() const {
    const cuda::moe_context_layout L = cuda::moe_context_layout_of<T>(opt, n);
    std::vector<std::byte> c(context_bytes);
    RG_CUDA_REQUIRE(cudaMemcpy(c.data(), context, context_bytes, cudaMemcpyDeviceToHost));
    const index_t E = opt.experts, k = opt.routing.k;
    const auto* z = reinterpret_cast<const M*>(c.data() + L.logits);
    const auto* g = reinterpret_cast<const M*>(c.data() + L.route_gates);
    const auto* ex = reinterpret_cast<const std::int32_t*>(c.data() + L.experts);
    const auto* co = reinterpret_cast<const std::uint8_t*>(c.data() + L.coins);
    const auto* rp = reinterpret_cast<const std::int32_t*>(c.data() + L.row_of_pair);
    decisions s;
    for (index_t t = 0; t < n; ++t) {
      for (index_t e = 0; e < E; ++e) s.logits.push_back(static_cast<double>(z[t * E + e]));
      for (index_t j = 0; j < k; ++j) {
        s.experts.push_back(ex[j * n + t]);
        s.coins.push_back(co[j * n + t]);
        s.gates.push_back(static_cast<double>(g[j * n + t]));
        if (opt.mix == mixing::sparse) s.rows.push_back(rp[j * n + t]);
      }
    }
    return s;
  }
};

/// Runs forward and backward on the GPU and the CPU and compares everything. Returns false when
/// the routing decisions differ (then the rest is not compared).
template <class Est, class T>
bool compare_with_cpu(gpu_layer<T>& L, grad_mode mode = grad_mode::overwrite,
                      const cuda::execution& exec = {}) {
  // fp64 layers route with two estimators: each estimator's fp64 routing kernels cost this file
  // about 50 s of nvcc (2 cores, 2026-12-01: five estimators 314 s, these two 165 s), and the
  // layer treats every estimator alike past its routing calls, which the fp32 cases run with all
  // five (test_cuda_routing checks fp64 routing itself, with midpoint and top-k).
  static_assert(!std::is_same_v<T, double> || std::is_same_v<Est, switch_router> ||
                    std::is_same_v<Est, sparsemixer_heun3>,
                "fp64 layer cases: switch_router or sparsemixer_heun3 (compile time)");
  CAPTURE(L.opt.routing.k);
  CAPTURE(L.opt.experts);
  CAPTURE(static_cast<int>(L.opt.act));
  CAPTURE(static_cast<int>(L.opt.mix));
  CAPTURE(L.opt.use_omega);
  CAPTURE(L.opt.capacity_factor);
  CAPTURE(Est::name);
  gpu::cpu_problem prob = L.template problem<Est>(mode);
  if (mode == grad_mode::accumulate) {  // start every gradient and dx from random values
    std::mt19937_64 gen(99);
    std::normal_distribution<double> normal(0.0, 1.0);
    std::vector<double> g(gpu::gradient_elements(L.opt)), d(static_cast<std::size_t>(L.dx.count()));
    for (double& v : g) v = normal(gen);
    for (double& v : d) v = normal(gen);
    std::size_t off = 0;
    const auto part = [&](auto& t) {
      std::vector<double> v(g.begin() + static_cast<std::ptrdiff_t>(off),
                            g.begin() + static_cast<std::ptrdiff_t>(off) + t.count());
      off += static_cast<std::size_t>(t.count());
      const std::vector<double> r = t.assign(v);
      std::copy(r.begin(), r.end(), g.begin() + static_cast<std::ptrdiff_t>(off) - t.count());
    };
    part(L.gWr);
    part(L.gbr);
    part(L.gW1);
    part(L.gb1);
    part(L.gW2);
    part(L.gb2);
    if (L.opt.use_omega) part(L.gom);
    prob.grad_init = g;
    prob.dx_init = L.dx.assign(d);
  }
  const gpu::cpu_result cpu = gpu::run_cpu_layer(prob);
  REQUIRE_MESSAGE(cpu.forward_code == 0, cpu.forward_message);
  REQUIRE_MESSAGE(cpu.backward_code == 0, cpu.backward_message);

  const status f = L.template forward<Est>(exec);
  REQUIRE_MESSAGE(f.is_ok(), f.message());
  RG_CUDA_REQUIRE(cudaDeviceSynchronize());
  const double tol = layer_tolerance<T>();
  const index_t E = L.opt.experts;

  // Routing: the same logits, and the same choices and coins for the same seed.
  const auto dec = L.saved();
  check_close(dec.logits, cpu.logits, std::is_same_v<T, double> ? 1e-12 : 1e-5, "logits");
  index_t differ = 0;
  for (std::size_t i = 0; i < dec.experts.size(); ++i)
    differ += dec.experts[i] != cpu.experts[i] || dec.coins[i] != cpu.coins[i];
  CHECK_MESSAGE(differ == 0,
                "routing decisions differ from the CPU layer's in " << differ << " slots");
  if (differ != 0) return false;
  check_close(dec.gates, cpu.gates, std::is_same_v<T, double> ? 1e-12 : 1e-5, "gates");
  if (L.opt.mix == mixing::sparse) {
    REQUIRE(dec.rows.size() == cpu.rows.size());
    for (std::size_t i = 0; i < dec.rows.size(); ++i)
      CHECK_MESSAGE(dec.rows[i] == cpu.rows[i], "packed row of pair " << i);
  }

  // Statistics.
  const std::vector<std::int64_t> counts = L.counts.download();
  const std::vector<double> losses = L.losses.download();
  for (index_t e = 0; e < E; ++e) {
    CHECK(counts[static_cast<std::size_t>(e)] == cpu.expert_counts[static_cast<std::size_t>(e)]);
    CHECK(counts[static_cast<std::size_t>(E + e)] == cpu.kept_counts[static_cast<std::size_t>(e)]);
  }
  CHECK(counts[static_cast<std::size_t>(2 * E)] == cpu.dropped);
  CHECK(counts[static_cast<std::size_t>(2 * E + 1)] == cpu.nonfinite);
  CHECK(losses[0] == doctest::Approx(cpu.load_balance_loss).epsilon(1e-5));
  CHECK(losses[1] == doctest::Approx(cpu.z_loss).epsilon(1e-5));

  // Forward output; the padding of y is never written.
  check_close(L.y.values(), cpu.y, tol, "y");
  CHECK(L.y.padding_is_nan());

  const status b = L.template backward<Est>(mode, exec);
  REQUIRE_MESSAGE(b.is_ok(), b.message());
  RG_CUDA_REQUIRE(cudaDeviceSynchronize());
  check_close(L.dx.values(), cpu.dx, tol, "dx");
  check_close(L.gWr.values(), cpu.router_weight, tol, "grads.router_weight");
  check_close(L.gbr.values(), cpu.router_bias, tol, "grads.router_bias");
  check_close(L.gW1.values(), cpu.w1, tol, "grads.w1");
  check_close(L.gb1.values(), cpu.b1, tol, "grads.b1");
  check_close(L.gW2.values(), cpu.w2, tol, "grads.w2");
  check_close(L.gb2.values(), cpu.b2, tol, "grads.b2");
  if (L.opt.use_omega) check_close(L.gom.values(), cpu.omega, tol, "grads.omega");
  if (mode == grad_mode::overwrite) {
    CHECK(L.dx.padding_is_nan());
    CHECK(L.gW1.padding_is_nan());
    CHECK(L.gW2.padding_is_nan());
    CHECK(L.gWr.padding_is_nan());
  }
  return true;
}

moe_options options(index_t d, index_t h, int E, int k, activation act, bool omega) {
  moe_options o;
  o.d_model = d;
  o.d_hidden = h;
  o.experts = E;
  o.routing.k = k;
  o.act = act;
  o.use_omega = omega;
  return o;
}

template <class Est>
void sweep_fp32(std::uint64_t seed) {
  const activation acts[] = {activation::gelu, activation::silu, activation::swiglu};
  int case_index = 0;
  for (int k : {1, 2})
    for (bool omega : {false, true}) {
      const activation act = acts[case_index++ % 3];
      gpu_layer<float> L(options(24, 40, 6, k, act, omega), 67, seed++);
      compare_with_cpu<Est>(L);
    }
}

}  // namespace

TEST_SUITE("moe") {
  TEST_CASE("cuda moe layer fp32: every estimator, k = 1 and 2, activations, omega") {
    sweep_fp32<switch_router>(10);
    sweep_fp32<topk_softmax>(20);
    sweep_fp32<sparsemixer_euler>(30);
    sweep_fp32<sparsemixer_midpoint>(40);
    sweep_fp32<sparsemixer_heun3>(50);
  }

  TEST_CASE("cuda moe layer fp64: tight agreement, k = 2 and 3, SwiGLU, omega, losses") {
    moe_options o = options(16, 24, 5, 2, activation::swiglu, true);
    o.routing.load_balance_coef = 0.02;
    o.routing.z_loss_coef = 0.003;
    gpu_layer<double> L(o, 45, 7);
    compare_with_cpu<sparsemixer_heun3>(L);
    o.routing.k = 3;
    o.act = activation::gelu;
    gpu_layer<double> L3(o, 38, 8);
    compare_with_cpu<sparsemixer_heun3>(L3);
    gpu_layer<double> S(o, 38, 9);
    compare_with_cpu<switch_router>(S);
  }

  TEST_CASE("cuda moe layer: capacity drops pairs in (slot, token) order") {
    for (double cf : {0.5, 1.0}) {
      moe_options o = options(24, 32, 4, 2, activation::gelu, false);
      o.capacity_factor = cf;
      gpu_layer<float> L(o, 90, 100 + static_cast<std::uint64_t>(cf * 10));
      if (!compare_with_cpu<sparsemixer_euler>(L)) continue;
      if (cf < 1.0) {
        const std::vector<std::int64_t> c = L.counts.download();
        CHECK(c[static_cast<std::size_t>(2 * o.experts)] > 0);  // something was dropped
      }
    }
    moe_options o = options(16, 16, 8, 1, activation::silu, true);
    o.capacity_factor = 0.8;
    gpu_layer<double> L(o, 60, 111);
    compare_with_cpu<switch_router>(L);
  }

  TEST_CASE("cuda moe layer: dense mode (every expert on every token), with losses") {
    moe_options o = options(24, 32, 4, 2, activation::gelu, true);
    o.mix = mixing::dense;
    o.routing.load_balance_coef = 0.01;
    o.routing.z_loss_coef = 0.001;
    gpu_layer<float> L(o, 33, 200);
    compare_with_cpu<sparsemixer_midpoint>(L);
    o.routing.load_balance_coef = o.routing.z_loss_coef = 0.0;
    o.act = activation::swiglu;
    gpu_layer<double> D(o, 29, 201);
    compare_with_cpu<switch_router>(D);
  }

  TEST_CASE("cuda moe layer: auxiliary losses, renormalised gates, eval mode") {
    moe_options o = options(24, 40, 6, 2, activation::silu, true);
    o.routing.load_balance_coef = 0.05;
    o.routing.z_loss_coef = 0.002;
    o.routing.renormalize = true;
    gpu_layer<float> L(o, 80, 300);
    compare_with_cpu<sparsemixer_heun3>(L);
    o.routing.mode = routing_mode::eval;
    o.routing.renormalize = false;
    gpu_layer<float> V(o, 80, 301);
    compare_with_cpu<switch_router>(V);
  }

  TEST_CASE("cuda moe layer: strided batches and parameters") {
    // padded rows; column-major batches and slabs (cuBLAS with op T); every other element (no
    // unit stride: x is staged for cuBLAS, the weights are rejected — see the bad-input test).
    const lay batches[] = {lay::padded, lay::transposed, lay::skip};
    const lay params[] = {lay::padded, lay::transposed, lay::transposed};
    for (int i = 0; i < 3; ++i) {
      CAPTURE(i);
      moe_options o = options(24, 40, 6, 2, i == 1 ? activation::swiglu : activation::gelu, true);
      o.capacity_factor = i == 2 ? 0.7 : 0.0;
      gpu_layer<float> L(o, 57, 400 + static_cast<std::uint64_t>(i), batches[i], params[i]);
      compare_with_cpu<sparsemixer_midpoint>(L);
    }
    moe_options o = options(16, 24, 4, 2, activation::gelu, false);
    o.mix = mixing::dense;
    gpu_layer<double> D(o, 21, 410, lay::skip, lay::padded);
    compare_with_cpu<sparsemixer_heun3>(D);
  }

  TEST_CASE("cuda moe layer bf16 and fp16: within the storage type's tolerance") {
    for (int k : {1, 2}) {
      moe_options o = options(32, 48, 6, k, k == 1 ? activation::gelu : activation::swiglu, true);
      o.capacity_factor = k == 2 ? 0.9 : 0.0;
      gpu_layer<__nv_bfloat16> B(o, 75, 500 + static_cast<std::uint64_t>(k));
      compare_with_cpu<sparsemixer_heun3>(B);
      gpu_layer<__half> H(o, 75, 510 + static_cast<std::uint64_t>(k), lay::padded);
      compare_with_cpu<switch_router>(H);
    }
    // Widths that are not a multiple of the vector width (scalar kernels).
    moe_options o = options(20, 37, 5, 2, activation::silu, false);
    gpu_layer<__nv_bfloat16> B(o, 41, 520);
    compare_with_cpu<sparsemixer_euler>(B);
  }

  TEST_CASE("cuda moe layer: gradients accumulate") {
    moe_options o = options(24, 32, 5, 2, activation::gelu, true);
    o.capacity_factor = 0.8;
    gpu_layer<float> L(o, 50, 600);
    compare_with_cpu<sparsemixer_heun3>(L, grad_mode::accumulate);
    o.mix = mixing::dense;
    gpu_layer<double> D(o, 20, 601);
    compare_with_cpu<switch_router>(D, grad_mode::accumulate);
  }

  TEST_CASE("cuda moe layer: rows the router cannot route (NaN input rows)") {
    moe_options o = options(16, 24, 4, 2, activation::gelu, true);
    o.routing.z_loss_coef = 0.001;
    gpu_layer<float> L(o, 40, 700);
    L.nan_row(5);
    L.nan_row(17);
    if (compare_with_cpu<sparsemixer_heun3>(L)) {
      const std::vector<std::int64_t> c = L.counts.download();
      CHECK(c[static_cast<std::size_t>(2 * o.experts + 1)] == 2);  // nonfinite rows
      const std::vector<double> y = L.y.values();
      for (index_t col = 0; col < o.d_model; ++col)
        CHECK(y[static_cast<std::size_t>(5 * o.d_model + col)] == 0.0);
    }
    o.mix = mixing::dense;
    gpu_layer<double> D(o, 30, 701);
    D.nan_row(3);
    compare_with_cpu<sparsemixer_heun3>(D);
  }

  TEST_CASE("cuda moe layer: many pairs and experts (multi-chunk dispatch, E > 1024)") {
    // Exactly representable inputs: both back ends compute the same logits bit for bit, so the
    // deterministic top-k router picks the same experts for all 66,000 pairs.
    {
      moe_options o = options(8, 8, 255, 2, activation::silu, false);
      o.capacity_factor = 1.2;
      gpu_layer<float> L(o, 33000, 800, lay::contiguous, lay::contiguous, true);
      compare_with_cpu<topk_softmax>(L);  // 66000 pairs: chunks of 512 pairs, 2 tiles each
    }
    {
      moe_options o = options(8, 8, 1100, 3, activation::gelu, false);
      o.capacity_factor = 1.5;
      gpu_layer<float> L(o, 700, 801, lay::contiguous, lay::contiguous, true);
      compare_with_cpu<topk_softmax>(L);
    }
    {
      moe_options o = options(16, 8, 16, 2, activation::gelu, false);
      o.capacity_factor = 0.9;
      gpu_layer<float> L(o, 3000, 802, lay::contiguous, lay::contiguous, true);
      compare_with_cpu<sparsemixer_heun3>(L);  // 6000 sampled pairs in 24 chunks
    }
  }

  TEST_CASE("cuda moe layer: bitwise reproducible; grouped and per-expert GEMMs agree") {
    moe_options o = options(32, 48, 6, 2, activation::swiglu, true);
    o.capacity_factor = 0.9;
    o.routing.load_balance_coef = 0.01;
    gpu_layer<__nv_bfloat16> L(o, 123, 900);
    const auto run = [&](const cuda::execution& exec) {
      L.poison_outputs();
      REQUIRE(L.forward<sparsemixer_heun3>(exec).is_ok());
      REQUIRE(L.backward<sparsemixer_heun3>(grad_mode::overwrite, exec).is_ok());
      RG_CUDA_REQUIRE(cudaDeviceSynchronize());
      std::vector<double> all = L.y.values();
      for (const std::vector<double>& v : {L.dx.values(), L.gradient_values()})
        all.insert(all.end(), v.begin(), v.end());
      return all;
    };
    // A caller's stream, workspace and cuBLAS handle (whose own stream is restored).
    cudaStream_t stream = nullptr, other = nullptr;
    RG_CUDA_REQUIRE(cudaStreamCreate(&stream));
    RG_CUDA_REQUIRE(cudaStreamCreate(&other));
    cublasHandle_t handle = nullptr;
    REQUIRE(cublasCreate(&handle) == CUBLAS_STATUS_SUCCESS);
    REQUIRE(cublasSetStream(handle, other) == CUBLAS_STATUS_SUCCESS);
    const std::size_t wbytes = cuda::moe_workspace_bytes<__nv_bfloat16>(o, L.n);
    REQUIRE(wbytes > 0);
    void* workspace = nullptr;
    RG_CUDA_REQUIRE(cudaMalloc(&workspace, wbytes));

    const std::vector<double> first = run({});
    const std::vector<double> second = run({});
    CHECK(std::memcmp(first.data(), second.data(), first.size() * sizeof(double)) == 0);
    const std::vector<double> with_all =
        run({stream, workspace, wbytes, handle, cuda::expert_gemm::grouped});
    CHECK(std::memcmp(first.data(), with_all.data(), first.size() * sizeof(double)) == 0);
    cudaStream_t current = nullptr;
    REQUIRE(cublasGetStream(handle, &current) == CUBLAS_STATUS_SUCCESS);
    CHECK(current == other);
    const std::vector<double> per_expert =
        run({stream, nullptr, 0, nullptr, cuda::expert_gemm::per_expert});
    check_close(per_expert, first, 2e-2, "per-expert GEMMs vs grouped");

    cudaFree(workspace);
    cublasDestroy(handle);
    cudaStreamDestroy(stream);
    cudaStreamDestroy(other);
  }

  TEST_CASE("cuda moe layer: T = 0 does nothing (stats zero, overwritten gradients zero)") {
    const moe_options o = options(8, 8, 3, 2, activation::gelu, true);
    gpu_layer<float> L(o, 0, 1000);
    CHECK(cuda::moe_context_bytes<float>(o, 0) == 0);
    REQUIRE(L.forward<sparsemixer_heun3>().is_ok());
    RG_CUDA_REQUIRE(cudaDeviceSynchronize());
    for (std::int64_t c : L.counts.download()) CHECK(c == 0);
    for (double v : L.losses.download()) CHECK(v == 0.0);
    REQUIRE(L.backward<sparsemixer_heun3>(grad_mode::accumulate).is_ok());
    RG_CUDA_REQUIRE(cudaDeviceSynchronize());
    for (double v : L.gradient_values()) CHECK(std::isnan(v));  // accumulate: untouched
    REQUIRE(L.backward<sparsemixer_heun3>(grad_mode::overwrite).is_ok());
    RG_CUDA_REQUIRE(cudaDeviceSynchronize());
    for (double v : L.gradient_values()) CHECK(v == 0.0);
  }

  TEST_CASE("cuda moe layer: bad input is a status and writes nothing") {
    const moe_options o = options(16, 24, 4, 2, activation::gelu, true);
    gpu_layer<float> L(o, 30, 1100);
    const auto forward_untouched = [&] {
      RG_CUDA_REQUIRE(cudaDeviceSynchronize());
      for (double v : L.y.values()) REQUIRE(std::isnan(v));
      for (std::int64_t c : L.counts.download()) REQUIRE(c == -7);
      for (double v : L.losses.download()) REQUIRE(std::isnan(v));
    };
    const auto backward_untouched = [&] {
      RG_CUDA_REQUIRE(cudaDeviceSynchronize());
      for (double v : L.dx.values()) REQUIRE(std::isnan(v));
      for (double v : L.gradient_values()) REQUIRE(std::isnan(v));
    };
    using Est = sparsemixer_heun3;
    const auto fwd_code = [&](const moe_options& opt, const cuda::device_moe_params<float>& p,
                              device_view<const float, 2> x, device_view<float, 2> y,
                              device_view<std::byte> ctx, const cuda::device_moe_stats& st,
                              const cuda::execution& exec = {}) {
      const status s = moe_forward<Est>(opt, p, x, y, L.rng, ctx, st, exec);
      INFO(s.message());
      return s.code();
    };

    // Host memory where device memory is needed.
    std::vector<float> host_x(static_cast<std::size_t>(30 * 16), 1.0f);
    CHECK(fwd_code(o, L.params(), device_view<const float, 2>(host_x.data(), {30, 16}), L.y.view(),
                   L.ctx(), L.stats()) == status_code::wrong_memory_space);
    std::int64_t host_count[4] = {};
    cuda::device_moe_stats host_stats = L.stats();
    host_stats.expert_counts = host_count;
    CHECK(fwd_code(o, L.params(), L.x.cview(), L.y.view(), L.ctx(), host_stats) ==
          status_code::wrong_memory_space);
    // Shapes, k > E, null parameters.
    CHECK(fwd_code(o, L.params(), L.x.cview(),
                   device_view<float, 2>(L.y.dev, {29, 16}, {L.y.str[0], L.y.str[1]}), L.ctx(),
                   L.stats()) == status_code::invalid_shape);
    moe_options bad_k = o;
    bad_k.routing.k = 5;
    CHECK(fwd_code(bad_k, L.params(), L.x.cview(), L.y.view(), L.ctx(), L.stats()) ==
          status_code::invalid_argument);
    cuda::device_moe_params<float> null_w2 = L.params();
    null_w2.w2 = device_view<const float, 3>(nullptr, {4, 16, 24});
    CHECK(fwd_code(o, null_w2, L.x.cview(), L.y.view(), L.ctx(), L.stats()) ==
          status_code::null_pointer);
    cuda::device_moe_params<float> wrong_w1 = L.params();
    wrong_w1.w1 = device_view<const float, 3>(L.W1.dev, {4, 16, 24});
    CHECK(fwd_code(o, wrong_w1, L.x.cview(), L.y.view(), L.ctx(), L.stats()) ==
          status_code::invalid_shape);
    // Weights cuBLAS cannot read (no unit stride).
    dtensor<float, 3> skip_w1({4, 24, 16}, lay::skip, 0.5f);
    cuda::device_moe_params<float> skip = L.params();
    skip.w1 = skip_w1.cview();
    CHECK(fwd_code(o, skip, L.x.cview(), L.y.view(), L.ctx(), L.stats()) ==
          status_code::not_supported);
    // The context: too small, misaligned; y overlapping x.
    CHECK(fwd_code(o, L.params(), L.x.cview(), L.y.view(),
                   device_view<std::byte>(L.context, {static_cast<index_t>(L.context_bytes - 1)}),
                   L.stats()) == status_code::workspace_too_small);
    CHECK(fwd_code(o, L.params(), L.x.cview(), L.y.view(),
                   device_view<std::byte>(L.context + 8, {static_cast<index_t>(L.context_bytes)}),
                   L.stats()) == status_code::misaligned);
    CHECK(fwd_code(o, L.params(), L.x.cview(),
                   device_view<float, 2>(const_cast<float*>(L.x.dev), {30, 16},
                                         {L.x.str[0], L.x.str[1]}),
                   L.ctx(), L.stats()) == status_code::invalid_argument);
    // A workspace smaller than the query says.
    void* small = nullptr;
    RG_CUDA_REQUIRE(cudaMalloc(&small, 1024));
    CHECK(fwd_code(o, L.params(), L.x.cview(), L.y.view(), L.ctx(), L.stats(),
                   {nullptr, small, 1024, nullptr, cuda::expert_gemm::grouped}) ==
          status_code::workspace_too_small);
    forward_untouched();

    // Backward: a context no forward wrote, a forward of another estimator, host gradients.
    RG_CUDA_REQUIRE(cudaMemset(L.context, 0, L.context_bytes));
    CHECK(L.backward<Est>().code() == status_code::invalid_argument);
    backward_untouched();
    REQUIRE(L.forward<topk_softmax>().is_ok());
    const status other = L.backward<Est>();
    CHECK(other.code() == status_code::invalid_argument);
    CHECK(std::string(other.message()).find("estimator") != std::string::npos);
    backward_untouched();
    std::vector<float> host_grad(static_cast<std::size_t>(4 * 16), 0.0f);
    cuda::device_moe_grads<float> g = L.grads();
    g.router_weight = device_view<float, 2>(host_grad.data(), {4, 16});
    CHECK(moe_backward<topk_softmax>(
              o, L.params(), L.x.cview(), L.dy.cview(),
              device_view<const std::byte>(L.context, {static_cast<index_t>(L.context_bytes)}), g,
              L.dx.view())
              .code() == status_code::wrong_memory_space);
    for (float v : host_grad) CHECK(v == 0.0f);
    // dx overlapping a gradient; two gradients overlapping.
    cuda::device_moe_grads<float> overlapping = L.grads();
    overlapping.b2 = device_view<float, 2>(L.gb1.dev, {4, 16}, {L.gb1.str[0], L.gb1.str[1]});
    CHECK(moe_backward<topk_softmax>(
              o, L.params(), L.x.cview(), L.dy.cview(),
              device_view<const std::byte>(L.context, {static_cast<index_t>(L.context_bytes)}),
              overlapping, L.dx.view())
              .code() == status_code::invalid_argument);
    backward_untouched();
    cudaFree(small);
  }
}
