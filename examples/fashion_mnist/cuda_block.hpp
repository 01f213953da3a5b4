// The trainer's MoE blocks on the GPU (--device cuda): a plain C++ interface (host float
// pointers, no Eigen, no CUDA types) to routegrad's CUDA MoE layer, implemented in
// cuda_block.cu. main.cpp and model.hpp are compiled by the host compiler with Eigen; the .cu is
// compiled by nvcc without Eigen (its target has no Eigen include directory).
//
// Each call copies its inputs (the block's parameters, x, dy) to the device, runs the layer in
// float32 and copies its outputs (y; dx and the parameter gradients) back. The forward's context
// stays on the device until the backward of the same block. Built only with the CUDA back end
// (FMNIST_WITH_CUDA).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <routegrad/core/philox.hpp>
#include <routegrad/moe/options.hpp>
#include <string>

namespace fmnist {

/// The estimators of the trainer (the .cu instantiates the layer for each).
enum class estimator_id { switch_router, topk_softmax, euler, midpoint, heun3 };

/// Offsets (floats) of a block's tensors from the start of its slice of the flat parameter (and
/// gradient) vector; `size` is the slice's length. The tensors are row-major and contiguous: W_r
/// [E, d], b_r [E], W1 [E, h, d], b1 [E, h], W2 [E, d, h], b2 [E, d], ω [d].
struct block_slice {
  std::size_t router_w = 0, router_b = 0, w1 = 0, b1 = 0, w2 = 0, b2 = 0, omega = 0, size = 0;
};

/// Whether a CUDA device can be used; on false, `why` says why (no device, no driver, ...).
bool cuda_device_available(std::string& why);

/// The device buffers of every block of one model: parameters, gradients, x, y, dy, dx and one
/// forward context per block and routing mode (train contexts are read by the backward).
class cuda_moe_blocks {
 public:
  /// Throws std::runtime_error when no CUDA device can be used or an allocation fails.
  cuda_moe_blocks(int blocks, const block_slice& slice);
  ~cuda_moe_blocks();
  cuda_moe_blocks(const cuda_moe_blocks&) = delete;
  cuda_moe_blocks& operator=(const cuda_moe_blocks&) = delete;

  /// y [tokens, d] = MoE_block(x) with the parameters at `params` (the block's slice, host
  /// memory). Returns the router's non-finite rows. Throws on a layer or CUDA error.
  std::int64_t forward(estimator_id est, const routegrad::moe_options& opt, int block,
                       const float* params, const float* x, float* y, routegrad::index_t tokens,
                       const routegrad::rng_stream& rng);

  /// The backward of the last train-mode forward of `block` (same options, parameters and x):
  /// writes dx [tokens, d] and overwrites the block's gradient slice `grads` (host memory).
  void backward(estimator_id est, const routegrad::moe_options& opt, int block, const float* params,
                const float* x, const float* dy, float* grads, float* dx,
                routegrad::index_t tokens);

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace fmnist
