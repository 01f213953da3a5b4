// Double-precision reference of the MoE layer (SPEC §6, include/routegrad/moe/options.hpp) for
// GIVEN routing decisions: expert FFNs, the combine, the capacity admission, the gate gradients
// and, given ∂L/∂z, the gradients of every parameter and of x. Plain loops, row-major contiguous
// vectors, only the standard library: independent of the library's code on purpose (the
// activations are written out here again rather than taken from moe/activation.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

namespace routegrad::test::moe_ref {

using vec = std::vector<double>;

enum class act_kind { gelu, silu, swiglu };

inline double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }
inline double gelu(double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); }
inline double gelu_d(double v) {
  const double pi = 3.14159265358979323846;
  return 0.5 * (1.0 + std::erf(v / std::sqrt(2.0))) +
         v * std::exp(-0.5 * v * v) / std::sqrt(2.0 * pi);
}
inline double silu(double v) { return v * sigmoid(v); }
inline double silu_d(double v) { return sigmoid(v) + v * sigmoid(v) * (1.0 - sigmoid(v)); }

/// The layer's parameters, row-major: Wr [E,d], br [E], W1 [E,h1,d], b1 [E,h1], W2 [E,d,h],
/// b2 [E,d], omega [d] (empty: no ω).
struct layer {
  int E = 0, d = 0, h = 0;
  act_kind act = act_kind::gelu;
  vec Wr, br, W1, b1, W2, b2, omega;

  int h1() const { return act == act_kind::swiglu ? 2 * h : h; }
  double om(int c) const { return omega.empty() ? 1.0 : omega[static_cast<std::size_t>(c)]; }
};

/// Gradients (same shapes as layer's parameters) and dx.
struct grads {
  vec Wr, br, W1, b1, W2, b2, omega, dx;

  grads(const layer& L, int T)
      : Wr(static_cast<std::size_t>(L.E * L.d)),
        br(static_cast<std::size_t>(L.E)),
        W1(static_cast<std::size_t>(L.E * L.h1() * L.d)),
        b1(static_cast<std::size_t>(L.E * L.h1())),
        W2(static_cast<std::size_t>(L.E * L.d * L.h)),
        b2(static_cast<std::size_t>(L.E * L.d)),
        omega(L.omega.size()),
        dx(static_cast<std::size_t>(T * L.d)) {}
};

inline std::size_t at(int i, int cols, int j) {
  return static_cast<std::size_t>(i) * static_cast<std::size_t>(cols) + static_cast<std::size_t>(j);
}

/// Router logits z [T,E] = x Wrᵀ + br.
inline vec logits(const layer& L, const vec& x, int T) {
  vec z(static_cast<std::size_t>(T * L.E));
  for (int t = 0; t < T; ++t)
    for (int e = 0; e < L.E; ++e) {
      double s = L.br[static_cast<std::size_t>(e)];
      for (int c = 0; c < L.d; ++c) s += x[at(t, L.d, c)] * L.Wr[at(e, L.d, c)];
      z[at(t, L.E, e)] = s;
    }
  return z;
}

/// One expert on one token: pre-activations, activations, output.
struct expert_eval {
  vec pre, post, out;
};

inline expert_eval expert_forward(const layer& L, int e, const double* x) {
  const int h1 = L.h1();
  expert_eval r{vec(static_cast<std::size_t>(h1)), vec(static_cast<std::size_t>(L.h)),
                vec(static_cast<std::size_t>(L.d))};
  for (int i = 0; i < h1; ++i) {
    double s = L.b1[at(e, h1, i)];
    for (int c = 0; c < L.d; ++c)
      s += L.W1[static_cast<std::size_t>((e * h1 + i) * L.d + c)] * x[c];
    r.pre[static_cast<std::size_t>(i)] = s;
  }
  for (int i = 0; i < L.h; ++i) {
    const double a = r.pre[static_cast<std::size_t>(i)];
    switch (L.act) {
      case act_kind::gelu:
        r.post[static_cast<std::size_t>(i)] = gelu(a);
        break;
      case act_kind::silu:
        r.post[static_cast<std::size_t>(i)] = silu(a);
        break;
      case act_kind::swiglu:
        r.post[static_cast<std::size_t>(i)] = silu(a) * r.pre[static_cast<std::size_t>(L.h + i)];
        break;
    }
  }
  for (int c = 0; c < L.d; ++c) {
    double s = L.b2[at(e, L.d, c)];
    for (int i = 0; i < L.h; ++i)
      s += L.W2[static_cast<std::size_t>((e * L.d + c) * L.h + i)] *
           r.post[static_cast<std::size_t>(i)];
    r.out[static_cast<std::size_t>(c)] = s;
  }
  return r;
}

