// The CPU MoE layer behind the plain interface of moe_cpu_bridge.hpp (host compiler, Eigen).
#include "cuda/moe_cpu_bridge.hpp"

#include <routegrad/moe/api.hpp>

namespace routegrad::test::gpu {
namespace {

template <class T>
std::vector<T> as(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}
template <class T>
std::vector<double> back(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

template <class Est, class T>
cpu_result run(const cpu_problem& p) {
  const moe_options& o = p.opt;
  const index_t n = p.tokens, E = o.experts, d = o.d_model, h = o.d_hidden, h1 = w1_rows(o);
  const int k = o.routing.k;
  const std::vector<T> x = as<T>(p.x), dy = as<T>(p.dy), wr = as<T>(p.router_weight),
                       br = as<T>(p.router_bias), w1 = as<T>(p.w1), b1 = as<T>(p.b1),
                       w2 = as<T>(p.w2), b2 = as<T>(p.b2), om = as<T>(p.omega);
  host_moe_params<T> params{host_view<const T, 2>(wr.data(), {E, d}),
                            host_view<const T, 1>(br.data(), {E}),
                            host_view<const T, 3>(w1.data(), {E, h1, d}),
                            host_view<const T, 2>(b1.data(), {E, h1}),
                            host_view<const T, 3>(w2.data(), {E, d, h}),
                            host_view<const T, 2>(b2.data(), {E, d}),
                            {}};
  if (o.use_omega) params.omega = host_view<const T, 1>(om.data(), {d});

  cpu_result r;
  r.y.assign(static_cast<std::size_t>(n * d), 0.0);
  std::vector<T> y(static_cast<std::size_t>(n * d));
  r.expert_counts.assign(static_cast<std::size_t>(E), -7);
  r.kept_counts.assign(static_cast<std::size_t>(E), -7);
  const host_moe_stats stats{r.expert_counts.data(),
                             r.kept_counts.data(),
                             &r.dropped,
                             &r.load_balance_loss,
                             &r.z_loss,
                             &r.nonfinite};
  cpu::moe_context<T> ctx(o, n);
  const status f = moe_forward<Est>(o, params, host_view<const T, 2>(x.data(), {n, d}),
                                    host_view<T, 2>(y.data(), {n, d}), p.rng, ctx.view(), stats);
  r.forward_code = static_cast<int>(f.code());
  r.forward_message = f.message();
  if (!f.is_ok()) return r;
  r.y = back(y);
  cpu::moe_saved_state<T> saved;
  if (cpu::read_moe_context<Est, T>(o, n, ctx.cview(), saved).is_ok() && n > 0) {
    for (index_t t = 0; t < n; ++t) {
      for (index_t e = 0; e < E; ++e) r.logits.push_back(static_cast<double>(saved.logits(t, e)));
      for (int j = 0; j < k; ++j) {
        r.experts.push_back(saved.experts(t, j));
        r.coins.push_back(saved.coins(t, j));
        r.gates.push_back(static_cast<double>(saved.gates(t, j)));
        if (o.mix == mixing::sparse) r.rows.push_back(static_cast<std::int64_t>(saved.rows(t, j)));
      }
    }
  }

  // The gradients, started from grad_init (accumulate mode) or zeros.
  std::vector<T> g(gradient_elements(o), T(0));
  if (!p.grad_init.empty()) g = as<T>(p.grad_init);
  std::vector<T> dx(static_cast<std::size_t>(n * d), T(0));
  if (!p.dx_init.empty()) dx = as<T>(p.dx_init);
  T* at = g.data();
  const auto take = [&at](index_t count) {
    T* q = at;
    at += count;
    return q;
  };
  host_moe_grads<T> grads{host_view<T, 2>(take(E * d), {E, d}),
                          host_view<T, 1>(take(E), {E}),
                          host_view<T, 3>(take(E * h1 * d), {E, h1, d}),
                          host_view<T, 2>(take(E * h1), {E, h1}),
                          host_view<T, 3>(take(E * d * h), {E, d, h}),
                          host_view<T, 2>(take(E * d), {E, d}),
                          {}};
  if (o.use_omega) grads.omega = host_view<T, 1>(take(d), {d});
  const status b = moe_backward<Est>(o, params, host_view<const T, 2>(x.data(), {n, d}),
                                     host_view<const T, 2>(dy.data(), {n, d}), ctx.cview(), grads,
                                     host_view<T, 2>(dx.data(), {n, d}), p.mode);
  r.backward_code = static_cast<int>(b.code());
  r.backward_message = b.message();
  if (!b.is_ok()) return r;
  r.dx = back(dx);
  const std::vector<double> all = back(g);
  std::size_t off = 0;
  const auto split = [&](std::vector<double>& out, index_t count) {
    out.assign(all.begin() + static_cast<std::ptrdiff_t>(off),
               all.begin() + static_cast<std::ptrdiff_t>(off + static_cast<std::size_t>(count)));
    off += static_cast<std::size_t>(count);
  };
  split(r.router_weight, E * d);
  split(r.router_bias, E);
  split(r.w1, E * h1 * d);
  split(r.b1, E * h1);
  split(r.w2, E * d * h);
  split(r.b2, E * d);
  if (o.use_omega) split(r.omega, d);
  return r;
}

template <class T>
cpu_result run_in(const cpu_problem& p) {
  switch (p.estimator) {
    case estimator_id::switch_router:
      return run<switch_router, T>(p);
    case estimator_id::topk_softmax:
      return run<topk_softmax, T>(p);
    case estimator_id::euler:
      return run<sparsemixer_euler, T>(p);
    case estimator_id::midpoint:
      return run<sparsemixer_midpoint, T>(p);
    case estimator_id::heun3:
      break;
  }
  return run<sparsemixer_heun3, T>(p);
}

}  // namespace

cpu_result run_cpu_layer(const cpu_problem& problem) {
  return problem.in_double ? run_in<double>(problem) : run_in<float>(problem);
}

}  // namespace routegrad::test::gpu
