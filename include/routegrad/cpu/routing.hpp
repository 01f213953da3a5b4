// CPU back end of the routing entry points: a loop over tokens (OpenMP when available) running
// the shared per-token rules with one serial lane. Results are bit-identical for any thread
// count: tokens are independent, and every cross-token sum runs over fixed blocks of tokens in
// block order.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(ROUTEGRAD_HAS_OPENMP)
#include <omp.h>
#endif

#include "../estimators/staged_row.hpp"
#include "../estimators/token_backward.hpp"
#include "../estimators/token_forward.hpp"
#include "../routing/options.hpp"
#include "../routing/validate.hpp"

namespace routegrad::cpu {

/// How the CPU back end runs: num_threads = 0 uses OpenMP's default.
struct execution {
  int num_threads = 0;
};

/// The math type for storage type T: double for double, float otherwise.
template <class T>
using math_t = std::conditional_t<std::is_same_v<std::remove_cv_t<T>, double>, double, float>;

/// Tokens per block of the fixed-order reductions (part of the bit-reproducibility contract).
inline constexpr index_t reduction_block = 256;

namespace detail {

template <class G, class M>
struct forward_slots {
  std::int32_t* experts;
  index_t expert_stride;
  std::uint8_t* coins;  // may be null
  index_t coin_stride;
  G* gates;
  index_t gate_stride;

  ROUTEGRAD_HD index_t expert(int j) const { return experts[j * expert_stride]; }
  ROUTEGRAD_HD void record(int j, index_t e, M gate, int coin) {
    experts[j * expert_stride] = static_cast<std::int32_t>(e);
    gates[j * gate_stride] = static_cast<G>(gate);
    if (coins) coins[j * coin_stride] = static_cast<std::uint8_t>(coin);
  }
  ROUTEGRAD_HD M gate(int j) const { return static_cast<M>(gates[j * gate_stride]); }
  ROUTEGRAD_HD void set_gate(int j, M g) { gates[j * gate_stride] = static_cast<G>(g); }
};

template <class GG>
struct backward_slots {
  const std::int32_t* experts;
  index_t expert_stride;
  const std::uint8_t* coins;  // may be null
  index_t coin_stride;
  const GG* grad_gates;
  index_t grad_stride;

