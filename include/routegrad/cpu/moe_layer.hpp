// CPU back end of the reference MoE layer (SPEC §6; what it computes, the layouts and the capacity
// order are in moe/options.hpp, the user-facing entry points in moe/api.hpp, docs/api.md).
//
//   forward:  z = x W_rᵀ + b_r  →  route_forward<Est>  →  dispatch (capacity, (slot, token) order)
//             →  per expert: H = X_e W1_eᵀ + b1_e, A = act(H), F = A W2_eᵀ + b2_e  →  combine
//   backward: G_tj = Σ_c dy[t,c]·ω[c]·F_tj[c]  →  route_backward<Est> (with the α/β terms)  →  dz
//             dW_r = dzᵀx, db_r = Σ_t dz_t, dx = dz W_r + Σ_j (dH W1_e)_tj, expert GEMMs, dω
//
// The experts run on tokens gathered per expert into contiguous blocks, as Eigen GEMMs on fixed
// tiles of moe_tile_rows rows (forward and input gradients) or of output rows (weight gradients:
// each tile reduces over all of its expert's tokens in one GEMM). Tiles are fixed by the shapes
// and the routing, never by the thread count, and every other cross-token sum runs in token
// order, so results are bit-identical for any cpu::execution::num_threads. Inside the layer's
// OpenMP regions Eigen's own GEMM threading is switched off (for the calling task only).
//
// The context (caller-owned bytes, moe_context_bytes) holds what the backward needs: a header,
// the logits, the routing state (experts, coins, rng) and gates, the routed counts, the dispatch
// (per-expert offsets, the packed row of each (token, slot) and the pair of each packed row), and
// per packed row the pre-activations H, the activations A and the expert outputs F.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../moe/activation.hpp"
#include "../moe/options.hpp"
#include "../moe/validate.hpp"
#include "routing.hpp"

namespace routegrad::cpu {

/// Rows per tile of the expert GEMMs (part of the bit-reproducibility contract).
inline constexpr index_t moe_tile_rows = 256;
/// Alignment the context buffer must have (validation::check_context).
inline constexpr std::size_t moe_context_alignment = 256;

namespace moe_detail {

inline constexpr std::uint64_t context_magic = 0x31584354454f4d52ULL;  // "RMOECTX1"

/// What the forward was run with; the backward refuses a context that disagrees.
struct context_header {
  std::uint64_t magic;
  std::uint64_t estimator;  // validation::estimator_fingerprint<Est>()
  std::uint32_t scalar_bytes;
  std::uint32_t k;
  index_t tokens, d_model, d_hidden, experts;
  std::uint32_t act, mix;
  std::uint32_t use_omega, renormalize;
  double capacity_factor;
  index_t capacity;
  index_t max_rows;
  index_t rows;  // packed rows the forward computed
  rng_stream rng;
};

/// Byte offsets of the context's sections (each 64-byte aligned) for one (options, T, scalar).
struct context_layout {
  index_t tokens = 0, capacity = 0, max_rows = 0;
  std::size_t header = 0, logits = 0, gates = 0, probs = 0, experts = 0, coins = 0, routed = 0,
              offsets = 0, row_of = 0, pair_of = 0, token_ok = 0, pre = 0, post = 0, out = 0;
  std::size_t total = 0;
};

template <class T>
context_layout layout_of(const moe_options& opt, index_t tokens) {
  context_layout L;
  if (tokens <= 0 || !validation::check_moe_options(opt).is_ok()) return L;
  const std::size_t n = static_cast<std::size_t>(tokens), E = static_cast<std::size_t>(opt.experts),
                    k = static_cast<std::size_t>(opt.routing.k),
                    d = static_cast<std::size_t>(opt.d_model),
                    h = static_cast<std::size_t>(opt.d_hidden),
                    h1 = static_cast<std::size_t>(w1_rows(opt));
  const bool dense = opt.mix == mixing::dense;
  L.tokens = tokens;
  L.capacity = expert_capacity(opt, tokens);
  L.max_rows = dense ? tokens * opt.experts
                     : std::min<index_t>(tokens * opt.routing.k, opt.experts * L.capacity);
  const std::size_t rows = static_cast<std::size_t>(L.max_rows);
  std::size_t at = 0;
  auto take = [&at](std::size_t bytes) {
    const std::size_t o = at;
    at = (at + bytes + 63) / 64 * 64;
    return o;
  };
  L.header = take(sizeof(context_header));
  L.logits = take(n * E * sizeof(T));
  L.gates = take(n * k * sizeof(T));
  L.probs = take(dense ? n * E * sizeof(T) : 0);
  L.experts = take(n * k * sizeof(std::int32_t));
  L.coins = take(n * k * sizeof(std::uint8_t));
  L.routed = take(E * sizeof(std::int64_t));
  L.offsets = take((E + 1) * sizeof(index_t));
  L.row_of = take(dense ? 0 : n * k * sizeof(index_t));
  L.pair_of = take(dense ? 0 : rows * sizeof(index_t));
  L.token_ok = take(n);
  L.pre = take(rows * h1 * sizeof(T));  // act'(H), or H = (a, b) for SwiGLU
  L.post = take(rows * h * sizeof(T));
  L.out = take(rows * d * sizeof(T));
  L.total = at;
  return L;
}

/// Pointers into a context (const or not, following B).
template <class T, class B>
struct context_ptrs {
  using CT = std::conditional_t<std::is_const_v<B>, const T, T>;
  template <class U>
  using P = std::conditional_t<std::is_const_v<B>, const U*, U*>;
  CT* logits;
  CT* gates;
  CT* probs;
  P<std::int32_t> experts;
  P<std::uint8_t> coins;
  P<std::int64_t> routed;
  P<index_t> offsets;
  P<index_t> row_of;
  P<index_t> pair_of;
  P<std::uint8_t> token_ok;
  CT* pre;
  CT* post;
  CT* out;

  context_ptrs(B* base, const context_layout& L)
      : logits(reinterpret_cast<CT*>(base + L.logits)),
        gates(reinterpret_cast<CT*>(base + L.gates)),
        probs(reinterpret_cast<CT*>(base + L.probs)),
        experts(reinterpret_cast<P<std::int32_t>>(base + L.experts)),
        coins(reinterpret_cast<P<std::uint8_t>>(base + L.coins)),
        routed(reinterpret_cast<P<std::int64_t>>(base + L.routed)),
        offsets(reinterpret_cast<P<index_t>>(base + L.offsets)),
        row_of(reinterpret_cast<P<index_t>>(base + L.row_of)),
        pair_of(reinterpret_cast<P<index_t>>(base + L.pair_of)),
        token_ok(reinterpret_cast<P<std::uint8_t>>(base + L.token_ok)),
        pre(reinterpret_cast<CT*>(base + L.pre)),
        post(reinterpret_cast<CT*>(base + L.post)),
        out(reinterpret_cast<CT*>(base + L.out)) {}
};

// ---------------------------------------------------------------------------------------------
// Eigen views
// ---------------------------------------------------------------------------------------------

template <class M>
using row_matrix = Eigen::Matrix<M, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class M>
using cmap = Eigen::Map<const row_matrix<M>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class M>
using mmap = Eigen::Map<row_matrix<M>, Eigen::Unaligned, Eigen::OuterStride<>>;

template <class M>
cmap<M> cmat(const M* p, index_t rows, index_t cols, index_t ld) {
  return cmap<M>(p, rows, cols, Eigen::OuterStride<>(ld));
}
template <class M>
mmap<M> mmat(M* p, index_t rows, index_t cols, index_t ld) {
  return mmap<M>(p, rows, cols, Eigen::OuterStride<>(ld));
}

/// One [E, rows, cols] weight (or a [rows, cols] one as E = 1): read in place when its rows are
/// contiguous, otherwise copied once per call into a contiguous buffer.
template <class T>
struct weight_source {
  std::vector<T> copy;
  const T* base = nullptr;
  index_t slab = 0, ld = 0, rows = 0, cols = 0;

