// The routing kernels: a group of `Width` lanes per token (estimators/lanes.hpp), running the
// shared per-token rules. No float atomics: counts are integers, and the loss sums go through
// per-block partials reduced in block order, so results are bitwise reproducible.
#pragma once

#include <cstdint>

#include "../estimators/token_backward.hpp"
#include "../estimators/token_forward.hpp"
#include "../routing/options.hpp"
#include "accessors.cuh"
#include "dependent_launch.cuh"
#include "lanes.cuh"

namespace routegrad::cuda::detail {

/// Choices kept in registers per lane; slots beyond are read back from global memory (cached). 2
/// covers top-1 and top-2; every slot kept costs registers the routing kernels spill (H200, E =
/// 128: 8 → 4 made the SparseMixer backward 12% faster; 4 → 2 (2026-11-30 07:28 UTC, T = 131072)
/// midpoint's backward 58.0–58.5 → 55.8–55.9 µs at E = 128 and 34.7–34.9 → 33.5–33.6 at E = 64,
/// heun3 top-2 fwd + bwd 170.4–170.9 → 165.6–165.7 at E = 128 and 95.8–96.4 → 92.3–92.6 at
/// E = 64; 1 helped top-1's backward a little more (54.9 at E = 128) and cost top-2 3–6%).
inline constexpr int register_slots = 2;
/// Tokens per block of the loss-sum kernel (the fixed reduction order).
inline constexpr int stats_block_tokens = 256;

template <class T, class G>
struct forward_args {
  const T* logits;
  index_t rows, cols, logit_stride0, logit_stride1;
  std::int32_t* experts;
  index_t expert_stride0, expert_stride1;
  std::uint8_t* coins;
  index_t coin_stride0, coin_stride1;
  G* gates;
  index_t gate_stride0, gate_stride1;
  routing_options opt;
  rng_stream rng;
  const std::uint64_t* offset_counter;  // state.offset_counter, may be null
  unsigned long long* counts;     // stats.expert_counts (as unsigned for atomicAdd), may be null
  unsigned long long* nonfinite;  // stats.nonfinite_rows, may be null
};

/// Whether a kernel keeps a row of candidate weights in shared memory: not where SparseMixer's
/// weights surely take their sparse form (lanes with a fixed number of steps per lane); whoever
/// reads a candidate's weight then recomputes it (bitwise the same). That frees a row of shared
/// memory per token, which bounded occupancy (H200, E = 128: the forward at 4 × 32 ran 6 blocks of
/// 128 threads per multiprocessor with the row, 8 — the register bound — without).
template <class Est, class Lanes, class M>
__host__ __device__ constexpr bool keeps_weights_row() {
  return Lanes::per_lane == 0 ||
         !sparse_weights<slot_candidates<Est, M, staged_row<M, Est::noisy>, nothing_taken>>(
             Lanes{}, Lanes::per_lane * Lanes::width);
}
/// Shared memory rows per token group. The forward (and the loss-sum kernel, which shares its
/// launch footprint): the staged row, Switch's jitter, the candidate weights (where kept).
template <class Est, class Lanes, class M>
__host__ __device__ constexpr int forward_shared_rows() {
  return 1 + (Est::noisy ? 1 : 0) + (keeps_weights_row<Est, Lanes, M>() ? 1 : 0);
}
/// The backward: those and the gradient row, always last.
template <class Est, class Lanes, class M>
__host__ __device__ constexpr int backward_shared_rows() {
  return forward_shared_rows<Est, Lanes, M>() + 1;
}

/// Threads per block and blocks per multiprocessor a routing kernel is compiled for, which caps
/// its registers at 65536 / (threads · blocks). The kernels are bound by latency, so resident
/// warps count; but every register short of what a kernel needs is a spill. 256 × 4 (64
/// registers) by default: on an H200 at T = 131072, E = 128 it ran the kernels 1.3–1.4× faster
/// than uncapped (126 registers), and 40–48 registers spilled more and ran 5–30% slower.
struct launch_bounds {
  int threads;
  int blocks;
};
/// The blocks of `b` a multiprocessor of the architecture being compiled can hold (threads per
/// multiprocessor: 1024 on sm_75, 1536 on sm_86/87/89, 2048 on the others): ptxas rejects a
/// minimum it cannot reach (on sm_75, 9 blocks of 128; the cap is then the register bound 64).
__host__ __device__ constexpr int resident_blocks(launch_bounds b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 750
  constexpr int max_threads = 1024;
#elif defined(__CUDA_ARCH__) && \
    (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 870 || __CUDA_ARCH__ == 890)
  constexpr int max_threads = 1536;
#else
  constexpr int max_threads = 2048;
#endif
  return b.blocks * b.threads <= max_threads ? b.blocks : max_threads / b.threads;
}
/// The forward at 4 lanes × 16 or 32 (E = 33 … 128 at large T): 128 × 10 (48 registers; 40 warps
/// per multiprocessor instead of 32). H200, T = 131072: at 56 registers (128 × 9; 2026-11-30 15:23
/// UTC) midpoint E = 128 fp32 33.4–33.5 → 31.3 µs, bf16 31.0–31.5 → 28.7–28.9, E = 64 23.2 →
/// 21.8–22.0, heun3 top-2 E = 128 54.7–54.9 → 51.8–52.0; 48 registers spilled then, and no longer
/// once the kernels' Philox block lost its adds of zero (mulhilo32): 18:42 UTC, 56 → 48 registers,
/// midpoint E = 128 fp32 30.98 → 29.92–30.05, bf16 28.16–28.77 → 27.36–27.68, euler 30.4–30.6 →
/// 29.4–29.5, heun3 top-2 fp32 51.7–51.8 → 50.9–51.2, Switch E = 64 28.0–28.7 → 27.0–27.5, top-k
/// E = 64 15.4 → 15.6–15.7 (its only loss). Other shapes spill at 56 registers or fewer.
template <class Lanes>
__host__ __device__ constexpr launch_bounds forward_bounds() {
  return Lanes::width == 4 && Lanes::per_lane >= 16 ? launch_bounds{128, 10}
                                                    : launch_bounds{256, 4};
}
/// The backward at 8 or 4 lanes × 16 (E = 33 … 128 at large T) where it keeps no weights row
/// (SparseMixer): 128 × 9 (56 registers), with shared memory for 9 blocks. H200, T = 131072: 8 × 16
/// (15:27 UTC) midpoint fp32 43.4–43.5 → 41.4–41.6 µs, bf16 45.7–45.8 → 43.0–43.1, heun3 top-2
/// fp32 63.5 → 61.7, bf16 70.0–70.2 → 68.6–68.8; 4 × 16 (19:07 UTC; it had run 27.2 → 27.7
/// before the backward's per-token set-up moved to the host) midpoint fp32 26.9 → 24.9–25.1,
/// bf16 22.6 → 21.6 (with 8–16 bytes spilled), heun3 top-2 37.9 → 36.3. Not elsewhere: Switch's
/// and top-k's backward (they keep the weights row) 80.6–80.9 → 90.2–90.4 and 44.0–44.2 →
/// 51.3–51.7; 48 registers (128 × 10) at 8 × 16 (18:42 UTC: midpoint fp32 39.7 → 44.0 µs, bf16
/// 37.2 → 38.6, heun3 top-2 59.8 → 61.5).
/// At 4 × 32 (SparseMixer, 2-byte logits, E = 65 … 128: routing.cuh lanes_for) shared memory
/// bounds it (two rows of E floats per token, 8 tokens a warp): 64 × 13, 26 warps and 72
/// registers. H200, T = 131072, midpoint bf16 (2026-12-01 04:52 UTC, two passes): fwd + bwd 58.9 /
/// 59.5 µs, against 60.9 / 61.6 at 128 × 6 (24 warps).
template <class Est, class Lanes, class M>
__host__ __device__ constexpr launch_bounds backward_bounds() {
  if (Lanes::width == 4 && Lanes::per_lane == 32) return launch_bounds{64, 13};
  return (Lanes::width == 8 || Lanes::width == 4) && Lanes::per_lane == 16 &&
                 !keeps_weights_row<Est, Lanes, M>()
             ? launch_bounds{128, 9}
             : launch_bounds{256, 4};
}

/// Elements of shared memory per token group: its rows, padded so that the groups of one warp
/// start on different banks (lane l of group g then reads bank (g·Width + l) mod 32 for 4-byte
/// elements: no bank conflicts when the groups access the same element index).
template <class M>
__host__ __device__ constexpr index_t group_stride(index_t cols, int rows_per_group, int width) {
  const index_t per_bank_cycle = 128 / static_cast<index_t>(sizeof(M));  // elements per 32 banks
  const index_t used = cols * rows_per_group;
  const index_t want = width % per_bank_cycle;
  return used + ((want - used % per_bank_cycle) % per_bank_cycle + per_bank_cycle) % per_bank_cycle;
}

/// This group's slice of the dynamic shared memory, `stride` (group_stride) elements per group.
/// The backward takes the stride from the host, computed once per launch (the forward computes
/// it, see there): each warp of the routing kernels routes about one token group, so whatever a
/// kernel computes ahead of the row's loads is paid per token and delays those loads (H200, E =
/// 128: the backward ran 185 of its 815 instructions per warp before them).
template <class M, int Width>
__device__ M* group_shared(unsigned char* base, int stride) {
  return reinterpret_cast<M*>(base) + static_cast<int>(threadIdx.x / Width) * stride;
}

/// The auxiliary-loss gradient's factors (aux_gradient) for a batch: α·E/T, 2β/T and 1/(T·k),
/// computed on the host with the same operations the kernel ran (bitwise the same values).
template <class M>
struct aux_scales {
  M load_balance, z_loss, inv_pairs;
};
template <class M>
__host__ __device__ aux_scales<M> aux_scales_of(const routing_options& opt, index_t rows,
                                                index_t cols) {
  const M inv_rows = M(1) / static_cast<M>(rows);
  return {static_cast<M>(opt.load_balance_coef) * static_cast<M>(cols) * inv_rows,
          M(2) * static_cast<M>(opt.z_loss_coef) * inv_rows,
          M(1) / (static_cast<M>(rows) * static_cast<M>(opt.k))};
}

template <class Est, class M>
__device__ M noise_eps_of(const routing_options& opt) {
  const bool jitter = Est::noisy && opt.mode == routing_mode::train && opt.jitter_eps > 0.0;
  return jitter ? static_cast<M>(opt.jitter_eps) : M(0);
}

template <class M>
__device__ token_params<M> params_of(const routing_options& opt) {
  return {opt.k, opt.mode == routing_mode::train, static_cast<M>(opt.jitter_eps), opt.renormalize};
}

template <class Est, class Lanes, class T, class G>
__global__ void __launch_bounds__(forward_bounds<Lanes>().threads,
                                  resident_blocks(forward_bounds<Lanes>()))
    forward_kernel(const forward_args<T, G> a) {
  wait_for_prior_grids();  // launched as a dependent launch (dependent_launch.cuh)
  using M = math_t<T>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  constexpr int Width = Lanes::count();
  const Lanes lanes = Lanes::make();
  const index_t groups = blockDim.x / Width;
  const index_t stride = static_cast<index_t>(gridDim.x) * groups;
  const token_params<M> params = params_of<M>(a.opt);
  const rng_stream rng = rng_with_counter(a.rng, a.offset_counter);
  const int n = static_cast<int>(a.cols);
  constexpr int rows_per_group = forward_shared_rows<Est, Lanes, M>();
  // (The forward computes its group stride itself: taken from the host, as the backward's, it
  // had ptxas rematerialise the row pointer from threadIdx in a dozen places, 0.2–0.7 µs slower.)
  M* values = group_shared<M, Width>(shared_bytes,
                                     static_cast<int>(group_stride<M>(n, rows_per_group, Width)));
  const M noise_eps = noise_eps_of<Est, M>(a.opt);
  for (index_t t = blockIdx.x * groups + threadIdx.x / Width; t < a.rows; t += stride) {
    const auto row = stage_row<Est::noisy>(lanes, a.logits + t * a.logit_stride0, a.logit_stride1,
                                           n, rng, t, noise_eps, values, values + n);
    device_forward_slots<G, M, register_slots> slots{
        a.experts + t * a.expert_stride0,
        a.expert_stride1,
        a.coins ? a.coins + t * a.coin_stride0 : nullptr,
        a.coin_stride1,
        a.gates + t * a.gate_stride0,
        a.gate_stride1,
        lanes.lane() == 0,
        lanes.mask,
        {},
        {}};
    token_outcome outcome;
    if constexpr (keeps_weights_row<Est, Lanes, M>())
      outcome = token_forward<Est, M>(lanes, row, slots, values + (rows_per_group - 1) * n, params,
                                      rng, t);
    else
      outcome = token_forward<Est, M>(lanes, row, slots, nullptr, params, rng, t);
    if (lanes.lane() == 0) {
      if (!outcome.complete && a.nonfinite) atomicAdd(a.nonfinite, 1ull);
      if (outcome.routable && a.counts)
        for (int j = 0; j < a.opt.k; ++j) {
          const int e = static_cast<int>(slots.expert(j));
          if (row.clean(e) > -math::infinity<M>()) atomicAdd(a.counts + e, 1ull);
        }
    }
    if (t + stride < a.rows) __syncwarp(lanes.mask);  // done with the row (stage_row)
  }
}

template <class T, class GG, class GL>
struct backward_args {
  const T* logits;
  index_t rows, cols, logit_stride0, logit_stride1;
  const std::int32_t* experts;
  index_t expert_stride0, expert_stride1;
  const std::uint8_t* coins;
  index_t coin_stride0, coin_stride1;
  const GG* grad_gates;
  index_t grad_gate_stride0, grad_gate_stride1;
  GL* grad_logits;
  index_t grad_stride0, grad_stride1;
  bool accumulate;
  routing_options opt;
  rng_stream rng;
  const std::uint64_t* offset_counter;  // state.offset_counter, may be null
  const std::int64_t* counts;
  int group_stride;  // shared-memory elements per token group (group_stride<M>)
  aux_scales<math_t<T>> aux;
};

template <class Est, class Lanes, class T, class GG, class GL>
__global__ void __launch_bounds__(backward_bounds<Est, Lanes, math_t<T>>().threads,
                                  resident_blocks(backward_bounds<Est, Lanes, math_t<T>>()))
    backward_kernel(const backward_args<T, GG, GL> a) {
  wait_for_prior_grids();  // launched as a dependent launch (dependent_launch.cuh)
  using M = math_t<T>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  constexpr int Width = Lanes::count();
  const Lanes lanes = Lanes::make();
  const index_t groups = blockDim.x / Width;
  const index_t stride = static_cast<index_t>(gridDim.x) * groups;
  const int n = static_cast<int>(a.cols);
  constexpr int rows_per_group = backward_shared_rows<Est, Lanes, M>();
  M* values = group_shared<M, Width>(shared_bytes, a.group_stride);
  M* scratch = values + (rows_per_group - 1) * n;  // the gradient row
  const M noise_eps = noise_eps_of<Est, M>(a.opt);
  const token_params<M> params = params_of<M>(a.opt);
  const rng_stream rng = rng_with_counter(a.rng, a.offset_counter);
  const aux_gradient<M, device_count_fraction<M>> aux{
      a.aux.load_balance,
      a.aux.z_loss,
      {a.opt.load_balance_coef != 0.0 ? a.counts : nullptr, a.aux.inv_pairs}};
  for (index_t t = blockIdx.x * groups + threadIdx.x / Width; t < a.rows; t += stride) {
    // The slots first: their loads are then in flight with the row's (stage_row ends with a
    // __syncwarp, above which no later load moves), not after it (H200, T = 131072, midpoint: E =
    // 128 backward 50.3–51.5 → 44.8 µs, E = 64 30.9–31.0 → 28.4–28.7). Not for Switch: its staging
    // draws the jitter, and the slots held through it cost registers (backward 77.6 → 100.4 µs).
    const auto load_slots = [&] {
      return device_backward_slots<GG, M, register_slots>(
          a.experts + t * a.expert_stride0, a.expert_stride1,
          a.coins ? a.coins + t * a.coin_stride0 : nullptr, a.coin_stride1,
          a.grad_gates + t * a.grad_gate_stride0, a.grad_gate_stride1, a.opt.k);
    };
    const auto stage = [&] {
      return stage_row<Est::noisy>(lanes, a.logits + t * a.logit_stride0, a.logit_stride1, n, rng,
                                   t, noise_eps, values, values + n);
    };
    struct inputs {
      decltype(load_slots()) slots;
      decltype(stage()) row;
    };
    const inputs in = [&]() -> inputs {
      if constexpr (Est::noisy) {
        const auto row = stage();
        return {load_slots(), row};
      } else {
        return {load_slots(), stage()};  // (a braced list runs in order)
      }
    }();
    const auto& slots = in.slots;
    const auto& row = in.row;
    // A state that names an expert or coin out of range (the CPU back end rejects it with a
    // status; here that would need a synchronisation) gets a zero gradient row, as does a row
    // the forward could not route (token_backward writes the row in every other case).
    bool valid_state = true;
    for (int j = 0; j < a.opt.k; ++j) {
      const index_t e = slots.expert(j);
      if (e < 0 || e >= a.cols || slots.coin(j) > Est::rule::num_nodes) valid_state = false;
    }
    shared_grad<M> acc{scratch};
    const auto backward = [&] {
      if constexpr (keeps_weights_row<Est, Lanes, M>())
        return token_backward<Est, M>(lanes, row, slots, acc, scratch - n, params, aux);
      else
        return token_backward<Est, M>(lanes, row, slots, acc, nullptr, params, aux);
    };
    if (!(valid_state && backward())) lanes.each(n, [&](int i) { scratch[i] = M(0); });
    GL* out = a.grad_logits + t * a.grad_stride0;
    const auto store = [&](GL& o, M g) { o = from_math<GL>(a.accumulate ? to_math<M>(o) + g : g); };
    bool stored = false;
    if constexpr (sizeof(GL) <= sizeof(M))  // a piece of output from whole 16-byte loads
      if (a.grad_stride1 == 1 && row_in_pieces<GL>(n, out, scratch)) {
        lanes.sync();  // each lane stores pieces of elements other lanes computed
        store_row_pieces(lanes, scratch, n, out, a.accumulate);
        stored = true;
      }
    if (!stored) {
      if (a.grad_stride1 == 1)
        lanes.each(n, [&](int i) { store(out[i], scratch[i]); });
      else
        lanes.each(n, [&](int i) { store(out[i * a.grad_stride1], scratch[i]); });
    }
    if (t + stride < a.rows) __syncwarp(lanes.mask);  // done with the rows (stage_row)
  }
}

/// What the loss sums need of an estimator: only whether it jitters its logits (Switch). The
/// loss-sum kernel is a template of this instead of the estimator, so that the four estimators
/// without jitter share one copy of it per lanes shape, which nvcc then compiles once, not four
/// times (a file that routes with every estimator compiled 70 of these kernels per logit type,
/// 14 lanes shapes × 5, instead of 28).
template <bool Noisy>
struct loss_estimator {
  static constexpr bool noisy = Noisy;
};

/// Loss sums, phase 1: block b sums, over its fixed range of tokens in token order, the unmasked
/// softmax column of every expert and logsumexp² (rows that cannot be routed are left out).
/// partial[b * (E + 1) + e] = Σ_t p_{t,e}; partial[b * (E + 1) + E] = Σ_t lse_t².
/// `group_stride`: shared-memory elements per token group, the forward's (run_forward launches
/// both with one footprint); the kernel uses the first rows of each group's slice.
template <bool Noisy, class Lanes, class T>
__global__ void __launch_bounds__(256)
    loss_partials_kernel(const T* logits, index_t rows, index_t cols, index_t s0, index_t s1,
                         routing_options opt, rng_stream stream,
                         const std::uint64_t* offset_counter, int group_stride, double* partial) {
  using Est = loss_estimator<Noisy>;
  using M = math_t<T>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  __shared__ M row_max[stats_block_tokens];
  __shared__ M row_norm[stats_block_tokens];
  __shared__ bool row_ok[stats_block_tokens];
  constexpr int Width = Lanes::count();
  const Lanes lanes = Lanes::make();
  const index_t first = static_cast<index_t>(blockIdx.x) * stats_block_tokens;
  const index_t count = rows - first < stats_block_tokens ? rows - first : stats_block_tokens;
  const index_t groups = blockDim.x / Width;
  const int n = static_cast<int>(cols);
  M* values = group_shared<M, Width>(shared_bytes, group_stride);
  const M noise_eps = noise_eps_of<Est, M>(opt);
  const rng_stream rng = rng_with_counter(stream, offset_counter);
  for (index_t r = threadIdx.x / Width; r < count; r += groups) {
    const auto row = stage_row<Est::noisy>(lanes, logits + (first + r) * s0, s1, n, rng, first + r,
                                           noise_eps, values, values + n);
    const row_summary<M> summary = summarize_row<M>(lanes, row);
    slot_softmax<M> c{M(0), M(1)};
    if (summary.routable) c = clean_softmax<Est, M>(lanes, row, summary.top.value);
    if (lanes.lane() == 0) {
      row_ok[r] = summary.routable;
      row_max[r] = c.max;
      row_norm[r] = c.norm;
    }
    __syncwarp(lanes.mask);  // done with the row (stage_row)
  }
  __syncthreads();
  double* out = partial + static_cast<index_t>(blockIdx.x) * (cols + 1);
  const auto p = [&](index_t r, index_t e) {
    return static_cast<double>(
        math::exp(to_math<M>(logits[(first + r) * s0 + e * s1]) - row_max[r]) / row_norm[r]);
  };
  // Column sums. With few experts, `chunks` threads share a column: each sums a contiguous run
  // of the block's rows in token order, then the runs are added in run order. Every order is
  // fixed by (E, block size), so the sums are bitwise reproducible.
  __shared__ double run_sum[256];
  const int threads = static_cast<int>(blockDim.x);
  const int chunks =
      cols < threads
          ? (threads / static_cast<int>(cols) < 32 ? threads / static_cast<int>(cols) : 32)
          : 1;
  if (chunks > 1) {
    const index_t per_chunk = (count + chunks - 1) / chunks;
    if (threadIdx.x < chunks * cols) {
      const index_t g = threadIdx.x / cols, e = threadIdx.x % cols;
      const index_t end = (g + 1) * per_chunk < count ? (g + 1) * per_chunk : count;
      double sum = 0.0;
      for (index_t r = g * per_chunk; r < end; ++r)
        if (row_ok[r]) sum += p(r, e);
      run_sum[threadIdx.x] = sum;
    }
    __syncthreads();
    for (index_t e = threadIdx.x; e < cols; e += blockDim.x) {
      double sum = 0.0;
      for (int g = 0; g < chunks; ++g) sum += run_sum[g * cols + e];
      out[e] = sum;
    }
  } else {
    for (index_t e = threadIdx.x; e < cols; e += blockDim.x) {
      double sum = 0.0;
      for (index_t r = 0; r < count; ++r)
        if (row_ok[r]) sum += p(r, e);
      out[e] = sum;
    }
  }
  // Σ lse²: the first warp, lane l taking rows l, l + 32, ..., then a fixed butterfly.
  if (threadIdx.x < 32) {
    double sum = 0.0;
    for (index_t r = threadIdx.x; r < count; r += 32)
      if (row_ok[r]) {
        const double lse = static_cast<double>(row_max[r] + math::log(row_norm[r]));
        sum += lse * lse;
      }
    for (int d = 16; d > 0; d /= 2) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, d);
    if (threadIdx.x == 0) out[cols] = sum;
  }
}

/// Loss sums, phase 2 (one block): combine the partials in block order and write the losses.
/// (A template only so that a header can define it in many translation units.)
template <int = 0>
__global__ void __launch_bounds__(256)
    loss_finish_kernel(double* partial, index_t blocks, index_t rows, index_t cols, int k,
                       double alpha, double beta, const std::int64_t* counts,
                       double* load_balance_loss, double* z_loss) {
  for (index_t e = threadIdx.x; e <= cols; e += blockDim.x) {
    double s = 0.0;
    for (index_t b = 0; b < blocks; ++b) s += partial[b * (cols + 1) + e];
    partial[e] = s;  // column e of block 0 is read only by this thread
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (load_balance_loss) {
      double loss = 0.0;
      for (index_t e = 0; e < cols; ++e)
        loss += static_cast<double>(counts[e]) / (static_cast<double>(rows) * k) *
                (partial[e] / static_cast<double>(rows));
      *load_balance_loss = alpha * static_cast<double>(cols) * loss;
    }
    if (z_loss) *z_loss = beta * partial[cols] / static_cast<double>(rows);
  }
}

}  // namespace routegrad::cuda::detail
