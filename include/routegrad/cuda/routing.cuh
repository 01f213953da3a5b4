// CUDA back end of the routing entry points: validation (including memory spaces), launch
// configuration, and the two-phase workspace for the loss values. No host synchronisation; no
// allocation unless the caller asks for loss values and passes no workspace (then the scratch is
// allocated stream-ordered with cudaMallocAsync).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../routing/options.hpp"
#include "../routing/validate.hpp"
#include "error.cuh"
#include "kernels.cuh"

namespace routegrad::cuda {

/// How the MoE layer runs its expert GEMMs (the routing entry points ignore it).
enum class expert_gemm : std::uint8_t {
  automatic,  // per_expert for E ≤ automatic_per_expert_max_experts, else grouped (measured on an
              // H100, bf16: per-expert 2.1 ms vs grouped 3.0 ms at E = 8, grouped 2.0 ms vs
              // per-expert 5.4 ms at E = 64; docs/performance.md)
  grouped,    // one cublasGemmGroupedBatchedEx per GEMM stage (one call per expert where cuBLAS
              // has no grouped kernel for the type)
  per_expert,  // one cublasGemmEx per expert with rows
};

/// How a CUDA call runs: the caller's stream and scratch space (routing: the loss values, see
/// forward_workspace_bytes; MoE layer: moe_workspace_bytes), and for the MoE layer the cuBLAS
/// handle (null: one cached per host thread and device) and the expert GEMM strategy.
struct execution {
  cudaStream_t stream = nullptr;
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
  cublasHandle_t blas = nullptr;
  expert_gemm gemm = expert_gemm::automatic;
};

/// The largest E for which expert_gemm::automatic issues one GEMM per expert.
inline constexpr int automatic_per_expert_max_experts = 16;

/// Whether the layer's expert GEMMs run as grouped calls for this E.
inline bool grouped_gemms(const execution& exec, int experts) {
  return exec.gemm == expert_gemm::grouped ||
         (exec.gemm == expert_gemm::automatic && experts > automatic_per_expert_max_experts);
}

using device_routing_state = routing_state<memory_space::device>;
using device_routing_stats = routing_stats<memory_space::device>;

/// Bytes of scratch route_forward needs for these statistics (0 when no loss value is asked).
inline std::size_t forward_workspace_bytes(index_t rows, index_t cols,
                                           const device_routing_stats& stats) {
  if (rows <= 0 || (!stats.load_balance_loss && !stats.z_loss)) return 0;
  const index_t blocks = (rows + detail::stats_block_tokens - 1) / detail::stats_block_tokens;
  std::size_t bytes = static_cast<std::size_t>(blocks * (cols + 1)) * sizeof(double);
  if (!stats.expert_counts && stats.load_balance_loss)
    bytes += static_cast<std::size_t>(cols) * sizeof(std::int64_t);
  return bytes;
}

namespace detail {

/// A pointer the kernels will dereference must be device (or managed) memory.
inline status check_device_pointer(const void* p, const char* message) {
  if (p == nullptr) return status::ok();
  cudaPointerAttributes attr{};
  const cudaError_t e = cudaPointerGetAttributes(&attr, p);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error of an unknown pointer
    return {status_code::wrong_memory_space, message};
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    return {status_code::wrong_memory_space, message};
  return status::ok();
}

template <class T>
bool aligned(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % alignof(T) == 0;
}

/// Alignment and memory space of the logits, the state and the counts (forward and backward).
template <class TL>
status check_logits_and_state(const device_view<TL, 2>& logits,
                              const routing_state<memory_space::device>& state,
                              const std::int64_t* counts) {
  if (!aligned<std::remove_const_t<TL>>(logits.data_handle()))
    return {status_code::misaligned, "logits: misaligned"};
  if (!aligned<std::int32_t>(state.experts.data_handle()))
    return {status_code::misaligned, "state.experts: misaligned"};
  if (!aligned<std::int64_t>(counts))
    return {status_code::misaligned, "stats.expert_counts: misaligned"};
  ROUTEGRAD_RETURN_IF_ERROR(
      check_device_pointer(logits.data_handle(), "logits: not device memory"));
  ROUTEGRAD_RETURN_IF_ERROR(
      check_device_pointer(state.experts.data_handle(), "state.experts: not device memory"));
  ROUTEGRAD_RETURN_IF_ERROR(
      check_device_pointer(state.coins.data_handle(), "state.coins: not device memory"));
  ROUTEGRAD_RETURN_IF_ERROR(
      check_device_pointer(state.offset_counter, "state.offset_counter: not device memory"));
  return check_device_pointer(counts, "stats.expert_counts: not device memory");
}

/// What lanes_for asks of the estimator and the logits, besides the batch's size.
struct shape_query {
  bool noisy;       // Switch: it draws its jitter while staging a row
  bool sparse;      // SparseMixer: candidate_weights' sparse form (no row of weights kept)
  int logit_bytes;  // the logits' storage type
};
template <class Est, class T>
constexpr shape_query shape_query_of() {
  return {Est::noisy, Est::per_slot_softmax && Est::jitter_mask, static_cast<int>(sizeof(T))};
}
/// Whether lanes_for may give the backward 4 × 32 (at E = 65 … 128; see there): dispatch_shape
/// compiles that shape only for those.
constexpr bool backward_may_take_4x32(shape_query q) { return q.sparse && q.logit_bytes <= 2; }

/// How a launch spreads a token over lanes: `width` lanes per token and rows of at most
/// width · per_lane elements (per_lane 0: any E). How far the row loops unroll is part of the
/// warp_lanes type dispatch_shape picks for it.
struct lanes_shape {
  int width;
  int per_lane;
};

/// The shape for a batch and a direction. Each reduction across a token's lanes costs a chain of
/// shuffles that every lane of the warp executes, so few lanes per token (more tokens per warp) run
/// fewer instructions per element; too few lanes leave long per-lane loops and, in small batches, a
/// long chain per token on a GPU that is mostly idle. So small batches spread a token over more
/// lanes and large ones over fewer; the backward, with more work per element and the gradient row
/// in shared memory, keeps more lanes than the forward at large T. Measured on an H200 (kernels
/// launched directly, fp32, replayed from graphs; docs/performance.md, "Run 5"), midpoint µs:
/// E ≤ 8: 8 lanes below T ≈ 12k (4096: 9.2 fwd+bwd vs 9.7 for 8 lanes × 4 steps); forward 4 lanes
/// at 16384, a thread per token from 32768 (32768: 7.2 vs 8.2 for 4 lanes; 131072: 10.1 vs 15.2
/// for 2); backward 4 lanes up to 32768, 2 beyond (131072: 13.5 vs 15.9 for a thread per token).
/// E ≤ 16: 8 lanes below 12k; forward 4 lanes, 2 from 65536, 1 from 131072 (14.7 vs 17.1 for 2);
/// backward 4 lanes at every larger T (131072: 19.0 vs 19.7 for 2 and 31.9 for 8 × 4); a noisy
/// estimator (Switch: a Philox block per four experts while staging) keeps 2 lanes in the forward
/// (its graph-replayed forward + backward at 131072 × 16: 34.0 µs with one lane, 32.9 with two;
/// 31.5 with two lanes in the backward as well, which SparseMixer's backward does not prefer: so
/// from T ≈ 98k a noisy backward takes two lanes (2026-11-30 07:33 UTC: Switch's backward 19.6–19.9
/// vs 20.7–20.8 µs with four; midpoint's 19.1–19.2 with two vs 17.8–17.9 with four)). E ≤
/// 32: 8 × 4 at T = 4096, 4 × 8 from 16384 on (131072: 47 vs 65 fwd+bwd for 8 × 4); E ≤ 64: 8 × 8
/// at T = 4096 (11.9 vs 13.2), 4 × 16 beyond; E = 128: backward 8 × 16 (57.7 vs 67.0 for 4 × 32),
/// forward 4 × 32 (H200, 2026-11-30 07:19 and 07:25 UTC: 46.0–46.7 vs 49.3–50.4 for 8 × 16; heun3
/// top-2 81.1–81.9 vs 85.6–86.5; bf16 46.7 vs 51.3); SparseMixer's backward of 2-byte logits
/// at E = 128 4 × 32 from T = 12288 (H200, 2026-12-01 04:52 UTC, T = 131072, two passes: midpoint
/// bf16 fwd + bwd 64.0 / 65.9 → 58.9 / 59.5 µs, heun3 top-2 bf16 109.9 / 111.7 → 103.4 / 103.7;
/// at 32768 within the noise: 27.2 / 25.6 → 25.7 / 25.8, docs/performance.md run 13; not in fp32,
/// where it lost: midpoint 71.1 / 73.1 → 76.1 / 76.1, nor for Switch and top-k, which keep a row of
/// weights: fp32 129.0 / 130.0 → 154.8 / 156.9, 76.0 / 78.8 → 83.2 / 83.3); E = 256: 32 × 8. The
/// same step one size down lost (H200, 2026-12-01 10:40 UTC, T = 131072, run 14): 2 × 32 at E ≤ 64
/// (midpoint bf16 forward 24.5 → 31 µs, SparseMixer's backward 25 → 46), 2 × 16 at E ≤ 32 (the
/// backward 22 → 26–29; the forward alone gained 4% for midpoint and lost 10% for top-k). A
/// bound on the elements per lane (even without unrolling) lets the per-slot bookkeeping use bit
/// masks.
inline lanes_shape lanes_for(index_t rows, index_t cols, bool backward, shape_query q) {
  constexpr index_t small = 12288, medium = 49152, large = 98304;  // tokens
  if (cols <= 8) {
    if (rows < small) return {8, 1};
    if (backward) return rows < medium ? lanes_shape{4, 2} : lanes_shape{2, 4};
    return rows < 24576 ? lanes_shape{4, 2} : lanes_shape{1, 8};
  }
  if (cols <= 16) {
    if (rows < small) return {8, 2};
    if (backward) return rows >= large && q.noisy ? lanes_shape{2, 8} : lanes_shape{4, 4};
    if (rows < medium) return {4, 4};
    return rows < large || q.noisy ? lanes_shape{2, 8} : lanes_shape{1, 16};
  }
  if (cols <= 32) return rows < small ? lanes_shape{8, 4} : lanes_shape{4, 8};
  if (cols <= 64) return rows < small ? lanes_shape{8, 8} : lanes_shape{4, 16};
  if (cols <= 128) {
    if (!backward) return {4, 32};
    return rows >= small && backward_may_take_4x32(q) ? lanes_shape{4, 32} : lanes_shape{8, 16};
  }
  if (cols <= 256) return {32, 8};
  return {32, 0};
}

/// Threads per block, dynamic shared memory and blocks of a kernel over `rows` tokens with
/// `bytes_per_group` of shared memory per token group; opts the kernel in to more than 48 KiB
/// when one group needs it.
struct launch_shape {
  int threads;
  std::size_t shared;
  unsigned blocks;
};

template <class Kernel>
status shape_for(Kernel kernel, int max_threads, int width, std::size_t bytes_per_group,
                 index_t rows, launch_shape& out) {
  // Kernels declare at most a few KiB of static shared memory; keep the dynamic part below the
  // default 48 KiB limit minus that, or opt in to more.
  constexpr std::size_t default_limit = 40 * 1024, static_reserve = 8 * 1024;
  int threads = max_threads;
  while (threads > 32 &&
         static_cast<std::size_t>(threads / width) * bytes_per_group > default_limit)
    threads /= 2;
  const std::size_t shared = static_cast<std::size_t>(threads / width) * bytes_per_group;
  if (shared > default_limit) {
    int device = 0, max_shared = 0;
    ROUTEGRAD_CUDA_TRY(cudaGetDevice(&device), "cudaGetDevice");
    ROUTEGRAD_CUDA_TRY(
        cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "cudaDeviceGetAttribute");
    if (shared + static_reserve > static_cast<std::size_t>(max_shared))
      return {status_code::not_supported,
              "logits: E too large for the CUDA back end (a token's rows must fit in shared "
              "memory)"};
    ROUTEGRAD_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(shared)),
                       "cudaFuncSetAttribute(shared memory)");
  }
  // One block per `threads / width` tokens (the kernels loop over tokens past 2^20 blocks). A
  // grid capped at one wave of resident blocks, each group then routing several tokens, was
  // measured on an H200 and not kept: 3–4% faster for SparseMixer midpoint's backward, 5–10%
  // slower for heun3 top-2 in bf16 (tokens of uneven cost balance better over many blocks).
  const index_t groups = threads / width;
  const index_t needed = (rows + groups - 1) / groups;
  const unsigned blocks =
      static_cast<unsigned>(needed < (index_t(1) << 20) ? needed : (index_t(1) << 20));
  out = {threads, shared, blocks};
  return status::ok();
}

