// The per-lane helpers the per-token rules use, for lanes policies wider than the CPU's one lane:
// taken_experts' bit mask against taken_before for every lane of a group, and keep_larger (a
// lane's running max, elements in ascending index) combined across lanes by better_extreme
// against the whole row's max with the lowest index on ties. A simulated policy stands in for a
// warp group: lane l of L owns the elements l, l + L, ... as cuda::warp_lanes does.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "common/test_util.hpp"

namespace {

using namespace routegrad;

/// One lane of a simulated group of L lanes (the members taken_experts reads).
template <int L>
struct simulated_lane {
  int l;
  static constexpr int count() { return L; }
  int lane() const { return l; }
  static constexpr int steps(int n) { return (n + L - 1) / L; }
};

struct fixed_slots {
  std::vector<int> experts;
  index_t expert(int j) const { return experts[static_cast<std::size_t>(j)]; }
};

template <int L>
void check_taken_bits(int n, std::mt19937_64& gen) {
  std::vector<int> order(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) order[static_cast<std::size_t>(i)] = i;
  std::shuffle(order.begin(), order.end(), gen);
  const int k = n < 6 ? n : 6;
  const fixed_slots slots{std::vector<int>(order.begin(), order.begin() + k)};
  for (int j = 0; j < k; ++j)
    for (int l = 0; l < L; ++l) {
      const taken_experts<simulated_lane<L>, fixed_slots> taken(simulated_lane<L>{l}, slots, j, n);
      CHECK(taken.use_bits == (simulated_lane<L>::steps(n) <= 32));
      for (int i = l; i < n; i += L) {
        INFO("L = " << L << ", n = " << n << ", slot " << j << ", lane " << l << ", i = " << i);
        CHECK(taken(i) == taken_before(slots, j, i));
      }
    }
}

template <int L>
void check_running_max(const std::vector<float>& row) {
  const int n = static_cast<int>(row.size());
  row_extreme<float> combined{-INFINITY, -1};
  for (int l = 0; l < L; ++l) {
    row_extreme<float> top{-INFINITY, -1};
    for (int i = l; i < n; i += L) keep_larger(top, row[static_cast<std::size_t>(i)], i);
    combined = better_extreme(combined, top);
  }
  row_extreme<float> expected{-INFINITY, -1};
  for (int i = 0; i < n; ++i) {
    const float z = row[static_cast<std::size_t>(i)];
    if (z > expected.value) expected = {z, i};  // first (lowest) index of the max
  }
  INFO("L = " << L << ", n = " << n);
  CHECK(combined.index == expected.index);
  if (expected.index >= 0) CHECK(combined.value == expected.value);
}

}  // namespace

TEST_CASE("lane helpers: taken_experts' bit mask equals taken_before on every lane") {
  std::mt19937_64 gen(11);
  for (int n : {1, 2, 7, 8, 31, 33, 64, 100, 128, 256, 257, 1000}) {
    check_taken_bits<1>(n, gen);
    check_taken_bits<4>(n, gen);
    check_taken_bits<8>(n, gen);
    check_taken_bits<32>(n, gen);
  }
}

TEST_CASE("lane helpers: per-lane keep_larger + better_extreme give the row's max, lowest index") {
  std::mt19937_64 gen(12);
  std::uniform_int_distribution<int> level(-3, 3);  // few distinct values: many ties across lanes
  for (int n : {1, 5, 8, 13, 64, 100, 128}) {
    for (int trial = 0; trial < 50; ++trial) {
      std::vector<float> row(static_cast<std::size_t>(n));
      for (float& z : row) z = static_cast<float>(level(gen));
      if (trial % 5 == 1) row[static_cast<std::size_t>(trial % n)] = NAN;  // never the max
      if (trial % 5 == 2)
        for (float& z : row) z = -INFINITY;  // no finite entry: "none"
      if (trial % 5 == 3) row[0] = -0.0f, row[static_cast<std::size_t>(n - 1)] = 0.0f;  // ±0 tie
      check_running_max<1>(row);
      check_running_max<4>(row);
      check_running_max<8>(row);
      check_running_max<32>(row);
    }
  }
}

