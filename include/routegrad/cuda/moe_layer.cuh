// The reference MoE layer on the GPU (SPEC §6; what it computes: moe/options.hpp).
//
//   forward:  z = x W_rᵀ + b_r (cuBLAS, fp32 logits) → route_forward<Est> (the routing kernels) →
//             dispatch: a stable counting sort of the routed (token, slot) pairs by expert (a
//             pair is routed when the routing could route its token and its expert's logit is
//             finite, the routing's count rule; each expert's pairs stay in (slot, token) order,
//             and capacity keeps the first `capacity` of them;
//             written here rather than with CUB, whose headers would bring libcu++'s ::cuda
//             namespace and make `cuda::` ambiguous after `using namespace routegrad`) → gather x
//             rows → per-expert GEMM W1 (cuBLAS grouped) → bias + activation → per-expert GEMM W2 →
//             combine y_t = ω ⊙ Σ_j g_tj (f + b2), a gather by token (no atomics).
//   backward: G_tj = Σ_d dy·ω·(f + b2) and df = g·dy⊙ω (one kernel) → route_backward<Est> → dz →
//             router GEMMs (dW_r = dzᵀx, dx = dz W_r), expert GEMMs (dW2 = dfᵀa, da = df W2,
//             dW1 = dpreᵀx, dx_e = dpre W1) on the expert-sorted blocks, bias and ω gradients as
//             column sums over fixed slices added in order, dx gathered by token.
//
// Memory. The caller owns the context (moe_context_bytes, 256-byte aligned: logits, routing state,
// gates, the dispatch, pre-activations, activations and expert outputs of the kept pairs) and a
// scratch workspace (moe_workspace_bytes; or leave exec.workspace null and each call allocates it
// stream-ordered with cudaMallocAsync / cudaFreeAsync).
//
// Host synchronisation. cuBLAS takes the GEMM sizes (rows per expert) on the host, so each call
// copies the segment offsets (E + 10 int64) to the host once and waits for them: one
// cudaStreamSynchronize in moe_forward (after the dispatch) and one in moe_backward (first
// thing). The calls therefore cannot be captured in a CUDA graph.
//
// cuBLAS handle: exec.blas, or one created on first use per host thread and device (kept until
// the thread exits). The handle's stream is set to exec.stream for the call (and restored for a
// caller's handle). exec.gemm picks one cublasGemmGroupedBatchedEx per GEMM stage (default; falls
// back to one call per expert where cuBLAS has no grouped kernel for the type) or one
// cublasGemmEx per expert.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "../moe/options.hpp"
#include "../moe/validate.hpp"
#include "blas.cuh"
#include "moe_kernels.cuh"
#include "routing.cuh"