/// Calls launch(Lanes{}) with the warp_lanes type of a lanes_for shape of direction `Backward`
/// (each direction compiles only the shapes lanes_for gives it, the backward's 4 × 32 only where
/// `Backward4x32` says lanes_for may give it; any other shape runs the generic 32-lane kernel).
/// Rows of up to 16 elements per lane unroll completely (the forward's draw then keeps its
/// candidates in index order: positive_elements), except where measured otherwise (H200,
/// SparseMixer midpoint): 4 × 16 (E ≤ 64): the backward four steps per loop iteration (37 µs vs
/// 41 not unrolled and 46 completely), the forward completely (2026-11-30 07:25 UTC, T = 131072:
/// 29.0–29.8 vs 30.6–31.5 by four; heun3 top-2 47.5–48.5 vs 53.0–53.9); 8 × 16 (E ≤ 128, the
/// backward): four steps at a time (61.5 µs vs 63 by eight, 68 not unrolled, 72 completely: it
/// keeps the gradient row too and spills); 4 × 32 (E ≤ 128, the forward): eight steps (46.0 µs vs
/// 49.1 completely: it spills), the backward (bf16) four (2026-12-01: midpoint 58.9 / 59.5 µs vs
/// 61.2 / 61.2 by eight, at 64 threads × 13 blocks); 4 × 8 (E ≤ 32, T = 131072): forward completely
/// (24.4 µs vs 25.4), backward four steps (24.3 vs 28.4).
template <bool Backward = false, bool Backward4x32 = false, class Launch>
void dispatch_shape(lanes_shape shape, Launch launch) {
  const auto is = [shape](int width, int per_lane) {
    return shape.width == width && shape.per_lane == per_lane;
  };
  if (is(8, 1)) {
    launch(warp_lanes<8, 1>{});
  } else if (is(4, 2)) {
    launch(warp_lanes<4, 2>{});
  } else if (is(8, 2)) {
    launch(warp_lanes<8, 2>{});
  } else if (is(4, 4)) {
    launch(warp_lanes<4, 4>{});
  } else if (is(8, 4)) {
    launch(warp_lanes<8, 4>{});
  } else if (is(4, 8)) {
    launch(warp_lanes < 4, 8, Backward ? 4 : 8 > {});
  } else if (is(8, 8)) {
    launch(warp_lanes<8, 8>{});
  } else if (is(2, 8)) {
    launch(warp_lanes<2, 8>{});
  } else if (is(4, 16)) {
    launch(warp_lanes < 4, 16, Backward ? 4 : 16 > {});
  } else if (is(32, 8)) {
    launch(warp_lanes<32, 8>{});
  } else if constexpr (Backward) {
    if (is(2, 4)) {
      launch(warp_lanes<2, 4>{});
    } else if (is(8, 16)) {
      launch(warp_lanes<8, 16, 4>{});
    } else if (Backward4x32 && is(4, 32)) {
      if constexpr (Backward4x32) launch(warp_lanes<4, 32, 4>{});
    } else {  // any E
      launch(warp_lanes<32>{});
    }
  } else {
    if (is(1, 8)) {
      launch(warp_lanes<1, 8>{});
    } else if (is(1, 16)) {
      launch(warp_lanes<1, 16>{});
    } else if (is(4, 32)) {
      launch(warp_lanes<4, 32, 8>{});
    } else {  // any E
      launch(warp_lanes<32>{});
    }
  }
}

}  // namespace detail