/// Adds expert e's parameter gradients for one token given dF = ∂L/∂f_e(x) and adds ∂L/∂x to dx.
inline void expert_backward(const layer& L, int e, const double* x, const vec& dF, grads& g,
                            double* dx) {
  const int h1 = L.h1();
  const expert_eval f = expert_forward(L, e, x);
  vec dpost(static_cast<std::size_t>(L.h), 0.0), dpre(static_cast<std::size_t>(h1), 0.0);
  for (int c = 0; c < L.d; ++c) {
    const double gc = dF[static_cast<std::size_t>(c)];
    g.b2[at(e, L.d, c)] += gc;
    for (int i = 0; i < L.h; ++i) {
      g.W2[static_cast<std::size_t>((e * L.d + c) * L.h + i)] +=
          gc * f.post[static_cast<std::size_t>(i)];
      dpost[static_cast<std::size_t>(i)] +=
          gc * L.W2[static_cast<std::size_t>((e * L.d + c) * L.h + i)];
    }
  }
  for (int i = 0; i < L.h; ++i) {
    const double a = f.pre[static_cast<std::size_t>(i)], da = dpost[static_cast<std::size_t>(i)];
    switch (L.act) {
      case act_kind::gelu:
        dpre[static_cast<std::size_t>(i)] = da * gelu_d(a);
        break;
      case act_kind::silu:
        dpre[static_cast<std::size_t>(i)] = da * silu_d(a);
        break;
      case act_kind::swiglu: {
        const double b = f.pre[static_cast<std::size_t>(L.h + i)];
        dpre[static_cast<std::size_t>(i)] = da * b * silu_d(a);
        dpre[static_cast<std::size_t>(L.h + i)] = da * silu(a);
        break;
      }
    }
  }
  for (int i = 0; i < h1; ++i) {
    const double gi = dpre[static_cast<std::size_t>(i)];
    g.b1[at(e, h1, i)] += gi;
    for (int c = 0; c < L.d; ++c) {
      g.W1[static_cast<std::size_t>((e * h1 + i) * L.d + c)] += gi * x[c];
      dx[c] += gi * L.W1[static_cast<std::size_t>((e * h1 + i) * L.d + c)];
    }
  }
}

/// One (token, slot) pair as the layer uses it.
struct pair {
  int expert = 0;
  double gate = 0.0;
  bool kept = false;
};

/// Capacity admission (options.hpp): routed pairs in (slot, token) order, each expert taking at
/// most `capacity`. Returns kept flags [T*k] (pairs with routed = false are never kept).
inline std::vector<bool> admit(const std::vector<int>& experts, const std::vector<bool>& routed,
                               int T, int k, int E, long capacity) {
  std::vector<bool> kept(experts.size(), false);
  std::vector<long> fill(static_cast<std::size_t>(E), 0);
  for (int j = 0; j < k; ++j)
    for (int t = 0; t < T; ++t) {
      const std::size_t p = at(t, k, j);
      if (!routed[p]) continue;
      long& f = fill[static_cast<std::size_t>(experts[p])];
      if (f < capacity) {
        kept[p] = true;
        ++f;
      }
    }
  return kept;
}

/// Sparse forward: y_t = ω ⊙ Σ_j kept g_tj f_{D_tj}(x_t).
inline vec forward(const layer& L, const vec& x, int T, int k, const std::vector<pair>& pairs) {
  vec y(static_cast<std::size_t>(T * L.d), 0.0);
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      const pair& p = pairs[at(t, k, j)];
      if (!p.kept) continue;
      const expert_eval f = expert_forward(L, p.expert, &x[at(t, L.d, 0)]);
      for (int c = 0; c < L.d; ++c)
        y[at(t, L.d, c)] += L.om(c) * p.gate * f.out[static_cast<std::size_t>(c)];
    }
  return y;
}

