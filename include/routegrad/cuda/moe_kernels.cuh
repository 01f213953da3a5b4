// The MoE layer's own kernels (the GEMMs are cuBLAS, the routing is cuda/kernels.cuh). Every
// output element has one owning thread; sums across threads are block tree reductions or
// per-slice partials added in a fixed order, never float atomics, so results are bitwise
// reproducible run to run.
//
// Indexing (see moe_layer.cuh): pair p = j·T + t is slot j of token t (j < K: K = k, or E in dense
// mode, where slot j is expert j); the dispatch gives kept pair p its row r = row_of_pair[p]
// (−1: not routed, or dropped by capacity) of the expert-sorted blocks [N, ·], expert e owning
// rows [seg[e], seg[e+1]).
// Indices read from memory are range-checked, so a corrupted context cannot make a kernel read or
// write out of bounds.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../core/math.hpp"
#include "../core/philox.hpp"
#include "../estimators/row_math.hpp"
#include "../estimators/token_common.hpp"
#include "../moe/activation.hpp"
#include "../moe/options.hpp"
#include "convert.cuh"
#include "kernels.cuh"
#include "lanes.cuh"

namespace routegrad::cuda::moe_detail {

/// Threads per block of the row kernels (one token or row per block iteration).
inline constexpr int row_threads = 128;
/// Threads per block of the flat kernels.
inline constexpr int flat_threads = 256;

/// A grid of at most 2^20 blocks (kernels loop grid-stride), at least 1.
inline unsigned grid_blocks(index_t work, int per_block) {
  index_t b = (work + per_block - 1) / per_block;
  if (b < 1) b = 1;
  return static_cast<unsigned>(b < (index_t(1) << 20) ? b : (index_t(1) << 20));
}

// ---------------------------------------------------------------------------------------------
// Vector access: V consecutive elements with one load / store when V > 1 (the caller checked
// unit stride and alignment to V·sizeof(T)).
// ---------------------------------------------------------------------------------------------

template <class T, int V>
struct alignas(sizeof(T) * V) pack {
  T v[V];
};

template <int V, class M, class T>
__device__ __forceinline__ void load(const T* p, M (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_math<M>(*p);
  } else {
    using S = std::remove_cv_t<T>;
    const pack<S, V> w = *reinterpret_cast<const pack<S, V>*>(p);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = to_math<M>(w.v[i]);
  }
}

template <int V, class M, class T>
__device__ __forceinline__ void store(T* p, const M (&in)[V]) {
  if constexpr (V == 1) {
    *p = from_math<T>(in[0]);
  } else {
    pack<T, V> w;
#pragma unroll
    for (int i = 0; i < V; ++i) w.v[i] = from_math<T>(in[i]);
    *reinterpret_cast<pack<T, V>*>(p) = w;
  }
}

/// A caller's strided [rows, cols] matrix; with V > 1 its column stride is 1.
template <class T>
struct strided {
  T* data;
  index_t s0, s1;
  __device__ T* row(index_t i) const { return data + i * s0; }
};

template <int V, class M, class T>
__device__ __forceinline__ void load_at(const strided<T>& m, index_t i, index_t c, M (&out)[V]) {
  if constexpr (V == 1)
    out[0] = to_math<M>(m.data[i * m.s0 + c * m.s1]);
  else
    load<V>(m.data + i * m.s0 + c, out);
}

template <int V, class M, class T>
__device__ __forceinline__ void store_at(const strided<T>& m, index_t i, index_t c,
                                         const M (&in)[V]) {
  if constexpr (V == 1)
    m.data[i * m.s0 + c * m.s1] = from_math<T>(in[0]);
  else
    store<V>(m.data + i * m.s0 + c, in);
}

/// Block sum in a fixed tree (warp butterflies, then warp 0 over the warps in order); every
/// thread gets the result. `scratch` holds row_threads / 32 values.
template <class M>
__device__ M block_sum(M x, M* scratch) {
  for (int d = 16; d > 0; d /= 2) x += __shfl_xor_sync(0xFFFFFFFFu, x, d);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  M total = M(0);
  for (int w = 0; w < static_cast<int>(blockDim.x) / 32; ++w) total += scratch[w];
  __syncthreads();  // scratch may be reused
  return total;
}

// ---------------------------------------------------------------------------------------------
// Forward: router, dispatch, experts, combine
// ---------------------------------------------------------------------------------------------

/// z[t, e] = b_r[e] (the router GEMM then adds x·W_rᵀ).
template <class M, class T>
__global__ void __launch_bounds__(flat_threads)
    bias_rows_kernel(M* z, index_t rows, index_t cols, const T* bias, index_t bias_stride) {
  const index_t n = rows * cols;
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < n;
       i += index_t(gridDim.x) * blockDim.x)
    z[i] = to_math<M>(bias[(i % cols) * bias_stride]);
}