namespace routegrad::cuda {

using device_moe_stats = moe_stats<memory_space::device>;
template <class T>
using device_moe_params = moe_params<T, memory_space::device>;
template <class T>
using device_moe_grads = moe_grads<T, memory_space::device>;

/// Where moe_forward keeps what moe_backward needs inside the context: byte offsets (each
/// 256-byte aligned) and the sizes they depend on. Public so that a caller can inspect a
/// forward's routing (logits, experts, coins, gates, dispatch); the layout may change between
/// versions. M below is float (double for a double layer); pair p = j·T + t is slot j of token t,
/// K slots per token (k, or E in dense mode where slot j is expert j).
struct moe_context_layout {
  index_t tokens = 0, slots = 0, pairs = 0;  // T, K, P = K·T
  std::size_t header = 0;         // int64 [10 + E]: checks, the rng, segment offsets seg[0..E]
  std::size_t logits = 0;         // M [T, E] row-major: z = x W_rᵀ + b_r
  std::size_t gates = 0;          // M [P]: mixing weight of pair p (sparse: the routing's gates)
  std::size_t route_gates = 0;    // M [k·T]: the routing's gates (== gates in sparse mode)
  std::size_t experts = 0;        // int32 [k·T]: the routing's choices, index j·T + t
  std::size_t coins = 0;          // uint8 [k·T]: the routing's coins
  std::size_t counts = 0;         // int64 [E]: routed pairs per expert (load balancing's f_e)
  std::size_t token_ok = 0;       // uint8 [T]: 1 when the routing could route token t
  std::size_t row_of_pair = 0;    // int32 [P]: row of pair p in the expert blocks, −1 dropped
  std::size_t pair_of_row = 0;    // int32 [P]: pair of row r (rows < N = seg[E])
  std::size_t expert_of_row = 0;  // int32 [P]
  std::size_t pre = 0;            // T [P, w1_rows]: x W1ᵀ of each kept row (without b1)
  std::size_t act = 0;            // T [P, h]: the activations
  std::size_t f = 0;              // T [P, d]: act W2ᵀ (without b2)
  std::size_t bytes = 0;          // total (0: T = 0, or invalid options or sizes)
};

namespace moe_detail {

/// 256-byte aligned sub-allocations of one buffer.
struct bump {
  std::size_t size = 0;
  std::size_t take(std::size_t bytes) {
    const std::size_t at = (size + 255) / 256 * 256;
    size = at + bytes;
    return at;
  }
  std::size_t total() const { return (size + 255) / 256 * 256; }
};

/// Keeps a parameter out of template argument deduction (C++20's std::type_identity_t), so T is
/// deduced from the parameter set alone and views of T convert to views of const T at the call.
template <class T>
struct non_deduced {
  using type = T;
};
template <class T>
using non_deduced_t = typename non_deduced<T>::type;

inline index_t slots_of(const moe_options& opt) {
  return opt.mix == mixing::dense ? static_cast<index_t>(opt.experts) : opt.routing.k;
}

/// The sizes the CUDA layer supports: 32-bit row indices and cuBLAS's int sizes.
inline status check_sizes(const moe_options& opt, index_t tokens) {
  const index_t lim = INT_MAX;
  if (tokens < 0) return {status_code::invalid_shape, "x: negative extent"};
  if (opt.d_model > lim || w1_rows(opt) > lim)
    return {status_code::not_supported, "options: d_model and w1_rows must fit in int (cuBLAS)"};
  if (tokens > lim / slots_of(opt))
    return {status_code::not_supported,
            "x: T·k (T·E in dense mode) must be below 2^31 for the CUDA layer"};
  return status::ok();
}

/// Pairs per chunk of the dispatch's counting sort over `keys` keys: a multiple of sort_tile,
/// large enough that the per-chunk histograms (keys · chunks counts) stay near 2^16 entries.
inline index_t sort_chunk(index_t pairs, index_t keys) {
  const index_t least = (pairs * keys + 65535) / 65536;
  const index_t tiles = (least + sort_tile - 1) / sort_tile;
  return (tiles > 1 ? tiles : 1) * sort_tile;
}
inline index_t sort_chunks(index_t pairs, index_t keys) {
  const index_t c = sort_chunk(pairs, keys);
  return (pairs + c - 1) / c;
}

/// Slices of a column sum (a fixed function of the sizes, so the summation order is too).
inline index_t slices_for(index_t segments, index_t cols) {
  const index_t s = (index_t(1) << 18) / (segments * cols > 0 ? segments * cols : 1);
  return s < 1 ? 1 : (s > 64 ? 64 : s);
}
inline index_t partial_elements(index_t segments, index_t cols) {
  return segments * slices_for(segments, cols) * cols;
}

/// The forward's scratch.
template <class T>
struct forward_scratch {
  std::size_t xs = 0, keys = 0, local_rank = 0, hist = 0, base = 0, route = 0, route_bytes = 0,
              pointers = 0;
  std::size_t bytes = 0;
};

/// The backward's scratch.
template <class T>
struct backward_scratch {
  std::size_t xs = 0, df = 0, da = 0, dpre = 0, grad_gates = 0, zero_gates = 0, dz = 0, dz_t = 0;
  std::size_t dx_router = 0, partial = 0, pointers = 0;
  std::size_t bytes = 0;
};

inline constexpr int forward_stages = 2, backward_stages = 4;

template <class T>
forward_scratch<T> forward_scratch_of(const moe_options& opt, index_t tokens) {
  forward_scratch<T> w;
  const index_t E = opt.experts, K = slots_of(opt), P = K * tokens, d = opt.d_model;
  const auto n = [](index_t count) { return static_cast<std::size_t>(count); };
  bump b;
  w.xs = b.take(n(P * d) * sizeof(T));
  if (opt.mix == mixing::sparse) {
    const index_t chunks = sort_chunks(P, E + 1);
    w.keys = b.take(n(P) * sizeof(std::int32_t));
    w.local_rank = b.take(n(P) * sizeof(std::int32_t));
    w.hist = b.take(n((E + 1) * chunks) * sizeof(std::int32_t));
    w.base = b.take(n((E + 1) * chunks) * sizeof(std::int32_t));
  }
  // The routing's loss-value scratch when every statistic is asked for (only the pointers'
  // presence matters to the size).
  std::int64_t count = 0;
  double loss = 0.0;
  w.route_bytes = forward_workspace_bytes(tokens, E, {&count, &loss, &loss, nullptr});
  w.route = b.take(w.route_bytes);
  w.pointers = b.take(blas::expert_stages::pointer_slots(forward_stages, E) * sizeof(void*));
  w.bytes = b.total();
  return w;
}

template <class T>
backward_scratch<T> backward_scratch_of(const moe_options& opt, index_t tokens) {
  using M = math_t<T>;
  const index_t E = opt.experts, K = slots_of(opt), P = K * tokens, d = opt.d_model,
                h = opt.d_hidden, h1 = w1_rows(opt);
  const auto n = [](index_t count) { return static_cast<std::size_t>(count); };
  backward_scratch<T> w;
  bump b;
  w.xs = b.take(n(P * d) * sizeof(T));
  w.df = b.take(n(P * d) * sizeof(T));
  w.da = b.take(n(P * h) * sizeof(T));
  w.dpre = opt.act == activation::swiglu ? b.take(n(P * h1) * sizeof(T)) : w.da;
  w.grad_gates = b.take(n(P) * sizeof(M));
  w.zero_gates =
      opt.mix == mixing::dense ? b.take(n(tokens * opt.routing.k) * sizeof(M)) : w.grad_gates;
  w.dz = b.take(n(tokens * E) * sizeof(M));
  w.dz_t = std::is_same_v<T, M> ? w.dz : b.take(n(tokens * E) * sizeof(T));
  w.dx_router = b.take(n(tokens * d) * sizeof(T));
  index_t partial = partial_elements(1, d);
  for (const index_t c : {partial_elements(1, E), partial_elements(E, d), partial_elements(E, h1)})
    partial = c > partial ? c : partial;
  w.partial = b.take(n(partial) * sizeof(M));
  w.pointers = b.take(blas::expert_stages::pointer_slots(backward_stages, E) * sizeof(void*));
  w.bytes = b.total();
  return w;
}

/// The widest vector access (16 bytes) when `cols` and every (pointer, row stride, column
/// stride) allow it; 1 otherwise.
template <class T>
inline constexpr int vector_width = 16 / sizeof(T) >= 1 ? static_cast<int>(16 / sizeof(T)) : 1;

struct row_access {
  const void* data;
  index_t s0, s1;
};

template <class T>
bool vectorizable(index_t cols, std::initializer_list<row_access> views) {
  constexpr int V = vector_width<T>;
  if (V == 1 || cols % V != 0) return false;
  for (const row_access& v : views)
    if (v.s1 != 1 || v.s0 % V != 0 ||
        reinterpret_cast<std::uintptr_t>(v.data) % (V * sizeof(T)) != 0)
      return false;
  return true;
}

template <class T, class Launch>
void with_width(bool vector, Launch launch) {
  if (vector)
    launch(std::integral_constant<int, vector_width<T>>{});
  else
    launch(std::integral_constant<int, 1>{});
}

template <class T>
strided<T> strided_of(const device_view<T, 2>& v) {
  return {v.data_handle(), v.stride(0), v.stride(1)};
}

/// A [1, n] row view of a rank-1 view (for the column sums' output).
template <class T>
strided<T> row_of(const device_view<T, 1>& v) {
  return {v.data_handle(), 0, v.stride(0)};
}

/// A view's data: aligned to its element type and in device memory.
#define ROUTEGRAD_MOE_CHECK_DEVICE(ptr, type, name)                                        \
  do {                                                                                     \
    if (!::routegrad::cuda::detail::aligned<type>(ptr))                                    \
      return {status_code::misaligned, name ": misaligned"};                               \
    ROUTEGRAD_RETURN_IF_ERROR(                                                             \
        ::routegrad::cuda::detail::check_device_pointer(ptr, name ": not device memory")); \
  } while (0)

template <class P>
status check_parameter_memory(const moe_options& opt, const P& p, bool grads) {
  using T = std::remove_const_t<typename decltype(p.w1)::element_type>;
#define ROUTEGRAD_MOE_PARAM(field)                                            \
  do {                                                                        \
    if (grads)                                                                \
      ROUTEGRAD_MOE_CHECK_DEVICE(p.field.data_handle(), T, "grads." #field);  \
    else                                                                      \
      ROUTEGRAD_MOE_CHECK_DEVICE(p.field.data_handle(), T, "params." #field); \
  } while (0)
  ROUTEGRAD_MOE_PARAM(router_weight);
  ROUTEGRAD_MOE_PARAM(router_bias);
  ROUTEGRAD_MOE_PARAM(w1);
  ROUTEGRAD_MOE_PARAM(b1);
  ROUTEGRAD_MOE_PARAM(w2);
  ROUTEGRAD_MOE_PARAM(b2);
  if (opt.use_omega) ROUTEGRAD_MOE_PARAM(omega);
#undef ROUTEGRAD_MOE_PARAM
  // cuBLAS needs a unit stride in one of the two matrix dimensions of the weights.
  if (!blas::is_gemm_operand(p.router_weight))
    return {status_code::not_supported,
            grads ? "grads.router_weight: the CUDA layer needs one unit stride (cuBLAS)"
                  : "params.router_weight: the CUDA layer needs one unit stride (cuBLAS)"};
  if (!blas::is_gemm_slab(p.w1))
    return {status_code::not_supported,
            grads ? "grads.w1: the CUDA layer needs a unit stride in dimension 1 or 2 (cuBLAS)"
                  : "params.w1: the CUDA layer needs a unit stride in dimension 1 or 2 (cuBLAS)"};
  if (!blas::is_gemm_slab(p.w2))
    return {status_code::not_supported,
            grads ? "grads.w2: the CUDA layer needs a unit stride in dimension 1 or 2 (cuBLAS)"
                  : "params.w2: the CUDA layer needs a unit stride in dimension 1 or 2 (cuBLAS)"};
  return status::ok();
}

/// The workspace: the caller's (large enough, aligned, device memory) or null (allocated later).
inline status check_workspace(const execution& exec, std::size_t need) {
  if (exec.workspace == nullptr || need == 0) return status::ok();
  if (exec.workspace_bytes < need)
    return {status_code::workspace_too_small,
            "exec.workspace: smaller than moe_workspace_bytes says"};
  if (reinterpret_cast<std::uintptr_t>(exec.workspace) % 256 != 0)
    return {status_code::misaligned, "exec.workspace: not aligned to 256 bytes"};
  return detail::check_device_pointer(exec.workspace, "exec.workspace: not device memory");
}

/// Scratch for one call: the caller's workspace, or a stream-ordered allocation freed by the
/// destructor.
class scratch {
 public:
  scratch() = default;
  scratch(const scratch&) = delete;
  scratch& operator=(const scratch&) = delete;
  ~scratch() {
    if (owned_) (void)cudaFreeAsync(base_, stream_);
  }
  status acquire(const execution& exec, std::size_t bytes) {
    stream_ = exec.stream;
    if (exec.workspace != nullptr || bytes == 0) {
      base_ = static_cast<std::byte*>(exec.workspace);
      return status::ok();
    }
    void* p = nullptr;
    ROUTEGRAD_CUDA_TRY(cudaMallocAsync(&p, bytes, stream_), "cudaMallocAsync(workspace)");
    base_ = static_cast<std::byte*>(p);
    owned_ = true;
    return status::ok();
  }
  template <class U>
  U* at(std::size_t offset) const {
    return reinterpret_cast<U*>(base_ + offset);
  }

 private:
  std::byte* base_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool owned_ = false;
};

/// The header and segment offsets, copied to the host (the call's one synchronisation).
struct host_header {
  std::vector<std::int64_t> words;
  const std::int64_t* seg() const { return words.data() + header_words::count; }
  index_t rows(index_t e) const { return seg()[e + 1] - seg()[e]; }
};

inline status fetch_header(const std::int64_t* device_header, index_t experts, cudaStream_t s,
                           host_header& out) {
  out.words.assign(static_cast<std::size_t>(header_words::count + experts + 1), 0);
  ROUTEGRAD_CUDA_TRY(
      cudaMemcpyAsync(out.words.data(), device_header, out.words.size() * sizeof(std::int64_t),
                      cudaMemcpyDeviceToHost, s),
      "cudaMemcpyAsync(segment offsets)");
  ROUTEGRAD_CUDA_TRY(cudaStreamSynchronize(s), "cudaStreamSynchronize(segment offsets)");
  return status::ok();
}

/// The header a forward with these options writes (the kernels add the dropped pairs).
template <class Est, class T>
header_values header_of(const moe_options& opt, index_t tokens, const rng_stream& rng) {
  header_values v{};
  using H = header_words;
  v.w[H::magic] = H::magic_value;
  v.w[H::scalar_bytes] = static_cast<std::int64_t>(sizeof(T));
  v.w[H::estimator] = static_cast<std::int64_t>(validation::estimator_fingerprint<Est>());
  v.w[H::tokens] = tokens;
  v.w[H::experts] = opt.experts;
  v.w[H::k] = opt.routing.k;
  v.w[H::d_model] = opt.d_model;
  v.w[H::d_hidden] = opt.d_hidden;
  v.w[H::act] = static_cast<std::int64_t>(opt.act);
  v.w[H::mix] = static_cast<std::int64_t>(opt.mix);
  v.w[H::use_omega] = opt.use_omega ? 1 : 0;
  v.w[H::renormalize] = opt.routing.renormalize ? 1 : 0;
  v.w[H::capacity] = opt.mix == mixing::dense ? tokens : expert_capacity(opt, tokens);
  v.w[H::seed] = static_cast<std::int64_t>(rng.seed);
  v.w[H::offset] = static_cast<std::int64_t>(rng.offset);
  v.w[H::first_token] = static_cast<std::int64_t>(rng.first_token);
  return v;
}

/// Whether a header copied back from a context is the one a forward of estimator Est with these
/// options wrote for this batch, with consistent segment offsets.
template <class Est, class T>
status check_header(const host_header& h, const moe_options& opt, index_t tokens) {
  using H = header_words;
  const header_values want = header_of<Est, T>(opt, tokens, {});
  const std::int64_t* w = h.words.data();
  for (int i = 0; i < H::seed; ++i)
    if (i != H::estimator && w[i] != want.w[i])
      return {status_code::invalid_argument,
              "context: not written by moe_forward with these options, this T and this scalar "
              "type"};
  if (w[H::estimator] != want.w[H::estimator])
    return {status_code::invalid_argument, "context: written by a forward of another estimator"};
  const index_t E = opt.experts, P = slots_of(opt) * tokens;
  const std::uint64_t first = static_cast<std::uint64_t>(w[H::first_token]);
  bool ok = first <= (std::uint64_t(1) << 32) &&
            static_cast<std::uint64_t>(tokens) <= (std::uint64_t(1) << 32) - first &&
            h.seg()[0] == 0 && h.seg()[E] <= P && w[H::dropped] >= 0;
  for (index_t e = 0; ok && e < E; ++e) ok = h.seg()[e] <= h.seg()[e + 1];
  if (opt.mix == mixing::dense) ok = ok && h.seg()[E] == P;
  if (!ok)
    return {status_code::invalid_argument, "context: the saved dispatch is corrupt (offsets)"};
  return status::ok();
}

inline rng_stream header_rng(const host_header& h) {
  return {static_cast<std::uint64_t>(h.words[header_words::seed]),
          static_cast<std::uint64_t>(h.words[header_words::offset]),
          static_cast<std::uint64_t>(h.words[header_words::first_token])};
}

/// A contiguous [rows, cols] block as a cuBLAS operand.
inline blas::matrix block(const void* data, index_t rows, index_t cols) {
  blas::matrix m{};
  (void)blas::make_matrix(data, rows, cols, cols, 1, m);
  return m;
}

/// C = A·B planned (the operands were validated, so planning cannot fail).
inline blas::gemm_call plan_of(const blas::matrix& c, const blas::matrix& a,
                               const blas::matrix& b) {
  blas::gemm_call g{};
  (void)blas::plan(c, a, b, g);
  return g;
}

template <class T>
status zero_slab(T* data, index_t rows, index_t cols, index_t s0, index_t s1, cudaStream_t s) {
  if (rows <= 0 || cols <= 0) return status::ok();
  zero_kernel<T><<<grid_blocks(rows * cols, flat_threads), flat_threads, 0, s>>>(
      strided<T>{data, s0, s1}, rows, cols);
  ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "zero kernel launch");
  return status::ok();
}

/// Every parameter gradient set to zero (a backward over no tokens in overwrite mode).
template <class T>
status zero_grads(const moe_options& opt, const device_moe_grads<T>& g, cudaStream_t s) {
  const index_t E = opt.experts;
  ROUTEGRAD_RETURN_IF_ERROR(zero_slab(g.router_weight.data_handle(), E, opt.d_model,
                                      g.router_weight.stride(0), g.router_weight.stride(1), s));
  ROUTEGRAD_RETURN_IF_ERROR(
      zero_slab(g.router_bias.data_handle(), 1, E, 0, g.router_bias.stride(0), s));
  for (index_t e = 0; e < E; ++e) {
    ROUTEGRAD_RETURN_IF_ERROR(zero_slab(g.w1.data_handle() + e * g.w1.stride(0), g.w1.extent(1),
                                        g.w1.extent(2), g.w1.stride(1), g.w1.stride(2), s));
    ROUTEGRAD_RETURN_IF_ERROR(zero_slab(g.w2.data_handle() + e * g.w2.stride(0), g.w2.extent(1),
                                        g.w2.extent(2), g.w2.stride(1), g.w2.stride(2), s));
  }
  ROUTEGRAD_RETURN_IF_ERROR(
      zero_slab(g.b1.data_handle(), E, g.b1.extent(1), g.b1.stride(0), g.b1.stride(1), s));
  ROUTEGRAD_RETURN_IF_ERROR(
      zero_slab(g.b2.data_handle(), E, g.b2.extent(1), g.b2.stride(0), g.b2.stride(1), s));
  if (opt.use_omega)
    ROUTEGRAD_RETURN_IF_ERROR(
        zero_slab(g.omega.data_handle(), 1, opt.d_model, 0, g.omega.stride(0), s));
  return status::ok();
}

/// out[s, c] (+)= Σ_r value(r, c) over segment s's rows (one segment of `rows` rows when seg is
/// null), deterministically.
template <class M, class T, class Value>
status column_sum(Value value, const std::int64_t* seg, index_t rows, index_t segments,
                  index_t cols, strided<T> out, bool accumulate, M* partial, cudaStream_t s) {
  if (segments <= 0 || cols <= 0) return status::ok();
  const index_t slices = slices_for(segments, cols);
  const index_t ys = segments * slices;
  const dim3 grid(static_cast<unsigned>((cols + flat_threads - 1) / flat_threads),
                  static_cast<unsigned>(ys < 65535 ? ys : 65535));
  column_partials_kernel<M>
      <<<grid, flat_threads, 0, s>>>(value, seg, rows, segments, slices, cols, partial);
  ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "column sum kernel launch");
  column_finish_kernel<M, T><<<grid_blocks(segments * cols, flat_threads), flat_threads, 0, s>>>(
      partial, segments, slices, cols, out, accumulate);
  ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "column sum kernel launch");
  return status::ok();
}

/// Checks shared by the forward and the backward: options, sizes, parameters, x, context.
template <class T>
status check_common(const moe_options& opt, const device_moe_params<T>& params,
                    const device_view<const T, 2>& x, const moe_context_layout& layout,
                    const void* context_data, index_t context_extent, index_t context_stride) {
  ROUTEGRAD_RETURN_IF_ERROR(validation::check_moe_options(opt));
  const index_t tokens = x.extent(0);
  ROUTEGRAD_RETURN_IF_ERROR(validation::check_batch_input(opt, x, tokens, "x: shape must be [T, d]",
                                                          "x: null data",
                                                          "x: strides must be non-negative"));
  ROUTEGRAD_RETURN_IF_ERROR(check_sizes(opt, tokens));
  ROUTEGRAD_RETURN_IF_ERROR(validation::check_moe_params(opt, params));
  ROUTEGRAD_RETURN_IF_ERROR(validation::check_context(
      device_view<const std::byte>(static_cast<const std::byte*>(context_data), {context_extent},
                                   {context_stride}),
      layout.bytes, 256));
  ROUTEGRAD_MOE_CHECK_DEVICE(x.data_handle(), T, "x");
  ROUTEGRAD_RETURN_IF_ERROR(check_parameter_memory(opt, params, false));
  return detail::check_device_pointer(context_data, "context: not device memory");
}

}  // namespace moe_detail

