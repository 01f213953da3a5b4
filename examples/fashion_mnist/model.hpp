// The Fashion-MNIST MoE classifier, on the CPU: dense parts with Eigen, the MoE blocks with
// routegrad's reference layer (routegrad/moe/api.hpp), or with model_config::cuda the MoE blocks
// on the GPU through routegrad's CUDA layer (cuda_block.hpp; builds with FMNIST_WITH_CUDA), the
// rest (input projection, head, loss, Adam) staying on the CPU.
//
//   h_0     = x W_inᵀ + b_in                    input projection 784 → d (linear)
//   h_{l+1} = h_l + MoE_l(h_l)                   l = 0..blocks−1, residual MoE FFN blocks
//   logits  = h_L W_outᵀ + b_out                 head d → 10, softmax cross-entropy
//
// The only non-linearity is inside the experts: without the MoE blocks the model is a linear
// classifier, so what the experts (and the router that picks them) learn shows in the accuracy.
// Every parameter lives in one flat float vector (Adam runs over it in one loop); the MoE layer
// gets strided views into it.
//
// A back end is a model class with this interface (cpu_model below; a CUDA one would keep the
// same members with device buffers, cuBLAS and cuda/moe_layer.cuh, and the driver in trainer.hpp
// would not change):
//   model(const model_config&, std::uint64_t seed)
//   template <class Est> double train_step(const float* x, const std::uint8_t* y, index_t B,
//                                          std::uint64_t step)   → mean cross-entropy
//   template <class Est> eval_result evaluate(const split&)
//   void adam_step(const adam_config&)
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <random>
#include <routegrad/moe/api.hpp>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "dataset.hpp"
#ifdef FMNIST_WITH_CUDA
#include "cuda_block.hpp"
#endif

namespace fmnist {

using routegrad::index_t;

struct model_config {
  int d_model = 64;
  int d_hidden = 128;
  int experts = 8;
  int k = 2;
  int blocks = 2;
  double jitter = 0.1;     // SparseMixer mask ε / Switch noise ε (routing_options::jitter_eps)
  bool use_omega = false;  // the learned output scale ω of SPEC §1
  double load_balance = 0.01;  // α of the Switch load-balancing loss (SPEC §5)
  double z_loss = 0.0;         // β of the router z-loss
  bool dense = false;          // every expert on every token (mixing::dense), for reference
  bool cuda = false;  // the MoE blocks on the GPU (float32; needs a build with FMNIST_WITH_CUDA)
  int threads = 1;    // cpu::execution::num_threads and Eigen's (0: OpenMP's default). One thread
                      // by default: at this size a second one gains ~25%, and when another process
                      // shares the cores OpenMP's barriers make two threads 5-10x slower.
};

struct adam_config {
  double lr = 2e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
};

struct eval_result {
  double loss = 0.0;
  double accuracy = 0.0;
  std::int64_t nonfinite_rows = 0;
  // The SparseMixer jitter mask (SPEC §2) applied to the router logits of every block, slot 1:
  // how many experts it keeps per token on average, and the share of tokens it leaves a single
  // candidate (no sampling and no routing gradient through π for that slot).
  double mask_candidates = 0.0;
  double mask_single = 0.0;
};

/// Experts the SPEC §2 jitter mask keeps in a row of logits (slot 1).
inline int mask_candidates(const float* z, index_t E, double eps) {
  float m = z[0];
  for (index_t i = 1; i < E; ++i) m = std::max(m, z[i]);
  int kept = 0;
  for (index_t i = 0; i < E; ++i) {
    const double den = std::max(static_cast<double>(std::fabs(z[i])), static_cast<double>(m));
    const double ratio = den == 0.0 ? 0.0 : (static_cast<double>(m) - z[i]) / den;
    kept += ratio > 2.0 * eps ? 0 : 1;
  }
  return kept;
}

/// Where each tensor lives in the flat parameter vector.
struct param_layout {
  struct block {
    std::size_t router_w, router_b, w1, b1, w2, b2, omega;
  };
  std::size_t w_in, b_in, w_out, b_out;
  std::vector<block> blocks;
  std::size_t total = 0;