/// dst (contiguous [rows, cols]) = src (strided); rows with token_ok[t] == 0 are zero (token_ok
/// may be null).
template <class T>
__global__ void __launch_bounds__(flat_threads)
    stage_kernel(T* dst, strided<const T> src, index_t rows, index_t cols,
                 const std::uint8_t* token_ok) {
  const index_t n = rows * cols;
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < n;
       i += index_t(gridDim.x) * blockDim.x) {
    const index_t t = i / cols;
    dst[i] = token_ok && !token_ok[t] ? from_math<T>(math_t<T>(0))
                                      : src.data[t * src.s0 + (i % cols) * src.s1];
  }
}

/// A token's logits as the routing sees them (estimators/row_math.hpp's Row accessor), read
/// from global memory, with Switch's jitter recomputed per element exactly as the routing
/// kernels stage it.
template <class M>
struct logit_row {
  const M* z;
  int n;
  rng_stream rng;
  index_t t;
  M noise_eps;  // 0: no jitter
  __device__ int size() const { return n; }
  __device__ M clean(int i) const { return z[i]; }
  __device__ M logit(int i) const {
    return noise_eps != M(0) ? z[i] * switch_noise<M>(rng, t, i, noise_eps) : z[i];
  }
};

/// token_ok[t] = 1 when the routing can route token t (summarize_row: no NaN or +inf logit, the
/// jittered ones included, and one finite) — the rule the routing counts pairs by. Dense mode
/// asks the same of the clean logits (no jitter). One warp per token.
template <class Est, class M>
__global__ void __launch_bounds__(flat_threads)
    token_ok_kernel(const M* z, index_t tokens, index_t experts, routing_options opt,
                    rng_stream rng, bool dense, std::uint8_t* token_ok) {
  const warp_lanes<32> lanes = warp_lanes<32>::make();
  const M eps = dense ? M(0) : detail::noise_eps_of<Est, M>(opt);
  const index_t warps = index_t(gridDim.x) * (blockDim.x / 32);
  for (index_t t = blockIdx.x * index_t(blockDim.x / 32) + threadIdx.x / 32; t < tokens;
       t += warps) {
    const logit_row<M> row{z + t * experts, static_cast<int>(experts), rng, t, eps};
    const row_summary<M> summary = summarize_row<M>(lanes, row);
    if (lanes.lane() == 0) token_ok[t] = summary.routable ? 1 : 0;
  }
}

/// Dense mode's mixing weights: gates[e·T + t] = softmax(z_t)_e over every expert, one warp per
/// token; zero for a token the router cannot route (token_ok[t] == 0).
template <class M>
__global__ void __launch_bounds__(flat_threads)
    dense_gates_kernel(const M* z, const std::uint8_t* token_ok, index_t tokens, index_t experts,
                       M* gates) {
  const index_t warps = index_t(gridDim.x) * (blockDim.x / 32);
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (index_t t = blockIdx.x * index_t(blockDim.x / 32) + threadIdx.x / 32; t < tokens;
       t += warps) {
    const M* row = z + t * experts;
    const bool ok = token_ok[t] != 0;  // the same for the whole warp
    M m = -math::infinity<M>();
    for (index_t e = lane; e < experts; e += 32) m = math::max(m, row[e]);
    for (int d = 16; d > 0; d /= 2) m = math::max(m, __shfl_xor_sync(0xFFFFFFFFu, m, d));
    M s = M(0);
    if (ok)
      for (index_t e = lane; e < experts; e += 32) s += math::exp(row[e] - m);
    for (int d = 16; d > 0; d /= 2) s += __shfl_xor_sync(0xFFFFFFFFu, s, d);
    for (index_t e = lane; e < experts; e += 32)
      gates[e * tokens + t] = ok ? math::exp(row[e] - m) / s : M(0);
  }
}

