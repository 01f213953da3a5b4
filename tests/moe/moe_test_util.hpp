// Helpers of the MoE layer tests: strided tensors that own their storage (contiguous, padded, or
// with a non-unit innermost stride), and one layer problem that owns every buffer a forward and a
// backward read or write, with fixed-seed random parameters, poisoned outputs, and the double
// reference layer (tests/common/moe_reference.hpp) built from the same numbers.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <doctest/doctest.h>

#include "common/estimator_kinds.hpp"
#include "common/moe_reference.hpp"
#include "common/test_util.hpp"

namespace routegrad::test {

enum class layout {
  contiguous,  // row-major
  padded,      // row-major, every outer stride padded (rank 1: stride 2)
  permuted,    // innermost stride ≠ 1 (rank 1: stride 3, rank 2: column-major, rank 3: each
               // [rows, cols] slab column-major and slabs padded)
};

template <class T, int R>
struct tensor {
  std::array<index_t, R> ext{};
  std::array<index_t, R> str{};
  std::vector<T> buf;

  tensor() = default;
  tensor(std::array<index_t, R> e, layout l, T fill) : ext(e) {
    if (l == layout::contiguous) {
      index_t s = 1;
      for (int i = R - 1; i >= 0; --i) {
        str[i] = s;
        s *= ext[i];
      }
    } else if (l == layout::padded) {
      index_t s = R == 1 ? 2 : 1;
      for (int i = R - 1; i >= 0; --i) {
        str[i] = s;
        s = s * ext[i] + (i == R - 1 ? 3 : 1);
      }
    } else {  // permuted
      if constexpr (R == 1) {
        str[0] = 3;
      } else if constexpr (R == 2) {
        str[0] = 1;
        str[1] = ext[0];
      } else {
        str[1] = 1;
        str[2] = ext[1];
        str[0] = ext[1] * ext[2] + 5;
      }
    }
    index_t span = 1;
    bool empty = false;
    for (int i = 0; i < R; ++i) {
      if (ext[i] == 0) empty = true;
      span += (ext[i] - 1) * str[i];
    }
    buf.assign(static_cast<std::size_t>(empty ? 1 : span + 2), fill);
  }

  index_t count() const {
    index_t n = 1;
    for (int i = 0; i < R; ++i) n *= ext[i];
    return n;
  }
  /// Storage offset of the flat-th element in logical row-major order.
  index_t offset(index_t flat) const {
    index_t o = 0;
    for (int i = R - 1; i >= 0; --i) {
      o += (flat % ext[i]) * str[i];
      flat /= ext[i];
    }
    return o;
  }
  T& operator[](index_t flat) { return buf[static_cast<std::size_t>(offset(flat))]; }
  const T& operator[](index_t flat) const { return buf[static_cast<std::size_t>(offset(flat))]; }

  host_view<T, R> view() {
    index_t e[R], s[R];
    for (int i = 0; i < R; ++i) e[i] = ext[i], s[i] = str[i];
    return host_view<T, R>(buf.data(), e, s);
  }
  host_view<const T, R> cview() const {
    index_t e[R], s[R];
    for (int i = 0; i < R; ++i) e[i] = ext[i], s[i] = str[i];
    return host_view<const T, R>(buf.data(), e, s);
  }
  std::vector<double> values() const {
    std::vector<double> v(static_cast<std::size_t>(count()));
    for (index_t i = 0; i < count(); ++i)
      v[static_cast<std::size_t>(i)] = static_cast<double>((*this)[i]);
    return v;
  }
  void assign(const std::vector<double>& v) {
    for (index_t i = 0; i < count(); ++i)
      (*this)[i] = static_cast<T>(v[static_cast<std::size_t>(i)]);
  }
  void fill_all(T v) { std::fill(buf.begin(), buf.end(), v); }
};

template <class T>
T nan_of() {
  return std::numeric_limits<T>::quiet_NaN();
}

/// Every buffer of one layer problem. Parameters, x and dy are fixed-seed random; outputs and
/// stats are poisoned (NaN / -7) by poison_outputs().
template <class T>
struct moe_case {
  moe_options opt;
  index_t T_ = 0;
  tensor<T, 2> Wr, x, dy, y, dx, gWr, b1, b2, gb1, gb2;
  tensor<T, 1> br, om, gbr, gom;
  tensor<T, 3> W1, W2, gW1, gW2;
  cpu::moe_context<T> ctx;
  std::vector<std::int64_t> counts, kept;
  std::int64_t dropped = 0, nonfinite = 0;
  double lb = 0.0, zl = 0.0;
  rng_stream rng{0x1234, 7, 0};

