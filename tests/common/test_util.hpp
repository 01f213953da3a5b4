// Small helpers shared by the CPU tests: fixed-seed random logits, a batch that owns every buffer a
// routing call reads or writes (with views onto them), poisoning buffers with a sentinel and
// checking they were left alone, bitwise comparison, the list of estimators, and a few SPEC
// formulas in double (masked softmax, the jitter mask, a slot's candidate set).
//
// Independent of the library's internals on purpose: the tests check the library against these.
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <routegrad/routegrad.hpp>

namespace routegrad::test {

/// Concatenates its arguments through a stream (for INFO / CAPTURE labels).
template <class... A>
std::string cat(const A&... a) {
  std::ostringstream os;
  (os << ... << a);
  return os.str();
}

// ---------------------------------------------------------------------------------------------
// Estimators
// ---------------------------------------------------------------------------------------------

template <class Est>
struct estimator_tag {
  using type = Est;
};

template <class Est>
inline const char* estimator_name() {
  if constexpr (std::is_same_v<Est, switch_router>)
    return "switch";
  else if constexpr (std::is_same_v<Est, topk_softmax>)
    return "topk_softmax";
  else if constexpr (std::is_same_v<Est, sparsemixer_euler>)
    return "sparsemixer_euler";
  else if constexpr (std::is_same_v<Est, sparsemixer_midpoint>)
    return "sparsemixer_midpoint";
  else if constexpr (std::is_same_v<Est, sparsemixer_heun3>)
    return "sparsemixer_heun3";
  else
    return "other";
}

/// Calls f(estimator_tag<Est>{}) for every estimator the library ships.
template <class F>
void for_each_estimator(F&& f) {
  f(estimator_tag<switch_router>{});
  f(estimator_tag<topk_softmax>{});
  f(estimator_tag<sparsemixer_euler>{});
  f(estimator_tag<sparsemixer_midpoint>{});
  f(estimator_tag<sparsemixer_heun3>{});
}

// ---------------------------------------------------------------------------------------------
// Buffers
// ---------------------------------------------------------------------------------------------

/// Fixed-seed logits uniform in [lo, hi), row-major [rows, cols]. Every value is exactly
/// representable in float, so float and double storage hold the same numbers.
template <class T>
std::vector<T> random_logits(std::uint64_t seed, index_t rows, index_t cols, double lo = -3.0,
                             double hi = 3.0) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<T> v(static_cast<std::size_t>(rows * cols));
  for (T& x : v) x = static_cast<T>(static_cast<float>(dist(gen)));
  return v;
}

inline constexpr unsigned char poison_byte = 0xA5;

/// Fills every byte with the sentinel 0xA5 (a finite value for float/double, a negative one for
/// int32, 165 for uint8).
template <class T>
void poison(std::vector<T>& v) {
  if (!v.empty()) std::memset(static_cast<void*>(v.data()), poison_byte, v.size() * sizeof(T));
}
template <class T>
void poison_value(T& x) {
  std::memset(static_cast<void*>(&x), poison_byte, sizeof(T));
}

template <class T>
bool is_poisoned(const std::vector<T>& v) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(v.data());
  for (std::size_t i = 0; i < v.size() * sizeof(T); ++i)
    if (p[i] != poison_byte) return false;
  return true;
}
template <class T>
bool is_poisoned_value(const T& x) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(&x);
  for (std::size_t i = 0; i < sizeof(T); ++i)
    if (p[i] != poison_byte) return false;
  return true;
}