  cmap<T> expert(index_t e) const { return cmat(base + e * slab, rows, cols, ld); }
};

template <class T>
weight_source<T> weights_of(const T* data, index_t E, index_t rows, index_t cols, index_t s0,
                            index_t s1, index_t s2) {
  weight_source<T> w;
  w.rows = rows;
  w.cols = cols;
  if (s2 == 1 && s1 >= cols) {
    w.base = data;
    w.slab = s0;
    w.ld = s1;
    return w;
  }
  w.copy.resize(static_cast<std::size_t>(E * rows * cols));
  for (index_t e = 0; e < E; ++e)
    for (index_t i = 0; i < rows; ++i)
      for (index_t c = 0; c < cols; ++c)
        w.copy[static_cast<std::size_t>((e * rows + i) * cols + c)] =
            data[e * s0 + i * s1 + c * s2];
  w.base = w.copy.data();
  w.slab = rows * cols;
  w.ld = cols;
  return w;
}

template <class T>
weight_source<T> weights_of(const host_view<const T, 3>& v) {
  return weights_of(v.data_handle(), v.extent(0), v.extent(1), v.extent(2), v.stride(0),
                    v.stride(1), v.stride(2));
}
template <class T>
weight_source<T> weights_of(const host_view<const T, 2>& v) {
  return weights_of(v.data_handle(), index_t(1), v.extent(0), v.extent(1), index_t(0), v.stride(0),
                    v.stride(1));
}

/// A small parameter (a bias or ω) copied into a contiguous [rows, cols] buffer.
template <class T>
std::vector<T> contiguous(const T* data, index_t rows, index_t cols, index_t s0, index_t s1) {
  std::vector<T> out(static_cast<std::size_t>(rows * cols));
  for (index_t i = 0; i < rows; ++i)
    for (index_t c = 0; c < cols; ++c)
      out[static_cast<std::size_t>(i * cols + c)] = data[i * s0 + c * s1];
  return out;
}

/// The parameters as the kernels read them.
template <class T>
struct layer_params {
  weight_source<T> router, w1, w2;
  std::vector<T> router_bias, b1, b2, omega;  // [E], [E, h1], [E, d], [d] (empty: no ω)

  layer_params(const moe_options& opt, const host_moe_params<T>& p)
      : router(weights_of(p.router_weight)),
        w1(weights_of(p.w1)),
        w2(weights_of(p.w2)),
        router_bias(contiguous(p.router_bias.data_handle(), 1, p.router_bias.extent(0), 0,
                               p.router_bias.stride(0))),
        b1(contiguous(p.b1.data_handle(), p.b1.extent(0), p.b1.extent(1), p.b1.stride(0),
                      p.b1.stride(1))),
        b2(contiguous(p.b2.data_handle(), p.b2.extent(0), p.b2.extent(1), p.b2.stride(0),
                      p.b2.stride(1))) {
    if (opt.use_omega)
      omega = contiguous(p.omega.data_handle(), 1, p.omega.extent(0), 0, p.omega.stride(0));
  }
};

// ---------------------------------------------------------------------------------------------
// Parallel loops
// ---------------------------------------------------------------------------------------------

/// Work (≈ FLOPs) below which one thread does a whole phase when the thread count is left to
/// OpenMP (execution::num_threads = 0): small layers pay no fork/join, and never spin-wait on an
/// oversubscribed machine. An explicit num_threads is always honoured.
inline constexpr double moe_min_parallel_work = 4.0e6;

/// Runs body(item, thread_scratch) for item in [0, count) on exec's threads (any order; every
/// item writes its own outputs). `work` estimates the FLOPs of the whole phase. Eigen's products
/// inside run on the calling thread only.
template <class M, class Body>
void for_each_item(index_t count, double work, const execution& exec, Body&& body) {
  if (count <= 0) return;
#if defined(_OPENMP)
  int threads = 1;
#if defined(ROUTEGRAD_HAS_OPENMP)
  if (exec.num_threads > 0)
    threads = exec.num_threads;
  else if (work >= moe_min_parallel_work)
    threads = omp_get_max_threads();
  if (static_cast<index_t>(threads) > count) threads = static_cast<int>(count);
#else
  (void)exec, (void)work;
#endif
#pragma omp parallel num_threads(threads)
  {
    // nthreads-var of this implicit task only: Eigen's GEMMs below stay on this thread.
    omp_set_num_threads(1);
    std::vector<M> scratch;
#pragma omp for schedule(dynamic, 1)
    for (index_t i = 0; i < count; ++i) body(i, scratch);
  }
#else
  (void)exec, (void)work;
  std::vector<M> scratch;
  for (index_t i = 0; i < count; ++i) body(i, scratch);
#endif
}

/// Token tiles [t0, t1) of moe_tile_rows rows; `work_per_token` ≈ FLOPs per token.
template <class M, class Body>
void for_each_token_tile(index_t tokens, double work_per_token, const execution& exec,
                         Body&& body) {
  const index_t tiles = (tokens + moe_tile_rows - 1) / moe_tile_rows;
  for_each_item<M>(tiles, work_per_token * static_cast<double>(tokens), exec,
                   [&](index_t i, std::vector<M>& scratch) {
                     body(i * moe_tile_rows, std::min(tokens, (i + 1) * moe_tile_rows), scratch);
                   });
}

/// One tile of an expert's packed rows: rows [off_e + r0, off_e + r1).
struct expert_tile {
  index_t expert, r0, r1;
};

inline std::vector<expert_tile> expert_tiles(const index_t* offsets, index_t E) {
  std::vector<expert_tile> tiles;
  for (index_t e = 0; e < E; ++e) {
    const index_t n = offsets[e + 1] - offsets[e];
    for (index_t r = 0; r < n; r += moe_tile_rows)
      tiles.push_back({e, r, std::min(n, r + moe_tile_rows)});
  }
  return tiles;
}

/// Scratch that is fully written before it is read: allocated, never zero-filled.
template <class M>
class scratch_buffer {
 public:
  explicit scratch_buffer(std::size_t n) : data_(n ? new M[n] : nullptr) {}
  M* data() { return data_.get(); }
  const M* data() const { return data_.get(); }