/// Inclusive sum over a block of Threads threads (a multiple of 32, at most 1024) in a fixed
/// order; `warp_sums` holds Threads / 32 values. Every thread must call it.
template <int Threads, class I>
__device__ I block_inclusive_sum(I x, I* warp_sums) {
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  for (int d = 1; d < 32; d *= 2) {
    const I y = __shfl_up_sync(0xFFFFFFFFu, x, d);
    if (lane >= d) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    I w = lane < Threads / 32 ? warp_sums[lane] : I(0);
    for (int d = 1; d < 32; d *= 2) {
      const I y = __shfl_up_sync(0xFFFFFFFFu, w, d);
      if (lane >= d) w += y;
    }
    if (lane < Threads / 32) warp_sums[lane] = w;
  }
  __syncthreads();
  if (warp > 0) x += warp_sums[warp - 1];
  __syncthreads();  // warp_sums may be reused
  return x;
}

/// The dispatch sorts pairs by key: the expert of a routed pair, or E for a pair the routing did
/// not route (its token unroutable, or its expert's logit −inf: the routing's count rule), which
/// is never dispatched. An expert outside [0, E) cannot come from the routing kernels; it is
/// read as not routed so every index stays in range.
__device__ __forceinline__ index_t dispatch_key(const std::int32_t* keys, index_t p,
                                                index_t num_experts) {
  const index_t e = keys[p];
  return e >= 0 && e < num_experts ? e : num_experts;
}

template <class M>
__global__ void __launch_bounds__(flat_threads)
    dispatch_keys_kernel(const std::int32_t* experts, const std::uint8_t* token_ok, const M* z,
                         index_t tokens, index_t pairs, index_t num_experts, std::int32_t* keys) {
  for (index_t p = blockIdx.x * index_t(blockDim.x) + threadIdx.x; p < pairs;
       p += index_t(gridDim.x) * blockDim.x) {
    const index_t t = p % tokens, e = experts[p];
    const bool routed =
        e >= 0 && e < num_experts && token_ok[t] && z[t * num_experts + e] > -math::infinity<M>();
    keys[p] = static_cast<std::int32_t>(routed ? e : num_experts);
  }
}

/// The dispatch is a stable counting sort of the pairs by key (E + 1 keys), in fixed chunks of
/// `chunk` pairs (a multiple of sort_tile): phase 1, one block per chunk, walks its chunk in
/// tiles of sort_tile pairs and gives each pair its rank among the chunk's earlier pairs of the
/// same key (local_rank), leaving the chunk's count of each key in hist[key·chunks + b].
inline constexpr int sort_tile = 256;

/// (A template only so that a header can define it in many translation units.)
template <int = 0>
__global__ void __launch_bounds__(sort_tile)
    chunk_rank_kernel(const std::int32_t* keys, index_t pairs, index_t num_experts, index_t chunk,
                      index_t chunks, std::int32_t* hist, std::int32_t* local_rank) {
  __shared__ std::int32_t tile[sort_tile];
  for (index_t b = blockIdx.x; b < chunks; b += gridDim.x) {
    for (index_t e = threadIdx.x; e <= num_experts; e += blockDim.x) hist[e * chunks + b] = 0;
    __syncthreads();  // the zeros are visible to the block
    const index_t end = (b + 1) * chunk < pairs ? (b + 1) * chunk : pairs;
    for (index_t base = b * chunk; base < end; base += sort_tile) {
      const index_t i = base + threadIdx.x;
      const bool valid = i < end;
      const index_t key = valid ? dispatch_key(keys, i, num_experts) : -1;
      tile[threadIdx.x] = static_cast<std::int32_t>(key);
      __syncthreads();
      int before = 0, after = 0;  // same-key pairs of the tile before / after this one
      if (valid)
        for (int j = 0; j < sort_tile; ++j)
          if (tile[j] == key) {
            before += j < static_cast<int>(threadIdx.x);
            after += j > static_cast<int>(threadIdx.x);
          }
      const std::int32_t running = valid ? hist[key * chunks + b] : 0;
      __syncthreads();  // every thread has read the running counts
      if (valid) {
        local_rank[i] = running + before;
        if (after == 0) hist[key * chunks + b] = running + before + 1;  // the key's last
      }
      __syncthreads();  // counts updated, tile free
    }
  }
}

