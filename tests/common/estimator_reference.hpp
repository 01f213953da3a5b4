// Double-precision per-token forward gates and backward logit gradients of every estimator of
// SPEC.md section 4, for GIVEN choices and coin scales (no randomness), plus the logit losses of
// SPEC section 5 for a whole [T, E] batch. Independent of the library's code: the library's
// output is compared against these.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <numeric>
#include <vector>

#include "common/reference.hpp"

namespace routegrad::test::ref {

enum class kind { switch_, topk_softmax, sparsemixer };

/// The k largest entries of `scores`, largest first, ties to the lower index.
inline std::vector<int> top_k(const vec& scores, int k) {
  std::vector<int> idx(scores.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int x, int y) {
    return scores[static_cast<std::size_t>(x)] > scores[static_cast<std::size_t>(y)];
  });
  idx.resize(static_cast<std::size_t>(k));
  return idx;
}

/// Everything one token needs. Fields a kind does not use are ignored.
struct token_args {
  kind estimator = kind::sparsemixer;
  rule r = euler_rule();  ///< sparsemixer: backward weight r.w (nodes unused: the scales are given)
  vec z;                  ///< logits row, size E (never modified)
  int k = 1;
  double eps = 0.1;         ///< sparsemixer jitter mask (no_mask: none)
  std::vector<int> chosen;  ///< D_1..D_k. sparsemixer: required. topk/switch: empty = compute top-k
  vec scales;               ///< sparsemixer coin scales c_1..c_k actually used; empty = all 1
  bool renormalize = false;  ///< g~_j = g_j / sum_l g_l
  vec noise;                 ///< switch: E multipliers; empty = all ones (eval)
};

/// What slot j saw: its candidate set, the softmax over it, its argmax a_j.
struct slot_info {
  index_set cand;
  vec pi;
  int argmax;
};

struct token_forward {
  std::vector<int> experts;      ///< D_1..D_k
  vec raw_gates;                 ///< g_j before renormalisation
  vec gates;                     ///< what the layer uses (= raw_gates unless renormalize)
  std::vector<slot_info> slots;  ///< per slot (topk/switch: the same full softmax for every slot)
};

/// SparseMixer slot j: candidates = finite logits minus D_1..D_{j-1}, then the jitter mask over
/// those (m_j = max of the experts not yet chosen, |z_i| original); pi^(j) = softmax over them.
/// `chosen` may be shorter than k only for the slots it covers (slot j needs D_1..D_{j-1}).
inline std::vector<slot_info> sparsemixer_slots(const vec& z, int k, double eps,
                                                const std::vector<int>& chosen) {
  std::vector<slot_info> out;
  std::vector<int> before;
  for (int j = 0; j < k; ++j) {
    slot_info s;
    s.cand = slot_candidates(z, eps, before);
    s.pi = softmax(z, s.cand);
    s.argmax = argmax(z, s.cand);
    out.push_back(s);
    if (static_cast<std::size_t>(j) < chosen.size())
      before.push_back(chosen[static_cast<std::size_t>(j)]);
  }
  return out;
}

/// Noisy logits of switch: z_i * noise_i (noise empty: z itself).
inline vec switch_logits(const token_args& a) {
  vec zh = a.z;
  if (!a.noise.empty())
    for (std::size_t i = 0; i < zh.size(); ++i) zh[i] *= a.noise[i];
  return zh;
}

/// Forward: chosen experts and gates. For sparsemixer the gate of slot j is c_j pi^(j)_{D_j}
/// (0 if D_j is not a candidate of its slot, which is a caller error). For topk_softmax and
/// switch, pi = softmax over all (finite) logits - noisy ones for switch - and g_j = pi_{D_j}.
inline token_forward forward(const token_args& a) {
  token_forward out;
  const std::size_t kk = static_cast<std::size_t>(a.k);
  if (a.estimator == kind::sparsemixer) {
    out.experts = a.chosen;
    out.slots = sparsemixer_slots(a.z, a.k, a.eps, a.chosen);
    for (std::size_t j = 0; j < kk; ++j) {
      const double c = a.scales.empty() ? 1.0 : a.scales[j];
      out.raw_gates.push_back(c * out.slots[j].pi[static_cast<std::size_t>(a.chosen[j])]);
    }
  } else {
    const vec zz = (a.estimator == kind::switch_) ? switch_logits(a) : a.z;
    slot_info s;
    s.cand = usable_experts(zz);
    s.pi = softmax(zz, s.cand);
    s.argmax = argmax(zz, s.cand);
    out.experts = a.chosen.empty() ? top_k(s.pi, a.k) : a.chosen;
    out.slots.assign(kk, s);
    for (std::size_t j = 0; j < kk; ++j)
      out.raw_gates.push_back(s.pi[static_cast<std::size_t>(out.experts[j])]);
  }
  out.gates = out.raw_gates;
  if (a.renormalize) {
    double sum = 0.0;
    for (double g : out.raw_gates) sum += g;
    for (double& g : out.gates) g = (sum == 0.0) ? 0.0 : g / sum;
  }
  return out;
}