/// The context's layout for a batch of `tokens` (bytes = 0 for invalid options or sizes).
template <class T>
moe_context_layout moe_context_layout_of(const moe_options& opt, index_t tokens) {
  using M = math_t<T>;
  moe_context_layout L;
  if (tokens <= 0 || !validation::check_moe_options(opt).is_ok() ||
      !moe_detail::check_sizes(opt, tokens).is_ok())
    return L;
  const index_t E = opt.experts, k = opt.routing.k, K = moe_detail::slots_of(opt), P = K * tokens,
                d = opt.d_model, h = opt.d_hidden, h1 = w1_rows(opt);
  const auto n = [](index_t count) { return static_cast<std::size_t>(count); };
  moe_detail::bump b;
  L.tokens = tokens;
  L.slots = K;
  L.pairs = P;
  L.header = b.take(n(moe_detail::header_words::count + E + 1) * sizeof(std::int64_t));
  L.logits = b.take(n(tokens * E) * sizeof(M));
  L.gates = b.take(n(P) * sizeof(M));
  L.route_gates = opt.mix == mixing::dense ? b.take(n(k * tokens) * sizeof(M)) : L.gates;
  L.experts = b.take(n(k * tokens) * sizeof(std::int32_t));
  L.coins = b.take(n(k * tokens));
  L.counts = b.take(n(E) * sizeof(std::int64_t));
  L.token_ok = b.take(n(tokens));
  L.row_of_pair = b.take(n(P) * sizeof(std::int32_t));
  L.pair_of_row = b.take(n(P) * sizeof(std::int32_t));
  L.expert_of_row = b.take(n(P) * sizeof(std::int32_t));
  L.pre = b.take(n(P * h1) * sizeof(T));
  L.act = b.take(n(P * h) * sizeof(T));
  L.f = b.take(n(P * d) * sizeof(T));
  L.bytes = b.total();
  return L;
}