/// Forward of one routing step on device memory, on exec.stream. See routegrad::route_forward.
template <class Est, class TL, class G>
status run_forward(const routing_options& opt, device_view<TL, 2> logits,
                   const device_routing_state& state, device_view<G, 2> gates,
                   const device_routing_stats& stats = {}, const execution& exec = {}) {
  static_assert(is_supported_storage<TL>, "logits: float, double, __half or __nv_bfloat16");
  static_assert(is_supported_storage<G>, "gates: float, double, __half or __nv_bfloat16");
  ROUTEGRAD_RETURN_IF_ERROR(validation::check_forward<Est>(opt, logits, state, gates));
  using T = std::remove_const_t<TL>;
  const index_t rows = logits.extent(0), cols = logits.extent(1);
  ROUTEGRAD_RETURN_IF_ERROR(detail::check_logits_and_state(logits, state, stats.expert_counts));
  if (!detail::aligned<G>(gates.data_handle()))
    return {status_code::misaligned, "gates: misaligned"};
  ROUTEGRAD_RETURN_IF_ERROR(
      detail::check_device_pointer(gates.data_handle(), "gates: not device memory"));
  ROUTEGRAD_RETURN_IF_ERROR(detail::check_device_pointer(
      stats.load_balance_loss, "stats.load_balance_loss: not device memory"));
  ROUTEGRAD_RETURN_IF_ERROR(
      detail::check_device_pointer(stats.z_loss, "stats.z_loss: not device memory"));
  ROUTEGRAD_RETURN_IF_ERROR(detail::check_device_pointer(
      stats.nonfinite_rows, "stats.nonfinite_rows: not device memory"));
  const std::size_t need = forward_workspace_bytes(rows, cols, stats);
  if (need > 0 && exec.workspace != nullptr) {
    if (exec.workspace_bytes < need)
      return {status_code::workspace_too_small,
              "exec.workspace: smaller than forward_workspace_bytes"};
    if (!detail::aligned<double>(exec.workspace))
      return {status_code::misaligned, "exec.workspace: misaligned"};
    ROUTEGRAD_RETURN_IF_ERROR(
        detail::check_device_pointer(exec.workspace, "exec.workspace: not device memory"));
  }

  // Launch shapes (this can still reject a too-large E) before anything is written.
  using M = math_t<T>;
  const detail::lanes_shape lanes =
      detail::lanes_for(rows, cols, /*backward=*/false, detail::shape_query_of<Est, T>());
  detail::launch_shape fwd_shape{}, loss_shape{};
  int group_stride = 0;  // shared-memory elements per token group, for the loss-sum kernel
  status shape_status = status::ok();
  detail::dispatch_shape(lanes, [&](auto policy) {
    using L = decltype(policy);
    constexpr int W = L::width;
    group_stride = static_cast<int>(
        detail::group_stride<M>(cols, detail::forward_shared_rows<Est, L, M>(), W));
    const std::size_t group_bytes = static_cast<std::size_t>(group_stride) * sizeof(M);
    shape_status =
        detail::shape_for(detail::forward_kernel<Est, L, T, G>, detail::forward_bounds<L>().threads,
                          W, group_bytes, rows, fwd_shape);
    if (shape_status.is_ok() && need > 0)
      shape_status =
          detail::shape_for(detail::loss_partials_kernel<Est::noisy, L, T>, 256, W, group_bytes, 0,
                            loss_shape);  // its grid: one block per 256 tokens
  });
  ROUTEGRAD_RETURN_IF_ERROR(shape_status);

  // Everything is valid: from here on only CUDA can fail.
  cudaStream_t s = exec.stream;
  if (stats.expert_counts)
    ROUTEGRAD_CUDA_TRY(cudaMemsetAsync(stats.expert_counts, 0,
                                       static_cast<std::size_t>(cols) * sizeof(std::int64_t), s),
                       "cudaMemsetAsync(expert_counts)");
  if (stats.nonfinite_rows)
    ROUTEGRAD_CUDA_TRY(cudaMemsetAsync(stats.nonfinite_rows, 0, sizeof(std::int64_t), s),
                       "cudaMemsetAsync(nonfinite_rows)");
  if (rows == 0) {
    if (stats.load_balance_loss)
      ROUTEGRAD_CUDA_TRY(cudaMemsetAsync(stats.load_balance_loss, 0, sizeof(double), s),
                         "cudaMemsetAsync(load_balance_loss)");
    if (stats.z_loss)
      ROUTEGRAD_CUDA_TRY(cudaMemsetAsync(stats.z_loss, 0, sizeof(double), s),
                         "cudaMemsetAsync(z_loss)");
    return status::ok();
  }
  void* workspace = exec.workspace;
  if (need > 0 && workspace == nullptr)
    ROUTEGRAD_CUDA_TRY(cudaMallocAsync(&workspace, need, s), "cudaMallocAsync(workspace)");
  const index_t blocks = (rows + detail::stats_block_tokens - 1) / detail::stats_block_tokens;
  std::int64_t* counts = stats.expert_counts;
  if (!counts && stats.load_balance_loss) {
    counts = reinterpret_cast<std::int64_t*>(static_cast<double*>(workspace) + blocks * (cols + 1));
    ROUTEGRAD_CUDA_TRY(
        cudaMemsetAsync(counts, 0, static_cast<std::size_t>(cols) * sizeof(std::int64_t), s),
        "cudaMemsetAsync(counts)");
  }

  const detail::forward_args<T, G> a{logits.data_handle(),
                                     rows,
                                     cols,
                                     logits.stride(0),
                                     logits.stride(1),
                                     state.experts.data_handle(),
                                     state.experts.stride(0),
                                     state.experts.stride(1),
                                     state.coins.data_handle(),
                                     state.coins.stride(0),
                                     state.coins.stride(1),
                                     gates.data_handle(),
                                     gates.stride(0),
                                     gates.stride(1),
                                     opt,
                                     state.rng,
                                     state.offset_counter,
                                     reinterpret_cast<unsigned long long*>(counts),
                                     reinterpret_cast<unsigned long long*>(stats.nonfinite_rows)};
  status launched = status::ok();
  detail::dispatch_shape(lanes, [&](auto policy) {
    using L = decltype(policy);
    launched = detail::launch_dependent(detail::forward_kernel<Est, L, T, G>, fwd_shape.blocks,
                                        fwd_shape.threads, fwd_shape.shared, s,
                                        "forward kernel launch", a);
    if (launched.is_ok() && need > 0)
      detail::loss_partials_kernel<Est::noisy, L>
          <<<static_cast<unsigned>(blocks), loss_shape.threads, loss_shape.shared, s>>>(
              logits.data_handle(), rows, cols, logits.stride(0), logits.stride(1), opt, state.rng,
              state.offset_counter, group_stride, static_cast<double*>(workspace));
  });
  ROUTEGRAD_RETURN_IF_ERROR(launched);
  ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "forward kernel launch");
  if (need > 0) {
    detail::loss_finish_kernel<><<<1, 256, 0, s>>>(
        static_cast<double*>(workspace), blocks, rows, cols, opt.k, opt.load_balance_coef,
        opt.z_loss_coef, counts, stats.load_balance_loss, stats.z_loss);
    ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "loss kernel launch");
    if (exec.workspace == nullptr)
      ROUTEGRAD_CUDA_TRY(cudaFreeAsync(workspace, s), "cudaFreeAsync(workspace)");
  }
  return status::ok();
}

