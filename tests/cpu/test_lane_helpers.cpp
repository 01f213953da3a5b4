// The per-lane helpers the per-token rules use, for lanes policies wider than the CPU's one lane:
// taken_experts' bit mask against taken_before for every lane of a group, and keep_larger (a
// lane's running max, elements in ascending index) combined across lanes by better_extreme
// against the whole row's max with the lowest index on ties. A simulated policy stands in for a
// warp group: lane l of L owns the elements l, l + L, ... as cuda::warp_lanes does.
#include <doctest/doctest.h>

#include <algorithm>
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