template <class T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}
template <class T>
bool bitwise_equal_value(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

/// Every buffer of one routing step on a contiguous [rows, cols] batch with k slots: the logits,
/// the state (experts, coins, rng), the gates, the gate gradients (fixed-seed random) and the
/// logit gradients, and every stat. Views are rebuilt from the vectors on each call.
template <class T>
struct routing_batch {
  index_t rows = 0;
  index_t cols = 0;
  int k = 1;
  std::vector<T> logits;
  std::vector<std::int32_t> experts;
  std::vector<std::uint8_t> coins;
  std::vector<T> gates;
  std::vector<T> grad_gates;
  std::vector<T> grad_logits;
  std::vector<std::int64_t> counts;
  double load_balance_loss = 0.0;
  double z_loss = 0.0;
  std::int64_t nonfinite_rows = 0;
  rng_stream rng{};
  const std::uint64_t* offset_counter = nullptr;
  bool with_coins = true;

  routing_batch() = default;
  routing_batch(std::vector<T> z, index_t rows_, index_t cols_, int k_,
                std::uint64_t grad_seed = 12345)
      : rows(rows_), cols(cols_), k(k_), logits(std::move(z)) {
    const std::size_t tk = static_cast<std::size_t>(rows * k);
    experts.assign(tk, -7);
    coins.assign(tk, 0xEE);
    gates.assign(tk, T(-3));
    grad_gates = random_logits<T>(grad_seed, rows, k, -1.0, 1.0);
    grad_logits.assign(static_cast<std::size_t>(rows * cols), T(0));
    counts.assign(static_cast<std::size_t>(cols), -1);
  }

  host_view<const T, 2> logits_view() const {
    return host_matrix<const T>(logits.data(), rows, cols);
  }
  host_routing_state state() {
    host_routing_state s;
    s.experts = host_matrix(experts.data(), rows, k);
    if (with_coins) s.coins = host_matrix(coins.data(), rows, k);
    s.rng = rng;
    s.offset_counter = offset_counter;
    return s;
  }
  host_routing_stats stats() {
    host_routing_stats s;
    s.expert_counts = counts.data();
    s.load_balance_loss = &load_balance_loss;
    s.z_loss = &z_loss;
    s.nonfinite_rows = &nonfinite_rows;
    return s;
  }

  template <class Est>
  status forward(const routing_options& opt, const cpu::execution& exec = {}) {
    return routegrad::route_forward<Est>(opt, logits_view(), state(),
                                         host_matrix(gates.data(), rows, k), stats(), exec);
  }
  template <class Est>
  status backward(const routing_options& opt, grad_mode mode = grad_mode::overwrite,
                  const cpu::execution& exec = {}) {
    return routegrad::route_backward<Est>(
        opt, logits_view(), state(), host_matrix<const T>(grad_gates.data(), rows, k),
        host_matrix(grad_logits.data(), rows, cols), mode, stats(), exec);
  }

  std::int32_t expert(index_t t, int j) const {
    return experts[static_cast<std::size_t>(t * k + j)];
  }
  int coin(index_t t, int j) const { return coins[static_cast<std::size_t>(t * k + j)]; }
  T gate(index_t t, int j) const { return gates[static_cast<std::size_t>(t * k + j)]; }
  T logit(index_t t, index_t e) const { return logits[static_cast<std::size_t>(t * cols + e)]; }
  T grad(index_t t, index_t e) const { return grad_logits[static_cast<std::size_t>(t * cols + e)]; }
};

/// Everything a routing call produced, for bitwise comparison of two runs.
template <class T>
struct routing_result {
  std::vector<std::int32_t> experts;
  std::vector<std::uint8_t> coins;
  std::vector<T> gates;
  std::vector<T> grad_logits;
  std::vector<std::int64_t> counts;
  double load_balance_loss;
  double z_loss;
  std::int64_t nonfinite_rows;

  static routing_result of(const routing_batch<T>& b) {
    return {b.experts,           b.coins,  b.gates,         b.grad_logits, b.counts,
            b.load_balance_loss, b.z_loss, b.nonfinite_rows};
  }
};

/// Rows [r0, r1) of a row-major [rows, cols] vector.
template <class T>
std::vector<T> slice_rows(const std::vector<T>& v, index_t cols, index_t r0, index_t r1) {
  return std::vector<T>(v.begin() + static_cast<std::ptrdiff_t>(r0 * cols),
                        v.begin() + static_cast<std::ptrdiff_t>(r1 * cols));
}

// ---------------------------------------------------------------------------------------------
// SPEC formulas in double (sections 1-2), for one row.
// ---------------------------------------------------------------------------------------------

using dvec = std::vector<double>;

/// SPEC §2 mask over `cand` (already without chosen / non-finite experts), m = max over cand.
inline std::vector<bool> spec_mask(const dvec& z, std::vector<bool> cand, double eps) {
  double m = -std::numeric_limits<double>::infinity();
  for (std::size_t i = 0; i < z.size(); ++i)
    if (cand[i]) m = std::max(m, z[i]);
  for (std::size_t i = 0; i < z.size(); ++i) {
    if (!cand[i]) continue;
    const double den = std::max(std::fabs(z[i]), m);
    const double ratio = den == 0.0 ? 0.0 : (m - z[i]) / den;
    if (ratio > 2.0 * eps) cand[i] = false;
  }
  return cand;
}

/// SparseMixer slot candidates: finite logits, not in `chosen`, then the mask.
inline std::vector<bool> spec_slot_candidates(const dvec& z, const std::vector<int>& chosen,
                                              double eps) {
  std::vector<bool> cand(z.size());
  for (std::size_t i = 0; i < z.size(); ++i) cand[i] = std::isfinite(z[i]);
  for (int c : chosen) cand[static_cast<std::size_t>(c)] = false;
  return spec_mask(z, cand, eps);
}

/// softmax of z over S (0 off S).
inline dvec spec_softmax(const dvec& z, const std::vector<bool>& S) {
  double m = -std::numeric_limits<double>::infinity();
  for (std::size_t i = 0; i < z.size(); ++i)
    if (S[i]) m = std::max(m, z[i]);
  dvec p(z.size(), 0.0);
  double s = 0.0;
  for (std::size_t i = 0; i < z.size(); ++i)
    if (S[i]) s += (p[i] = std::exp(z[i] - m));
  for (double& x : p) x /= s;
  return p;
}

/// argmax over S, ties to the lowest index; -1 when S is empty.
inline int spec_argmax(const dvec& z, const std::vector<bool>& S) {
  int best = -1;
  for (std::size_t i = 0; i < z.size(); ++i)
    if (S[i] && (best < 0 || z[i] > z[static_cast<std::size_t>(best)])) best = static_cast<int>(i);
  return best;
}

/// The k largest entries of z, largest first, ties to the lower index.
inline std::vector<int> spec_top_k(const dvec& z, int k) {
  std::vector<int> idx(z.size());
  for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int>(i);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) {
    return z[static_cast<std::size_t>(a)] > z[static_cast<std::size_t>(b)];
  });
  idx.resize(static_cast<std::size_t>(k));
  return idx;
}

template <class T>
dvec row_as_double(const std::vector<T>& logits, index_t cols, index_t t) {
  dvec z(static_cast<std::size_t>(cols));
  for (index_t e = 0; e < cols; ++e)
    z[static_cast<std::size_t>(e)] =
        static_cast<double>(logits[static_cast<std::size_t>(t * cols + e)]);
  return z;
}

/// Whether `name` occurs in `message` as a whole argument name (not inside a longer identifier:
/// "gates" does not match "grad_gates").
inline bool names_argument(const char* message, const std::string& name) {
  const std::string m = message ? message : "";
  auto ident = [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.';
  };
  for (std::size_t pos = m.find(name); pos != std::string::npos; pos = m.find(name, pos + 1)) {
    const bool left = pos == 0 || !ident(m[pos - 1]);
    const std::size_t end = pos + name.size();
    const bool right =
        end >= m.size() || !(std::isalnum(static_cast<unsigned char>(m[end])) || m[end] == '_');
    if (left && right) return true;
  }
  return false;
}

}  // namespace routegrad::test