/// Backward of one routing step on device memory, on exec.stream. See routegrad::route_backward.
template <class Est, class TL, class GG, class GL>
status run_backward(const routing_options& opt, device_view<TL, 2> logits,
                    const device_routing_state& state, device_view<GG, 2> grad_gates,
                    device_view<GL, 2> grad_logits, grad_mode mode = grad_mode::overwrite,
                    const device_routing_stats& stats = {}, const execution& exec = {}) {
  static_assert(is_supported_storage<TL>, "logits: float, double, __half or __nv_bfloat16");
  static_assert(is_supported_storage<GG>, "grad_gates: float, double, __half or __nv_bfloat16");
  static_assert(is_supported_storage<GL>, "grad_logits: float, double, __half or __nv_bfloat16");
  ROUTEGRAD_RETURN_IF_ERROR(
      validation::check_backward<Est>(opt, logits, state, grad_gates, grad_logits, stats));
  using T = std::remove_const_t<TL>;
  using M = math_t<T>;
  const index_t rows = logits.extent(0), cols = logits.extent(1);
  ROUTEGRAD_RETURN_IF_ERROR(detail::check_logits_and_state(
      logits, state, opt.load_balance_coef != 0.0 ? stats.expert_counts : nullptr));
  if (!detail::aligned<std::remove_const_t<GG>>(grad_gates.data_handle()))
    return {status_code::misaligned, "grad_gates: misaligned"};
  if (!detail::aligned<GL>(grad_logits.data_handle()))
    return {status_code::misaligned, "grad_logits: misaligned"};
  ROUTEGRAD_RETURN_IF_ERROR(
      detail::check_device_pointer(grad_gates.data_handle(), "grad_gates: not device memory"));
  ROUTEGRAD_RETURN_IF_ERROR(
      detail::check_device_pointer(grad_logits.data_handle(), "grad_logits: not device memory"));
  if (rows == 0) return status::ok();

  constexpr detail::shape_query query = detail::shape_query_of<Est, T>();
  constexpr bool backward_4x32 = detail::backward_may_take_4x32(query);
  const detail::lanes_shape lanes = detail::lanes_for(rows, cols, /*backward=*/true, query);
  detail::launch_shape shape{};
  int group_stride = 0;  // shared-memory elements per token group, passed to the kernel
  status shape_status = status::ok();
  detail::dispatch_shape</*Backward=*/true, backward_4x32>(lanes, [&](auto policy) {
    using L = decltype(policy);
    group_stride = static_cast<int>(
        detail::group_stride<M>(cols, detail::backward_shared_rows<Est, L, M>(), L::width));
    shape_status =
        detail::shape_for(detail::backward_kernel<Est, L, T, std::remove_const_t<GG>, GL>,
                          detail::backward_bounds<Est, L, M>().threads, L::width,
                          static_cast<std::size_t>(group_stride) * sizeof(M), rows, shape);
  });
  ROUTEGRAD_RETURN_IF_ERROR(shape_status);

  const detail::backward_args<T, std::remove_const_t<GG>, GL> a{
      logits.data_handle(),
      rows,
      cols,
      logits.stride(0),
      logits.stride(1),
      state.experts.data_handle(),
      state.experts.stride(0),
      state.experts.stride(1),
      state.coins.data_handle(),
      state.coins.stride(0),
      state.coins.stride(1),
      grad_gates.data_handle(),
      grad_gates.stride(0),
      grad_gates.stride(1),
      grad_logits.data_handle(),
      grad_logits.stride(0),
      grad_logits.stride(1),
      mode == grad_mode::accumulate,
      opt,
      state.rng,
      state.offset_counter,
      stats.expert_counts,
      group_stride,
      detail::aux_scales_of<M>(opt, rows, cols)};
  status launched = status::ok();
  detail::dispatch_shape</*Backward=*/true, backward_4x32>(lanes, [&](auto policy) {
    using L = decltype(policy);
    launched = detail::launch_dependent(
        detail::backward_kernel<Est, L, T, std::remove_const_t<GG>, GL>, shape.blocks,
        shape.threads, shape.shared, exec.stream, "backward kernel launch", a);
  });
  return launched;
}