/// Phase 2 (one block): base[i] = Σ_{i' < i} hist[i'] over the key-major order i = e·chunks + b,
/// so pair p of key e in chunk b lands at base[e·chunks + b] + local_rank[p] and key e's pairs
/// start at base[e·chunks] (the not-routed pairs, key E, at the routed pairs' count).
template <int Threads>
__global__ void __launch_bounds__(Threads)
    exclusive_scan_kernel(const std::int32_t* in, index_t n, std::int32_t* out) {
  __shared__ std::int32_t warp_sums[Threads / 32];
  __shared__ std::int32_t carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (index_t base = 0; base < n; base += Threads) {
    const index_t i = base + threadIdx.x;
    const std::int32_t v = i < n ? in[i] : 0;
    const std::int32_t inclusive = block_inclusive_sum<Threads>(v, warp_sums);
    if (i < n) out[i] = carry + inclusive - v;
    __syncthreads();  // every thread has read carry
    if (threadIdx.x == Threads - 1) carry += inclusive;
    __syncthreads();
  }
}

/// The words before the segment offsets in the context header: what the forward ran with (the
/// backward refuses a context that disagrees), its rng, and the pairs dropped by capacity.
struct header_words {
  static constexpr int magic = 0, scalar_bytes = 1, estimator = 2, tokens = 3, experts = 4, k = 5,
                       d_model = 6, d_hidden = 7, act = 8, mix = 9, use_omega = 10,
                       renormalize = 11, capacity = 12, seed = 13, offset = 14, first_token = 15,
                       dropped = 16, count = 17;
  static constexpr std::int64_t magic_value = 0x726f757465677264;  // "routegrd"
};

/// The header as the host fills it (the kernels add `dropped`).
struct header_values {
  std::int64_t w[header_words::count];
};

__device__ inline void write_header(std::int64_t* header, const header_values& h,
                                    std::int64_t dropped) {
  for (int i = 0; i < header_words::count; ++i) header[i] = h.w[i];
  header[header_words::dropped] = dropped;
}

/// Phase 3 (one block): the kept rows of each expert, min(routed, capacity), as segment offsets
/// seg[0..E] (seg[E] = N, the kept pairs), and the header with the pairs dropped by capacity.
template <int Threads>
__global__ void __launch_bounds__(Threads)
    kept_segments_kernel(const std::int32_t* base, index_t chunks, index_t num_experts,
                         index_t capacity, std::int64_t* header, header_values values) {
  __shared__ std::int64_t warp_sums[Threads / 32];
  __shared__ std::int64_t carry;
  std::int64_t* seg = header + header_words::count;
  if (threadIdx.x == 0) {
    carry = 0;
    seg[0] = 0;
  }
  __syncthreads();
  for (index_t first = 0; first < num_experts; first += Threads) {
    const index_t e = first + threadIdx.x;
    std::int64_t kept = 0;
    if (e < num_experts) {
      const std::int64_t routed = base[(e + 1) * chunks] - base[e * chunks];
      kept = routed < capacity ? routed : capacity;
    }
    const std::int64_t inclusive = block_inclusive_sum<Threads>(kept, warp_sums);
    if (e < num_experts) seg[e + 1] = carry + inclusive;
    __syncthreads();  // every thread has read carry
    if (threadIdx.x == Threads - 1) carry += inclusive;
    __syncthreads();
  }
  // Routed pairs (the keys below E) minus the kept ones.
  if (threadIdx.x == 0) write_header(header, values, base[num_experts * chunks] - carry);
}

