// Argument checks of the MoE layer shared by every back end (SPEC §7): options, parameter and
// gradient views, the input and output batches. Each returns the first violated rule as a status
// naming the argument; nothing has been read from or written to the caller's buffers.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "../core/status.hpp"
#include "../estimators/estimators.hpp"
#include "../routing/validate.hpp"
#include "options.hpp"

namespace routegrad::validation {

template <class T, int R, memory_space S>
bool shape_is(const strided_view<T, R, S>& v, const index_t (&extents)[R]) {
  for (int i = 0; i < R; ++i)
    if (v.extent(i) != extents[i]) return false;
  return true;
}

/// Every element has its own address (rank 1 to 3): sorting the dimensions of extent > 1 by
/// stride, each stride is at least the span of the ones nested inside it.
template <class T, int R, memory_space S>
bool distinct_addresses(const strided_view<T, R, S>& v) {
  if (!strides_nonnegative(v)) return false;
  index_t stride[R], extent[R];
  int n = 0;
  for (int i = 0; i < R; ++i)
    if (v.extent(i) > 1) {
      stride[n] = v.stride(i);
      extent[n] = v.extent(i);
      ++n;
    }
  for (int i = 1; i < n; ++i)  // insertion sort by stride, n ≤ 3
    for (int j = i; j > 0 && stride[j] < stride[j - 1]; --j) {
      std::swap(stride[j], stride[j - 1]);
      std::swap(extent[j], extent[j - 1]);
    }
  index_t span = 1;
  for (int i = 0; i < n; ++i) {
    if (stride[i] < span) return false;
    span = stride[i] * extent[i];
  }
  return true;
}

inline status check_moe_options(const moe_options& opt) {
  if (opt.d_model < 1) return {status_code::invalid_argument, "options.d_model: must be >= 1"};
  if (opt.d_hidden < 1) return {status_code::invalid_argument, "options.d_hidden: must be >= 1"};
  if (opt.experts < 1) return {status_code::invalid_argument, "options.experts: must be >= 1"};
  if (opt.experts >= (1 << 24))
    return {status_code::invalid_argument, "options.experts: must be below 2^24"};
  if (opt.act != activation::gelu && opt.act != activation::silu && opt.act != activation::swiglu)
    return {status_code::invalid_argument, "options.act: must be gelu, silu or swiglu"};
  if (opt.mix != mixing::sparse && opt.mix != mixing::dense)
    return {status_code::invalid_argument, "options.mix: must be sparse or dense"};
  if (!(opt.capacity_factor >= 0.0) || !std::isfinite(opt.capacity_factor))
    return {status_code::invalid_argument,
            "options.capacity_factor: must be finite and >= 0 (0 = dropless)"};
  if (opt.routing.k < 1 || opt.routing.k > opt.experts)
    return {status_code::invalid_argument, "options.routing.k: must satisfy 1 <= k <= E"};
  if (!(opt.routing.jitter_eps >= 0.0 && opt.routing.jitter_eps < 0.5))
    return {status_code::invalid_argument,
            "options.routing.jitter_eps: must satisfy 0 <= eps < 0.5"};
  if (!std::isfinite(opt.routing.load_balance_coef) || !std::isfinite(opt.routing.z_loss_coef))
    return {status_code::invalid_argument, "options.routing: loss coefficients must be finite"};
  if (opt.routing.mode != routing_mode::train && opt.routing.mode != routing_mode::eval)
    return {status_code::invalid_argument, "options.routing.mode: must be train or eval"};
  return status::ok();
}

namespace detail {

/// One view of the parameter or gradient set: shape, data, strides (distinct addresses when it
/// is written).
template <class V, int R>
status check_param_view(const V& v, const index_t (&extents)[R], bool writing,
                        const char* bad_shape, const char* null_data, const char* bad_stride) {
  if (!shape_is(v, extents)) return {status_code::invalid_shape, bad_shape};
  if (!has_data(v)) return {status_code::null_pointer, null_data};
  if (writing ? !distinct_addresses(v) : !strides_nonnegative(v))
    return {status_code::invalid_stride, bad_stride};
  return status::ok();
}

/// The same checks for moe_params (writing = false) and moe_grads (writing = true); `what` is
/// "params" or "grads" in the messages.
template <class P>
status check_parameter_set(const moe_options& opt, const P& p, bool writing) {
  const index_t E = opt.experts, d = opt.d_model, h = opt.d_hidden, h1 = w1_rows(opt);
#define ROUTEGRAD_CHECK_PARAM(field, ...)                                           \
  ROUTEGRAD_RETURN_IF_ERROR(check_param_view(                                       \
      p.field, {__VA_ARGS__}, writing,                                              \
      writing ? "grads." #field ": wrong shape" : "params." #field ": wrong shape", \
      writing ? "grads." #field ": null data" : "params." #field ": null data",     \
      writing ? "grads." #field ": strides overlap or are negative"                 \
              : "params." #field ": strides must be non-negative"))
  ROUTEGRAD_CHECK_PARAM(router_weight, E, d);
  ROUTEGRAD_CHECK_PARAM(router_bias, E);
  ROUTEGRAD_CHECK_PARAM(w1, E, h1, d);
  ROUTEGRAD_CHECK_PARAM(b1, E, h1);
  ROUTEGRAD_CHECK_PARAM(w2, E, d, h);
  ROUTEGRAD_CHECK_PARAM(b2, E, d);
  if (opt.use_omega) {
    ROUTEGRAD_CHECK_PARAM(omega, d);
  }
#undef ROUTEGRAD_CHECK_PARAM
  return status::ok();
}

}  // namespace detail

template <class T, memory_space S>
status check_moe_params(const moe_options& opt, const moe_params<T, S>& p) {
  return detail::check_parameter_set(opt, p, false);
}

template <class T, memory_space S>
status check_moe_grads(const moe_options& opt, const moe_grads<T, S>& g) {
  return detail::check_parameter_set(opt, g, true);
}

/// An input batch [T, d] (x or dy): shape and non-negative strides.
template <class T, memory_space S>
status check_batch_input(const moe_options& opt, const strided_view<T, 2, S>& v, index_t tokens,
                         const char* bad_shape, const char* null_data, const char* bad_stride) {
  if (v.extent(0) != tokens || v.extent(1) != opt.d_model)
    return {status_code::invalid_shape, bad_shape};
  if (!has_data(v)) return {status_code::null_pointer, null_data};
  if (!strides_nonnegative(v)) return {status_code::invalid_stride, bad_stride};
  return status::ok();
}

/// An output batch [T, d] (y or dx): shape and distinct addresses.
template <class T, memory_space S>
status check_batch_output(const moe_options& opt, const strided_view<T, 2, S>& v, index_t tokens,
                          const char* bad_shape, const char* null_data, const char* bad_stride) {
  if (v.extent(0) != tokens || v.extent(1) != opt.d_model)
    return {status_code::invalid_shape, bad_shape};
  if (!has_data(v)) return {status_code::null_pointer, null_data};
  if (!writable_without_overlap(v)) return {status_code::invalid_stride, bad_stride};
  return status::ok();
}

/// The caller's context buffer (forward writes it, backward reads it): contiguous, large enough,
/// aligned to `alignment` bytes.
template <class B, memory_space S>
status check_context(const strided_view<B, 1, S>& ctx, std::size_t needed, std::size_t alignment) {
  if (needed == 0) return status::ok();
  if (ctx.data_handle() == nullptr) return {status_code::null_pointer, "context: null data"};
  if (ctx.extent(0) > 1 && ctx.stride(0) != 1)
    return {status_code::invalid_stride, "context: must be contiguous bytes"};
  if (static_cast<std::size_t>(ctx.extent(0)) < needed)
    return {status_code::workspace_too_small,
            "context: smaller than the size query (moe_context_bytes) says"};
  if (reinterpret_cast<std::uintptr_t>(ctx.data_handle()) % alignment != 0)
    return {status_code::misaligned, "context: not aligned to 256 bytes"};
  return status::ok();
}

/// A digest of the estimator's traits and rule, kept in a layer context so that a backward run
/// with another estimator than the forward is refused (not a cryptographic hash). Used by the CPU
/// and the CUDA layer.
template <class Est>
std::uint64_t estimator_fingerprint() {
  using R = typename Est::rule;
  std::uint64_t h = 0xcbf29ce484222325ULL;
  auto mix = [&h](double v) {
    std::uint64_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    h = (h ^ bits) * 0x100000001b3ULL;
  };
  mix(Est::sampled);
  mix(Est::jitter_mask);
  mix(Est::per_slot_softmax);
  mix(Est::noisy);
  mix(Est::weight);
  mix(R::num_nodes);
  for (int n = 0; n < R::num_nodes; ++n) {
    mix(R::scale(n));
    mix(R::probability(n));
  }
  return h;
}

/// [lo, hi) bytes a view can touch (empty for an empty view); strides already non-negative.
struct byte_span {
  std::uintptr_t lo = 0, hi = 0;
};

template <class V>
byte_span span_of(const V& v) {
  if (v.size() == 0 || v.data_handle() == nullptr) return {};
  index_t last = 0;
  for (int i = 0; i < V::rank; ++i) last += (v.extent(i) - 1) * v.stride(i);
  const auto lo = reinterpret_cast<std::uintptr_t>(v.data_handle());
  return {lo, lo + static_cast<std::uintptr_t>(last + 1) * sizeof(typename V::element_type)};
}

inline byte_span span_of_bytes(const void* p, std::size_t bytes) {
  if (p == nullptr || bytes == 0) return {};
  const auto lo = reinterpret_cast<std::uintptr_t>(p);
  return {lo, lo + bytes};
}

inline bool overlap(byte_span a, byte_span b) {
  return a.lo < a.hi && b.lo < b.hi && a.lo < b.hi && b.lo < a.hi;
}

inline bool overlaps_any(byte_span a, const std::vector<byte_span>& others) {
  for (const byte_span& b : others)
    if (overlap(a, b)) return true;
  return false;
}

/// The spans of a parameter (or gradient) set, ω only when used.
template <class P>
std::vector<byte_span> spans_of_set(const moe_options& opt, const P& p) {
  std::vector<byte_span> s{span_of(p.router_weight),
                           span_of(p.router_bias),
                           span_of(p.w1),
                           span_of(p.b1),
                           span_of(p.w2),
                           span_of(p.b2)};
  if (opt.use_omega) s.push_back(span_of(p.omega));
  return s;
}

/// The forward's outputs (y, the context) may not share memory with its inputs (x, the
/// parameters) or with each other (address ranges; any overlap is refused).
template <class T, memory_space S>
status check_moe_forward_overlaps(const moe_options& opt, const moe_params<T, S>& params,
                                  const strided_view<const T, 2, S>& x,
                                  const strided_view<T, 2, S>& y, const void* context,
                                  std::size_t context_bytes) {
  const byte_span ys = span_of(y), xs = span_of(x), cs = span_of_bytes(context, context_bytes);
  const std::vector<byte_span> ps = spans_of_set(opt, params);
  if (overlap(ys, xs)) return {status_code::invalid_argument, "y: overlaps x"};
  if (overlaps_any(ys, ps)) return {status_code::invalid_argument, "y: overlaps a parameter"};
  if (overlap(cs, xs) || overlap(cs, ys) || overlaps_any(cs, ps))
    return {status_code::invalid_argument, "context: overlaps x, y or a parameter"};
  return status::ok();
}

/// The backward's outputs (dx, the gradients) may not share memory with its inputs (x, dy, the
/// parameters, the context) or with each other.
template <class T, memory_space S>
status check_moe_backward_overlaps(const moe_options& opt, const moe_params<T, S>& params,
                                   const strided_view<const T, 2, S>& x,
                                   const strided_view<const T, 2, S>& dy, const void* context,
                                   std::size_t context_bytes, const moe_grads<T, S>& grads,
                                   const strided_view<T, 2, S>& dx) {
  std::vector<byte_span> inputs = spans_of_set(opt, params);
  inputs.push_back(span_of(x));
  inputs.push_back(span_of(dy));
  inputs.push_back(span_of_bytes(context, context_bytes));
  const std::vector<byte_span> gs = spans_of_set(opt, grads);
  const byte_span dxs = span_of(dx);
  if (overlaps_any(dxs, inputs))
    return {status_code::invalid_argument,
            "dx: overlaps an input (x, dy, a parameter or the context)"};
  if (overlaps_any(dxs, gs)) return {status_code::invalid_argument, "dx: overlaps a gradient"};
  for (std::size_t i = 0; i < gs.size(); ++i) {
    if (overlaps_any(gs[i], inputs))
      return {status_code::invalid_argument,
              "grads: a gradient overlaps an input (x, dy, a parameter or the context)"};
    for (std::size_t j = i + 1; j < gs.size(); ++j)
      if (overlap(gs[i], gs[j]))
        return {status_code::invalid_argument, "grads: two gradients overlap"};
  }
  return status::ok();
}

}  // namespace routegrad::validation