  explicit param_layout(const model_config& c) {
    const std::size_t d = static_cast<std::size_t>(c.d_model);
    const std::size_t h = static_cast<std::size_t>(c.d_hidden);
    const std::size_t E = static_cast<std::size_t>(c.experts);
    auto take = [&](std::size_t n) {
      const std::size_t at = total;
      total += (n + 15) / 16 * 16;  // 64-byte aligned tensors
      return at;
    };
    w_in = take(d * num_pixels);
    b_in = take(d);
    for (int l = 0; l < c.blocks; ++l) {
      block b{};
      b.router_w = take(E * d);
      b.router_b = take(E);
      b.w1 = take(E * h * d);
      b.b1 = take(E * h);
      b.w2 = take(E * d * h);
      b.b2 = take(E * d);
      b.omega = take(d);
      blocks.push_back(b);
    }
    w_out = take(num_classes * d);
    b_out = take(num_classes);
  }
};

/// Rows of a row-major float matrix.
using row_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using matrix_map = Eigen::Map<row_matrix>;
using const_matrix_map = Eigen::Map<const row_matrix>;
using vector_map = Eigen::Map<Eigen::RowVectorXf>;
using const_vector_map = Eigen::Map<const Eigen::RowVectorXf>;

/// Softmax cross-entropy of logits [B, C] against labels: returns the mean loss and writes
/// d(mean loss)/d logits into dlogits (may be null) and the number of correct argmax predictions.
inline double softmax_cross_entropy(const row_matrix& logits, const std::uint8_t* labels,
                                    row_matrix* dlogits, std::int64_t* correct) {
  const index_t B = logits.rows();
  const index_t C = logits.cols();
  double loss = 0.0;
  std::int64_t right = 0;
  if (dlogits != nullptr) dlogits->resize(B, C);
  for (index_t i = 0; i < B; ++i) {
    const float m = logits.row(i).maxCoeff();
    double sum = 0.0;
    index_t best = 0;
    for (index_t c = 0; c < C; ++c) {
      sum += std::exp(static_cast<double>(logits(i, c) - m));
      if (logits(i, c) > logits(i, best)) best = c;
    }
    const double lse = m + std::log(sum);
    loss += lse - logits(i, labels[i]);
    right += best == labels[i] ? 1 : 0;
    if (dlogits != nullptr)
      for (index_t c = 0; c < C; ++c)
        (*dlogits)(i, c) = static_cast<float>(
            (std::exp(static_cast<double>(logits(i, c)) - lse) - (c == labels[i] ? 1.0 : 0.0)) /
            static_cast<double>(B));
  }
  if (correct != nullptr) *correct = right;
  return B > 0 ? loss / static_cast<double>(B) : 0.0;
}

class cpu_model {
 public:
  cpu_model(const model_config& cfg, std::uint64_t seed)
      : cfg_(cfg),
        layout_(cfg),
        theta_(layout_.total, 0.0f),
        grad_(layout_.total, 0.0f),
        adam_m_(layout_.total, 0.0f),
        adam_v_(layout_.total, 0.0f),
        seed_(seed) {
    if (cfg.k < 1 || cfg.k > cfg.experts)
      throw std::invalid_argument("k must satisfy 1 <= k <= experts");
    // Eigen's GEMM threads (a process-wide setting) for the dense parts; the layer's own loops
    // take cfg.threads through cpu::execution.
    if (cfg.threads > 0) Eigen::setNbThreads(cfg.threads);
    init(seed);
    if (cfg.cuda) {
#ifdef FMNIST_WITH_CUDA
      gpu_ = std::make_unique<cuda_moe_blocks>(cfg.blocks, block_slice_of());
#else
      throw std::runtime_error("this fashion_mnist was built without the CUDA back end");
#endif
    }
  }

