// Shared by routegrad_ext.cpp (CPU path and Python bindings) and routegrad_ext_cuda.cu (CUDA
// path): the options of one routing call, the estimator names, and tensor -> view helpers.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <routegrad/routegrad.hpp>

namespace routegrad_ext {

/// What forward() and backward() are asked to do (pass the same to both).
struct call_options {
  routegrad::routing_options routing;
  std::string estimator;
  routegrad::rng_stream rng;
  const std::uint64_t* offset_counter = nullptr;  // routing_state::offset_counter (may be null)
};

/// Fails an argument check: pybind11 raises it as a Python RuntimeError with this message.
///
/// Messages are built with std::string and std::to_string and thrown as std::runtime_error,
/// not through TORCH_CHECK: with PyTorch 2.11 on the GPU machine, a TORCH_CHECK failure raised
/// inside this extension crashed (SIGSEGV in std::ostream's integer insertion, c10::str's
/// ostringstream instantiated in the extension's own code), while routegrad's own errors
/// (std::string concatenation) came through; see docs/integration.md.
[[noreturn]] inline void fail(const std::string& message) { throw std::runtime_error(message); }

/// Calls f(Est{}) for the estimator called `name`.
template <class F>
void with_estimator(const std::string& name, F&& f) {
  if (name == "switch")
    f(routegrad::switch_router{});
  else if (name == "topk_softmax")
    f(routegrad::topk_softmax{});
  else if (name == "sparsemixer_euler")
    f(routegrad::sparsemixer_euler{});
  else if (name == "sparsemixer_midpoint")
    f(routegrad::sparsemixer_midpoint{});
  else if (name == "sparsemixer_heun3")
    f(routegrad::sparsemixer_heun3{});
  else
    fail("estimator: unknown name '" + name +
         "' (expected switch, topk_softmax, sparsemixer_euler, sparsemixer_midpoint or "
         "sparsemixer_heun3)");
}

/// The options of one call. k and the coefficients are checked by routegrad itself (a k outside
/// int's range becomes 0, which routegrad rejects with its own message).
inline call_options make_options(std::int64_t k, const std::string& estimator,
                                 const std::string& mode, double jitter_eps, std::int64_t seed,
                                 std::int64_t offset, bool renormalize, double load_balance_coef,
                                 double z_loss_coef) {
  with_estimator(estimator, [](auto) {});  // reject an unknown name before any work
  if (mode != "train" && mode != "eval")
    fail("mode: must be 'train' or 'eval', not '" + mode + "'");
  call_options o;
  o.routing.k = k >= 0 && k <= std::numeric_limits<int>::max() ? static_cast<int>(k) : 0;
  o.routing.mode = mode == "train" ? routegrad::routing_mode::train : routegrad::routing_mode::eval;
  o.routing.jitter_eps = jitter_eps;
  o.routing.renormalize = renormalize;
  o.routing.load_balance_coef = load_balance_coef;
  o.routing.z_loss_coef = z_loss_coef;
  o.estimator = estimator;
  o.rng = {static_cast<std::uint64_t>(seed), static_cast<std::uint64_t>(offset), 0};
  return o;
}

/// Torch's own checks, each naming the argument; everything else is left to routegrad.
inline void require_2d(const at::Tensor& t, const char* name) {
  if (!t.defined()) fail(std::string(name) + ": must be a tensor");
  if (t.dim() != 2)
    fail(std::string(name) + ": must be a 2-D tensor, got " + std::to_string(t.dim()) + "-D");
}
inline void require_dtype(const at::Tensor& t, at::ScalarType type, const char* name) {
  if (t.scalar_type() != type)
    fail(std::string(name) + ": must be " + c10::toString(type) + ", got " +
         c10::toString(t.scalar_type()));
}
inline void require_device(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  if (t.device() != logits.device())
    fail(std::string(name) + ": must be on the same device as logits (" + logits.device().str() +
         "), got " + t.device().str());
}

/// The optional offset counter: a one-element int64 tensor on the logits' device whose value
/// routegrad adds to `offset` when the call runs (routing_state::offset_counter; on CUDA read by
/// the kernels, so a captured CUDA graph draws anew after the counter is advanced, e.g. by an
/// in-place `counter += 1` captured ahead of the step). Read as uint64: a negative value wraps.
inline const std::uint64_t* counter_pointer(const c10::optional<at::Tensor>& counter,
                                            const at::Tensor& logits) {
  if (!counter.has_value()) return nullptr;
  const at::Tensor& c = *counter;
  require_dtype(c, at::kLong, "offset_counter");
  require_device(c, logits, "offset_counter");
  if (c.numel() != 1)
    fail("offset_counter: must hold one element, got " + std::to_string(c.numel()));
  return reinterpret_cast<const std::uint64_t*>(c.data_ptr<std::int64_t>());
}

/// Where routegrad writes a loss value: only when its coefficient is non-zero (the value is
/// α·… or β·…, so 0 otherwise, and computing it costs a reduction over the logits: on an H100
/// the loss kernels were most of a small step's GPU time when the extension always asked).
inline double* loss_pointer(const at::Tensor& value, double coef) {
  return coef != 0.0 ? value.data_ptr<double>() : nullptr;
}

/// The slots to allocate for the outputs: k clamped to [0, E], so that a bad k reaches
/// routegrad's own check instead of failing in the allocation.
inline std::int64_t slots_to_allocate(std::int64_t k, std::int64_t experts) {
  return std::clamp<std::int64_t>(k, 0, experts);
}

/// A routegrad view of a 2-D tensor (element strides, as torch counts them).
template <class T, routegrad::memory_space Space>
routegrad::strided_view<T, 2, Space> view2(const at::Tensor& t) {
  return routegrad::strided_view<T, 2, Space>(static_cast<T*>(t.data_ptr()), {t.size(0), t.size(1)},
                                              {t.stride(0), t.stride(1)});
}

/// The forward's outputs, in this order: gates, experts, coins, expert_counts,
/// load_balance_loss, z_loss, nonfinite_rows.
using forward_result = std::vector<at::Tensor>;

}  // namespace routegrad_ext
