// Reproducibility (SPEC §3): the same (seed, offset) gives the same choices, gates, coins and
// gradients bitwise; on any thread count, any batch split (first_token), float or double storage,
// and any strides of the caller's buffers.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/test_util.hpp"

namespace {

using namespace routegrad;
using namespace routegrad::test;

/// A [rows, cols] matrix in a buffer of its own with a chosen layout: row-major or transposed
/// (column-major), with `pad` unused elements after each row (column). The padding is poisoned
/// so that a write outside the view shows.
template <class T>
struct strided_matrix {
  index_t rows, cols;
  bool transposed;
  index_t pad;
  std::vector<T> buf;

  strided_matrix(index_t r, index_t c, bool tr, index_t p)
      : rows(r), cols(c), transposed(tr), pad(p) {
    buf.resize(static_cast<std::size_t>(tr ? c * (r + p) : r * (c + p)));
    poison(buf);
  }
  index_t s0() const { return transposed ? 1 : cols + pad; }
  index_t s1() const { return transposed ? rows + pad : 1; }
  T& at(index_t r, index_t c) { return buf[static_cast<std::size_t>(r * s0() + c * s1())]; }
  host_view<T, 2> view() { return host_matrix(buf.data(), rows, cols, s0(), s1()); }
  host_view<const T, 2> cview() const {
    return host_matrix<const T>(buf.data(), rows, cols, s0(), s1());
  }

  void fill_from(const std::vector<T>& row_major) {
    for (index_t r = 0; r < rows; ++r)
      for (index_t c = 0; c < cols; ++c)
        at(r, c) = row_major[static_cast<std::size_t>(r * cols + c)];
  }
  std::vector<T> to_row_major() {
    std::vector<T> out(static_cast<std::size_t>(rows * cols));
    for (index_t r = 0; r < rows; ++r)
      for (index_t c = 0; c < cols; ++c) out[static_cast<std::size_t>(r * cols + c)] = at(r, c);
    return out;
  }
  /// Whether every element outside the view still holds the sentinel.
  bool padding_untouched() const {
    const index_t line = transposed ? rows + pad : cols + pad;  // elements per row (column)
    const index_t used = transposed ? rows : cols;
    for (std::size_t i = 0; i < buf.size(); ++i) {
      if (static_cast<index_t>(i) % line < used) continue;
      const unsigned char* p = reinterpret_cast<const unsigned char*>(&buf[i]);
      for (std::size_t b = 0; b < sizeof(T); ++b)
        if (p[b] != poison_byte) return false;
    }
    return true;
  }
};

struct layout {
  bool transposed = false;
  index_t pad = 0;
};

struct layouts {
  layout logits, experts, coins, gates, grad_gates, grad_logits;
};

/// Forward + backward on buffers with the given layouts; returns the results in row-major order.
template <class Est, class T>
routing_result<T> run_strided(const std::vector<T>& z, index_t rows, index_t cols, int k,
                              const routing_options& opt, const rng_stream& rng, const layouts& l,
                              bool* padding_ok) {
  strided_matrix<T> logits(rows, cols, l.logits.transposed, l.logits.pad);
  logits.fill_from(z);
  strided_matrix<std::int32_t> experts(rows, k, l.experts.transposed, l.experts.pad);
  strided_matrix<std::uint8_t> coins(rows, k, l.coins.transposed, l.coins.pad);
  strided_matrix<T> gates(rows, k, l.gates.transposed, l.gates.pad);
  strided_matrix<T> grad_gates(rows, k, l.grad_gates.transposed, l.grad_gates.pad);
  grad_gates.fill_from(random_logits<T>(12345, rows, k, -1.0, 1.0));
  strided_matrix<T> grad_logits(rows, cols, l.grad_logits.transposed, l.grad_logits.pad);
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = 0; c < cols; ++c) grad_logits.at(r, c) = T(0);

  routing_result<T> out{};
  out.counts.assign(static_cast<std::size_t>(cols), -1);
  host_routing_stats stats;
  stats.expert_counts = out.counts.data();
  stats.load_balance_loss = &out.load_balance_loss;
  stats.z_loss = &out.z_loss;
  stats.nonfinite_rows = &out.nonfinite_rows;
  host_routing_state state;
  state.experts = experts.view();
  state.coins = coins.view();
  state.rng = rng;
  REQUIRE(routegrad::route_forward<Est>(opt, logits.cview(), state, gates.view(), stats).is_ok());
  REQUIRE(routegrad::route_backward<Est>(opt, logits.cview(), state, grad_gates.cview(),
                                         grad_logits.view(), grad_mode::overwrite, stats)
              .is_ok());
  out.experts = experts.to_row_major();
  out.coins = coins.to_row_major();
  out.gates = gates.to_row_major();
  out.grad_logits = grad_logits.to_row_major();
  *padding_ok = experts.padding_untouched() && coins.padding_untouched() &&
                gates.padding_untouched() && grad_logits.padding_untouched();
  return out;
}