  ROUTEGRAD_HD index_t expert(int j) const { return experts[j * expert_stride]; }
  ROUTEGRAD_HD int coin(int j) const { return coins ? coins[j * coin_stride] : 0; }
  ROUTEGRAD_HD GG grad_gate(int j) const { return grad_gates[j * grad_stride]; }
};

template <class M>
struct scratch_grad {
  M* values;
  ROUTEGRAD_HD void set(int i, M v) { values[i] = v; }
  ROUTEGRAD_HD void add(int i, M v) { values[i] += v; }
  ROUTEGRAD_HD void scale(int i, M f) { values[i] *= f; }
};

template <class M>
struct count_fraction {
  const std::int64_t* counts;  // null when the load-balancing term is off
  M inv_pairs;                 // 1 / (T·k)
  ROUTEGRAD_HD M operator()(index_t e) const {
    return counts ? static_cast<M>(counts[e]) * inv_pairs : M(0);
  }
};

/// Runs body(first_token, end_token, block_index, thread_scratch) over fixed blocks of tokens;
/// each thread owns `scratch_size` elements of scratch.
template <class Scratch, class Body>
void for_each_block(index_t rows, const execution& exec, index_t scratch_size, Body body) {
  const index_t blocks = (rows + reduction_block - 1) / reduction_block;
#if defined(ROUTEGRAD_HAS_OPENMP)
  const int threads = exec.num_threads > 0 ? exec.num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(threads) if (blocks > 1)
  {
    std::vector<Scratch> scratch(static_cast<std::size_t>(scratch_size));
#pragma omp for schedule(static)
    for (index_t b = 0; b < blocks; ++b)
      body(b * reduction_block, std::min(rows, (b + 1) * reduction_block), b, scratch.data());
  }
#else
  (void)exec;
  std::vector<Scratch> scratch(static_cast<std::size_t>(scratch_size));
  for (index_t b = 0; b < blocks; ++b)
    body(b * reduction_block, std::min(rows, (b + 1) * reduction_block), b, scratch.data());
#endif
}

/// Copies row t of the logits into `scratch` (contiguous, math type) and, for Switch in
/// training, its jitter into `scratch + n`: each row is read from the caller's memory once, and
/// the jitter costs one Philox block per four experts.
template <class Est, class M, class T>
staged_row<M, Est::noisy> stage_row(const routing_options& opt, const rng_stream& rng,
                                    const host_view<T, 2>& logits, index_t t, M* scratch) {
  const index_t n = logits.extent(1), s = logits.stride(1);
  const T* src = logits.data_handle() + t * logits.stride(0);
  for (index_t e = 0; e < n; ++e) scratch[e] = static_cast<M>(src[e * s]);
  M* noise = nullptr;
  if constexpr (Est::noisy) {
    if (opt.mode == routing_mode::train && opt.jitter_eps > 0.0) {
      noise = scratch + n;
      const M eps = static_cast<M>(opt.jitter_eps);
      for (index_t g = 0; 4 * g < n; ++g) {
        const philox4x32 b = switch_noise_block(rng, t, g);
        for (index_t w = 0; w < 4 && 4 * g + w < n; ++w)
          noise[4 * g + w] = switch_noise_from_word(b.v[w], eps);
      }
    }
  }
  (void)opt, (void)rng;
  return {scratch, static_cast<int>(n), noise};
}

template <class M>
token_params<M> params_of(const routing_options& opt) {
  return {opt.k, opt.mode == routing_mode::train, static_cast<M>(opt.jitter_eps), opt.renormalize};
}

}  // namespace detail

/// Forward of one routing step on host memory. See routegrad::route_forward.
template <class Est, class TL, class G>
status run_forward(const routing_options& opt, host_view<TL, 2> logits,
                   const host_routing_state& state, host_view<G, 2> gates,
                   const host_routing_stats& stats = {}, const execution& exec = {}) {
  ROUTEGRAD_RETURN_IF_ERROR(validation::check_forward<Est>(opt, logits, state, gates));
  const rng_stream rng = rng_with_counter(state.rng, state.offset_counter);
  using T = std::remove_const_t<TL>;
  using M = math_t<T>;
  const index_t rows = logits.extent(0), n = logits.extent(1);
  const index_t blocks = (rows + reduction_block - 1) / reduction_block;
  const bool want_counts = stats.expert_counts != nullptr || stats.load_balance_loss != nullptr;
  const bool want_p = stats.load_balance_loss != nullptr;
  const bool want_lse = stats.z_loss != nullptr;
  // Per-block partial sums, reduced in block order afterwards.
  std::vector<std::int64_t> block_counts(want_counts ? static_cast<std::size_t>(blocks * n) : 0);
  std::vector<double> block_p(want_p ? static_cast<std::size_t>(blocks * n) : 0);
  std::vector<double> block_lse2(want_lse ? static_cast<std::size_t>(blocks) : 0);
  std::vector<std::int64_t> block_bad(static_cast<std::size_t>(blocks));
  const token_params<M> params = detail::params_of<M>(opt);

  detail::for_each_block<M>(rows, exec, 3 * n, [&](index_t t0, index_t t1, index_t b, M* scratch) {
    std::int64_t bad = 0;
    double lse2 = 0.0;
    for (index_t t = t0; t < t1; ++t) {
      const auto row = detail::stage_row<Est>(opt, rng, logits, t, scratch);
      detail::forward_slots<G, M> slots{state.experts.data_handle() + t * state.experts.stride(0),
                                        state.experts.stride(1),
                                        state.coins.data_handle()
                                            ? state.coins.data_handle() + t * state.coins.stride(0)
                                            : nullptr,
                                        state.coins.stride(1),
                                        gates.data_handle() + t * gates.stride(0),
                                        gates.stride(1)};
      const token_outcome outcome =
          token_forward<Est, M>(serial_lanes{}, row, slots, scratch + 2 * n, params, rng, t);
      if (!outcome.complete) ++bad;
      if (!outcome.routable) continue;  // left out of the counts and the loss sums
      if (want_counts)
        for (int j = 0; j < opt.k; ++j) {
          const index_t e = slots.expert(j);
          if (row.clean(e) > -math::infinity<M>())  // slots with a finite choice are routed
            ++block_counts[static_cast<std::size_t>(b * n + e)];
        }
      if (want_p || want_lse) {
        const row_summary<M> summary = summarize_row<M>(serial_lanes{}, row);
        const slot_softmax<M> c = clean_softmax<Est, M>(serial_lanes{}, row, summary.top.value);
        if (want_p)
          for (index_t e = 0; e < n; ++e)
            block_p[static_cast<std::size_t>(b * n + e)] +=
                static_cast<double>(math::exp(row.clean(e) - c.max) / c.norm);
        if (want_lse) {
          const double lse = static_cast<double>(c.max + math::log(c.norm));
          lse2 += lse * lse;
        }
      }
    }
    block_bad[static_cast<std::size_t>(b)] = bad;
    if (want_lse) block_lse2[static_cast<std::size_t>(b)] = lse2;
  });

  std::int64_t bad = 0;
  for (std::int64_t x : block_bad) bad += x;
  if (stats.nonfinite_rows) *stats.nonfinite_rows = bad;
  std::vector<std::int64_t> counts(want_counts ? static_cast<std::size_t>(n) : 0);
  for (index_t b = 0; b < (want_counts ? blocks : 0); ++b)
    for (index_t e = 0; e < n; ++e)
      counts[static_cast<std::size_t>(e)] += block_counts[static_cast<std::size_t>(b * n + e)];
  if (stats.expert_counts)
    for (index_t e = 0; e < n; ++e) stats.expert_counts[e] = counts[static_cast<std::size_t>(e)];
  if (stats.load_balance_loss) {
    double loss = 0.0;
    if (rows > 0) {
      for (index_t e = 0; e < n; ++e) {
        double p = 0.0;
        for (index_t b = 0; b < blocks; ++b) p += block_p[static_cast<std::size_t>(b * n + e)];
        const double f = static_cast<double>(counts[static_cast<std::size_t>(e)]) /
                         (static_cast<double>(rows) * opt.k);
        loss += f * (p / static_cast<double>(rows));
      }
      loss *= opt.load_balance_coef * static_cast<double>(n);
    }
    *stats.load_balance_loss = loss;
  }
  if (stats.z_loss) {
    double s = 0.0;
    for (double x : block_lse2) s += x;
    *stats.z_loss = rows > 0 ? opt.z_loss_coef * s / static_cast<double>(rows) : 0.0;
  }
  return status::ok();
}

/// Backward of one routing step on host memory. See routegrad::route_backward.
template <class Est, class TL, class GG, class GL>
status run_backward(const routing_options& opt, host_view<TL, 2> logits,
                    const host_routing_state& state, host_view<GG, 2> grad_gates,
                    host_view<GL, 2> grad_logits, grad_mode mode = grad_mode::overwrite,
                    const host_routing_stats& stats = {}, const execution& exec = {}) {
  ROUTEGRAD_RETURN_IF_ERROR(
      validation::check_backward<Est>(opt, logits, state, grad_gates, grad_logits, stats));
  const rng_stream rng = rng_with_counter(state.rng, state.offset_counter);
  using T = std::remove_const_t<TL>;
  using M = math_t<T>;
  const index_t rows = logits.extent(0), n = logits.extent(1);
  // The state may come from elsewhere: check its indices and coins before writing anything.
  for (index_t t = 0; t < rows; ++t)
    for (int j = 0; j < opt.k; ++j) {
      const std::int32_t e = state.experts(t, j);
      if (e < 0 || e >= n)
        return {status_code::invalid_argument, "state.experts: an index is outside [0, E)"};
      if (state.coins.data_handle() && state.coins(t, j) > Est::rule::num_nodes)
        return {status_code::invalid_argument, "state.coins: a coin names no node of the rule"};
    }
  const token_params<M> params = detail::params_of<M>(opt);
  const M inv_rows = rows > 0 ? M(1) / static_cast<M>(rows) : M(0);
  const aux_gradient<M, detail::count_fraction<M>> aux{
      static_cast<M>(opt.load_balance_coef) * static_cast<M>(n) * inv_rows,
      M(2) * static_cast<M>(opt.z_loss_coef) * inv_rows,
      {opt.load_balance_coef != 0.0 ? stats.expert_counts : nullptr,
       rows > 0 ? M(1) / (static_cast<M>(rows) * static_cast<M>(opt.k)) : M(0)}};

  detail::for_each_block<M>(rows, exec, 4 * n, [&](index_t t0, index_t t1, index_t, M* scratch) {
    M* grad = scratch + 2 * n;
    for (index_t t = t0; t < t1; ++t) {
      const auto row = detail::stage_row<Est>(opt, rng, logits, t, scratch);
      const detail::backward_slots<std::remove_const_t<GG>> slots{
          state.experts.data_handle() + t * state.experts.stride(0),
          state.experts.stride(1),
          state.coins.data_handle() ? state.coins.data_handle() + t * state.coins.stride(0)
                                    : nullptr,
          state.coins.stride(1),
          grad_gates.data_handle() + t * grad_gates.stride(0),
          grad_gates.stride(1)};
      detail::scratch_grad<M> acc{grad};
      if (!token_backward<Est, M>(serial_lanes{}, row, slots, acc, grad + n, params, aux))
        std::fill(grad, grad + n, M(0));
      GL* out = grad_logits.data_handle() + t * grad_logits.stride(0);
      const index_t s = grad_logits.stride(1);
      if (mode == grad_mode::accumulate)
        for (index_t e = 0; e < n; ++e)
          out[e * s] = static_cast<GL>(static_cast<M>(out[e * s]) + grad[e]);
      else
        for (index_t e = 0; e < n; ++e) out[e * s] = static_cast<GL>(grad[e]);
    }
  });
  return status::ok();
}

}  // namespace routegrad::cpu