/// Bytes of the context moe_forward writes and moe_backward reads (allocate 256-byte aligned; 0 for
/// T = 0, or for invalid options, which the calls then report).
template <class T>
std::size_t moe_context_bytes(const moe_options& opt, index_t tokens) {
  return moe_context_layout_of<T>(opt, tokens).bytes;
}

/// Bytes of scratch one moe_forward or moe_backward call needs beyond the context (pass them in
/// exec.workspace, 256-byte aligned; 0 for invalid options or sizes).
template <class T>
std::size_t moe_workspace_bytes(const moe_options& opt, index_t tokens) {
  if (!validation::check_moe_options(opt).is_ok() || !moe_detail::check_sizes(opt, tokens).is_ok())
    return 0;
  const std::size_t f = moe_detail::forward_scratch_of<T>(opt, tokens).bytes,
                    b = moe_detail::backward_scratch_of<T>(opt, tokens).bytes;
  return f > b ? f : b;
}

/// The layer's forward on device memory, on exec.stream. See routegrad::moe_forward.
template <class Est, class T>
status run_moe_forward(const moe_options& opt, const device_moe_params<T>& params,
                       device_view<const T, 2> x, device_view<T, 2> y, const rng_stream& rng,
                       device_view<std::byte> context, const device_moe_stats& stats,
                       const execution& exec) {
  static_assert(is_supported_storage<T>, "T: float, double, __half or __nv_bfloat16");
  using namespace moe_detail;
  using M = math_t<T>;
  const index_t tokens = x.extent(0);
  const moe_context_layout L = moe_context_layout_of<T>(opt, tokens);
  ROUTEGRAD_RETURN_IF_ERROR(
      check_common(opt, params, x, L, context.data_handle(), context.extent(0), context.stride(0)));
  ROUTEGRAD_RETURN_IF_ERROR(
      validation::check_batch_output(opt, y, tokens, "y: shape must be [T, d]", "y: null data",
                                     "y: strides overlap or are negative"));
  ROUTEGRAD_RETURN_IF_ERROR(
      validation::check_moe_forward_overlaps(opt, params, x, y, context.data_handle(), L.bytes));
  ROUTEGRAD_MOE_CHECK_DEVICE(y.data_handle(), T, "y");
  ROUTEGRAD_MOE_CHECK_DEVICE(stats.expert_counts, std::int64_t, "stats.expert_counts");
  ROUTEGRAD_MOE_CHECK_DEVICE(stats.kept_counts, std::int64_t, "stats.kept_counts");
  ROUTEGRAD_MOE_CHECK_DEVICE(stats.dropped_pairs, std::int64_t, "stats.dropped_pairs");
  ROUTEGRAD_MOE_CHECK_DEVICE(stats.load_balance_loss, double, "stats.load_balance_loss");
  ROUTEGRAD_MOE_CHECK_DEVICE(stats.z_loss, double, "stats.z_loss");
  ROUTEGRAD_MOE_CHECK_DEVICE(stats.nonfinite_rows, std::int64_t, "stats.nonfinite_rows");

  const index_t E = opt.experts, k = opt.routing.k, K = slots_of(opt), P = K * tokens,
                d = opt.d_model, h = opt.d_hidden, h1 = w1_rows(opt);
  const bool dense = opt.mix == mixing::dense;
  std::byte* ctx = context.data_handle();
  M* logits = reinterpret_cast<M*>(ctx + L.logits);
  M* gates = reinterpret_cast<M*>(ctx + L.gates);
  M* route_gates = reinterpret_cast<M*>(ctx + L.route_gates);
  std::int32_t* experts = reinterpret_cast<std::int32_t*>(ctx + L.experts);
  std::uint8_t* coins = reinterpret_cast<std::uint8_t*>(ctx + L.coins);
  std::int64_t* counts = reinterpret_cast<std::int64_t*>(ctx + L.counts);
  std::uint8_t* token_ok = reinterpret_cast<std::uint8_t*>(ctx + L.token_ok);
  std::int64_t* header = reinterpret_cast<std::int64_t*>(ctx + L.header);
  std::int64_t* seg = header + header_words::count;
  std::int32_t* row_of_pair = reinterpret_cast<std::int32_t*>(ctx + L.row_of_pair);
  std::int32_t* pair_of_row = reinterpret_cast<std::int32_t*>(ctx + L.pair_of_row);
  std::int32_t* expert_of_row = reinterpret_cast<std::int32_t*>(ctx + L.expert_of_row);
  T* pre = reinterpret_cast<T*>(ctx + L.pre);
  T* act = reinterpret_cast<T*>(ctx + L.act);
  T* f = reinterpret_cast<T*>(ctx + L.f);

  // The routing call's views, checked now so that it cannot fail after the router GEMM.
  const device_view<const M, 2> z(logits, {tokens, E});
  const index_t ts = tokens > 0 ? tokens : 1;  // slot stride (≥ 1 so that T = 0 validates)
  const device_routing_state state{device_view<std::int32_t, 2>(experts, {tokens, k}, {1, ts}),
                                   device_view<std::uint8_t, 2>(coins, {tokens, k}, {1, ts}), rng};
  const device_view<M, 2> route_gate_view(route_gates, {tokens, k}, {1, ts});
  ROUTEGRAD_RETURN_IF_ERROR(validation::check_forward<Est>(opt.routing, z, state, route_gate_view));

  const forward_scratch<T> W = forward_scratch_of<T>(opt, tokens);
  ROUTEGRAD_RETURN_IF_ERROR(check_workspace(exec, W.bytes));
  const cudaStream_t s = exec.stream;

  // Everything is valid: from here on only CUDA and cuBLAS can fail.
  if (tokens == 0) {
    for (std::int64_t* c : {stats.expert_counts, stats.kept_counts})
      if (c)
        ROUTEGRAD_CUDA_TRY(
            cudaMemsetAsync(c, 0, static_cast<std::size_t>(E) * sizeof(std::int64_t), s),
            "cudaMemsetAsync(stats)");
    for (std::int64_t* c : {stats.dropped_pairs, stats.nonfinite_rows})
      if (c)
        ROUTEGRAD_CUDA_TRY(cudaMemsetAsync(c, 0, sizeof(std::int64_t), s),
                           "cudaMemsetAsync(stats)");
    for (double* v : {stats.load_balance_loss, stats.z_loss})
      if (v) ROUTEGRAD_CUDA_TRY(cudaMemsetAsync(v, 0, sizeof(double), s), "cudaMemsetAsync(stats)");
    return status::ok();
  }
  blas::handle_scope blas_handle;
  ROUTEGRAD_RETURN_IF_ERROR(blas_handle.open(exec.blas, s));
  const cublasHandle_t handle = blas_handle.get();
  scratch ws;
  ROUTEGRAD_RETURN_IF_ERROR(ws.acquire(exec, W.bytes));
  T* xs = ws.at<T>(W.xs);

  // Router: z = b_r, then z += x W_rᵀ (x staged contiguous when cuBLAS cannot read it).
  blas::matrix xm{};
  if (!blas::make_matrix(x.data_handle(), tokens, d, x.stride(0), x.stride(1), xm) ||
      xm.ld > INT_MAX) {
    stage_kernel<T><<<grid_blocks(tokens * d, flat_threads), flat_threads, 0, s>>>(
        xs, strided<const T>{x.data_handle(), x.stride(0), x.stride(1)}, tokens, d, nullptr);
    ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "stage kernel launch");
    xm = block(xs, tokens, d);
  }
  bias_rows_kernel<M, T><<<grid_blocks(tokens * E, flat_threads), flat_threads, 0, s>>>(
      logits, tokens, E, params.router_bias.data_handle(), params.router_bias.stride(0));
  ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "bias kernel launch");
  {
    blas::matrix wt{};  // W_rᵀ [d, E]
    (void)blas::make_matrix(params.router_weight.data_handle(), d, E,
                            params.router_weight.stride(1), params.router_weight.stride(0), wt);
    ROUTEGRAD_RETURN_IF_ERROR(
        (blas::gemm<T, M>(handle, plan_of(block(logits, tokens, E), xm, wt), 1.0, 1.0)));
  }

  // Routing (in dense mode too: its choices give the statistics and the auxiliary losses).
  {
    const device_routing_stats rstats{counts, stats.load_balance_loss, stats.z_loss,
                                      stats.nonfinite_rows};
    const execution rexec{s, ws.at<void>(W.route), W.route_bytes};
    ROUTEGRAD_RETURN_IF_ERROR(
        route_forward<Est>(opt.routing, z, state, route_gate_view, rstats, rexec));
  }

  // Dispatch: rows of each expert's block, in (slot, token) order, past capacity dropped.
  const header_values hv = header_of<Est, T>(opt, tokens, rng);
  token_ok_kernel<Est, M><<<grid_blocks(tokens * 32, flat_threads), flat_threads, 0, s>>>(
      logits, tokens, E, opt.routing, rng, dense, token_ok);
  ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "token kernel launch");
  if (dense) {
    dense_gates_kernel<M><<<grid_blocks(tokens * 32, flat_threads), flat_threads, 0, s>>>(
        logits, token_ok, tokens, E, gates);
    ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "dense gates kernel launch");
    dense_dispatch_kernel<>
        <<<grid_blocks(P > E + 1 ? P : E + 1, flat_threads), flat_threads, 0, s>>>(
            tokens, E, row_of_pair, pair_of_row, expert_of_row, header, hv);
    ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "dispatch kernel launch");
  } else {
    std::int32_t* keys = ws.at<std::int32_t>(W.keys);
    std::int32_t* local_rank = ws.at<std::int32_t>(W.local_rank);
    std::int32_t* hist = ws.at<std::int32_t>(W.hist);
    std::int32_t* base = ws.at<std::int32_t>(W.base);
    const index_t chunk = sort_chunk(P, E + 1), chunks = sort_chunks(P, E + 1);
    dispatch_keys_kernel<M><<<grid_blocks(P, flat_threads), flat_threads, 0, s>>>(
        experts, token_ok, logits, tokens, P, E, keys);
    ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "dispatch kernel launch");
    chunk_rank_kernel<>
        <<<grid_blocks(chunks, 1), sort_tile, 0, s>>>(keys, P, E, chunk, chunks, hist, local_rank);
    ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "dispatch kernel launch");
    exclusive_scan_kernel<1024><<<1, 1024, 0, s>>>(hist, (E + 1) * chunks, base);
    ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "dispatch kernel launch");
    kept_segments_kernel<1024>
        <<<1, 1024, 0, s>>>(base, chunks, E, expert_capacity(opt, tokens), header, hv);
    ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "dispatch kernel launch");
    assign_rows_kernel<><<<grid_blocks(P, flat_threads), flat_threads, 0, s>>>(
        keys, local_rank, base, P, E, chunk, chunks, seg, row_of_pair, pair_of_row, expert_of_row);
    ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "dispatch kernel launch");
  }

  // The rows per expert on the host (the call's one synchronisation), then the expert GEMMs.
  host_header hh;
  ROUTEGRAD_RETURN_IF_ERROR(fetch_header(header, E, s, hh));
  if (!check_header<Est, T>(hh, opt, tokens).is_ok())
    return {status_code::cuda_error, "moe_forward: the dispatch wrote inconsistent offsets"};
  const index_t rows = hh.seg()[E];
  blas::expert_stages stages;
  const int up = stages.add_stage(1.0, 0.0), down = stages.add_stage(1.0, 0.0);
  for (index_t e = 0; e < E; ++e) {
    const index_t n = hh.rows(e), r0 = hh.seg()[e];
    if (n == 0) continue;
    blas::matrix w1t{}, w2t{};
    (void)blas::slab_matrix(params.w1, e, true, w1t);  // W1_eᵀ [d, h1]
    (void)blas::slab_matrix(params.w2, e, true, w2t);  // W2_eᵀ [h, d]
    stages.add(up, plan_of(block(pre + r0 * h1, n, h1), block(xs + r0 * d, n, d), w1t));
    stages.add(down, plan_of(block(f + r0 * d, n, d), block(act + r0 * h, n, h), w2t));
  }
  ROUTEGRAD_RETURN_IF_ERROR(stages.upload(
      ws.at<void*>(W.pointers), blas::expert_stages::pointer_slots(forward_stages, E), s));
  const bool grouped = grouped_gemms(exec, opt.experts);

  if (rows > 0) {
    const strided<const T> xv{x.data_handle(), x.stride(0), x.stride(1)};
    with_width<T>(vectorizable<T>(d, {{x.data_handle(), x.stride(0), x.stride(1)}}), [&](auto w) {
      constexpr int V = decltype(w)::value;
      gather_kernel<V, T><<<grid_blocks(rows, 1), row_threads, 0, s>>>(
          xs, xv, d, pair_of_row, rows, tokens, P, dense ? token_ok : nullptr);
    });
    ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "gather kernel launch");
    ROUTEGRAD_RETURN_IF_ERROR((stages.run<T, T>(up, handle, grouped)));
    const strided<const T> b1{params.b1.data_handle(), params.b1.stride(0), params.b1.stride(1)};
    with_width<T>(h % vector_width<T> == 0, [&](auto w) {
      constexpr int V = decltype(w)::value;
      activation_kernel<V, T><<<grid_blocks(rows * (h / V), flat_threads), flat_threads, 0, s>>>(
          act, pre, b1, expert_of_row, rows, h, E, opt.act);
    });
    ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "activation kernel launch");
    ROUTEGRAD_RETURN_IF_ERROR((stages.run<T, T>(down, handle, grouped)));
  }

  // y_t = ω ⊙ Σ_j g_tj (f + b2), gathered by token.
  const mixture<T, M> mix{gates,
                          row_of_pair,
                          expert_of_row,
                          f,
                          {params.b2.data_handle(), params.b2.stride(0), params.b2.stride(1)},
                          tokens,
                          K,
                          rows,
                          E,
                          d};
  const T* omega = opt.use_omega ? params.omega.data_handle() : nullptr;
  const index_t omega_stride = opt.use_omega ? params.omega.stride(0) : 0;
  with_width<T>(vectorizable<T>(d, {{y.data_handle(), y.stride(0), y.stride(1)}}), [&](auto w) {
    constexpr int V = decltype(w)::value;
    combine_kernel<V, T, M>
        <<<grid_blocks(tokens, 1), row_threads, 0, s>>>(strided_of(y), mix, omega, omega_stride);
  });
  ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "combine kernel launch");

  if (stats.kept_counts || stats.dropped_pairs) {
    kept_stats_kernel<><<<grid_blocks(E, flat_threads), flat_threads, 0, s>>>(
        header, E, stats.kept_counts, stats.dropped_pairs);
    ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "stats kernel launch");
  }
  if (stats.expert_counts)
    ROUTEGRAD_CUDA_TRY(cudaMemcpyAsync(stats.expert_counts, counts,
                                       static_cast<std::size_t>(E) * sizeof(std::int64_t),
                                       cudaMemcpyDeviceToDevice, s),
                       "cudaMemcpyAsync(expert_counts)");
  return status::ok();
}