/// Phase 4: a routed pair's rank in its expert's (slot, token)-ordered list decides admission;
/// kept pairs get their row, the others −1.
/// (A template only so that a header can define it in many translation units.)
template <int = 0>
__global__ void __launch_bounds__(flat_threads)
    assign_rows_kernel(const std::int32_t* keys, const std::int32_t* local_rank,
                       const std::int32_t* base, index_t pairs, index_t num_experts, index_t chunk,
                       index_t chunks, const std::int64_t* seg, std::int32_t* row_of_pair,
                       std::int32_t* pair_of_row, std::int32_t* expert_of_row) {
  for (index_t p = blockIdx.x * index_t(blockDim.x) + threadIdx.x; p < pairs;
       p += index_t(gridDim.x) * blockDim.x) {
    const index_t e = dispatch_key(keys, p, num_experts);
    row_of_pair[p] = -1;
    if (e == num_experts) continue;  // not routed
    const index_t rank = base[e * chunks + p / chunk] + local_rank[p] - base[e * chunks];
    if (rank < seg[e + 1] - seg[e]) {
      const index_t r = seg[e] + rank;
      row_of_pair[p] = static_cast<std::int32_t>(r);
      pair_of_row[r] = static_cast<std::int32_t>(p);
      expert_of_row[r] = static_cast<std::int32_t>(e);
    }
  }
}

/// Dense mode: pair p = e·T + t is row p; expert e owns rows [e·T, (e+1)·T).
/// (A template only so that a header can define it in many translation units.)
template <int = 0>
__global__ void __launch_bounds__(flat_threads)
    dense_dispatch_kernel(index_t tokens, index_t num_experts, std::int32_t* row_of_pair,
                          std::int32_t* pair_of_row, std::int32_t* expert_of_row,
                          std::int64_t* header, header_values values) {
  const index_t pairs = tokens * num_experts;
  for (index_t p = blockIdx.x * index_t(blockDim.x) + threadIdx.x; p < pairs;
       p += index_t(gridDim.x) * blockDim.x) {
    row_of_pair[p] = static_cast<std::int32_t>(p);
    pair_of_row[p] = static_cast<std::int32_t>(p);
    expert_of_row[p] = static_cast<std::int32_t>(p / tokens);
  }
  for (index_t e = blockIdx.x * index_t(blockDim.x) + threadIdx.x; e <= num_experts;
       e += index_t(gridDim.x) * blockDim.x)
    header[header_words::count + e] = e * tokens;
  if (blockIdx.x == 0 && threadIdx.x == 0) write_header(header, values, 0);
}

/// xs[r, :] = x[t, :] for the token t of kept row r (one row per block iteration); zero for a
/// token with token_ok[t] == 0 (dense mode; token_ok may be null).
template <int V, class T>
__global__ void __launch_bounds__(row_threads)
    gather_kernel(T* xs, strided<const T> x, index_t cols, const std::int32_t* pair_of_row,
                  index_t rows, index_t tokens, index_t pairs, const std::uint8_t* token_ok) {
  using M = math_t<T>;
  for (index_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const index_t p = pair_of_row[r];
    const bool valid = p >= 0 && p < pairs && (!token_ok || token_ok[p % tokens]);
    const index_t t = valid ? p % tokens : 0;
    for (index_t c = index_t(threadIdx.x) * V; c < cols; c += index_t(blockDim.x) * V) {
      M v[V];
      if (valid) {
        load_at<V>(x, t, c, v);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) v[i] = M(0);
      }
      store<V>(xs + r * cols + c, v);
    }
  }
}

/// b1[e, i] as the math type.
template <class M, class T>
__device__ __forceinline__ M bias_at(const strided<const T>& b, index_t e, index_t i) {
  return to_math<M>(b.data[e * b.s0 + i * b.s1]);
}

/// act[r, i] = act(pre[r, i] + b1[e, i]) for i < h (SwiGLU: silu(a)·b with a, b the two halves).
template <int V, class T>
__global__ void __launch_bounds__(flat_threads)
    activation_kernel(T* act, const T* pre, strided<const T> b1, const std::int32_t* expert_of_row,
                      index_t rows, index_t hidden, index_t experts, activation kind) {
  using M = math_t<T>;
  const bool glu = kind == activation::swiglu;
  const index_t pre_cols = glu ? 2 * hidden : hidden;
  const index_t packs = rows * (hidden / V);
  for (index_t q = blockIdx.x * index_t(blockDim.x) + threadIdx.x; q < packs;
       q += index_t(gridDim.x) * blockDim.x) {
    const index_t r = q / (hidden / V), i = (q % (hidden / V)) * V;
    index_t e = expert_of_row[r];
    e = e >= 0 && e < experts ? e : 0;
    M a[V], out[V];
    load<V>(pre + r * pre_cols + i, a);
    if (glu) {
      M b[V];
      load<V>(pre + r * pre_cols + hidden + i, b);
#pragma unroll
      for (int v = 0; v < V; ++v)
        out[v] = moe_math::swiglu(a[v] + bias_at<M>(b1, e, i + v),
                                  b[v] + bias_at<M>(b1, e, hidden + i + v));
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v)
        out[v] = moe_math::activate(kind, a[v] + bias_at<M>(b1, e, i + v));
    }
    store<V>(act + r * hidden + i, out);
  }
}