template <class T>
void check_same(const routing_result<T>& a, const routing_result<T>& b, bool compare_stats = true) {
  CHECK(bitwise_equal(a.experts, b.experts));
  CHECK(bitwise_equal(a.coins, b.coins));
  CHECK(bitwise_equal(a.gates, b.gates));
  CHECK(bitwise_equal(a.grad_logits, b.grad_logits));
  if (compare_stats) {
    CHECK(a.counts == b.counts);
    CHECK(bitwise_equal_value(a.load_balance_loss, b.load_balance_loss));
    CHECK(bitwise_equal_value(a.z_loss, b.z_loss));
    CHECK(a.nonfinite_rows == b.nonfinite_rows);
  }
}

/// Logits in [lo, hi) with a few unroutable rows (NaN, all -inf) and rows with -inf entries.
template <class T>
std::vector<T> batch_logits(std::uint64_t seed, index_t rows, index_t cols, double lo, double hi) {
  std::vector<T> z = random_logits<T>(seed, rows, cols, lo, hi);
  const T inf = std::numeric_limits<T>::infinity();
  for (index_t t = 13; t < rows; t += 397)
    z[static_cast<std::size_t>(t * cols + 1)] = std::numeric_limits<T>::quiet_NaN();
  for (index_t t = 101; t < rows; t += 503)
    for (index_t e = 0; e < cols; ++e) z[static_cast<std::size_t>(t * cols + e)] = -inf;
  for (index_t t = 7; t < rows; t += 11) z[static_cast<std::size_t>(t * cols + (t % cols))] = -inf;
  return z;
}

routing_options train_options(int k, double eps) {
  routing_options opt;
  opt.k = k;
  opt.jitter_eps = eps;
  opt.load_balance_coef = 0.01;
  opt.z_loss_coef = 0.001;
  return opt;
}

/// Fraction of (token, slot) pairs whose expert differs.
double fraction_differing(const std::vector<std::int32_t>& a, const std::vector<std::int32_t>& b) {
  std::int64_t n = 0;
  for (std::size_t i = 0; i < a.size(); ++i) n += a[i] != b[i];
  return static_cast<double>(n) / static_cast<double>(a.size());
}

}  // namespace

TEST_CASE("reproducibility: the same seed and offset give bitwise identical results") {
  const index_t rows = 1000, E = 12;
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    for (int k : {1, 3}) {
      INFO(cat(estimator_name<Est>(), " k=", k));
      const routing_options opt = train_options(k, 0.1);
      routing_batch<float> a(batch_logits<float>(3, rows, E, 1.0, 3.0), rows, E, k);
      routing_batch<float> b = a;
      a.rng = b.rng = rng_stream{0x5EEDull, 0x0FF5E7ull, 0};
      REQUIRE(a.forward<Est>(opt).is_ok());
      REQUIRE(a.backward<Est>(opt).is_ok());
      REQUIRE(b.forward<Est>(opt).is_ok());
      REQUIRE(b.backward<Est>(opt).is_ok());
      check_same(routing_result<float>::of(a), routing_result<float>::of(b));
      // Rerunning the forward on the same state buffers reproduces them too.
      routing_batch<float> c = a;
      REQUIRE(c.forward<Est>(opt).is_ok());
      CHECK(bitwise_equal(c.experts, a.experts));
      CHECK(bitwise_equal(c.coins, a.coins));
      CHECK(bitwise_equal(c.gates, a.gates));
    }
  });
}