/// Gate gradients G_tj = Σ_c dy[t,c] ω[c] f_{D_tj}(x_t)[c] for kept pairs, 0 otherwise.
inline vec gate_grads(const layer& L, const vec& x, const vec& dy, int T, int k,
                      const std::vector<pair>& pairs) {
  vec G(static_cast<std::size_t>(T * k), 0.0);
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      const pair& p = pairs[at(t, k, j)];
      if (!p.kept) continue;
      const expert_eval f = expert_forward(L, p.expert, &x[at(t, L.d, 0)]);
      double s = 0.0;
      for (int c = 0; c < L.d; ++c)
        s += dy[at(t, L.d, c)] * L.om(c) * f.out[static_cast<std::size_t>(c)];
      G[at(t, k, j)] = s;
    }
  return G;
}

/// Router part of the backward given dz [T,E]: dWr += dzᵀx, dbr += Σ_t dz_t, dx += dz Wr.
inline void router_backward(const layer& L, const vec& x, const vec& dz, int T, grads& g) {
  for (int t = 0; t < T; ++t)
    for (int e = 0; e < L.E; ++e) {
      const double v = dz[at(t, L.E, e)];
      g.br[static_cast<std::size_t>(e)] += v;
      for (int c = 0; c < L.d; ++c) {
        g.Wr[at(e, L.d, c)] += v * x[at(t, L.d, c)];
        g.dx[at(t, L.d, c)] += v * L.Wr[at(e, L.d, c)];
      }
    }
}

/// Full sparse backward given the decisions and dz = ∂L/∂z (which the caller computes from the
/// gate gradients with the estimator's rule plus the auxiliary terms).
inline grads backward(const layer& L, const vec& x, const vec& dy, int T, int k,
                      const std::vector<pair>& pairs, const vec& dz) {
  grads g(L, T);
  router_backward(L, x, dz, T, g);
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      const pair& p = pairs[at(t, k, j)];
      if (!p.kept) continue;
      const double* xt = &x[at(t, L.d, 0)];
      const expert_eval f = expert_forward(L, p.expert, xt);
      vec dF(static_cast<std::size_t>(L.d));
      for (int c = 0; c < L.d; ++c) {
        dF[static_cast<std::size_t>(c)] = p.gate * dy[at(t, L.d, c)] * L.om(c);
        if (!g.omega.empty())
          g.omega[static_cast<std::size_t>(c)] +=
              dy[at(t, L.d, c)] * p.gate * f.out[static_cast<std::size_t>(c)];
      }
      expert_backward(L, p.expert, xt, dF, g, &g.dx[at(t, L.d, 0)]);
    }
  return g;
}

/// softmax over all E of row t of z.
inline vec softmax_row(const vec& z, int E, int t) {
  double m = -std::numeric_limits<double>::infinity();
  for (int e = 0; e < E; ++e) m = std::max(m, z[at(t, E, e)]);
  vec p(static_cast<std::size_t>(E));
  double s = 0.0;
  for (int e = 0; e < E; ++e) s += (p[static_cast<std::size_t>(e)] = std::exp(z[at(t, E, e)] - m));
  for (double& v : p) v /= s;
  return p;
}

/// Dense forward: y_t = ω ⊙ Σ_e softmax(z_t)_e f_e(x_t).
inline vec dense_forward(const layer& L, const vec& x, int T) {
  const vec z = logits(L, x, T);
  vec y(static_cast<std::size_t>(T * L.d), 0.0);
  for (int t = 0; t < T; ++t) {
    const vec pi = softmax_row(z, L.E, t);
    for (int e = 0; e < L.E; ++e) {
      const expert_eval f = expert_forward(L, e, &x[at(t, L.d, 0)]);
      for (int c = 0; c < L.d; ++c)
        y[at(t, L.d, c)] +=
            L.om(c) * pi[static_cast<std::size_t>(e)] * f.out[static_cast<std::size_t>(c)];
    }
  }
  return y;
}

}  // namespace routegrad::test::moe_ref