  const model_config& config() const { return cfg_; }
  const param_layout& layout() const { return layout_; }
  std::size_t num_parameters() const {
    const std::size_t d = static_cast<std::size_t>(cfg_.d_model);
    const std::size_t h = static_cast<std::size_t>(cfg_.d_hidden);
    const std::size_t E = static_cast<std::size_t>(cfg_.experts);
    const std::size_t per_block =
        E * d + E + 2 * E * h * d + E * h + E * d + (cfg_.use_omega ? d : 0);
    return d * num_pixels + d + static_cast<std::size_t>(cfg_.blocks) * per_block +
           num_classes * d + num_classes;
  }
  std::vector<float>& parameters() { return theta_; }
  const std::vector<float>& gradients() const { return grad_; }
  /// Non-finite router rows the layer reported since construction (should stay 0).
  std::int64_t nonfinite_rows() const { return nonfinite_rows_; }

  /// One forward + backward on a batch; gradients land in gradients(). Returns the mean
  /// cross-entropy (the load-balancing term's gradient is added by the layer, not reported here).
  template <class Est>
  double train_step(const float* x, const std::uint8_t* labels, index_t B, std::uint64_t step) {
    forward<Est>(x, B, routegrad::routing_mode::train, step, train_ctx_);
    row_matrix dlogits;
    const double loss = softmax_cross_entropy(logits_, labels, &dlogits, nullptr);
    backward<Est>(x, B, dlogits);
    return loss;
  }

  /// Test loss and accuracy in eval mode (argmax routing, no noise), in chunks.
  template <class Est>
  eval_result evaluate(const split& s, index_t chunk = 1000) {
    eval_result r;
    std::int64_t correct = 0, candidates = 0, single = 0;
    double loss_sum = 0.0;
    for (index_t i0 = 0; i0 < s.n; i0 += chunk) {
      const index_t B = std::min(chunk, s.n - i0);
      forward<Est>(s.pixels.data() + i0 * num_pixels, B, routegrad::routing_mode::eval, 0,
                   eval_ctx_);
      std::int64_t right = 0;
      loss_sum += softmax_cross_entropy(logits_, s.labels.data() + i0, nullptr, &right) *
                  static_cast<double>(B);
      correct += right;
      for (int l = 0; l < cfg_.blocks; ++l) {  // the router logits each block saw
        const param_layout::block& b = layout_.blocks[static_cast<std::size_t>(l)];
        const const_matrix_map W_r(at(b.router_w), cfg_.experts, cfg_.d_model);
        const const_vector_map b_r(at(b.router_b), cfg_.experts);
        row_matrix z = h_[static_cast<std::size_t>(l)] * W_r.transpose();
        z.rowwise() += b_r;
        for (index_t t = 0; t < B; ++t) {
          const int kept = mask_candidates(z.row(t).data(), cfg_.experts, cfg_.jitter);
          candidates += kept;
          single += kept == 1 ? 1 : 0;
        }
      }
    }
    const double rows = static_cast<double>(s.n) * std::max(1, cfg_.blocks);
    r.mask_candidates = static_cast<double>(candidates) / rows;
    r.mask_single = static_cast<double>(single) / rows;
    r.loss = loss_sum / static_cast<double>(s.n);
    r.accuracy = static_cast<double>(correct) / static_cast<double>(s.n);
    r.nonfinite_rows = nonfinite_rows_;
    return r;
  }