 private:
  std::unique_ptr<M[]> data_;
};

template <class M>
M* ensure(std::vector<M>& v, std::size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

/// out[i, c] = (or +=) src[i, c] through the output's strides.
template <class T, class M>
void store(T* dst, index_t s_row, index_t s_col, const M* src, index_t rows, index_t cols,
           index_t ld, grad_mode mode) {
  for (index_t i = 0; i < rows; ++i) {
    T* o = dst + i * s_row;
    const M* s = src + i * ld;
    if (mode == grad_mode::accumulate)
      for (index_t c = 0; c < cols; ++c)
        o[c * s_col] = static_cast<T>(static_cast<M>(o[c * s_col]) + s[c]);
    else
      for (index_t c = 0; c < cols; ++c) o[c * s_col] = static_cast<T>(s[c]);
  }
}

/// Activations of one tile: A[i, :] from H[i, :] (h1 = h, or 2h for SwiGLU). For GELU and SiLU
/// H is replaced by act'(H) (all the backward needs besides A: one erf per element saved there);
/// SwiGLU keeps H = (a, b).
template <class M>
void activate_rows(activation act, M* H, M* A, index_t rows, index_t h) {
  if (act == activation::swiglu) {
    for (index_t i = 0; i < rows; ++i) {
      const M* a = H + i * 2 * h;
      const M* b = a + h;
      M* o = A + i * h;
      for (index_t c = 0; c < h; ++c) o[c] = moe_math::swiglu(a[c], b[c]);
    }
  } else {
    for (index_t i = 0; i < rows * h; ++i) {
      M grad;
      A[i] = moe_math::activate_with_grad(act, H[i], grad);
      H[i] = grad;
    }
  }
}

/// dH from dA and what activate_rows left in H (act'(H), or (a, b) for SwiGLU).
template <class M>
void activation_backward_rows(activation act, const M* H, const M* dA, M* dH, index_t rows,
                              index_t h) {
  if (act == activation::swiglu) {
    for (index_t i = 0; i < rows; ++i) {
      const M* a = H + i * 2 * h;
      const M* b = a + h;
      const M* g = dA + i * h;
      M* da = dH + i * 2 * h;
      M* db = da + h;
      for (index_t c = 0; c < h; ++c) moe_math::swiglu_grad(a[c], b[c], g[c], da[c], db[c]);
    }
  } else {
    for (index_t i = 0; i < rows * h; ++i) dH[i] = dA[i] * H[i];
  }
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// The routing views the layer keeps in its context (empty views when T = 0).
template <class T, class B>
struct routing_views {
  host_view<const T, 2> logits;
  host_routing_state state;
  host_view<T, 2> gates;
};

template <class T, class B>
routing_views<T, B> routing_views_of(B* base, const context_layout& L, const moe_options& opt,
                                     const rng_stream& rng) {
  const index_t n = L.tokens, E = opt.experts, k = opt.routing.k;
  routing_views<T, B> v;
  if (n <= 0 || base == nullptr) {
    v.logits = host_view<const T, 2>(nullptr, {index_t(0), E});
    v.state.experts = host_view<std::int32_t, 2>(nullptr, {index_t(0), index_t(k)});
    v.state.coins = host_view<std::uint8_t, 2>(nullptr, {index_t(0), index_t(k)});
    v.gates = host_view<T, 2>(nullptr, {index_t(0), index_t(k)});
    v.state.rng = rng;
    return v;
  }
  // The backward's state views are read only; routing_state has mutable element types.
  std::byte* b = const_cast<std::byte*>(reinterpret_cast<const std::byte*>(base));
  v.logits = host_view<const T, 2>(reinterpret_cast<const T*>(b + L.logits), {n, E});
  v.state.experts =
      host_view<std::int32_t, 2>(reinterpret_cast<std::int32_t*>(b + L.experts), {n, index_t(k)});
  v.state.coins =
      host_view<std::uint8_t, 2>(reinterpret_cast<std::uint8_t*>(b + L.coins), {n, index_t(k)});
  v.state.rng = rng;
  v.gates = host_view<T, 2>(reinterpret_cast<T*>(b + L.gates), {n, index_t(k)});
  return v;
}

template <class Est, class T>
status check_forward(const moe_options& opt, const host_moe_params<T>& params,
                     const host_view<const T, 2>& x, const host_view<T, 2>& y,
                     const rng_stream& rng, const host_view<std::byte, 1>& context) {
  ROUTEGRAD_RETURN_IF_ERROR(validation::check_moe_options(opt));
  if (x.extent(0) < 0) return {status_code::invalid_shape, "x: negative extent"};
  const index_t n = x.extent(0);
  ROUTEGRAD_RETURN_IF_ERROR(
      validation::check_batch_input(opt, x, n, "x: shape must be [T, d_model]", "x: null data",
                                    "x: strides must be non-negative"));
  ROUTEGRAD_RETURN_IF_ERROR(validation::check_moe_params(opt, params));
  ROUTEGRAD_RETURN_IF_ERROR(
      validation::check_batch_output(opt, y, n, "y: shape must be [T, d_model] like x",
                                     "y: null data", "y: strides overlap or are negative"));
  if (rng.first_token > (std::uint64_t(1) << 32) ||
      static_cast<std::uint64_t>(n) > (std::uint64_t(1) << 32) - rng.first_token)
    return {status_code::invalid_argument,
            "rng.first_token: first_token + T must not exceed 2^32 (Philox counter layout)"};
  const context_layout L = layout_of<T>(opt, n);
  ROUTEGRAD_RETURN_IF_ERROR(validation::check_context(context, L.total, moe_context_alignment));
  const routing_views<T, std::byte> rv =
      routing_views_of<T>(L.total ? context.data_handle() : nullptr, L, opt, rng);
  ROUTEGRAD_RETURN_IF_ERROR(validation::check_options_and_logits(opt.routing, rv.logits, rng));
  // Outputs may not share memory with inputs (address ranges; any overlap is refused).
  return validation::check_moe_forward_overlaps(opt, params, x, y,
                                                L.total ? context.data_handle() : nullptr, L.total);
}

/// The context a backward receives: size, alignment, header and the dispatch's indices.
template <class Est, class T>
status check_context_contents(const moe_options& opt, const context_layout& L,
                              const host_view<const std::byte, 1>& context) {
  ROUTEGRAD_RETURN_IF_ERROR(validation::check_context(context, L.total, moe_context_alignment));
  if (L.total == 0) return status::ok();
  const std::byte* base = context.data_handle();
  context_header hd;
  std::memcpy(&hd, base + L.header, sizeof hd);
  const bool same = hd.magic == context_magic && hd.scalar_bytes == sizeof(T) &&
                    hd.tokens == L.tokens && hd.d_model == opt.d_model &&
                    hd.d_hidden == opt.d_hidden && hd.experts == opt.experts &&
                    hd.k == static_cast<std::uint32_t>(opt.routing.k) &&
                    hd.act == static_cast<std::uint32_t>(opt.act) &&
                    hd.mix == static_cast<std::uint32_t>(opt.mix) &&
                    hd.use_omega == static_cast<std::uint32_t>(opt.use_omega) &&
                    hd.renormalize == static_cast<std::uint32_t>(opt.routing.renormalize) &&
                    hd.capacity == L.capacity && hd.max_rows == L.max_rows;
  if (!same)
    return {status_code::invalid_argument,
            "context: not written by moe_forward with these options, this T and this scalar type"};
  if (hd.estimator != validation::estimator_fingerprint<Est>())
    return {status_code::invalid_argument, "context: written by a forward of another estimator"};
  const context_ptrs<T, const std::byte> c(base, L);
  const index_t n = L.tokens, E = opt.experts, k = opt.routing.k;
  bool ok = hd.rows >= 0 && hd.rows <= L.max_rows && c.offsets[0] == 0 && c.offsets[E] == hd.rows;
  for (index_t e = 0; ok && e < E; ++e) ok = c.offsets[e] <= c.offsets[e + 1];
  if (ok && opt.mix == mixing::sparse) {
    for (index_t p = 0; ok && p < n * k; ++p) ok = c.row_of[p] >= -1 && c.row_of[p] < hd.rows;
    for (index_t r = 0; ok && r < hd.rows; ++r) ok = c.pair_of[r] >= 0 && c.pair_of[r] < n * k;
  } else if (ok) {
    ok = hd.rows == n * E;
  }
  if (!ok)
    return {status_code::invalid_argument, "context: the saved dispatch is corrupt (indices)"};
  return status::ok();
}

template <class Est, class T>
status check_backward(const moe_options& opt, const host_moe_params<T>& params,
                      const host_view<const T, 2>& x, const host_view<const T, 2>& dy,
                      const host_view<const std::byte, 1>& context, const host_moe_grads<T>& grads,
                      const host_view<T, 2>& dx, grad_mode mode) {
  ROUTEGRAD_RETURN_IF_ERROR(validation::check_moe_options(opt));
  if (x.extent(0) < 0) return {status_code::invalid_shape, "x: negative extent"};
  const index_t n = x.extent(0);
  ROUTEGRAD_RETURN_IF_ERROR(
      validation::check_batch_input(opt, x, n, "x: shape must be [T, d_model]", "x: null data",
                                    "x: strides must be non-negative"));
  ROUTEGRAD_RETURN_IF_ERROR(
      validation::check_batch_input(opt, dy, n, "dy: shape must be [T, d_model] like x",
                                    "dy: null data", "dy: strides must be non-negative"));
  ROUTEGRAD_RETURN_IF_ERROR(validation::check_moe_params(opt, params));
  ROUTEGRAD_RETURN_IF_ERROR(validation::check_moe_grads(opt, grads));
  ROUTEGRAD_RETURN_IF_ERROR(
      validation::check_batch_output(opt, dx, n, "dx: shape must be [T, d_model] like x",
                                     "dx: null data", "dx: strides overlap or are negative"));
  if (mode != grad_mode::overwrite && mode != grad_mode::accumulate)
    return {status_code::invalid_argument, "mode: must be overwrite or accumulate"};
  const context_layout L = layout_of<T>(opt, n);
  ROUTEGRAD_RETURN_IF_ERROR((check_context_contents<Est, T>(opt, L, context)));
  // Outputs may not share memory with inputs or with each other (address ranges).
  return validation::check_moe_backward_overlaps(
      opt, params, x, dy, L.total ? context.data_handle() : nullptr, L.total, grads, dx);
}

/// Writes zeros (overwrite) into every parameter gradient; nothing for accumulate.
template <class T>
void zero_grads(const moe_options& opt, const host_moe_grads<T>& g, grad_mode mode) {
  if (mode != grad_mode::overwrite) return;
  auto zero2 = [](const host_view<T, 2>& v) {
    for (index_t i = 0; i < v.extent(0); ++i)
      for (index_t c = 0; c < v.extent(1); ++c) v(i, c) = T(0);
  };
  auto zero1 = [](const host_view<T, 1>& v) {
    for (index_t i = 0; i < v.extent(0); ++i) v(i) = T(0);
  };
  auto zero3 = [](const host_view<T, 3>& v) {
    for (index_t e = 0; e < v.extent(0); ++e)
      for (index_t i = 0; i < v.extent(1); ++i)
        for (index_t c = 0; c < v.extent(2); ++c)
          v.data_handle()[e * v.stride(0) + i * v.stride(1) + c * v.stride(2)] = T(0);
  };
  zero2(g.router_weight);
  zero1(g.router_bias);
  zero3(g.w1);
  zero2(g.b1);
  zero3(g.w2);
  zero2(g.b2);
  if (opt.use_omega) zero1(g.omega);
}

}  // namespace moe_detail

/// Bytes of context a forward of `tokens` tokens needs (0 for T = 0, or for invalid options,
/// which the forward then reports). The buffer must be aligned to moe_context_alignment (256).
template <class T>
std::size_t moe_context_bytes(const moe_options& opt, index_t tokens) {
  return moe_detail::layout_of<T>(opt, tokens).total;
}

/// An owning, 256-byte-aligned context buffer for callers without an allocator of their own:
///   cpu::moe_context<float> ctx(opt, T);   moe_forward<Est>(..., ctx.view(), ...);
///   moe_backward<Est>(..., ctx.cview(), ...);
/// resize() keeps the storage when it is large enough. Move-only.
template <class T>
class moe_context {
 public:
  moe_context() = default;
  moe_context(const moe_options& opt, index_t tokens) { resize(opt, tokens); }

  void resize(const moe_options& opt, index_t tokens) {
    const std::size_t bytes = moe_context_bytes<T>(opt, tokens);
    if (bytes > capacity_) {
      storage_.reset(static_cast<std::byte*>(
          ::operator new[](bytes, std::align_val_t{moe_context_alignment})));
      capacity_ = bytes;
    }
    size_ = bytes;
  }

  std::size_t size() const { return size_; }
  host_view<std::byte, 1> view() {
    return host_view<std::byte, 1>(storage_.get(), {static_cast<index_t>(size_)});
  }
  host_view<const std::byte, 1> cview() const {
    return host_view<const std::byte, 1>(storage_.get(), {static_cast<index_t>(size_)});
  }

 private:
  struct aligned_delete {
    void operator()(std::byte* p) const {
      ::operator delete[](p, std::align_val_t{moe_context_alignment});
    }
  };
  std::unique_ptr<std::byte[], aligned_delete> storage_;
  std::size_t capacity_ = 0;
  std::size_t size_ = 0;
};

/// Read-only views of what a forward saved (for logging, debugging and tests).
template <class T>
struct moe_saved_state {
  host_view<const T, 2> logits;              // z [T, E]
  host_view<const std::int32_t, 2> experts;  // the routing's choices [T, k]
  host_view<const std::uint8_t, 2> coins;    // [T, k] (routing_state's meaning)
  host_view<const T, 2> gates;               // [T, k] (as the routing wrote them)
  host_view<const index_t, 2> rows;          // sparse: [T, k], the packed row of each pair,
                                             // −1 when dropped or not routed; dense: empty
  host_view<const std::int64_t, 1> routed;   // [E] routed pairs (before capacity)
  host_view<const index_t, 1> offsets;       // [E + 1] first packed row of each expert
  rng_stream rng;
};

/// Fills `out` with views into a context written by moe_forward<Est, T>(opt, ..., x [tokens, d]).
template <class Est, class T>
status read_moe_context(const moe_options& opt, index_t tokens,
                        host_view<const std::byte, 1> context, moe_saved_state<T>& out) {
  ROUTEGRAD_RETURN_IF_ERROR(validation::check_moe_options(opt));
  if (tokens < 0) return {status_code::invalid_shape, "tokens: must be >= 0"};
  const moe_detail::context_layout L = moe_detail::layout_of<T>(opt, tokens);
  ROUTEGRAD_RETURN_IF_ERROR((moe_detail::check_context_contents<Est, T>(opt, L, context)));
  const index_t E = opt.experts, k = opt.routing.k;
  moe_saved_state<T> s;
  if (L.total == 0) {
    s.logits = host_view<const T, 2>(nullptr, {index_t(0), E});
    s.experts = host_view<const std::int32_t, 2>(nullptr, {index_t(0), index_t(k)});
    s.coins = host_view<const std::uint8_t, 2>(nullptr, {index_t(0), index_t(k)});
    s.gates = host_view<const T, 2>(nullptr, {index_t(0), index_t(k)});
    s.rows = host_view<const index_t, 2>(nullptr, {index_t(0), index_t(0)});
    out = s;
    return status::ok();
  }
  const std::byte* base = context.data_handle();
  const moe_detail::context_ptrs<T, const std::byte> c(base, L);
  moe_detail::context_header hd;
  std::memcpy(&hd, base + L.header, sizeof hd);
  s.logits = host_view<const T, 2>(c.logits, {tokens, E});
  s.experts = host_view<const std::int32_t, 2>(c.experts, {tokens, index_t(k)});
  s.coins = host_view<const std::uint8_t, 2>(c.coins, {tokens, index_t(k)});
  s.gates = host_view<const T, 2>(c.gates, {tokens, index_t(k)});
  s.rows = opt.mix == mixing::sparse
               ? host_view<const index_t, 2>(c.row_of, {tokens, index_t(k)})
               : host_view<const index_t, 2>(nullptr, {index_t(0), index_t(0)});
  s.routed = host_view<const std::int64_t, 1>(c.routed, {E});
  s.offsets = host_view<const index_t, 1>(c.offsets, {E + 1});
  s.rng = hd.rng;
  out = s;
  return status::ok();
}

/// Forward of the layer on host memory. See routegrad::moe_forward (moe/api.hpp).
template <class Est, class T>
status run_moe_forward(const moe_options& opt, const host_moe_params<T>& params,
                       host_view<const T, 2> x, host_view<T, 2> y, const rng_stream& rng,
                       host_view<std::byte, 1> context, const host_moe_stats& stats = {},
                       const execution& exec = {}) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "the CPU MoE layer computes in float or double");
  using namespace moe_detail;
  using M = T;
  ROUTEGRAD_RETURN_IF_ERROR((check_forward<Est, T>(opt, params, x, y, rng, context)));
  const index_t n = x.extent(0), E = opt.experts, k = opt.routing.k, d = opt.d_model,
                h = opt.d_hidden, h1 = w1_rows(opt);
  const bool dense = opt.mix == mixing::dense;
  if (n == 0) {
    for (index_t e = 0; e < E; ++e) {
      if (stats.expert_counts) stats.expert_counts[e] = 0;
      if (stats.kept_counts) stats.kept_counts[e] = 0;
    }
    if (stats.dropped_pairs) *stats.dropped_pairs = 0;
    if (stats.load_balance_loss) *stats.load_balance_loss = 0.0;
    if (stats.z_loss) *stats.z_loss = 0.0;
    if (stats.nonfinite_rows) *stats.nonfinite_rows = 0;
    return status::ok();
  }
  Eigen::initParallel();
  const context_layout L = layout_of<T>(opt, n);
  std::byte* base = context.data_handle();
  const context_ptrs<T, std::byte> c(base, L);
  const layer_params<T> P(opt, params);

