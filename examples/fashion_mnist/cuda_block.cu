// The trainer's MoE blocks on the GPU: cuda_block.hpp's interface over routegrad's CUDA MoE
// layer (cuda/moe_layer.cuh), float32. Every CUDA call of the example is in this file.
#if defined(__has_include)
#if __has_include(<Eigen/Core>)
#error "cuda_block.cu must not see Eigen: its target must not have Eigen's include directory"
#endif
#endif

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <routegrad/cuda/moe_layer.cuh>
#include <routegrad/estimators/estimators.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_block.hpp"

namespace fmnist {

namespace {

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}

void layer_check(const routegrad::status& s, const char* what) {
  if (!s.is_ok())
    throw std::runtime_error(std::string("the CUDA MoE layer's ") + what +
                             " failed: " + routegrad::to_string(s.code()) + ": " + s.message());
}

/// A device allocation of n bytes (cudaMalloc: 256-byte aligned), freed with the owner.
struct device_buffer {
  void* ptr = nullptr;
  std::size_t bytes = 0;
  device_buffer() = default;
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  ~device_buffer() {
    if (ptr != nullptr) cudaFree(ptr);
  }
  /// Makes it at least n bytes (contents lost on growth); zero-filled when zero is set.
  void reserve(std::size_t n, bool zero = false) {
    if (n > bytes) {
      if (ptr != nullptr) cuda_check(cudaFree(ptr), "cudaFree");
      ptr = nullptr;
      bytes = 0;
      cuda_check(cudaMalloc(&ptr, n), "cudaMalloc");
      bytes = n;
      if (zero) cuda_check(cudaMemset(ptr, 0, n), "cudaMemset");
    }
  }
  float* f() const { return static_cast<float*>(ptr); }
};

template <class Est>
struct est_tag {
  using type = Est;
};

template <class F>
void with_estimator(estimator_id id, F&& f) {
  switch (id) {
    case estimator_id::switch_router:
      f(est_tag<routegrad::switch_router>{});
      return;
    case estimator_id::topk_softmax:
      f(est_tag<routegrad::topk_softmax>{});
      return;
    case estimator_id::euler:
      f(est_tag<routegrad::sparsemixer_euler>{});
      return;
    case estimator_id::midpoint:
      f(est_tag<routegrad::sparsemixer_midpoint>{});
      return;
    case estimator_id::heun3:
      f(est_tag<routegrad::sparsemixer_heun3>{});
      return;
  }
  throw std::invalid_argument("unknown estimator id");
}

}  // namespace

bool cuda_device_available(std::string& why) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    why = std::string("cudaGetDeviceCount: ") + cudaGetErrorString(e);
    return false;
  }
  if (count == 0) {
    why = "cudaGetDeviceCount: no CUDA device";
    return false;
  }
  return true;
}

struct cuda_moe_blocks::impl {
  block_slice slice;
  std::vector<device_buffer> params, grads;  // per block
  std::vector<device_buffer> train_ctx, eval_ctx;
  std::vector<routegrad::index_t> train_tokens;  // tokens of the last train forward, per block
  device_buffer x, y, dy, dx, nonfinite;
};

cuda_moe_blocks::cuda_moe_blocks(int blocks, const block_slice& slice) : impl_(new impl) {
  std::string why;
  if (!cuda_device_available(why)) throw std::runtime_error(why);
  const std::size_t n = static_cast<std::size_t>(blocks);
  impl_->slice = slice;
  impl_->params = std::vector<device_buffer>(n);
  impl_->grads = std::vector<device_buffer>(n);
  impl_->train_ctx = std::vector<device_buffer>(n);
  impl_->eval_ctx = std::vector<device_buffer>(n);
  impl_->train_tokens.assign(n, -1);
  for (std::size_t l = 0; l < n; ++l) {
    impl_->params[l].reserve(slice.size * sizeof(float));
    // Zeros: the layer writes only the tensors (not the padding between them, nor ω's gradient
    // without use_omega), and the whole slice is copied back.
    impl_->grads[l].reserve(slice.size * sizeof(float), true);
  }
  impl_->nonfinite.reserve(sizeof(std::int64_t));
}

cuda_moe_blocks::~cuda_moe_blocks() = default;

namespace {

routegrad::cuda::device_moe_params<float> device_params(const block_slice& s, const float* base,
                                                        const routegrad::moe_options& opt) {
  const routegrad::index_t E = opt.experts, d = opt.d_model, h = opt.d_hidden;
  routegrad::cuda::device_moe_params<float> p;
  p.router_weight = routegrad::device_view<const float, 2>(base + s.router_w, {E, d});
  p.router_bias = routegrad::device_view<const float, 1>(base + s.router_b, {E});
  p.w1 = routegrad::device_view<const float, 3>(base + s.w1, {E, h, d});
  p.b1 = routegrad::device_view<const float, 2>(base + s.b1, {E, h});
  p.w2 = routegrad::device_view<const float, 3>(base + s.w2, {E, d, h});
  p.b2 = routegrad::device_view<const float, 2>(base + s.b2, {E, d});
  if (opt.use_omega) p.omega = routegrad::device_view<const float, 1>(base + s.omega, {d});
  return p;
}

routegrad::cuda::device_moe_grads<float> device_grads(const block_slice& s, float* base,
                                                      const routegrad::moe_options& opt) {
  const routegrad::index_t E = opt.experts, d = opt.d_model, h = opt.d_hidden;
  routegrad::cuda::device_moe_grads<float> g;
  g.router_weight = routegrad::device_view<float, 2>(base + s.router_w, {E, d});
  g.router_bias = routegrad::device_view<float, 1>(base + s.router_b, {E});
  g.w1 = routegrad::device_view<float, 3>(base + s.w1, {E, h, d});
  g.b1 = routegrad::device_view<float, 2>(base + s.b1, {E, h});
  g.w2 = routegrad::device_view<float, 3>(base + s.w2, {E, d, h});
  g.b2 = routegrad::device_view<float, 2>(base + s.b2, {E, d});
  if (opt.use_omega) g.omega = routegrad::device_view<float, 1>(base + s.omega, {d});
  return g;
}

}  // namespace