  void adam_step(const adam_config& a) {
    ++adam_t_;
    const double c1 = 1.0 - std::pow(a.beta1, static_cast<double>(adam_t_));
    const double c2 = 1.0 - std::pow(a.beta2, static_cast<double>(adam_t_));
    const float b1 = static_cast<float>(a.beta1), b2 = static_cast<float>(a.beta2);
    const float step = static_cast<float>(a.lr / c1);
    const float inv_c2 = static_cast<float>(1.0 / c2);
    const float eps = static_cast<float>(a.eps);
    const std::size_t n = theta_.size();
    float* th = theta_.data();
    const float* g = grad_.data();
    float* m = adam_m_.data();
    float* v = adam_v_.data();
    for (std::size_t i = 0; i < n; ++i) {
      m[i] = b1 * m[i] + (1.0f - b1) * g[i];
      v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
      th[i] -= step * m[i] / (std::sqrt(v[i] * inv_c2) + eps);
    }
  }

 private:
  routegrad::moe_options moe_opts(routegrad::routing_mode mode) const {
    routegrad::moe_options o;
    o.d_model = cfg_.d_model;
    o.d_hidden = cfg_.d_hidden;
    o.experts = cfg_.experts;
    o.act = routegrad::activation::gelu;
    o.mix = cfg_.dense ? routegrad::mixing::dense : routegrad::mixing::sparse;
    o.use_omega = cfg_.use_omega;
    o.routing.k = cfg_.k;
    o.routing.mode = mode;
    o.routing.jitter_eps = cfg_.jitter;
    o.routing.load_balance_coef = cfg_.load_balance;
    o.routing.z_loss_coef = cfg_.z_loss;
    return o;
  }

#ifdef FMNIST_WITH_CUDA
  template <class Est>
  estimator_id estimator_of() const {
    if constexpr (std::is_same_v<Est, routegrad::switch_router>)
      return estimator_id::switch_router;
    else if constexpr (std::is_same_v<Est, routegrad::topk_softmax>)
      return estimator_id::topk_softmax;
    else if constexpr (std::is_same_v<Est, routegrad::sparsemixer_euler>)
      return estimator_id::euler;
    else if constexpr (std::is_same_v<Est, routegrad::sparsemixer_midpoint>)
      return estimator_id::midpoint;
    else {
      static_assert(std::is_same_v<Est, routegrad::sparsemixer_heun3>, "unknown estimator");
      return estimator_id::heun3;
    }
  }

  /// A block's tensors relative to its router weight (the same for every block: one layout).
  block_slice block_slice_of() const {
    block_slice s;
    if (layout_.blocks.empty()) return s;
    const param_layout::block& b = layout_.blocks.front();
    s.router_w = 0;
    s.router_b = b.router_b - b.router_w;
    s.w1 = b.w1 - b.router_w;
    s.b1 = b.b1 - b.router_w;
    s.w2 = b.w2 - b.router_w;
    s.b2 = b.b2 - b.router_w;
    s.omega = b.omega - b.router_w;
    s.size = s.omega + static_cast<std::size_t>(cfg_.d_model);
    return s;
  }
#endif

  float* at(std::size_t off) { return theta_.data() + off; }
  const float* at(std::size_t off) const { return theta_.data() + off; }

  routegrad::host_moe_params<float> block_params(int l) const {
    const param_layout::block& b = layout_.blocks[static_cast<std::size_t>(l)];
    const index_t E = cfg_.experts, d = cfg_.d_model, h = cfg_.d_hidden;
    routegrad::host_moe_params<float> p;
    p.router_weight = routegrad::host_view<const float, 2>(at(b.router_w), {E, d});
    p.router_bias = routegrad::host_view<const float, 1>(at(b.router_b), {E});
    p.w1 =
        routegrad::strided_view<const float, 3, routegrad::memory_space::host>(at(b.w1), {E, h, d});
    p.b1 = routegrad::host_view<const float, 2>(at(b.b1), {E, h});
    p.w2 =
        routegrad::strided_view<const float, 3, routegrad::memory_space::host>(at(b.w2), {E, d, h});
    p.b2 = routegrad::host_view<const float, 2>(at(b.b2), {E, d});
    if (cfg_.use_omega) p.omega = routegrad::host_view<const float, 1>(at(b.omega), {d});
    return p;
  }