/// What the combine and the gate gradients read for pair p of token t.
template <class T, class M>
struct mixture {
  const M* gates;                     // [K·T]
  const std::int32_t* row_of_pair;    // [K·T]
  const std::int32_t* expert_of_row;  // [N]
  const T* f;                         // [N, d] expert outputs without b2
  strided<const T> b2;                // [E, d]
  index_t tokens, slots, rows, experts, d;

  /// Row of pair p, or −1 when dropped; `e` its expert.
  __device__ index_t row(index_t p, index_t& e) const {
    const index_t r = row_of_pair[p];
    if (r < 0 || r >= rows) return -1;
    e = expert_of_row[r];
    if (e < 0 || e >= experts) return -1;
    return r;
  }
  /// m_t[c..c+V) = Σ_j g_tj · (f[r_j, c] + b2[e_j, c]).
  template <int V>
  __device__ void sum(index_t t, index_t c, M (&m)[V]) const {
#pragma unroll
    for (int v = 0; v < V; ++v) m[v] = M(0);
    for (index_t j = 0; j < slots; ++j) {
      const index_t p = j * tokens + t;
      index_t e = 0;
      const index_t r = row(p, e);
      if (r < 0) continue;
      const M g = gates[p];
      M fv[V];
      load<V>(f + r * d + c, fv);
#pragma unroll
      for (int v = 0; v < V; ++v) m[v] += g * (fv[v] + bias_at<M>(b2, e, c + v));
    }
  }
};

/// y[t, :] = ω ⊙ Σ_j g_tj · f_{D_tj}(x_t) (zero for a token whose pairs were all dropped).
template <int V, class T, class M>
__global__ void __launch_bounds__(row_threads)
    combine_kernel(strided<T> y, mixture<T, M> mix, const T* omega, index_t omega_stride) {
  for (index_t t = blockIdx.x; t < mix.tokens; t += gridDim.x)
    for (index_t c = index_t(threadIdx.x) * V; c < mix.d; c += index_t(blockDim.x) * V) {
      M m[V];
      mix.template sum<V>(t, c, m);
      if (omega) {
#pragma unroll
        for (int v = 0; v < V; ++v) m[v] *= to_math<M>(omega[(c + v) * omega_stride]);
      }
      store_at<V>(y, t, c, m);
    }
}

/// kept_counts[e] = seg[e+1] − seg[e]; dropped = the header's count of pairs over capacity.
/// (A template only so that a header can define it in many translation units.)
template <int = 0>
__global__ void __launch_bounds__(flat_threads)
    kept_stats_kernel(const std::int64_t* header, index_t experts, std::int64_t* kept_counts,
                      std::int64_t* dropped) {
  const std::int64_t* seg = header + header_words::count;
  for (index_t e = blockIdx.x * index_t(blockDim.x) + threadIdx.x; e < experts;
       e += index_t(gridDim.x) * blockDim.x)
    if (kept_counts) kept_counts[e] = seg[e + 1] - seg[e];
  if (blockIdx.x == 0 && threadIdx.x == 0 && dropped) *dropped = header[header_words::dropped];
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

/// One block per pair p = (t, j): the gate gradient G_p = Σ_c dy[t,c]·ω[c]·(f[r,c] + b2[e,c])
/// (0 for a dropped pair) and the expert output gradient df[r, :] = g_p · dy[t, :] ⊙ ω.
template <int V, class T, class M>
__global__ void __launch_bounds__(row_threads)
    gate_grad_kernel(mixture<T, M> mix, strided<const T> dy, const T* omega, index_t omega_stride,
                     M* grad_gates, T* df) {
  __shared__ M scratch[row_threads / 32];
  const index_t pairs = mix.tokens * mix.slots;
  for (index_t p = blockIdx.x; p < pairs; p += gridDim.x) {
    index_t e = 0;
    const index_t r = mix.row(p, e);  // the same for every thread of the block
    if (r < 0) {
      if (threadIdx.x == 0) grad_gates[p] = M(0);
      continue;
    }
    const index_t t = p % mix.tokens;
    const M g = mix.gates[p];
    M acc = M(0);
    for (index_t c = index_t(threadIdx.x) * V; c < mix.d; c += index_t(blockDim.x) * V) {
      M u[V], fv[V], out[V];
      load_at<V>(dy, t, c, u);
      load<V>(mix.f + r * mix.d + c, fv);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        if (omega) u[v] *= to_math<M>(omega[(c + v) * omega_stride]);
        acc += u[v] * (fv[v] + bias_at<M>(mix.b2, e, c + v));
        out[v] = g * u[v];
      }
      store<V>(df + r * mix.d + c, out);
    }
    const M total = block_sum(acc, scratch);
    if (threadIdx.x == 0) grad_gates[p] = total;
  }
}