  const double fd = static_cast<double>(d), fE = static_cast<double>(E),
               fh = static_cast<double>(h + h1), fk = static_cast<double>(k);
  // 1. Router logits z = x W_rᵀ + b_r, written into the context.
  for_each_token_tile<M>(n, 2 * fd * fE, exec,
                         [&](index_t t0, index_t t1, std::vector<M>& scratch) {
                           const index_t rows = t1 - t0;
                           M* xt = ensure(scratch, static_cast<std::size_t>(rows * d));
                           for (index_t i = 0; i < rows; ++i)
                             for (index_t col = 0; col < d; ++col) xt[i * d + col] = x(t0 + i, col);
                           auto z = mmat(c.logits + t0 * E, rows, E, E);
                           z.noalias() = cmat<M>(xt, rows, d, d) * P.router.expert(0).transpose();
                           for (index_t i = 0; i < rows; ++i)
                             for (index_t e = 0; e < E; ++e)
                               z(i, e) += P.router_bias[static_cast<std::size_t>(e)];
                         });

  // 2. Routing (writes the state, the gates, the routed counts and the loss values).
  routing_views<T, std::byte> rv = routing_views_of<T>(base, L, opt, rng);
  const host_routing_stats rstats{c.routed, stats.load_balance_loss, stats.z_loss,
                                  stats.nonfinite_rows};
  ROUTEGRAD_RETURN_IF_ERROR(
      run_forward<Est>(opt.routing, rv.logits, rv.state, rv.gates, rstats, exec));

