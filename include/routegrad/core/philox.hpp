// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the
// counter-based generator cuRAND, PyTorch and JAX use, and the uniform conversion routegrad uses.
//
// Counter layout (docs/math.md §3 and docs/api.md): one Philox block per (token, purpose, sub):
//   key     = { seed[31:0], seed[63:32] }
//   counter = { token, purpose << 24 | sub, offset[31:0], offset[63:32] }
// where `token` is the global token index (first_token + row, < 2^32) and `sub` < 2^24 is the
// slot (purpose::slot) or the group of four experts (purpose::switch_noise). A block yields four
// 32-bit words; see rng_purpose for which word feeds what.
#pragma once

#include <cstdint>

#include "config.hpp"

namespace routegrad {

struct philox4x32 {
  std::uint32_t v[4];
};

namespace detail {
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE void mulhilo32(std::uint32_t a, std::uint32_t b,
                                                  std::uint32_t& hi, std::uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  // The same bits. From the 64-bit product nvcc kept an add of zero to the high word (20 per
  // block; sm_90, CUDA 13.0): without them the forward kernels fit in 48 registers (kernels.cuh).
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const std::uint64_t p = static_cast<std::uint64_t>(a) * b;
  hi = static_cast<std::uint32_t>(p >> 32);
  lo = static_cast<std::uint32_t>(p);
#endif
}
}  // namespace detail

/// Philox-4x32 with `Rounds` rounds (10 is the standard, Crush-resistant choice).
template <int Rounds = 10>
ROUTEGRAD_HD inline philox4x32 philox4x32_rounds(philox4x32 ctr, std::uint32_t k0,
                                                 std::uint32_t k1) {
  constexpr std::uint32_t m0 = 0xD2511F53u, m1 = 0xCD9E8D57u;
  constexpr std::uint32_t w0 = 0x9E3779B9u, w1 = 0xBB67AE85u;
  for (int r = 0; r < Rounds; ++r) {
    if (r > 0) {
      k0 += w0;
      k1 += w1;
    }
    std::uint32_t hi0, lo0, hi1, lo1;
    detail::mulhilo32(m0, ctr.v[0], hi0, lo0);
    detail::mulhilo32(m1, ctr.v[2], hi1, lo1);
    ctr = philox4x32{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
  }
  return ctr;
}

ROUTEGRAD_HD inline philox4x32 philox4x32_10(philox4x32 ctr, std::uint32_t k0, std::uint32_t k1) {
  return philox4x32_rounds<10>(ctr, k0, k1);
}

/// A 32-bit word to a float uniform in the open interval (0, 1): 23 random bits, centred in their
/// cell, so the result is exactly representable and never 0 or 1 (min 2^-24, max 1 - 2^-24).
/// The same float feeds the float and the double back ends, so their choices agree.
ROUTEGRAD_HD ROUTEGRAD_FORCEINLINE float uniform_open01(std::uint32_t x) {
  return (static_cast<float>(x >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

/// What a Philox block is drawn for; the value goes into the counter's second word.
enum class rng_purpose : std::uint32_t {
  slot = 1,          // sub = slot; word 0: the categorical uniform, word 1: the coin uniform
  switch_noise = 2,  // sub = expert / 4; word (expert % 4): that expert's jitter uniform
};

/// The random stream of one routing call: seed, the caller's offset, and the global index of the
/// call's first token (so a batch split into several calls draws the same numbers).
struct rng_stream {
  std::uint64_t seed = 0;
  std::uint64_t offset = 0;
  std::uint64_t first_token = 0;

  ROUTEGRAD_HD philox4x32 block(std::uint64_t row, rng_purpose purpose, std::uint32_t sub) const {
    const std::uint64_t token = first_token + row;
    philox4x32 ctr{{static_cast<std::uint32_t>(token),
                    (static_cast<std::uint32_t>(purpose) << 24) | (sub & 0xFFFFFFu),
                    static_cast<std::uint32_t>(offset), static_cast<std::uint32_t>(offset >> 32)}};
    return philox4x32_10(ctr, static_cast<std::uint32_t>(seed),
                         static_cast<std::uint32_t>(seed >> 32));
  }
};

}  // namespace routegrad