/// Dense mode: dz[t, e] (+)= π_e (G_e − Σ_i π_i G_i), the softmax's exact backward; one warp per
/// token. gates and grad_gates are [E·T] (index e·T + t).
template <class M>
__global__ void __launch_bounds__(flat_threads)
    dense_softmax_backward_kernel(const M* gates, const M* grad_gates, index_t tokens,
                                  index_t experts, M* dz, bool accumulate) {
  const index_t warps = index_t(gridDim.x) * (blockDim.x / 32);
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (index_t t = blockIdx.x * index_t(blockDim.x / 32) + threadIdx.x / 32; t < tokens;
       t += warps) {
    M s = M(0);
    for (index_t e = lane; e < experts; e += 32)
      s += gates[e * tokens + t] * grad_gates[e * tokens + t];
    for (int d = 16; d > 0; d /= 2) s += __shfl_xor_sync(0xFFFFFFFFu, s, d);
    for (index_t e = lane; e < experts; e += 32) {
      const M pi = gates[e * tokens + t];
      const M v = pi * (grad_gates[e * tokens + t] - s);
      M& o = dz[t * experts + e];
      o = accumulate ? o + v : v;
    }
  }
}

template <class T, class M>
__global__ void __launch_bounds__(flat_threads) convert_kernel(T* dst, const M* src, index_t n) {
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < n;
       i += index_t(gridDim.x) * blockDim.x)
    dst[i] = from_math<T>(src[i]);
}

/// Column sums over row segments, phase 1: partial[(s·slices + q)·cols + c] = Σ value(r, c) over
/// slice q of segment s's rows (rows [seg[s], seg[s+1]), or [0, rows) for one segment when seg
/// is null), in row order. Thread per column, block row y = (segment, slice).
template <class M, class Value>
__global__ void __launch_bounds__(flat_threads)
    column_partials_kernel(Value value, const std::int64_t* seg, index_t rows, index_t segments,
                           index_t slices, index_t cols, M* partial) {
  const index_t c = blockIdx.x * index_t(blockDim.x) + threadIdx.x;
  if (c >= cols) return;
  for (index_t y = blockIdx.y; y < segments * slices; y += gridDim.y) {
    const index_t s = y / slices, q = y % slices;
    const index_t begin = seg ? seg[s] : 0, end = seg ? seg[s + 1] : rows;
    const index_t n = end > begin ? end - begin : 0;
    const index_t lo = begin + n * q / slices, hi = begin + n * (q + 1) / slices;
    M acc = M(0);
    for (index_t r = lo; r < hi; ++r) acc += value(r, c);
    partial[y * cols + c] = acc;
  }
}

/// Phase 2: out[s, c] (+)= Σ_q partial[(s·slices + q)·cols + c], slices in order.
template <class M, class T>
__global__ void __launch_bounds__(flat_threads)
    column_finish_kernel(const M* partial, index_t segments, index_t slices, index_t cols,
                         strided<T> out, bool accumulate) {
  const index_t n = segments * cols;
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < n;
       i += index_t(gridDim.x) * blockDim.x) {
    const index_t s = i / cols, c = i % cols;
    M acc = M(0);
    for (index_t q = 0; q < slices; ++q) acc += partial[(s * slices + q) * cols + c];
    T& o = out.data[s * out.s0 + c * out.s1];
    o = from_math<T>(accumulate ? to_math<M>(o) + acc : acc);
  }
}