/// The layer's backward on device memory, on exec.stream. See routegrad::moe_backward.
template <class Est, class T>
status run_moe_backward(const moe_options& opt, const device_moe_params<T>& params,
                        device_view<const T, 2> x, device_view<const T, 2> dy,
                        device_view<const std::byte> context, const device_moe_grads<T>& grads,
                        device_view<T, 2> dx, grad_mode mode, const execution& exec) {
  static_assert(is_supported_storage<T>, "T: float, double, __half or __nv_bfloat16");
  using namespace moe_detail;
  using M = math_t<T>;
  const index_t tokens = x.extent(0);
  const moe_context_layout L = moe_context_layout_of<T>(opt, tokens);
  ROUTEGRAD_RETURN_IF_ERROR(
      check_common(opt, params, x, L, context.data_handle(), context.extent(0), context.stride(0)));
  ROUTEGRAD_RETURN_IF_ERROR(
      validation::check_batch_input(opt, dy, tokens, "dy: shape must be [T, d]", "dy: null data",
                                    "dy: strides must be non-negative"));
  ROUTEGRAD_RETURN_IF_ERROR(
      validation::check_batch_output(opt, dx, tokens, "dx: shape must be [T, d]", "dx: null data",
                                     "dx: strides overlap or are negative"));
  ROUTEGRAD_RETURN_IF_ERROR(validation::check_moe_grads(opt, grads));
  if (mode != grad_mode::overwrite && mode != grad_mode::accumulate)
    return {status_code::invalid_argument, "mode: must be overwrite or accumulate"};
  ROUTEGRAD_RETURN_IF_ERROR(validation::check_moe_backward_overlaps(
      opt, params, x, dy, context.data_handle(), L.bytes, grads, dx));
  ROUTEGRAD_MOE_CHECK_DEVICE(dy.data_handle(), T, "dy");
  ROUTEGRAD_MOE_CHECK_DEVICE(dx.data_handle(), T, "dx");
  ROUTEGRAD_RETURN_IF_ERROR(check_parameter_memory(opt, grads, true));

  const index_t E = opt.experts, k = opt.routing.k, K = slots_of(opt), P = K * tokens,
                d = opt.d_model, h = opt.d_hidden, h1 = w1_rows(opt);
  const bool dense = opt.mix == mixing::dense, accumulate = mode == grad_mode::accumulate;
  const std::byte* ctx = context.data_handle();
  const M* logits = reinterpret_cast<const M*>(ctx + L.logits);
  const M* gates = reinterpret_cast<const M*>(ctx + L.gates);
  const std::int32_t* experts = reinterpret_cast<const std::int32_t*>(ctx + L.experts);
  const std::uint8_t* coins = reinterpret_cast<const std::uint8_t*>(ctx + L.coins);
  const std::int64_t* counts = reinterpret_cast<const std::int64_t*>(ctx + L.counts);
  const std::uint8_t* token_ok = reinterpret_cast<const std::uint8_t*>(ctx + L.token_ok);
  const std::int64_t* header = reinterpret_cast<const std::int64_t*>(ctx + L.header);
  const std::int64_t* seg = header + header_words::count;
  const std::int32_t* row_of_pair = reinterpret_cast<const std::int32_t*>(ctx + L.row_of_pair);
  const std::int32_t* pair_of_row = reinterpret_cast<const std::int32_t*>(ctx + L.pair_of_row);
  const std::int32_t* expert_of_row = reinterpret_cast<const std::int32_t*>(ctx + L.expert_of_row);
  const T* pre = reinterpret_cast<const T*>(ctx + L.pre);
  const T* act = reinterpret_cast<const T*>(ctx + L.act);
  const T* f = reinterpret_cast<const T*>(ctx + L.f);

  const backward_scratch<T> W = backward_scratch_of<T>(opt, tokens);
  ROUTEGRAD_RETURN_IF_ERROR(check_workspace(exec, W.bytes));
  const cudaStream_t s = exec.stream;

  // Everything the host can check is valid.
  if (tokens == 0) return accumulate ? status::ok() : zero_grads(opt, grads, s);

  // The rows per expert and the rng on the host (the call's one synchronisation); a context that
  // no forward with these options wrote for this batch is rejected before anything is written.
  host_header hh;
  ROUTEGRAD_RETURN_IF_ERROR(fetch_header(header, E, s, hh));
  ROUTEGRAD_RETURN_IF_ERROR((check_header<Est, T>(hh, opt, tokens)));
  const index_t rows = hh.seg()[E];
  const device_routing_state state{
      device_view<std::int32_t, 2>(const_cast<std::int32_t*>(experts), {tokens, k}, {1, tokens}),
      device_view<std::uint8_t, 2>(const_cast<std::uint8_t*>(coins), {tokens, k}, {1, tokens}),
      header_rng(hh)};

  blas::handle_scope blas_handle;
  ROUTEGRAD_RETURN_IF_ERROR(blas_handle.open(exec.blas, s));
  const cublasHandle_t handle = blas_handle.get();
  scratch ws;
  ROUTEGRAD_RETURN_IF_ERROR(ws.acquire(exec, W.bytes));
  T* xs = ws.at<T>(W.xs);
  T* df = ws.at<T>(W.df);
  T* dxs = df;  // df is dead once dW2 and db2 are computed
  T* da = ws.at<T>(W.da);
  T* dpre = ws.at<T>(W.dpre);
  M* grad_gates = ws.at<M>(W.grad_gates);
  M* dz = ws.at<M>(W.dz);
  T* dz_t = ws.at<T>(W.dz_t);
  T* dx_router = ws.at<T>(W.dx_router);
  M* partial = ws.at<M>(W.partial);

  // The expert GEMM stages, planned now that the rows per expert are known.
  blas::expert_stages stages;
  const double beta_grad = accumulate ? 1.0 : 0.0;
  const int st_da = stages.add_stage(1.0, 0.0), st_dw2 = stages.add_stage(1.0, beta_grad),
            st_dw1 = stages.add_stage(1.0, beta_grad), st_dxs = stages.add_stage(1.0, 0.0);
  for (index_t e = 0; e < E; ++e) {
    const index_t n = hh.rows(e), r0 = hh.seg()[e];
    if (n == 0) continue;
    blas::matrix w1{}, w2{}, gw1{}, gw2{};
    (void)blas::slab_matrix(params.w1, e, false, w1);  // [h1, d]
    (void)blas::slab_matrix(params.w2, e, false, w2);  // [d, h]
    (void)blas::slab_matrix(grads.w1, e, false, gw1);
    (void)blas::slab_matrix(grads.w2, e, false, gw2);
    const blas::matrix dfe = block(df + r0 * d, n, d), dpree = block(dpre + r0 * h1, n, h1);
    stages.add(st_da, plan_of(block(da + r0 * h, n, h), dfe, w2));
    stages.add(st_dw2, plan_of(gw2, blas::transposed(dfe), block(act + r0 * h, n, h)));
    stages.add(st_dw1, plan_of(gw1, blas::transposed(dpree), block(xs + r0 * d, n, d)));
    stages.add(st_dxs, plan_of(block(dxs + r0 * d, n, d), dpree, w1));
  }
  ROUTEGRAD_RETURN_IF_ERROR(stages.upload(
      ws.at<void*>(W.pointers), blas::expert_stages::pointer_slots(backward_stages, E), s));
  const bool grouped = grouped_gemms(exec, opt.experts);

  // Gate gradients and df (workspace only).
  const mixture<T, M> mix{gates,
                          row_of_pair,
                          expert_of_row,
                          f,
                          {params.b2.data_handle(), params.b2.stride(0), params.b2.stride(1)},
                          tokens,
                          K,
                          rows,
                          E,
                          d};
  const strided<const T> dyv{dy.data_handle(), dy.stride(0), dy.stride(1)};
  const T* omega = opt.use_omega ? params.omega.data_handle() : nullptr;
  const index_t omega_stride = opt.use_omega ? params.omega.stride(0) : 0;
  with_width<T>(vectorizable<T>(d, {{dy.data_handle(), dy.stride(0), dy.stride(1)}}), [&](auto w) {
    constexpr int V = decltype(w)::value;
    gate_grad_kernel<V, T, M>
        <<<grid_blocks(P, 1), row_threads, 0, s>>>(mix, dyv, omega, omega_stride, grad_gates, df);
  });
  ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "gate gradient kernel launch");

  // dz: the estimator's backward (sparse), or the softmax's exact backward plus the auxiliary
  // losses' gradient (dense). The routing validates its arguments before writing.
  {
    const device_view<const M, 2> z(logits, {tokens, E});
    const device_view<M, 2> dzv(dz, {tokens, E});
    const device_routing_stats rstats{const_cast<std::int64_t*>(counts), nullptr, nullptr, nullptr};
    const execution rexec{s, nullptr, 0};
    const bool aux = opt.routing.load_balance_coef != 0.0 || opt.routing.z_loss_coef != 0.0;
    if (!dense) {
      ROUTEGRAD_RETURN_IF_ERROR(route_backward<Est>(
          opt.routing, z, state, device_view<const M, 2>(grad_gates, {tokens, k}, {1, tokens}), dzv,
          grad_mode::overwrite, rstats, rexec));
    } else {
      if (aux) {
        M* zero_gates = ws.at<M>(W.zero_gates);
        ROUTEGRAD_CUDA_TRY(
            cudaMemsetAsync(zero_gates, 0, static_cast<std::size_t>(tokens * k) * sizeof(M), s),
            "cudaMemsetAsync(zero gates)");
        ROUTEGRAD_RETURN_IF_ERROR(route_backward<Est>(
            opt.routing, z, state, device_view<const M, 2>(zero_gates, {tokens, k}, {1, tokens}),
            dzv, grad_mode::overwrite, rstats, rexec));
      }
      dense_softmax_backward_kernel<M>
          <<<grid_blocks(tokens * 32, flat_threads), flat_threads, 0, s>>>(gates, grad_gates,
                                                                           tokens, E, dz, aux);
      ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "dense softmax backward kernel launch");
    }
  }

  // From here on the caller's gradients are written.
  if (opt.use_omega)
    ROUTEGRAD_RETURN_IF_ERROR(column_sum<M>(omega_value<T, M>{mix, dyv}, nullptr, tokens, 1, d,
                                            row_of(grads.omega), accumulate, partial, s));
  ROUTEGRAD_RETURN_IF_ERROR(column_sum<M>(block_value<M, M>{dz, E}, nullptr, tokens, 1, E,
                                          row_of(grads.router_bias), accumulate, partial, s));
  if constexpr (!std::is_same_v<T, M>) {  // 16-bit storage: dz rounded once for the GEMMs
    convert_kernel<T, M>
        <<<grid_blocks(tokens * E, flat_threads), flat_threads, 0, s>>>(dz_t, dz, tokens * E);
    ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "convert kernel launch");
  }

  // Router GEMMs: dW_r (+)= dzᵀ x, dx_router = dz W_r, on x staged contiguous with the rows of
  // tokens the router could not route read as zero (their dz is 0, and 0·NaN must not reach
  // dW_r; the CPU layer does the same).
  stage_kernel<T><<<grid_blocks(tokens * d, flat_threads), flat_threads, 0, s>>>(
      xs, strided<const T>{x.data_handle(), x.stride(0), x.stride(1)}, tokens, d, token_ok);
  ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "stage kernel launch");
  const blas::matrix xm = block(xs, tokens, d);
  {
    blas::matrix gwr{}, wr{}, dzt{};
    (void)blas::make_matrix(grads.router_weight.data_handle(), E, d, grads.router_weight.stride(0),
                            grads.router_weight.stride(1), gwr);
    (void)blas::make_matrix(params.router_weight.data_handle(), E, d,
                            params.router_weight.stride(0), params.router_weight.stride(1), wr);
    (void)blas::make_matrix(dz_t, E, tokens, 1, E, dzt);  // dzᵀ [E, T]
    ROUTEGRAD_RETURN_IF_ERROR((blas::gemm<T, T>(handle, plan_of(gwr, dzt, xm), 1.0, beta_grad)));
    ROUTEGRAD_RETURN_IF_ERROR((blas::gemm<T, T>(
        handle, plan_of(block(dx_router, tokens, d), block(dz_t, tokens, E), wr), 1.0, 0.0)));
  }

  // The experts, on the expert-sorted blocks.
  const strided<const T> b1{params.b1.data_handle(), params.b1.stride(0), params.b1.stride(1)};
  if (rows > 0) {
    const strided<const T> xv{x.data_handle(), x.stride(0), x.stride(1)};
    with_width<T>(vectorizable<T>(d, {{x.data_handle(), x.stride(0), x.stride(1)}}), [&](auto w) {
      constexpr int V = decltype(w)::value;
      gather_kernel<V, T><<<grid_blocks(rows, 1), row_threads, 0, s>>>(
          xs, xv, d, pair_of_row, rows, tokens, P, dense ? token_ok : nullptr);
    });
    ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "gather kernel launch");
    ROUTEGRAD_RETURN_IF_ERROR((stages.run<T, T>(st_da, handle, grouped)));
    with_width<T>(h % vector_width<T> == 0, [&](auto w) {
      constexpr int V = decltype(w)::value;
      activation_backward_kernel<V, T>
          <<<grid_blocks(rows * (h / V), flat_threads), flat_threads, 0, s>>>(
              dpre, da, pre, b1, expert_of_row, rows, h, E, opt.act);
    });
    ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "activation backward kernel launch");
    ROUTEGRAD_RETURN_IF_ERROR((stages.run<T, T>(st_dw2, handle, grouped)));
  }
  ROUTEGRAD_RETURN_IF_ERROR(column_sum<M>(block_value<T, M>{df, d}, seg, rows, E, d,
                                          strided_of(grads.b2), accumulate, partial, s));
  ROUTEGRAD_RETURN_IF_ERROR(column_sum<M>(block_value<T, M>{dpre, h1}, seg, rows, E, h1,
                                          strided_of(grads.b1), accumulate, partial, s));
  if (rows > 0) {
    ROUTEGRAD_RETURN_IF_ERROR((stages.run<T, T>(st_dw1, handle, grouped)));
    ROUTEGRAD_RETURN_IF_ERROR((stages.run<T, T>(st_dxs, handle, grouped)));
  }
  if (!accumulate)  // experts without rows have zero weight gradients
    for (index_t e = 0; e < E; ++e) {
      if (hh.rows(e) > 0) continue;
      ROUTEGRAD_RETURN_IF_ERROR(zero_slab(grads.w1.data_handle() + e * grads.w1.stride(0), h1, d,
                                          grads.w1.stride(1), grads.w1.stride(2), s));
      ROUTEGRAD_RETURN_IF_ERROR(zero_slab(grads.w2.data_handle() + e * grads.w2.stride(0), d, h,
                                          grads.w2.stride(1), grads.w2.stride(2), s));
    }

  // dx = dz W_r + Σ_j (dpre W1)_{r_j}, gathered by token.
  with_width<T>(vectorizable<T>(d, {{dx.data_handle(), dx.stride(0), dx.stride(1)}}), [&](auto w) {
    constexpr int V = decltype(w)::value;
    dx_combine_kernel<V, T, M><<<grid_blocks(tokens, 1), row_threads, 0, s>>>(
        strided_of(dx), dx_router, dxs, row_of_pair, tokens, K, rows, d, accumulate);
  });
  ROUTEGRAD_CUDA_TRY(cudaGetLastError(), "dx kernel launch");
  return status::ok();
}

}  // namespace routegrad::cuda