namespace detail {

template <int = 0>  // (a template only so that a header can define it in many translation units)
__global__ void advance_counter_kernel(std::uint64_t* counter, std::uint64_t by) {
  *counter += by;
}

}  // namespace detail

/// Adds `by` to a device offset counter (routing_state::offset_counter) on `stream`. Captured in a
/// CUDA graph ahead of the routing calls, it makes every replay draw from the next offset: the
/// routing kernels read the counter when they run, after this kernel has completed.
inline status advance_offset_counter(std::uint64_t* counter, std::uint64_t by,
                                     cudaStream_t stream = nullptr) {
  if (counter == nullptr) return {status_code::null_pointer, "counter: null"};
  if (!detail::aligned<std::uint64_t>(counter))
    return {status_code::misaligned, "counter: misaligned"};
  ROUTEGRAD_RETURN_IF_ERROR(detail::check_device_pointer(counter, "counter: not device memory"));
  detail::advance_counter_kernel<><<<1, 1, 0, stream>>>(counter, by);
  ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "advance_offset_counter launch");
  return status::ok();
}

}  // namespace routegrad::cuda

namespace routegrad {

/// Device-memory overloads of the routing entry points (routing/api.hpp has the host ones).
template <class Est, class TL, class G>
status route_forward(const routing_options& opt, device_view<TL, 2> logits,
                     const cuda::device_routing_state& state, device_view<G, 2> gates,
                     const cuda::device_routing_stats& stats = {},
                     const cuda::execution& exec = {}) {
  return cuda::run_forward<Est>(opt, logits, state, gates, stats, exec);
}

template <class Est, class TL, class GG, class GL>
status route_backward(const routing_options& opt, device_view<TL, 2> logits,
                      const cuda::device_routing_state& state, device_view<GG, 2> grad_gates,
                      device_view<GL, 2> grad_logits, grad_mode mode = grad_mode::overwrite,
                      const cuda::device_routing_stats& stats = {},
                      const cuda::execution& exec = {}) {
  return cuda::run_backward<Est>(opt, logits, state, grad_gates, grad_logits, mode, stats, exec);
}

}  // namespace routegrad