/// value(r, c) of a contiguous [rows, cols] block.
template <class T, class M>
struct block_value {
  const T* data;
  index_t cols;
  __device__ M operator()(index_t r, index_t c) const { return to_math<M>(data[r * cols + c]); }
};

/// value(t, c) = dy[t, c] · m_t[c], the summand of dω.
template <class T, class M>
struct omega_value {
  mixture<T, M> mix;
  strided<const T> dy;
  __device__ M operator()(index_t t, index_t c) const {
    M m[1];
    mix.template sum<1>(t, c, m);
    return to_math<M>(dy.data[t * dy.s0 + c * dy.s1]) * m[0];
  }
};

/// dpre[r, :] = da[r, :] ⊙ act'(pre[r, :] + b1[e, :]) (SwiGLU: both halves); may run in place
/// (dpre == da) when not SwiGLU.
template <int V, class T>
__global__ void __launch_bounds__(flat_threads)
    activation_backward_kernel(T* dpre, const T* da, const T* pre, strided<const T> b1,
                               const std::int32_t* expert_of_row, index_t rows, index_t hidden,
                               index_t experts, activation kind) {
  using M = math_t<T>;
  const bool glu = kind == activation::swiglu;
  const index_t pre_cols = glu ? 2 * hidden : hidden;
  const index_t packs = rows * (hidden / V);
  for (index_t q = blockIdx.x * index_t(blockDim.x) + threadIdx.x; q < packs;
       q += index_t(gridDim.x) * blockDim.x) {
    const index_t r = q / (hidden / V), i = (q % (hidden / V)) * V;
    index_t e = expert_of_row[r];
    e = e >= 0 && e < experts ? e : 0;
    M g[V], a[V];
    load<V>(da + r * hidden + i, g);
    load<V>(pre + r * pre_cols + i, a);
    if (glu) {
      M b[V], ga[V], gb[V];
      load<V>(pre + r * pre_cols + hidden + i, b);
#pragma unroll
      for (int v = 0; v < V; ++v)
        moe_math::swiglu_grad(a[v] + bias_at<M>(b1, e, i + v),
                              b[v] + bias_at<M>(b1, e, hidden + i + v), g[v], ga[v], gb[v]);
      store<V>(dpre + r * pre_cols + i, ga);
      store<V>(dpre + r * pre_cols + hidden + i, gb);
    } else {
      M out[V];
#pragma unroll
      for (int v = 0; v < V; ++v)
        out[v] = g[v] * moe_math::activate_grad(kind, a[v] + bias_at<M>(b1, e, i + v));
      store<V>(dpre + r * pre_cols + i, out);
    }
  }
}

/// dx[t, :] (+)= dx_router[t, :] + Σ_j dxs[r_j, :] over the token's kept pairs.
template <int V, class T, class M>
__global__ void __launch_bounds__(row_threads)
    dx_combine_kernel(strided<T> dx, const T* dx_router, const T* dxs,
                      const std::int32_t* row_of_pair, index_t tokens, index_t slots, index_t rows,
                      index_t d, bool accumulate) {
  for (index_t t = blockIdx.x; t < tokens; t += gridDim.x)
    for (index_t c = index_t(threadIdx.x) * V; c < d; c += index_t(blockDim.x) * V) {
      M acc[V], part[V];
      load<V>(dx_router + t * d + c, acc);
      for (index_t j = 0; j < slots; ++j) {
        const index_t r = row_of_pair[j * tokens + t];
        if (r < 0 || r >= rows) continue;
        load<V>(dxs + r * d + c, part);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] += part[v];
      }
      if (accumulate) {
        load_at<V>(strided<const T>{dx.data, dx.s0, dx.s1}, t, c, part);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] = part[v] + acc[v];
      }
      store_at<V>(dx, t, c, acc);
    }
}

/// A strided [rows, cols] slab set to zero.
template <class T>
__global__ void __launch_bounds__(flat_threads)
    zero_kernel(strided<T> m, index_t rows, index_t cols) {
  const index_t n = rows * cols;
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < n;
       i += index_t(gridDim.x) * blockDim.x)
    m.data[(i / cols) * m.s0 + (i % cols) * m.s1] = from_math<T>(math_t<T>(0));
}

}  // namespace routegrad::cuda::moe_detail