  // 3. Dispatch. A pair is routed when its row is routable and its expert's logit finite (the
  //    routing's own count rule); routed pairs are admitted in (slot, token) order up to capacity.
  std::int64_t dropped = 0;
  index_t rows_total = 0;
  {
    std::vector<M> row_scratch(static_cast<std::size_t>(2 * E));
    const M inf = math::infinity<M>();
    for (index_t t = 0; t < n; ++t) {
      const auto row = detail::stage_row<Est>(opt.routing, rng, rv.logits, t, row_scratch.data());
      bool ok = summarize_row<M>(serial_lanes{}, row).routable;
      if (dense) {  // dense mixing uses the clean logits: no NaN / +inf, some finite entry
        bool bad = false, any = false;
        for (index_t e = 0; e < E; ++e) {
          const M v = row.clean(static_cast<int>(e));
          bad |= math::is_nan(v) || v == inf;
          any |= v > -inf;
        }
        ok = !bad && any;
      }
      c.token_ok[t] = ok ? 1 : 0;
    }
    if (dense) {
      for (index_t e = 0; e <= E; ++e) c.offsets[e] = e * n;
      rows_total = n * E;
      for (index_t t = 0; t < n; ++t) {
        T* p = c.probs + t * E;
        if (!c.token_ok[t]) {
          std::fill(p, p + E, T(0));
          continue;
        }
        const T* z = c.logits + t * E;
        M m = -inf;
        for (index_t e = 0; e < E; ++e) m = std::max(m, z[e]);
        M s = M(0);
        for (index_t e = 0; e < E; ++e) s += (p[e] = math::exp(z[e] - m));
        for (index_t e = 0; e < E; ++e) p[e] /= s;
      }
    } else {
      const index_t cap = L.capacity;
      std::vector<index_t> fill(static_cast<std::size_t>(E), 0);
      for (index_t j = 0; j < k; ++j)
        for (index_t t = 0; t < n; ++t) {
          const index_t p = t * k + j;
          const index_t e = c.experts[p];
          const bool routed = c.token_ok[t] && c.logits[t * E + e] > -inf;
          if (!routed) {
            c.row_of[p] = -1;
          } else if (fill[static_cast<std::size_t>(e)] < cap) {
            c.row_of[p] = fill[static_cast<std::size_t>(e)]++;  // position inside expert e
          } else {
            c.row_of[p] = -1;
            ++dropped;
          }
        }
      c.offsets[0] = 0;
      for (index_t e = 0; e < E; ++e)
        c.offsets[e + 1] = c.offsets[e] + fill[static_cast<std::size_t>(e)];
      rows_total = c.offsets[E];
      for (index_t p = 0; p < n * k; ++p)
        if (c.row_of[p] >= 0) {
          c.row_of[p] += c.offsets[c.experts[p]];
          c.pair_of[c.row_of[p]] = p;
        }
    }
  }