namespace routegrad {

/// The MoE layer's forward on device memory (moe/options.hpp says what it computes): writes y
/// [T, d], the context (cuda::moe_context_bytes) and the requested statistics (device pointers).
/// One host synchronisation (see cuda/moe_layer.cuh).
template <class Est, class T>
status moe_forward(const moe_options& opt, const moe_params<T, memory_space::device>& params,
                   device_view<const cuda::moe_detail::non_deduced_t<T>, 2> x,
                   device_view<cuda::moe_detail::non_deduced_t<T>, 2> y, const rng_stream& rng,
                   device_view<std::byte> context,
                   const moe_stats<memory_space::device>& stats = {},
                   const cuda::execution& exec = {}) {
  return cuda::run_moe_forward<Est, T>(opt, params, x, y, rng, context, stats, exec);
}

/// The MoE layer's backward on device memory: dx [T, d] and every parameter gradient (overwrite
/// or accumulate), from the context the forward wrote for the same options, parameters and x.
template <class Est, class T>
status moe_backward(const moe_options& opt, const moe_params<T, memory_space::device>& params,
                    device_view<const cuda::moe_detail::non_deduced_t<T>, 2> x,
                    device_view<const cuda::moe_detail::non_deduced_t<T>, 2> dy,
                    device_view<const std::byte> context,
                    const moe_grads<T, memory_space::device>& grads,
                    device_view<cuda::moe_detail::non_deduced_t<T>, 2> dx,
                    grad_mode mode = grad_mode::overwrite, const cuda::execution& exec = {}) {
  return cuda::run_moe_backward<Est, T>(opt, params, x, dy, context, grads, dx, mode, exec);
}

}  // namespace routegrad