TEST_CASE("lane helpers: max_nan propagates NaN and orders the rest as max") {
  const float values[] = {-INFINITY, -2.5f, -0.0f, 0.0f, 1.0f, 3.0f, INFINITY, NAN};
  for (const float a : values)
    for (const float b : values) {
      CAPTURE(a);
      CAPTURE(b);
      const float m = math::max_nan(a, b);
      if (std::isnan(a) || std::isnan(b)) {
        CHECK(std::isnan(m));
      } else {
        CHECK(m == std::max(a, b));
      }
      CHECK(std::isnan(math::max_nan(static_cast<double>(a), static_cast<double>(b))) ==
            std::isnan(m));
    }
}

namespace {

/// A row accessor without staged maxima (a caller's own): peak_of_row reads it element by element.
struct plain_row {
  const float* z;
  int n;
  int size() const { return n; }
  float clean(int i) const { return z[i]; }
  float logit(int i) const { return z[i]; }
};

}  // namespace

TEST_CASE("lane helpers: peak_of_row and max_value_where agree with summarize_row and max_where") {
  // The backward's (and the GPU forward's sparse form's) max without the argmax: the same
  // routability (NaN, +inf, no finite logit) and the same max, from staging's maxima (the GPU's
  // rows), from rows without them (the CPU's, a caller's own), and for Switch's jittered rows.
  std::mt19937_64 gen(13);
  std::uniform_int_distribution<int> level(-3, 3);
  std::uniform_real_distribution<float> jitter(0.9f, 1.1f);
  const serial_lanes lanes;
  for (int n : {1, 2, 7, 64, 129}) {
    for (int trial = 0; trial < 60; ++trial) {
      std::vector<float> z(static_cast<std::size_t>(n)), noise(z.size());
      for (float& v : z) v = static_cast<float>(level(gen)) * 0.75f;
      for (float& v : noise) v = jitter(gen);
      const auto at = [&](int i) -> float& { return z[static_cast<std::size_t>(i % n)]; };
      switch (trial % 6) {
        case 1:
          at(trial) = NAN;
          break;
        case 2:
          at(trial) = INFINITY;
          break;
        case 3:
          std::fill(z.begin(), z.end(), -INFINITY);
          break;
        case 4:
          at(trial) = -INFINITY;
          break;
        case 5:
          at(trial) = 3.0e38f;
          break;  // jitter may overflow it to +inf
        default:
          break;
      }
      float staged = -INFINITY;
      for (const float v : z) staged = math::max_nan(staged, v);
      CAPTURE(n);
      CAPTURE(trial);
      const staged_row<float, false, true> clean{z.data(), n, nullptr, staged};  // the GPU's
      const staged_row<float, false> cpu{z.data(), n, nullptr};
      const staged_row<float, true, true> jittered{z.data(), n, noise.data(), staged};
      const plain_row plain{z.data(), n};
      static_assert(row_brings_staged_max<staged_row<float, false, true>>::value);
      static_assert(!row_brings_staged_max<staged_row<float, false>>::value);
      static_assert(!row_brings_staged_max<staged_row<float, true, true>>::value);
      static_assert(!row_brings_staged_max<plain_row>::value);
      const auto check = [&](const auto& row) {
        const row_summary<float> full = summarize_row<float>(lanes, row);
        const row_peak<float> peak = peak_of_row<float>(lanes, row);
        CHECK(peak.routable == full.routable);
        if (!full.routable) return;
        CHECK(peak.max == full.top.value);
        for (int taken = 0; taken < n; ++taken) {
          const auto others = [taken](int i, float) { return i != taken; };
          const row_extreme<float> expect = max_where<float>(lanes, row, others);
          const float got = max_value_where<float>(lanes, row, others);
          if (expect.index < 0)
            CHECK(got == -INFINITY);
          else
            CHECK(got == expect.value);
        }
      };
      check(clean);
      check(cpu);
      check(jittered);
      check(plain);
    }
  }
}