  // 4. Experts on their gathered tokens: H = X W1ᵀ + b1, A = act(H), F = A W2ᵀ + b2.
  const std::vector<expert_tile> tiles = expert_tiles(c.offsets, E);
  for_each_item<M>(static_cast<index_t>(tiles.size()),
                   2 * static_cast<double>(rows_total) * fd * fh, exec,
                   [&](index_t i, std::vector<M>& scratch) {
                     const expert_tile& tl = tiles[static_cast<std::size_t>(i)];
                     const index_t e = tl.expert, rows = tl.r1 - tl.r0, g0 = c.offsets[e] + tl.r0;
                     M* xt = ensure(scratch, static_cast<std::size_t>(rows * d));
                     for (index_t r = 0; r < rows; ++r) {
                       const index_t t = dense ? tl.r0 + r : c.pair_of[g0 + r] / k;
                       M* dst = xt + r * d;
                       if (!c.token_ok[t])
                         std::fill(dst, dst + d, M(0));  // dense only: keep bad rows out
                       else
                         for (index_t col = 0; col < d; ++col) dst[col] = x(t, col);
                     }
                     auto H = mmat(c.pre + g0 * h1, rows, h1, h1);
                     H.noalias() = cmat<M>(xt, rows, d, d) * P.w1.expert(e).transpose();
                     const T* b1 = P.b1.data() + e * h1;
                     for (index_t r = 0; r < rows; ++r)
                       for (index_t col = 0; col < h1; ++col) H(r, col) += b1[col];
                     M* A = c.post + g0 * h;
                     activate_rows<M>(opt.act, c.pre + g0 * h1, A, rows, h);
                     auto F = mmat(c.out + g0 * d, rows, d, d);
                     F.noalias() = cmat<M>(A, rows, h, h) * P.w2.expert(e).transpose();
                     const T* b2 = P.b2.data() + e * d;
                     for (index_t r = 0; r < rows; ++r)
                       for (index_t col = 0; col < d; ++col) F(r, col) += b2[col];
                   });

  // 5. Combine: y_t = ω ⊙ Σ_j g_tj F_tj (slot order; dense: Σ_e π_te F_te in expert order).
  for_each_token_tile<M>(n, 2 * fd * (dense ? fE : fk), exec,
                         [&](index_t t0, index_t t1, std::vector<M>& scratch) {
                           M* acc = ensure(scratch, static_cast<std::size_t>(d));
                           for (index_t t = t0; t < t1; ++t) {
                             std::fill(acc, acc + d, M(0));
                             if (dense) {
                               if (c.token_ok[t])
                                 for (index_t e = 0; e < E; ++e) {
                                   const M w = c.probs[t * E + e];
                                   const T* f = c.out + (e * n + t) * d;
                                   for (index_t col = 0; col < d; ++col) acc[col] += w * f[col];
                                 }
                             } else {
                               for (index_t j = 0; j < k; ++j) {
                                 const index_t r = c.row_of[t * k + j];
                                 if (r < 0) continue;
                                 const M g = c.gates[t * k + j];
                                 const T* f = c.out + r * d;
                                 for (index_t col = 0; col < d; ++col) acc[col] += g * f[col];
                               }
                             }
                             if (opt.use_omega)
                               for (index_t col = 0; col < d; ++col)
                                 y(t, col) = acc[col] * P.omega[static_cast<std::size_t>(col)];
                             else
                               for (index_t col = 0; col < d; ++col) y(t, col) = acc[col];
                           }
                         });