  moe_case(const moe_options& o, index_t tokens, std::uint64_t seed,
           layout param_layout = layout::contiguous, layout batch_layout = layout::contiguous)
      : opt(o), T_(tokens) {
    const index_t E = o.experts, d = o.d_model, h = o.d_hidden, h1 = w1_rows(o);
    const layout pl = param_layout, bl = batch_layout;
    Wr = tensor<T, 2>({E, d}, pl, T(0));
    br = tensor<T, 1>({E}, pl, T(0));
    W1 = tensor<T, 3>({E, h1, d}, pl, T(0));
    b1 = tensor<T, 2>({E, h1}, pl, T(0));
    W2 = tensor<T, 3>({E, d, h}, pl, T(0));
    b2 = tensor<T, 2>({E, d}, pl, T(0));
    om = tensor<T, 1>({d}, pl, T(0));
    x = tensor<T, 2>({tokens, d}, bl, T(0));
    dy = tensor<T, 2>({tokens, d}, bl, T(0));
    y = tensor<T, 2>({tokens, d}, bl, T(0));
    dx = tensor<T, 2>({tokens, d}, bl, T(0));
    gWr = tensor<T, 2>({E, d}, pl, T(0));
    gbr = tensor<T, 1>({E}, pl, T(0));
    gW1 = tensor<T, 3>({E, h1, d}, pl, T(0));
    gb1 = tensor<T, 2>({E, h1}, pl, T(0));
    gW2 = tensor<T, 3>({E, d, h}, pl, T(0));
    gb2 = tensor<T, 2>({E, d}, pl, T(0));
    gom = tensor<T, 1>({d}, pl, T(0));
    std::mt19937_64 gen(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    std::uniform_real_distribution<double> uni(0.5, 1.5);
    auto fill = [&](auto& t, double scale) {
      for (index_t i = 0; i < t.count(); ++i) t[i] = static_cast<T>(scale * normal(gen));
    };
    fill(Wr, 1.0);
    fill(br, 0.3);
    fill(W1, 1.0 / std::sqrt(static_cast<double>(d)));
    fill(b1, 0.2);
    fill(W2, 1.0 / std::sqrt(static_cast<double>(h)));
    fill(b2, 0.2);
    for (index_t i = 0; i < om.count(); ++i) om[i] = static_cast<T>(uni(gen));
    fill(x, 1.0);
    fill(dy, 1.0);
    counts.assign(static_cast<std::size_t>(E), -7);
    kept.assign(static_cast<std::size_t>(E), -7);
    ctx.resize(o, tokens);
    poison_outputs();
  }

  void poison_outputs() {
    for (auto* t : {&y, &dx, &gWr, &gb1, &gb2}) t->fill_all(nan_of<T>());
    for (auto* t : {&gbr, &gom}) t->fill_all(nan_of<T>());
    for (auto* t : {&gW1, &gW2}) t->fill_all(nan_of<T>());
    std::fill(counts.begin(), counts.end(), -7);
    std::fill(kept.begin(), kept.end(), -7);
    dropped = nonfinite = -7;
    lb = zl = std::numeric_limits<double>::quiet_NaN();
  }

  host_moe_params<T> params() const {
    host_moe_params<T> p{Wr.cview(), br.cview(), W1.cview(), b1.cview(),
                         W2.cview(), b2.cview(), {}};
    if (opt.use_omega) p.omega = om.cview();
    return p;
  }
  host_moe_grads<T> grads() {
    host_moe_grads<T> g{gWr.view(), gbr.view(), gW1.view(), gb1.view(), gW2.view(), gb2.view(), {}};
    if (opt.use_omega) g.omega = gom.view();
    return g;
  }
  host_moe_stats stats() { return {counts.data(), kept.data(), &dropped, &lb, &zl, &nonfinite}; }

  template <class Est>
  status forward(const cpu::execution& exec = {}) {
    return moe_forward<Est>(opt, params(), x.cview(), y.view(), rng, ctx.view(), stats(), exec);
  }
  template <class Est>
  status backward(grad_mode mode = grad_mode::overwrite, const cpu::execution& exec = {}) {
    return moe_backward<Est>(opt, params(), x.cview(), dy.cview(), ctx.cview(), grads(), dx.view(),
                             mode, exec);
  }

  /// L = Σ dy·y + the auxiliary loss values of the last forward.
  double objective() const {
    double s = 0.0;
    for (index_t i = 0; i < y.count(); ++i)
      s += static_cast<double>(dy[i]) * static_cast<double>(y[i]);
    return s + lb + zl;
  }

  template <class Est>
  cpu::moe_saved_state<T> saved() const {
    cpu::moe_saved_state<T> s;
    REQUIRE(cpu::read_moe_context<Est, T>(opt, T_, ctx.cview(), s).is_ok());
    return s;
  }

  moe_ref::layer ref_layer() const {
    moe_ref::layer L;
    L.E = opt.experts;
    L.d = static_cast<int>(opt.d_model);
    L.h = static_cast<int>(opt.d_hidden);
    L.act = opt.act == activation::gelu   ? moe_ref::act_kind::gelu
            : opt.act == activation::silu ? moe_ref::act_kind::silu
                                          : moe_ref::act_kind::swiglu;
    L.Wr = Wr.values();
    L.br = br.values();
    L.W1 = W1.values();
    L.b1 = b1.values();
    L.W2 = W2.values();
    L.b2 = b2.values();
    if (opt.use_omega) L.omega = om.values();
    return L;
  }
};

/// |a − b| ≤ atol + rtol·max(|a|, |b|) for every element; reports the first failure.
inline void check_close(const std::vector<double>& got, const std::vector<double>& want,
                        double rtol, double atol, const char* what) {
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double tol = atol + rtol * std::max(std::fabs(got[i]), std::fabs(want[i]));
    if (!(std::fabs(got[i] - want[i]) <= tol)) {
      FAIL_CHECK(std::string(what) << "[" << i << "]: got " << got[i] << ", want " << want[i]);
      return;
    }
  }
}

/// What check_against_reference saw.
struct reference_summary {
  std::int64_t kept = 0;       // pairs the layer computed
  int sampled_off_argmax = 0;  // slots whose choice is not the slot's argmax
};

/// After c.forward<Est>() and c.backward<Est>() (overwrite), on a problem whose logits are all
/// finite: checks the layer against the double reference for the choices and coins it saved
/// (any routing mode):
///  - z = x Wrᵀ + br; the gates of those choices (estimator_reference.hpp);
///  - the capacity admission ((slot, token) order), the statistics and the loss values;
///  - y; the router gradient = the estimator's rule on the reference's gate gradients (0 for
///    dropped pairs) + the α/β terms; every other gradient and dx.
template <class Est>
reference_summary check_against_reference(const moe_case<double>& c) {
  const moe_options& opt = c.opt;
  const int T = static_cast<int>(c.T_), E = opt.experts, k = opt.routing.k;
  reference_summary out;
  const cpu::moe_saved_state<double> s = c.saved<Est>();
  const moe_ref::layer L = c.ref_layer();
  const moe_ref::vec X = c.x.values(), DY = c.dy.values();

  // Logits: the layer's z against x Wrᵀ + br; the reference then works on the layer's z, so that
  // it sees the same choices.
  const moe_ref::vec z_ref = moe_ref::logits(L, X, T);
  moe_ref::vec z(static_cast<std::size_t>(T * E));
  for (int t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e) z[moe_ref::at(t, E, e)] = s.logits(t, e);
  check_close(z, z_ref, 1e-12, 1e-12, "logits");

  // Gates of the given choices and coins; the capacity admission; the pairs.
  std::vector<ref::token_args> args(static_cast<std::size_t>(T));
  std::vector<int> chosen;
  std::vector<moe_ref::pair> pairs(static_cast<std::size_t>(T * k));
  for (int t = 0; t < T; ++t) {
    ref::token_args& a = args[static_cast<std::size_t>(t)];
    a.estimator = kind_of<Est>();
    a.r = rule_of<Est>();
    a.k = k;
    a.eps = opt.routing.jitter_eps;
    a.renormalize = opt.routing.renormalize;
    a.z.assign(z.begin() + t * E, z.begin() + (t + 1) * E);
    if constexpr (Est::noisy)
      if (opt.routing.mode == routing_mode::train)
        for (int e = 0; e < E; ++e) a.noise.push_back(switch_noise<double>(s.rng, t, e, a.eps));
    for (int j = 0; j < k; ++j) {
      const int d = s.experts(t, j), coin = s.coins(t, j);
      REQUIRE(d >= 0);
      REQUIRE(d < E);
      a.chosen.push_back(d);
      a.scales.push_back(coin == 0 ? 1.0 : Est::rule::scale(coin - 1));
      chosen.push_back(d);
    }
    const ref::token_forward fw = ref::forward(a);
    for (int j = 0; j < k; ++j) {
      const std::size_t sj = static_cast<std::size_t>(j);
      CHECK(s.gates(t, j) == doctest::Approx(fw.gates[sj]).epsilon(1e-12));
      pairs[moe_ref::at(t, k, j)] = {a.chosen[sj], fw.gates[sj], false};
      if (a.chosen[sj] != fw.slots[sj].argmax) ++out.sampled_off_argmax;
    }
  }
  const std::vector<bool> kept = moe_ref::admit(chosen, std::vector<bool>(chosen.size(), true), T,
                                                k, E, static_cast<long>(expert_capacity(opt, T)));
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      const std::size_t p = moe_ref::at(t, k, j);
      pairs[p].kept = kept[p];
      CHECK((s.rows(t, j) >= 0) == kept[p]);
      out.kept += kept[p];
    }

