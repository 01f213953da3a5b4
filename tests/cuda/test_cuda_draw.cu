// The inverse-CDF draw on the device, for every kind of lanes policy the kernels use: the set of
// positive candidate weights candidate_weights records (in index order for the whole group where
// the policy has index words, per lane step otherwise) and the element inverse_cdf picks, against
// a serial scan of the same weights (the device's, copied back) — exactly, including targets equal
// to a running sum, one ulp either side of it, and beyond the total. The candidates are the
// host's jitter_masked test; in candidate_weights' sparse form only their weights are written (the
// others hold no meaning), otherwise every weight is (0 for the masked).
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <routegrad/cuda.cuh>
#include <vector>

namespace {

using namespace routegrad;
using cuda::warp_lanes;

constexpr int max_words = 8;  // index words of the widest policy here (E ≤ 256)

/// One group of Lanes per row, 32 / width rows per block of one warp. Writes the weights, the
/// recorded words (index order; for policies without index words, lane l's word of its own steps
/// in word l, for the first max_words lanes) and one chosen element per target.
template <class Lanes>
__global__ void draw_kernel(const float* logits, int rows, int n, const float* row_max,
                            float two_eps, const float* targets, int targets_per_row,
                            float* weights_out, unsigned* words_out, int* chosen_out) {
  extern __shared__ float shared[];
  constexpr int width = Lanes::count();
  const Lanes lanes = Lanes::make();
  const int group = static_cast<int>(threadIdx.x) / width;
  const int r = static_cast<int>(blockIdx.x) * (32 / width) + group;
  if (r >= rows) return;
  float* values = shared + group * 2 * n;
  float* weights = values + n;
  lanes.each(n, [&](int i) { values[i] = logits[static_cast<index_t>(r) * n + i]; });
  lanes.sync();
  using Row = staged_row<float, false>;
  const Row row{values, n, nullptr};
  const nothing_taken taken;
  const slot_candidates<sparsemixer_midpoint, float, Row, nothing_taken> candidate{
      row, taken, row_max[r], two_eps};
  positive_elements<Lanes> live;
  candidate_weights(lanes, row, row_max[r], candidate, weights, &live);
  lanes.each(n, [&](int i) { weights_out[static_cast<index_t>(r) * n + i] = weights[i]; });
  if constexpr (positive_elements<Lanes>::indexed) {
    if (lanes.lane() == 0)
      for (int q = 0; q < max_words; ++q)
        words_out[r * max_words + q] = q < positive_elements<Lanes>::words ? live.word[q] : 0u;
  } else if (lanes.lane() < max_words) {  // each lane's own steps (lanes.step_bits), where kept
    words_out[r * max_words + lanes.lane()] = keeps_positive_elements(lanes, n) ? live.word[0] : 0u;
  }
  for (int j = 0; j < targets_per_row; ++j) {
    const int chosen = inverse_cdf(
        lanes, [&](int e) { return weights[e]; }, n, targets[r * targets_per_row + j], live);
    if (lanes.lane() == 0) chosen_out[r * targets_per_row + j] = chosen;
  }
}

/// The draw by definition: the first element (in index order) whose running sum of positive
/// weights exceeds the target, else the last positive one.
int serial_draw(const float* w, int n, float target) {
  float running = 0.0f;
  int last = -1;
  for (int i = 0; i < n; ++i) {
    if (!(w[i] > 0.0f)) continue;
    running += w[i];
    if (running > target) return i;
    last = i;
  }
  return last;
}

template <class Lanes>
void check_policy(int n, float two_eps, std::uint64_t seed) {
  constexpr int width = Lanes::count();
  constexpr bool indexed = positive_elements<Lanes>::indexed;
  // candidate_weights' sparse form (sparse_weights): only the candidates' weights are written
  const int steps = Lanes::per_lane > 0 ? Lanes::per_lane : (n + width - 1) / width;
  const bool sparse = (indexed || steps <= 32) && steps >= sparse_weights_min_steps;
  const int rows = 67;  // not a multiple of the rows per block
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> logits(static_cast<std::size_t>(rows) * n), row_max(rows);
  for (int r = 0; r < rows; ++r) {
    float m = -INFINITY;
    for (int i = 0; i < n; ++i) {
      // Some rows have many equal logits (ties in the running sums), some a wide spread.
      const float z = r % 5 == 0 ? std::round(normal(gen)) : normal(gen) * (1.0f + r % 3);
      logits[static_cast<std::size_t>(r) * n + i] = z;
      m = std::fmax(m, z);
    }
    row_max[r] = m;
  }
  // Targets are set after the weights are known: a first call learns the weights.
  constexpr int per_row = 24;
  std::vector<float> targets(static_cast<std::size_t>(rows) * per_row, 0.0f);
  float *d_logits, *d_max, *d_targets, *d_weights;
  unsigned* d_words;
  int* d_chosen;
  REQUIRE(cudaMalloc(&d_logits, logits.size() * sizeof(float)) == cudaSuccess);
  REQUIRE(cudaMalloc(&d_max, row_max.size() * sizeof(float)) == cudaSuccess);
  REQUIRE(cudaMalloc(&d_targets, targets.size() * sizeof(float)) == cudaSuccess);
  REQUIRE(cudaMalloc(&d_weights, logits.size() * sizeof(float)) == cudaSuccess);
  REQUIRE(cudaMalloc(&d_words, static_cast<std::size_t>(rows) * max_words * sizeof(unsigned)) ==
          cudaSuccess);
  REQUIRE(cudaMalloc(&d_chosen, targets.size() * sizeof(int)) == cudaSuccess);
  cudaMemcpy(d_logits, logits.data(), logits.size() * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemcpy(d_max, row_max.data(), row_max.size() * sizeof(float), cudaMemcpyHostToDevice);
  const unsigned blocks = static_cast<unsigned>((rows + 32 / width - 1) / (32 / width));
  const std::size_t shared = static_cast<std::size_t>(32 / width) * 2 * n * sizeof(float);
  std::vector<float> weights(logits.size());
  std::vector<unsigned> words(static_cast<std::size_t>(rows) * max_words);
  std::vector<int> chosen(targets.size());
  for (int pass = 0; pass < 2; ++pass) {
    cudaMemcpy(d_targets, targets.data(), targets.size() * sizeof(float), cudaMemcpyHostToDevice);
    cudaMemset(d_weights, 0xFF, logits.size() * sizeof(float));  // poisoned (NaN)
    cudaMemset(d_words, 0xAB, words.size() * sizeof(unsigned));
    cudaMemset(d_chosen, 0xAB, chosen.size() * sizeof(int));
    draw_kernel<Lanes><<<blocks, 32, shared>>>(d_logits, rows, n, d_max, two_eps, d_targets,
                                               per_row, d_weights, d_words, d_chosen);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    cudaMemcpy(weights.data(), d_weights, weights.size() * sizeof(float), cudaMemcpyDeviceToHost);
    cudaMemcpy(words.data(), d_words, words.size() * sizeof(unsigned), cudaMemcpyDeviceToHost);
    cudaMemcpy(chosen.data(), d_chosen, chosen.size() * sizeof(int), cudaMemcpyDeviceToHost);
    if (pass == 1) break;
    for (int r = 0; r < rows; ++r) {  // running sums, one ulp either side, 0, beyond the total
      const float* w = weights.data() + static_cast<std::size_t>(r) * n;
      const float* z = logits.data() + static_cast<std::size_t>(r) * n;
      std::vector<float> sums;
      float running = 0.0f;
      for (int i = 0; i < n; ++i)
        if (!jitter_masked(z[i], row_max[r], two_eps) && w[i] > 0.0f)
          sums.push_back(running += w[i]);
      float* t = targets.data() + static_cast<std::size_t>(r) * per_row;
      int c = 0;
      t[c++] = 0.0f;
      t[c++] = running * 1.5f;  // unreached: the last positive
      for (std::size_t s = 0; s < sums.size() && c + 3 <= per_row; ++s) {
        t[c++] = sums[s];
        t[c++] = std::nextafter(sums[s], -INFINITY);
        t[c++] = std::nextafter(sums[s], INFINITY);
      }
      while (c < per_row) t[c++] = running * std::uniform_real_distribution<float>(0, 1)(gen);
    }
  }
  int positives = 0;
  for (int r = 0; r < rows; ++r) {
    CAPTURE(r);
    float* w = weights.data() + static_cast<std::size_t>(r) * n;
    unsigned expect[max_words] = {};
    for (int i = 0; i < n; ++i) {
      CAPTURE(i);
      if (jitter_masked(logits[static_cast<std::size_t>(r) * n + i], row_max[r], two_eps)) {
        if (!sparse) REQUIRE(w[i] == 0.0f);  // every element written (the poison is NaN)
        w[i] = 0.0f;                         // (for the serial draw)
        continue;
      }
      REQUIRE(w[i] >= 0.0f);  // every candidate written
      if (w[i] > 0.0f) {
        if (i < 32 * max_words) expect[i / 32] |= 1u << (i % 32);  // (indexed rows: all of them)
        ++positives;
      }
    }
    if (indexed) {
      for (int q = 0; q < max_words; ++q)
        CHECK(words[static_cast<std::size_t>(r) * max_words + q] ==
              (q < (n + 31) / 32 ? expect[q] : 0u));
    } else {  // lane l's bit s: element l + s·width (rows of at most 32 steps keep the set)
      for (int l = 0; l < width && l < max_words; ++l) {
        unsigned own = 0u;
        for (int s = 0; steps <= 32 && l + s * width < n; ++s)
          if (w[l + s * width] > 0.0f) own |= 1u << s;
        CAPTURE(l);
        CHECK(words[static_cast<std::size_t>(r) * max_words + l] == own);
      }
    }
    for (int j = 0; j < per_row; ++j) {
      const float target = targets[static_cast<std::size_t>(r) * per_row + j];
      CAPTURE(target);
      CHECK(chosen[static_cast<std::size_t>(r) * per_row + j] == serial_draw(w, n, target));
    }
  }
  CHECK(positives > rows);  // the mask left more than the maximum in some rows
  cudaFree(d_logits);
  cudaFree(d_max);
  cudaFree(d_targets);
  cudaFree(d_weights);
  cudaFree(d_words);
  cudaFree(d_chosen);
}

}  // namespace

TEST_CASE("cuda draw: index-order candidate sets and the inverse CDF, every kind of policy") {
  for (const float two_eps : {0.2f, 0.8f}) {  // few candidates; about half the row
    CAPTURE(two_eps);
    // index words (rows unrolled completely, ≤ 256 elements)
    check_policy<warp_lanes<8, 1>>(7, two_eps, 1);
    check_policy<warp_lanes<4, 2>>(8, two_eps, 2);
    check_policy<warp_lanes<4, 4>>(13, two_eps, 3);
    check_policy<warp_lanes<2, 8>>(16, two_eps, 4);
    check_policy<warp_lanes<1, 16>>(16, two_eps, 5);
    check_policy<warp_lanes<4, 8>>(30, two_eps, 6);
    check_policy<warp_lanes<4, 16, 16>>(50, two_eps, 7);
    check_policy<warp_lanes<4, 16, 16>>(64, two_eps, 8);
    check_policy<warp_lanes<8, 16, 16>>(128, two_eps, 9);
    check_policy<warp_lanes<32, 8>>(200, two_eps, 10);
    check_policy<warp_lanes<32, 8>>(256, two_eps, 11);
    // per-lane steps (partly unrolled, or no bound)
    check_policy<warp_lanes<4, 32, 8>>(128, two_eps, 12);
    check_policy<warp_lanes<4, 32, 8>>(100, two_eps, 13);
    check_policy<warp_lanes<4, 16, 4>>(64, two_eps, 14);
    check_policy<warp_lanes<32>>(1000, two_eps, 15);
    // rows of more than 32 steps: no set kept, every weight written, every step scanned
    check_policy<warp_lanes<32>>(1100, two_eps, 16);
  }
}