std::int64_t cuda_moe_blocks::forward(estimator_id est, const routegrad::moe_options& opt,
                                      int block, const float* params, const float* x, float* y,
                                      routegrad::index_t tokens, const routegrad::rng_stream& rng) {
  impl& m = *impl_;
  const std::size_t l = static_cast<std::size_t>(block);
  const routegrad::index_t d = opt.d_model;
  const std::size_t act_bytes = static_cast<std::size_t>(tokens * d) * sizeof(float);
  const bool train = opt.routing.mode == routegrad::routing_mode::train;
  device_buffer& ctx = train ? m.train_ctx[l] : m.eval_ctx[l];
  const std::size_t ctx_bytes = routegrad::cuda::moe_context_bytes<float>(opt, tokens);
  ctx.reserve(ctx_bytes);
  m.x.reserve(act_bytes);
  m.y.reserve(act_bytes);

  cuda_check(
      cudaMemcpy(m.params[l].ptr, params, m.slice.size * sizeof(float), cudaMemcpyHostToDevice),
      "copying the parameters to the device");
  cuda_check(cudaMemcpy(m.x.ptr, x, act_bytes, cudaMemcpyHostToDevice), "copying x");
  cuda_check(cudaMemset(m.nonfinite.ptr, 0, sizeof(std::int64_t)), "cudaMemset");
  routegrad::cuda::device_moe_stats stats;
  stats.nonfinite_rows = static_cast<std::int64_t*>(m.nonfinite.ptr);
  const auto p = device_params(m.slice, m.params[l].f(), opt);
  with_estimator(est, [&](auto tag) {
    using Est = typename decltype(tag)::type;
    layer_check(routegrad::moe_forward<Est, float>(
                    opt, p, routegrad::device_view<const float, 2>(m.x.f(), {tokens, d}),
                    routegrad::device_view<float, 2>(m.y.f(), {tokens, d}), rng,
                    routegrad::device_view<std::byte>(static_cast<std::byte*>(ctx.ptr),
                                                      {static_cast<routegrad::index_t>(ctx_bytes)}),
                    stats),
                "forward");
  });
  cuda_check(cudaMemcpy(y, m.y.ptr, act_bytes, cudaMemcpyDeviceToHost), "copying y");
  std::int64_t nonfinite = 0;
  cuda_check(cudaMemcpy(&nonfinite, m.nonfinite.ptr, sizeof nonfinite, cudaMemcpyDeviceToHost),
             "copying the statistics");
  if (train) m.train_tokens[l] = tokens;
  return nonfinite;
}

void cuda_moe_blocks::backward(estimator_id est, const routegrad::moe_options& opt, int block,
                               const float* params, const float* x, const float* dy, float* grads,
                               float* dx, routegrad::index_t tokens) {
  impl& m = *impl_;
  const std::size_t l = static_cast<std::size_t>(block);
  if (m.train_tokens[l] != tokens)
    throw std::logic_error("cuda_moe_blocks::backward without a train forward of this batch");
  const routegrad::index_t d = opt.d_model;
  const std::size_t act_bytes = static_cast<std::size_t>(tokens * d) * sizeof(float);
  const std::size_t ctx_bytes = routegrad::cuda::moe_context_bytes<float>(opt, tokens);
  m.x.reserve(act_bytes);
  m.dy.reserve(act_bytes);
  m.dx.reserve(act_bytes);
  // x and the parameters again: the host values are those of the forward (Adam runs after the
  // backward), and another block's forward may have used the x buffer since.
  cuda_check(
      cudaMemcpy(m.params[l].ptr, params, m.slice.size * sizeof(float), cudaMemcpyHostToDevice),
      "copying the parameters to the device");
  cuda_check(cudaMemcpy(m.x.ptr, x, act_bytes, cudaMemcpyHostToDevice), "copying x");
  cuda_check(cudaMemcpy(m.dy.ptr, dy, act_bytes, cudaMemcpyHostToDevice), "copying dy");
  const auto p = device_params(m.slice, m.params[l].f(), opt);
  const auto g = device_grads(m.slice, m.grads[l].f(), opt);
  with_estimator(est, [&](auto tag) {
    using Est = typename decltype(tag)::type;
    layer_check(routegrad::moe_backward<Est, float>(
                    opt, p, routegrad::device_view<const float, 2>(m.x.f(), {tokens, d}),
                    routegrad::device_view<const float, 2>(m.dy.f(), {tokens, d}),
                    routegrad::device_view<const std::byte>(
                        static_cast<const std::byte*>(m.train_ctx[l].ptr),
                        {static_cast<routegrad::index_t>(ctx_bytes)}),
                    g, routegrad::device_view<float, 2>(m.dx.f(), {tokens, d}),
                    routegrad::grad_mode::overwrite),
                "backward");
  });
  cuda_check(cudaMemcpy(dx, m.dx.ptr, act_bytes, cudaMemcpyDeviceToHost), "copying dx");
  cuda_check(
      cudaMemcpy(grads, m.grads[l].ptr, m.slice.size * sizeof(float), cudaMemcpyDeviceToHost),
      "copying the gradients");
}

}  // namespace fmnist