TEST_CASE("reproducibility: a different offset or seed changes the choices") {
  const index_t rows = 2000, E = 8;
  auto check_changes = [&](auto tag, double lo, double hi) {
    using Est = typename decltype(tag)::type;
    INFO(cat(estimator_name<Est>()));
    routing_options opt;
    opt.k = 2;
    opt.jitter_eps = 0.1;
    const std::vector<float> z = random_logits<float>(21, rows, E, lo, hi);
    std::vector<std::vector<std::int32_t>> experts;
    for (const rng_stream& rng :
         {rng_stream{1, 0, 0}, rng_stream{1, 1, 0}, rng_stream{1, 1ull << 32, 0},
          rng_stream{2, 0, 0}, rng_stream{1ull + (1ull << 32), 0, 0}}) {
      routing_batch<float> b(z, rows, E, 2);
      b.rng = rng;
      REQUIRE(b.forward<Est>(opt).is_ok());
      experts.push_back(b.experts);
    }
    for (std::size_t i = 1; i < experts.size(); ++i) {
      CAPTURE(i);
      CHECK(fraction_differing(experts[0], experts[i]) > 0.2);
    }
  };
  // SparseMixer samples among the experts that survive the mask: logits close together.
  check_changes(estimator_tag<sparsemixer_euler>{}, 2.0, 3.0);
  check_changes(estimator_tag<sparsemixer_midpoint>{}, 2.0, 3.0);
  check_changes(estimator_tag<sparsemixer_heun3>{}, 2.0, 3.0);
  // Switch: multiplicative noise of +-10% against logits within 1% of each other.
  check_changes(estimator_tag<switch_router>{}, 1.0, 1.01);
}

TEST_CASE("reproducibility: an offset counter adds its value to rng.offset") {
  // routing_state::offset_counter (host memory on the CPU): offset 5 with a counter holding 7
  // draws exactly what offset 12 draws, forward and backward (Switch's backward redraws its noise).
  const index_t rows = 1500, E = 8;
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    INFO(estimator_name<Est>());
    const routing_options opt = train_options(2, 0.1);
    routing_batch<float> counted(batch_logits<float>(5, rows, E, 1.0, 1.05), rows, E, 2);
    routing_batch<float> plain = counted, uncounted = counted;
    const std::uint64_t counter = 7;
    counted.rng = uncounted.rng = rng_stream{0xC0FFEEull, 5, 0};
    counted.offset_counter = &counter;
    plain.rng = rng_stream{0xC0FFEEull, 12, 0};
    for (routing_batch<float>* b : {&counted, &plain, &uncounted}) {
      REQUIRE(b->forward<Est>(opt).is_ok());
      REQUIRE(b->backward<Est>(opt).is_ok());
    }
    check_same(routing_result<float>::of(counted), routing_result<float>::of(plain));
    if (Est::sampled || Est::noisy)  // the counter did move the draws
      CHECK(fraction_differing(counted.experts, uncounted.experts) > 0.05);
  });
  // A counter that is not 8-byte aligned is rejected before anything is written.
  alignas(8) unsigned char raw[16] = {};
  routing_batch<float> b(batch_logits<float>(5, 10, E, 1.0, 2.0), 10, E, 1);
  b.offset_counter = reinterpret_cast<const std::uint64_t*>(raw + 4);
  const status s = b.forward<sparsemixer_midpoint>(train_options(1, 0.1));
  CHECK(s.code() == status_code::misaligned);
  CHECK(names_argument(s.message(), "state.offset_counter"));
  for (std::int32_t e : b.experts) CHECK(e == -7);
}

TEST_CASE("reproducibility: a batch split into calls with first_token matches one call") {
  const index_t rows = 1000, E = 9;
  const std::uint64_t base_token = 5000;
  const index_t cuts[] = {0, 300, 777, 1000};
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    for (int k : {1, 2}) {
      INFO(cat(estimator_name<Est>(), " k=", k));
      routing_options opt;
      opt.k = k;
      opt.jitter_eps = 0.1;  // the auxiliary losses scale with 1/T: off for a per-row comparison
      const std::vector<double> z = batch_logits<double>(4, rows, E, 1.0, 3.0);
      routing_batch<double> whole(z, rows, E, k);
      whole.rng = rng_stream{77, 88, base_token};
      REQUIRE(whole.forward<Est>(opt).is_ok());
      REQUIRE(whole.backward<Est>(opt).is_ok());

      std::vector<std::int32_t> experts;
      std::vector<std::uint8_t> coins;
      std::vector<double> gates, grads;
      std::vector<std::int64_t> counts(static_cast<std::size_t>(E), 0);
      std::int64_t nonfinite = 0;
      for (int p = 0; p < 3; ++p) {
        const index_t r0 = cuts[p], r1 = cuts[p + 1];
        routing_batch<double> part(slice_rows(z, E, r0, r1), r1 - r0, E, k);
        part.grad_gates = slice_rows(whole.grad_gates, k, r0, r1);
        part.rng = rng_stream{77, 88, base_token + static_cast<std::uint64_t>(r0)};
        REQUIRE(part.forward<Est>(opt).is_ok());
        REQUIRE(part.backward<Est>(opt).is_ok());
        experts.insert(experts.end(), part.experts.begin(), part.experts.end());
        coins.insert(coins.end(), part.coins.begin(), part.coins.end());
        gates.insert(gates.end(), part.gates.begin(), part.gates.end());
        grads.insert(grads.end(), part.grad_logits.begin(), part.grad_logits.end());
        for (index_t e = 0; e < E; ++e)
          counts[static_cast<std::size_t>(e)] += part.counts[static_cast<std::size_t>(e)];
        nonfinite += part.nonfinite_rows;
      }
      CHECK(bitwise_equal(experts, whole.experts));
      CHECK(bitwise_equal(coins, whole.coins));
      CHECK(bitwise_equal(gates, whole.gates));
      CHECK(bitwise_equal(grads, whole.grad_logits));
      CHECK(counts == whole.counts);
      CHECK(nonfinite == whole.nonfinite_rows);
    }
  });
}