  // 6. The header (what the backward checks) and the statistics.
  context_header hd{};
  hd.magic = context_magic;
  hd.estimator = validation::estimator_fingerprint<Est>();
  hd.scalar_bytes = sizeof(T);
  hd.k = static_cast<std::uint32_t>(k);
  hd.tokens = n;
  hd.d_model = d;
  hd.d_hidden = h;
  hd.experts = E;
  hd.act = static_cast<std::uint32_t>(opt.act);
  hd.mix = static_cast<std::uint32_t>(opt.mix);
  hd.use_omega = opt.use_omega ? 1 : 0;
  hd.renormalize = opt.routing.renormalize ? 1 : 0;
  hd.capacity_factor = opt.capacity_factor;
  hd.capacity = L.capacity;
  hd.max_rows = L.max_rows;
  hd.rows = rows_total;
  hd.rng = rng;
  std::memcpy(base + L.header, &hd, sizeof hd);
  for (index_t e = 0; e < E; ++e) {
    if (stats.expert_counts) stats.expert_counts[e] = c.routed[e];
    if (stats.kept_counts) stats.kept_counts[e] = c.offsets[e + 1] - c.offsets[e];
  }
  if (stats.dropped_pairs) *stats.dropped_pairs = dropped;
  return status::ok();
}

/// Backward of the layer on host memory. See routegrad::moe_backward (moe/api.hpp).
template <class Est, class T>
status run_moe_backward(const moe_options& opt, const host_moe_params<T>& params,
                        host_view<const T, 2> x, host_view<const T, 2> dy,
                        host_view<const std::byte, 1> context, const host_moe_grads<T>& grads,
                        host_view<T, 2> dx, grad_mode mode = grad_mode::overwrite,
                        const execution& exec = {}) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "the CPU MoE layer computes in float or double");
  using namespace moe_detail;
  using M = T;
  ROUTEGRAD_RETURN_IF_ERROR((check_backward<Est, T>(opt, params, x, dy, context, grads, dx, mode)));
  const index_t n = x.extent(0), E = opt.experts, k = opt.routing.k, d = opt.d_model,
                h = opt.d_hidden, h1 = w1_rows(opt);
  const bool dense = opt.mix == mixing::dense;
  if (n == 0) {  // the gradient of an empty batch is zero
    zero_grads(opt, grads, mode);
    return status::ok();
  }
  Eigen::initParallel();
  const context_layout L = layout_of<T>(opt, n);
  const std::byte* base = context.data_handle();
  const context_ptrs<T, const std::byte> c(base, L);
  context_header hd;
  std::memcpy(&hd, base + L.header, sizeof hd);
  const index_t N = hd.rows;
  const layer_params<T> P(opt, params);
  const std::size_t nd = static_cast<std::size_t>(n * d);

  // 0. Per token: x (contiguous; rows the router could not route zeroed, as the forward did),
  //    u = dy ⊙ ω, the gate gradients G (sparse) or dz (dense), and dy ⊙ Σ_j g F for dω.
  scratch_buffer<M> X(nd), U(nd), S(opt.use_omega ? nd : 0), dz(static_cast<std::size_t>(n * E));
  std::vector<M> G(static_cast<std::size_t>(n * k), M(0));
  const double fd = static_cast<double>(d), fE = static_cast<double>(E),
               fh = static_cast<double>(h + h1), fk = static_cast<double>(k);
  for_each_token_tile<M>(
      n, 4 * fd * (dense ? fE : fk), exec, [&](index_t t0, index_t t1, std::vector<M>&) {
        for (index_t t = t0; t < t1; ++t) {
          M* xr = X.data() + t * d;
          M* u = U.data() + t * d;
          const bool keep =
              c.token_ok[t] != 0;  // unroutable rows: dz_t = 0, and 0·NaN must not leak
          for (index_t col = 0; col < d; ++col) {
            xr[col] = keep ? static_cast<M>(x(t, col)) : M(0);
            u[col] =
                opt.use_omega ? dy(t, col) * P.omega[static_cast<std::size_t>(col)] : dy(t, col);
          }
          M* s = opt.use_omega ? S.data() + t * d : nullptr;
          if (s) std::fill(s, s + d, M(0));
          if (dense) {
            M* dzt = dz.data() + t * E;
            if (!c.token_ok[t]) {
              std::fill(dzt, dzt + E, M(0));
              continue;
            }
            const T* pi = c.probs + t * E;
            M mean = M(0);
            for (index_t e = 0; e < E; ++e) {
              const T* f = c.out + (e * n + t) * d;
              M g = M(0);
              for (index_t col = 0; col < d; ++col) g += u[col] * f[col];
              dzt[e] = g;
              mean += pi[e] * g;
              if (s)
                for (index_t col = 0; col < d; ++col) s[col] += pi[e] * f[col];
            }
            for (index_t e = 0; e < E; ++e) dzt[e] = pi[e] * (dzt[e] - mean);
          } else {
            for (index_t j = 0; j < k; ++j) {
              const index_t r = c.row_of[t * k + j];
              if (r < 0) continue;
              const T* f = c.out + r * d;
              M g = M(0);
              for (index_t col = 0; col < d; ++col) g += u[col] * f[col];
              G[static_cast<std::size_t>(t * k + j)] = g;
              if (s) {
                const M gate = c.gates[t * k + j];
                for (index_t col = 0; col < d; ++col) s[col] += gate * f[col];
              }
            }
          }
          if (s)
            for (index_t col = 0; col < d; ++col) s[col] *= dy(t, col);
        }
      });

  // 1. The router's logit gradient: the estimator's rule on G plus the α/β terms (dense: the
  //    exact softmax gradient above, plus the α/β terms with zero gate gradients).
  {
    const routing_views<T, const std::byte> rv = routing_views_of<T>(base, L, opt, hd.rng);
    const host_routing_stats rstats{const_cast<std::int64_t*>(c.routed), nullptr, nullptr, nullptr};
    const auto gv = host_view<const M, 2>(G.data(), {n, k});
    const auto dzv = host_view<M, 2>(dz.data(), {n, E});
    if (!dense) {
      ROUTEGRAD_RETURN_IF_ERROR(run_backward<Est>(opt.routing, rv.logits, rv.state, gv, dzv,
                                                  grad_mode::overwrite, rstats, exec));
    } else if (opt.routing.load_balance_coef != 0.0 || opt.routing.z_loss_coef != 0.0) {
      ROUTEGRAD_RETURN_IF_ERROR(run_backward<Est>(opt.routing, rv.logits, rv.state, gv, dzv,
                                                  grad_mode::accumulate, rstats, exec));
    }
  }

  // 2. Experts, per tile of packed rows: X_e and dF = w·u gathered, dA = dF W2, dH = dA ⊙ act'(H),
  //    dX = dH W1 (kept per packed row; summed per token in slot order below).
  scratch_buffer<M> Xp(static_cast<std::size_t>(N * d)), dF(static_cast<std::size_t>(N * d)),
      dH(static_cast<std::size_t>(N * h1)), dXp(static_cast<std::size_t>(N * d));
  const std::vector<expert_tile> tiles = expert_tiles(c.offsets, E);
  for_each_item<M>(
      static_cast<index_t>(tiles.size()), 4 * static_cast<double>(N) * fd * fh, exec,
      [&](index_t i, std::vector<M>& scratch) {
        const expert_tile& tl = tiles[static_cast<std::size_t>(i)];
        const index_t e = tl.expert, rows = tl.r1 - tl.r0, g0 = c.offsets[e] + tl.r0;
        for (index_t r = 0; r < rows; ++r) {
          index_t t;
          M w;
          if (dense) {
            t = tl.r0 + r;
            w = c.probs[t * E + e];
          } else {
            const index_t p = c.pair_of[g0 + r];
            t = p / k;
            w = c.gates[p];
          }
          std::copy(X.data() + t * d, X.data() + (t + 1) * d, Xp.data() + (g0 + r) * d);
          const M* u = U.data() + t * d;
          M* f = dF.data() + (g0 + r) * d;
          for (index_t col = 0; col < d; ++col) f[col] = w * u[col];
        }
        M* dA = ensure(scratch, static_cast<std::size_t>(rows * h));
        mmat(dA, rows, h, h).noalias() = cmat<M>(dF.data() + g0 * d, rows, d, d) * P.w2.expert(e);
        activation_backward_rows<M>(opt.act, c.pre + g0 * h1, dA, dH.data() + g0 * h1, rows, h);
        mmat(dXp.data() + g0 * d, rows, d, d).noalias() =
            cmat<M>(dH.data() + g0 * h1, rows, h1, h1) * P.w1.expert(e);
      });

  // 3. Every output, in independent items: weight-gradient blocks (each reduces over all of its
  //    expert's rows in one GEMM), router-weight column blocks, dx token tiles, db_r, dω.
  const index_t blk = moe_tile_rows;
  const index_t w1_blocks = (h1 + blk - 1) / blk, w2_blocks = (d + blk - 1) / blk,
                router_blocks = (d + blk - 1) / blk, dx_tiles = (n + blk - 1) / blk;
  const index_t n_w1 = E * w1_blocks, n_w2 = E * w2_blocks;
  const index_t items = n_w1 + n_w2 + router_blocks + dx_tiles + 2;
  const double work = 2 * static_cast<double>(N) * fd * fh + 4 * static_cast<double>(n) * fd * fE;
  // One block of an expert's weight and bias gradients, reduced over all of its rows in one GEMM:
  // gw_e[c0:c0+cb, :] = dG_e[:, c0:c0+cb]ᵀ In_e and gb_e[c0:c0+cb] = Σ_r dG_e[r, c0:c0+cb], with
  // dG [rows, g_cols] and In [rows, in_cols] in packed-row order.
  auto weight_grad_block = [&](const M* dG, index_t g_cols, const M* in, index_t in_cols, index_t e,
                               index_t c0, index_t cb, const auto& gw, const auto& gb,
                               std::vector<M>& scratch) {
    const index_t r0 = c.offsets[e], ne = c.offsets[e + 1] - r0;
    M* out = ensure(scratch, static_cast<std::size_t>(cb * (in_cols + 1)));
    M* bias = out + cb * in_cols;
    auto o = mmat(out, cb, in_cols, in_cols);
    const auto dGe = cmat<M>(dG + r0 * g_cols, ne, g_cols, g_cols);
    if (ne > 0)
      o.noalias() =
          dGe.middleCols(c0, cb).transpose() * cmat<M>(in + r0 * in_cols, ne, in_cols, in_cols);
    else
      o.setZero();
    std::fill(bias, bias + cb, M(0));
    for (index_t r = 0; r < ne; ++r)
      for (index_t q = 0; q < cb; ++q) bias[q] += dGe(r, c0 + q);
    store(gw.data_handle() + e * gw.stride(0) + c0 * gw.stride(1), gw.stride(1), gw.stride(2), out,
          cb, in_cols, in_cols, mode);
    store(gb.data_handle() + e * gb.stride(0) + c0 * gb.stride(1), gb.stride(1), index_t(0), bias,
          cb, 1, 1, mode);
  };
  for_each_item<M>(items, work, exec, [&](index_t item, std::vector<M>& scratch) {
    if (item < n_w1) {  // dW1_e[i0:i1, :] = dH_e[:, i0:i1]ᵀ X_e, db1_e[i0:i1] = Σ_r dH_e[r, i0:i1]
      const index_t e = item / w1_blocks, i0 = (item % w1_blocks) * blk;
      weight_grad_block(dH.data(), h1, Xp.data(), d, e, i0, std::min(h1, i0 + blk) - i0, grads.w1,
                        grads.b1, scratch);
      return;
    }
    item -= n_w1;
    if (item < n_w2) {  // dW2_e[c0:c1, :] = dF_e[:, c0:c1]ᵀ A_e, db2_e[c0:c1] = Σ_r dF_e[r, c0:c1]
      const index_t e = item / w2_blocks, c0 = (item % w2_blocks) * blk;
      weight_grad_block(dF.data(), d, c.post, h, e, c0, std::min(d, c0 + blk) - c0, grads.w2,
                        grads.b2, scratch);
      return;
    }
    item -= n_w2;
    if (item < router_blocks) {  // dW_r[:, c0:c1] = dzᵀ X[:, c0:c1]
      const index_t c0 = item * blk, cb = std::min(d, c0 + blk) - c0;
      M* out = ensure(scratch, static_cast<std::size_t>(E * cb));
      mmat(out, E, cb, cb).noalias() =
          cmat<M>(dz.data(), n, E, E).transpose() * cmat<M>(X.data(), n, d, d).middleCols(c0, cb);
      const auto& gw = grads.router_weight;
      store(gw.data_handle() + c0 * gw.stride(1), gw.stride(0), gw.stride(1), out, E, cb, cb, mode);
      return;
    }
    item -= router_blocks;
    if (item < dx_tiles) {  // dx_t = dz_t W_r + Σ_j dX_tj (slot order; dense: expert order)
      const index_t t0 = item * blk, rows = std::min(n, t0 + blk) - t0;
      M* out = ensure(scratch, static_cast<std::size_t>(rows * d));
      mmat(out, rows, d, d).noalias() =
          cmat<M>(dz.data() + t0 * E, rows, E, E) * P.router.expert(0);
      for (index_t i = 0; i < rows; ++i) {
        const index_t t = t0 + i;
        M* o = out + i * d;
        if (dense) {
          for (index_t e = 0; e < E; ++e) {
            const M* g = dXp.data() + (e * n + t) * d;
            for (index_t col = 0; col < d; ++col) o[col] += g[col];
          }
        } else {
          for (index_t j = 0; j < k; ++j) {
            const index_t r = c.row_of[t * k + j];
            if (r < 0) continue;
            const M* g = dXp.data() + r * d;
            for (index_t col = 0; col < d; ++col) o[col] += g[col];
          }
        }
      }
      store(dx.data_handle() + t0 * dx.stride(0), dx.stride(0), dx.stride(1), out, rows, d, d,
            mode);
      return;
    }
    item -= dx_tiles;
    if (item == 0) {  // db_r = Σ_t dz_t
      M* out = ensure(scratch, static_cast<std::size_t>(E));
      std::fill(out, out + E, M(0));
      for (index_t t = 0; t < n; ++t)
        for (index_t e = 0; e < E; ++e) out[e] += dz.data()[t * E + e];
      const auto& gb = grads.router_bias;
      store(gb.data_handle(), index_t(0), gb.stride(0), out, 1, E, E, mode);
      return;
    }
    if (opt.use_omega) {  // dω = Σ_t dy_t ⊙ Σ_j g_tj F_tj
      M* out = ensure(scratch, static_cast<std::size_t>(d));
      std::fill(out, out + d, M(0));
      for (index_t t = 0; t < n; ++t)
        for (index_t col = 0; col < d; ++col) out[col] += S.data()[t * d + col];
      const auto& go = grads.omega;
      store(go.data_handle(), index_t(0), go.stride(0), out, 1, d, d, mode);
    }
  });
  return status::ok();
}

}  // namespace routegrad::cpu