/// Backward: dL/dz (size E) from the gradients w.r.t. the gates forward() returns
/// (w.r.t. the renormalised gates when a.renormalize).
///   sparsemixer:  sum_j w G_j J^(j)_{D_j}(i)
///   topk_softmax: sum_j G_j J_{D_j}(i)                (exact chain rule)
///   switch:       sum_j G_j J_{D_j}(i) noise_i        (exact chain rule through the noise)
///   renormalize:  first G_j = (G~_j - sum_l G~_l g~_l) / sum_l g_l  (all zero when sum_l g_l = 0).
inline vec backward(const token_args& a, const vec& gate_grads) {
  const token_forward fw = forward(a);
  const std::size_t n = a.z.size();
  const std::size_t kk = static_cast<std::size_t>(a.k);
  vec dz(n, 0.0);
  vec G = gate_grads;
  if (a.renormalize) {
    double sum = 0.0;
    double Gg = 0.0;
    for (std::size_t j = 0; j < kk; ++j) {
      sum += fw.raw_gates[j];
      Gg += gate_grads[j] * fw.gates[j];
    }
    if (sum == 0.0) return dz;
    for (std::size_t j = 0; j < kk; ++j) G[j] = (gate_grads[j] - Gg) / sum;
  }
  const double w = (a.estimator == kind::sparsemixer) ? a.r.w : 1.0;
  for (std::size_t j = 0; j < kk; ++j) {
    const slot_info& s = fw.slots[j];
    const vec J = softmax_jacobian_row(s.pi, s.cand, fw.experts[j]);
    for (std::size_t i = 0; i < n; ++i) {
      const double chain = (a.estimator == kind::switch_ && !a.noise.empty()) ? a.noise[i] : 1.0;
      dz[i] += w * G[j] * J[i] * chain;
    }
  }
  return dz;
}

// ---------------------------------------------------------------------------------------------
// SPEC section 5: losses on the logits of a whole [T, E] batch (row-major).
// ---------------------------------------------------------------------------------------------

struct loss_and_grad {
  double value;
  vec grad;  ///< d value / d logits, [T, E] row-major
};

/// Load balancing (Switch): L_aux = alpha E sum_e f_e P_e, f_e = count_e / (T k) over every
/// (token, slot) in `chosen` ([T, k] row-major), P_e = mean_t softmax(z_t)_e (all E, no mask).
/// Gradient with f constant: alpha E / T * p_{t,i} (f_i - sum_e f_e p_{t,e}).
inline loss_and_grad load_balancing_loss(const vec& logits, int T, int E,
                                         const std::vector<int>& chosen, int k, double alpha) {
  const std::size_t nT = static_cast<std::size_t>(T);
  const std::size_t nE = static_cast<std::size_t>(E);
  loss_and_grad out{0.0, vec(nT * nE, 0.0)};
  if (T == 0) return out;
  vec f(nE, 0.0);
  for (int e : chosen) f[static_cast<std::size_t>(e)] += 1.0 / (static_cast<double>(T) * k);
  vec P(nE, 0.0);
  for (std::size_t t = 0; t < nT; ++t) {
    const vec row(logits.begin() + static_cast<std::ptrdiff_t>(t * nE),
                  logits.begin() + static_cast<std::ptrdiff_t>((t + 1) * nE));
    const vec p = softmax(row, index_set(nE, true));
    double fp = 0.0;
    for (std::size_t e = 0; e < nE; ++e) {
      P[e] += p[e] / T;
      fp += f[e] * p[e];
    }
    for (std::size_t i = 0; i < nE; ++i) out.grad[t * nE + i] = alpha * E / T * p[i] * (f[i] - fp);
  }
  for (std::size_t e = 0; e < nE; ++e) out.value += alpha * E * f[e] * P[e];
  return out;
}

/// Router z-loss (ST-MoE): L_z = beta mean_t (logsumexp_t)^2; gradient beta (2/T) lse_t p_{t,i}.
inline loss_and_grad z_loss(const vec& logits, int T, int E, double beta) {
  const std::size_t nT = static_cast<std::size_t>(T);
  const std::size_t nE = static_cast<std::size_t>(E);
  loss_and_grad out{0.0, vec(nT * nE, 0.0)};
  if (T == 0) return out;
  for (std::size_t t = 0; t < nT; ++t) {
    double m = -std::numeric_limits<double>::infinity();
    for (std::size_t e = 0; e < nE; ++e) m = std::max(m, logits[t * nE + e]);
    double s = 0.0;
    for (std::size_t e = 0; e < nE; ++e) s += std::exp(logits[t * nE + e] - m);
    const double lse = m + std::log(s);
    out.value += beta * lse * lse / T;
    for (std::size_t i = 0; i < nE; ++i) {
      const double p = std::exp(logits[t * nE + i] - lse);
      out.grad[t * nE + i] = beta * 2.0 / T * lse * p;
    }
  }
  return out;
}

}  // namespace routegrad::test::ref