TEST_CASE("reproducibility: 1 2 and 3 threads give bitwise identical results (T = 3000)") {
#if !defined(ROUTEGRAD_HAS_OPENMP)
  MESSAGE("built without OpenMP: the thread counts below all run serially");
#endif
  const index_t rows = 3000, E = 16;  // 3000 is not a multiple of the 256-token block
  auto run = [&](auto tag, auto zero, int k, int threads, grad_mode mode) {
    using Est = typename decltype(tag)::type;
    using T = decltype(zero);
    routing_batch<T> b(batch_logits<T>(5, rows, E, -2.0, 2.0), rows, E, k);
    b.rng = rng_stream{123, 456, 789};
    if (mode == grad_mode::accumulate) b.grad_logits = random_logits<T>(6, rows, E);
    const routing_options opt = train_options(k, 0.1);
    REQUIRE(b.template forward<Est>(opt, cpu::execution{threads}).is_ok());
    REQUIRE(b.template backward<Est>(opt, mode, cpu::execution{threads}).is_ok());
    return routing_result<T>::of(b);
  };
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    for (grad_mode mode : {grad_mode::overwrite, grad_mode::accumulate}) {
      INFO(cat(estimator_name<Est>(), " float k=2",
               mode == grad_mode::accumulate ? " accumulate" : " overwrite"));
      const routing_result<float> one = run(tag, 0.0f, 2, 1, mode);
      CHECK(one.nonfinite_rows > 0);
      for (int threads : {2, 3, 0}) {
        CAPTURE(threads);
        check_same(one, run(tag, 0.0f, 2, threads, mode));
      }
    }
    {
      INFO(cat(estimator_name<Est>(), " double k=1 overwrite"));
      const routing_result<double> one = run(tag, 0.0, 1, 1, grad_mode::overwrite);
      for (int threads : {2, 3, 0}) {
        CAPTURE(threads);
        check_same(one, run(tag, 0.0, 1, threads, grad_mode::overwrite));
      }
    }
  });
}

TEST_CASE("reproducibility: float and double storage make the same choices") {
  // core/philox.hpp: the same float uniform feeds both back ends. On logits that are exactly
  // representable in float the choices and coins agree; the gates agree to float rounding.
  // (A draw whose target lands within float rounding of a CDF step, or a Switch near-tie, could
  // legitimately differ; with these fixed seeds none does, and such a case is ~1e-7 per draw.)
  const index_t rows = 3000, E = 10;
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    for (int k : {1, 2}) {
      INFO(cat(estimator_name<Est>(), " k=", k));
      routing_options opt;
      opt.k = k;
      opt.jitter_eps = 0.1;
      const std::vector<float> zf = batch_logits<float>(8, rows, E, 1.5, 3.0);
      const std::vector<double> zd(zf.begin(), zf.end());
      routing_batch<float> f(zf, rows, E, k);
      routing_batch<double> d(zd, rows, E, k);
      f.rng = rng_stream{31, 41, 59};
      d.rng = f.rng;
      REQUIRE(f.forward<Est>(opt).is_ok());
      REQUIRE(d.forward<Est>(opt).is_ok());
      CHECK(bitwise_equal(f.experts, d.experts));
      CHECK(bitwise_equal(f.coins, d.coins));
      CHECK(f.nonfinite_rows == d.nonfinite_rows);
      CHECK(f.counts == d.counts);
      std::int64_t gate_mismatch = 0;
      for (std::size_t i = 0; i < f.gates.size(); ++i)
        if (!(std::fabs(static_cast<double>(f.gates[i]) - d.gates[i]) <=
              1e-6 * std::fabs(d.gates[i]) + 1e-30))
          ++gate_mismatch;
      CHECK(gate_mismatch == 0);
    }
  });
}