  routegrad::host_moe_grads<float> block_grads(int l) {
    const param_layout::block& b = layout_.blocks[static_cast<std::size_t>(l)];
    const index_t E = cfg_.experts, d = cfg_.d_model, h = cfg_.d_hidden;
    float* g = grad_.data();
    routegrad::host_moe_grads<float> p;
    p.router_weight = routegrad::host_view<float, 2>(g + b.router_w, {E, d});
    p.router_bias = routegrad::host_view<float, 1>(g + b.router_b, {E});
    p.w1 = routegrad::strided_view<float, 3, routegrad::memory_space::host>(g + b.w1, {E, h, d});
    p.b1 = routegrad::host_view<float, 2>(g + b.b1, {E, h});
    p.w2 = routegrad::strided_view<float, 3, routegrad::memory_space::host>(g + b.w2, {E, d, h});
    p.b2 = routegrad::host_view<float, 2>(g + b.b2, {E, d});
    if (cfg_.use_omega) p.omega = routegrad::host_view<float, 1>(g + b.omega, {d});
    return p;
  }

  /// PyTorch's nn.Linear initialisation: U(−1/√fan_in, 1/√fan_in) for weights and biases.
  void init(std::uint64_t seed) {
    std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ULL + 0x5EEDULL);
    auto fill = [&](std::size_t off, std::size_t n, double fan_in, double gain = 1.0) {
      std::uniform_real_distribution<float> u(static_cast<float>(-gain / std::sqrt(fan_in)),
                                              static_cast<float>(gain / std::sqrt(fan_in)));
      for (std::size_t i = 0; i < n; ++i) theta_[off + i] = u(rng);
    };
    const std::size_t d = static_cast<std::size_t>(cfg_.d_model);
    const std::size_t h = static_cast<std::size_t>(cfg_.d_hidden);
    const std::size_t E = static_cast<std::size_t>(cfg_.experts);
    fill(layout_.w_in, d * num_pixels, num_pixels);
    fill(layout_.b_in, d, num_pixels);
    for (const param_layout::block& b : layout_.blocks) {
      fill(b.router_w, E * d, static_cast<double>(d));
      fill(b.router_b, E, static_cast<double>(d));
      fill(b.w1, E * h * d, static_cast<double>(d));
      fill(b.b1, E * h, static_cast<double>(d));
      fill(b.w2, E * d * h, static_cast<double>(h));
      fill(b.b2, E * d, static_cast<double>(h));
      for (std::size_t i = 0; i < d; ++i) theta_[b.omega + i] = 1.0f;
    }
    fill(layout_.w_out, num_classes * d, static_cast<double>(d));
    fill(layout_.b_out, num_classes, static_cast<double>(d));
  }

  struct contexts {
    std::vector<routegrad::cpu::moe_context<float>> block;
    index_t tokens = -1;
  };