  // Statistics.
  for (int e = 0; e < E; ++e) {
    std::int64_t routed = 0, kept_e = 0;
    for (std::size_t p = 0; p < chosen.size(); ++p)
      if (chosen[p] == e) {
        ++routed;
        kept_e += kept[p];
      }
    CHECK(c.counts[static_cast<std::size_t>(e)] == routed);
    CHECK(c.kept[static_cast<std::size_t>(e)] == kept_e);
  }
  CHECK(c.dropped == T * k - out.kept);
  CHECK(c.nonfinite == 0);

  // Output.
  check_close(c.y.values(), moe_ref::forward(L, X, T, k, pairs), 1e-11, 1e-12, "y");

  // The router gradient: the estimator's rule on the reference's gate gradients, plus α, β.
  const moe_ref::vec G = moe_ref::gate_grads(L, X, DY, T, k, pairs);
  const ref::loss_and_grad lb =
      ref::load_balancing_loss(z, T, E, chosen, k, opt.routing.load_balance_coef);
  const ref::loss_and_grad zl = ref::z_loss(z, T, E, opt.routing.z_loss_coef);
  CHECK(c.lb == doctest::Approx(lb.value).epsilon(1e-12));
  CHECK(c.zl == doctest::Approx(zl.value).epsilon(1e-12));
  moe_ref::vec dz(static_cast<std::size_t>(T * E));
  for (int t = 0; t < T; ++t) {
    const ref::vec Gt(G.begin() + t * k, G.begin() + (t + 1) * k);
    const ref::vec dzt = ref::backward(args[static_cast<std::size_t>(t)], Gt);
    for (int e = 0; e < E; ++e) {
      const std::size_t i = moe_ref::at(t, E, e);
      dz[i] = dzt[static_cast<std::size_t>(e)] + lb.grad[i] + zl.grad[i];
    }
  }
  const moe_ref::grads g = moe_ref::backward(L, X, DY, T, k, pairs, dz);
  check_close(c.gWr.values(), g.Wr, 1e-10, 1e-12, "router_weight");
  check_close(c.gbr.values(), g.br, 1e-10, 1e-12, "router_bias");
  check_close(c.gW1.values(), g.W1, 1e-10, 1e-12, "w1");
  check_close(c.gb1.values(), g.b1, 1e-10, 1e-12, "b1");
  check_close(c.gW2.values(), g.W2, 1e-10, 1e-12, "w2");
  check_close(c.gb2.values(), g.b2, 1e-10, 1e-12, "b2");
  if (opt.use_omega) check_close(c.gom.values(), g.omega, 1e-10, 1e-12, "omega");
  check_close(c.dx.values(), g.dx, 1e-10, 1e-12, "dx");
  return out;
}

}  // namespace routegrad::test