TEST_CASE("reproducibility: strided buffers give the same results as contiguous ones") {
  const index_t rows = 600, E = 7;
  const int k = 2;
  const layouts contiguous{};
  layouts transposed;
  transposed.logits = {true, 0};
  transposed.experts = {true, 0};
  transposed.coins = {true, 0};
  transposed.gates = {true, 0};
  transposed.grad_gates = {true, 0};
  transposed.grad_logits = {true, 0};
  layouts padded;
  padded.logits = {false, 5};
  padded.experts = {false, 1};
  padded.coins = {false, 3};
  padded.gates = {false, 2};
  padded.grad_gates = {false, 4};
  padded.grad_logits = {false, 3};
  layouts mixed;
  mixed.logits = {true, 3};
  mixed.experts = {false, 2};
  mixed.coins = {true, 1};
  mixed.gates = {true, 5};
  mixed.grad_gates = {false, 0};
  mixed.grad_logits = {true, 2};

  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    auto check_type = [&](auto zero) {
      using T = decltype(zero);
      INFO(cat(estimator_name<Est>(), sizeof(T) == 4 ? " float" : " double"));
      const routing_options opt = train_options(k, 0.1);
      const rng_stream rng{9, 10, 11};
      const std::vector<T> z = batch_logits<T>(10, rows, E, 1.0, 3.0);
      bool ok = false;
      const routing_result<T> ref = run_strided<Est, T>(z, rows, E, k, opt, rng, contiguous, &ok);
      CHECK(ok);
      for (const layouts* l : {&transposed, &padded, &mixed}) {
        CAPTURE(l == &transposed ? "transposed" : (l == &padded ? "padded" : "mixed"));
        ok = false;
        check_same(ref, run_strided<Est, T>(z, rows, E, k, opt, rng, *l, &ok));
        CHECK(ok);  // nothing written outside the views
      }
      // Contiguous through routing_batch (host_matrix without strides) agrees as well.
      routing_batch<T> b(z, rows, E, k);
      b.grad_gates = random_logits<T>(12345, rows, k, -1.0, 1.0);
      b.rng = rng;
      REQUIRE(b.template forward<Est>(opt).is_ok());
      REQUIRE(b.template backward<Est>(opt).is_ok());
      check_same(ref, routing_result<T>::of(b));
    };
    check_type(0.0f);
    check_type(0.0);
  });
}

TEST_CASE("reproducibility: broadcast logits (row stride 0) match the materialised rows") {
  const index_t rows = 500, E = 6;
  const std::vector<float> one_row = {2.2f, 2.9f, 2.5f, 0.1f, 2.7f, 3.0f};
  std::vector<float> full;
  for (index_t t = 0; t < rows; ++t) full.insert(full.end(), one_row.begin(), one_row.end());
  for_each_estimator([&](auto tag) {
    using Est = typename decltype(tag)::type;
    INFO(cat(estimator_name<Est>()));
    routing_options opt;
    opt.k = 2;
    routing_batch<float> b(full, rows, E, 2);
    b.rng = rng_stream{4, 4, 4};
    REQUIRE(b.forward<Est>(opt).is_ok());
    REQUIRE(b.backward<Est>(opt).is_ok());

    routing_batch<float> c(full, rows, E, 2);  // buffers only; logits come from the broadcast view
    c.rng = b.rng;
    const host_view<const float, 2> bcast = host_matrix<const float>(one_row.data(), rows, E, 0, 1);
    REQUIRE(routegrad::route_forward<Est>(opt, bcast, c.state(),
                                          host_matrix(c.gates.data(), rows, 2), c.stats())
                .is_ok());
    REQUIRE(routegrad::route_backward<Est>(
                opt, bcast, c.state(), host_matrix<const float>(c.grad_gates.data(), rows, 2),
                host_matrix(c.grad_logits.data(), rows, E), grad_mode::overwrite, c.stats())
                .is_ok());
    check_same(routing_result<float>::of(b), routing_result<float>::of(c));
  });
}