  template <class Est>
  void forward(const float* x, index_t B, routegrad::routing_mode mode, std::uint64_t step,
               contexts& ctx) {
    const index_t d = cfg_.d_model;
    const routegrad::moe_options opt = moe_opts(mode);
    if (ctx.tokens != B) {
      ctx.block.resize(static_cast<std::size_t>(cfg_.blocks));
      for (auto& c : ctx.block) c.resize(opt, B);
      ctx.tokens = B;
    }
    h_.resize(static_cast<std::size_t>(cfg_.blocks) + 1);
    for (row_matrix& m : h_) m.resize(B, d);
    y_.resize(B, d);

    const Eigen::Map<const row_matrix> X(x, B, num_pixels);
    const const_matrix_map W_in(at(layout_.w_in), d, num_pixels);
    const const_vector_map b_in(at(layout_.b_in), d);
    h_[0].noalias() = X * W_in.transpose();
    h_[0].rowwise() += b_in;

    const routegrad::cpu::execution exec{cfg_.threads};
    for (int l = 0; l < cfg_.blocks; ++l) {
      const std::size_t ul = static_cast<std::size_t>(l);
      std::int64_t nonfinite = 0;
      routegrad::host_moe_stats stats;
      stats.nonfinite_rows = &nonfinite;
      // One random stream per (run, block); the step is the offset (SPEC §3 counter layout).
      const routegrad::rng_stream rng{seed_ * 1000003ULL + static_cast<std::uint64_t>(l), step, 0};
#ifdef FMNIST_WITH_CUDA
      if (gpu_) {
        nonfinite = gpu_->forward(estimator_of<Est>(), opt, l, at(layout_.blocks[ul].router_w),
                                  h_[ul].data(), y_.data(), B, rng);
      } else
#endif
      {
        routegrad::check(routegrad::moe_forward<Est, float>(
            opt, block_params(l), routegrad::host_matrix<const float>(h_[ul].data(), B, d),
            routegrad::host_matrix(y_.data(), B, d), rng, ctx.block[ul].view(), stats, exec));
      }
      nonfinite_rows_ += nonfinite;
      h_[ul + 1] = h_[ul] + y_;
    }
    const const_matrix_map W_out(at(layout_.w_out), num_classes, d);
    const const_vector_map b_out(at(layout_.b_out), num_classes);
    logits_.noalias() = h_.back() * W_out.transpose();
    logits_.rowwise() += b_out;
  }

  template <class Est>
  void backward(const float* x, index_t B, const row_matrix& dlogits) {
    const index_t d = cfg_.d_model;
    const routegrad::moe_options opt = moe_opts(routegrad::routing_mode::train);
    const routegrad::cpu::execution exec{cfg_.threads};
    float* g = grad_.data();
    matrix_map gW_out(g + layout_.w_out, num_classes, d);
    vector_map gb_out(g + layout_.b_out, num_classes);
    gW_out.noalias() = dlogits.transpose() * h_.back();
    gb_out = dlogits.colwise().sum();

    const const_matrix_map W_out(at(layout_.w_out), num_classes, d);
    dh_.noalias() = dlogits * W_out;  // [B, d]
    dx_.resize(B, d);
    for (int l = cfg_.blocks - 1; l >= 0; --l) {
      const std::size_t ul = static_cast<std::size_t>(l);
#ifdef FMNIST_WITH_CUDA
      if (gpu_) {
        const std::size_t off = layout_.blocks[ul].router_w;
        gpu_->backward(estimator_of<Est>(), opt, l, at(off), h_[ul].data(), dh_.data(), g + off,
                       dx_.data(), B);
      } else
#endif
      {
        routegrad::check(routegrad::moe_backward<Est, float>(
            opt, block_params(l), routegrad::host_matrix<const float>(h_[ul].data(), B, d),
            routegrad::host_matrix<const float>(dh_.data(), B, d), train_ctx_.block[ul].cview(),
            block_grads(l), routegrad::host_matrix(dx_.data(), B, d),
            routegrad::grad_mode::overwrite, exec));
      }
      dh_ += dx_;  // residual: dL/dh_l = dL/dh_{l+1} + (dMoE/dh_l)ᵀ dL/dh_{l+1}
    }
    const Eigen::Map<const row_matrix> X(x, B, num_pixels);
    matrix_map gW_in(g + layout_.w_in, d, num_pixels);
    vector_map gb_in(g + layout_.b_in, d);
    gW_in.noalias() = dh_.transpose() * X;
    gb_in = dh_.colwise().sum();
  }

  model_config cfg_;
  param_layout layout_;
  std::vector<float> theta_, grad_, adam_m_, adam_v_;
  std::uint64_t seed_;
  std::uint64_t adam_t_ = 0;
  std::int64_t nonfinite_rows_ = 0;
  contexts train_ctx_, eval_ctx_;
  std::vector<row_matrix> h_;
  row_matrix y_, logits_, dh_, dx_;
#ifdef FMNIST_WITH_CUDA
  std::unique_ptr<cuda_moe_blocks> gpu_;
#endif
};

}  // namespace fmnist
