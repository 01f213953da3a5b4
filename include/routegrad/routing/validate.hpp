// Argument checks shared by every back end (SPEC §7). Each returns the first violated rule as a
// status naming the argument; nothing has been read from or written to the caller's buffers.
#pragma once

#include <cmath>
#include <cstdint>

#include "../core/status.hpp"
#include "../estimators/estimators.hpp"
#include "options.hpp"

namespace routegrad::validation {

/// Strides may not be negative; an input may broadcast (stride 0).
template <class T, int R, memory_space S>
bool strides_nonnegative(const strided_view<T, R, S>& v) {
  for (int i = 0; i < R; ++i)
    if (v.stride(i) < 0) return false;
  return true;
}

/// An output must give every element its own address: each dimension of extent > 1 has a stride
/// of at least the span of the dimensions nested inside it (in either order for rank 2).
template <class T, memory_space S>
bool writable_without_overlap(const strided_view<T, 2, S>& v) {
  if (!strides_nonnegative(v)) return false;
  const index_t n0 = v.extent(0), n1 = v.extent(1), s0 = v.stride(0), s1 = v.stride(1);
  if (n0 <= 1 && n1 <= 1) return true;
  if (n0 <= 1) return s1 >= 1;
  if (n1 <= 1) return s0 >= 1;
  return (s1 >= 1 && s0 >= s1 * n1) || (s0 >= 1 && s1 >= s0 * n0);
}

template <class T, int R, memory_space S>
bool has_data(const strided_view<T, R, S>& v) {
  return v.size() == 0 || v.data_handle() != nullptr;
}

template <class T, memory_space S>
bool shape_is(const strided_view<T, 2, S>& v, index_t rows, index_t cols) {
  return v.extent(0) == rows && v.extent(1) == cols;
}

/// Options and the logits: 1 ≤ k ≤ E, 0 ≤ ε < 0.5, finite coefficients, the counter layout's
/// limits (first_token + T ≤ 2^32, E < 2^24).
template <class T, memory_space S>
status check_options_and_logits(const routing_options& opt, const strided_view<T, 2, S>& logits,
                                const rng_stream& rng) {
  const index_t rows = logits.extent(0), experts = logits.extent(1);
  if (rows < 0 || experts < 0) return {status_code::invalid_shape, "logits: negative extent"};
  if (experts < 1) return {status_code::invalid_shape, "logits: E (extent 1) must be at least 1"};
  if (experts >= (index_t(1) << 24))
    return {status_code::invalid_shape, "logits: E must be below 2^24"};
  if (opt.k < 1 || opt.k > experts)
    return {status_code::invalid_argument, "options.k: must satisfy 1 <= k <= E"};
  if (!(opt.jitter_eps >= 0.0 && opt.jitter_eps < 0.5))
    return {status_code::invalid_argument, "options.jitter_eps: must satisfy 0 <= eps < 0.5"};
  if (!std::isfinite(opt.load_balance_coef))
    return {status_code::invalid_argument, "options.load_balance_coef: must be finite"};
  if (!std::isfinite(opt.z_loss_coef))
    return {status_code::invalid_argument, "options.z_loss_coef: must be finite"};
  if (opt.mode != routing_mode::train && opt.mode != routing_mode::eval)
    return {status_code::invalid_argument, "options.mode: must be train or eval"};
  if (rng.first_token > (std::uint64_t(1) << 32) ||
      static_cast<std::uint64_t>(rows) > (std::uint64_t(1) << 32) - rng.first_token)
    return {status_code::invalid_argument,
            "state.rng.first_token: first_token + T must not exceed 2^32 (Philox counter layout)"};
  if (!strides_nonnegative(logits))
    return {status_code::invalid_stride, "logits: strides must be non-negative"};
  if (!has_data(logits)) return {status_code::null_pointer, "logits: null data"};
  return status::ok();
}

/// The state's experts and coins views against [T, k].
template <class Est, memory_space S>
status check_state_views(const routing_state<S>& state, index_t rows, int k, bool writing) {
  if (!shape_is(state.experts, rows, k))
    return {status_code::invalid_shape, "state.experts: shape must be [T, k]"};
  if (!has_data(state.experts)) return {status_code::null_pointer, "state.experts: null data"};
  if (reinterpret_cast<std::uintptr_t>(state.offset_counter) % alignof(std::uint64_t) != 0)
    return {status_code::misaligned, "state.offset_counter: misaligned"};
  if (writing ? !writable_without_overlap(state.experts) : !strides_nonnegative(state.experts))
    return {status_code::invalid_stride, "state.experts: strides overlap or are negative"};
  const bool coins_given = state.coins.data_handle() != nullptr;
  if (has_coin<Est> && !coins_given && rows > 0)
    return {status_code::null_pointer, "state.coins: required by this estimator"};
  if (coins_given) {
    if (!shape_is(state.coins, rows, k))
      return {status_code::invalid_shape, "state.coins: shape must be [T, k]"};
    if (writing ? !writable_without_overlap(state.coins) : !strides_nonnegative(state.coins))
      return {status_code::invalid_stride, "state.coins: strides overlap or are negative"};
  }
  return status::ok();
}

template <class Est, class TL, class G, memory_space S>
status check_forward(const routing_options& opt, const strided_view<TL, 2, S>& logits,
                     const routing_state<S>& state, const strided_view<G, 2, S>& gates) {
  ROUTEGRAD_RETURN_IF_ERROR(check_options_and_logits(opt, logits, state.rng));
  const index_t rows = logits.extent(0);
  ROUTEGRAD_RETURN_IF_ERROR(check_state_views<Est>(state, rows, opt.k, true));
  if (!shape_is(gates, rows, opt.k))
    return {status_code::invalid_shape, "gates: shape must be [T, k]"};
  if (!has_data(gates)) return {status_code::null_pointer, "gates: null data"};
  if (!writable_without_overlap(gates))
    return {status_code::invalid_stride, "gates: strides overlap or are negative"};
  return status::ok();
}

template <class Est, class TL, class GG, class GL, memory_space S>
status check_backward(const routing_options& opt, const strided_view<TL, 2, S>& logits,
                      const routing_state<S>& state, const strided_view<GG, 2, S>& grad_gates,
                      const strided_view<GL, 2, S>& grad_logits, const routing_stats<S>& stats) {
  ROUTEGRAD_RETURN_IF_ERROR(check_options_and_logits(opt, logits, state.rng));
  const index_t rows = logits.extent(0), experts = logits.extent(1);
  ROUTEGRAD_RETURN_IF_ERROR(check_state_views<Est>(state, rows, opt.k, false));
  if (!shape_is(grad_gates, rows, opt.k))
    return {status_code::invalid_shape, "grad_gates: shape must be [T, k]"};
  if (!has_data(grad_gates)) return {status_code::null_pointer, "grad_gates: null data"};
  if (!strides_nonnegative(grad_gates))
    return {status_code::invalid_stride, "grad_gates: strides must be non-negative"};
  if (!shape_is(grad_logits, rows, experts))
    return {status_code::invalid_shape, "grad_logits: shape must be [T, E] like logits"};
  if (!has_data(grad_logits)) return {status_code::null_pointer, "grad_logits: null data"};
  if (!writable_without_overlap(grad_logits))
    return {status_code::invalid_stride, "grad_logits: strides overlap or are negative"};
  if (opt.load_balance_coef != 0.0 && stats.expert_counts == nullptr && rows > 0)
    return {status_code::null_pointer,
            "stats.expert_counts: the load-balancing gradient needs the forward's counts"};
  return status::ok();
}

}  // namespace routegrad::validation
