// Philox-4x32 against the published known-answer vectors, the uniform conversion, and the
// counter layout of rng_stream (core/philox.hpp).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <tuple>
#include <vector>

#include "common/test_util.hpp"

namespace {

using routegrad::philox4x32;
using routegrad::rng_purpose;
using routegrad::rng_stream;

struct kat {
  std::uint32_t ctr[4];
  std::uint32_t key[2];
  std::uint32_t expected[4];
};

// Known-answer vectors from Random123's tests/kat_vectors (D. E. Shaw Research,
// https://github.com/DEShawResearch/random123, tests/kat_vectors, the "philox4x32 7" and
// "philox4x32 10" lines; columns: counter[4] key[2] -> output[4]):
//
//   philox4x32 7  00000000 00000000 00000000 00000000 00000000 00000000   5f6fb709 0d893f64
//   4f121f81 4f730a48 philox4x32 7  ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff 5207ddc2
//   45165e59 4d8ee751 8c52f662 philox4x32 7  243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0
//   4dfccaba 190a87f0 c47362ba b6b5242a philox4x32 10 00000000 00000000 00000000 00000000 00000000
//   00000000   6627e8d5 e169c58d bc57ac4c 9b00dbd8 philox4x32 10 ffffffff ffffffff ffffffff
//   ffffffff ffffffff ffffffff   408f276d 41c83b0e a20bc7c6 6d5451fd philox4x32 10 243f6a88
//   85a308d3 13198a2e 03707344 a4093822 299f31d0   d16cfe09 94fdcceb 5001e420 24126ea1
//
// The same lines are quoted verbatim by several independent Philox test suites (Go, Rust and
// Python ports that cite Random123's kat_vectors); they were looked up, not recalled.
const kat kPhilox10[] = {
    {{0x00000000u, 0x00000000u, 0x00000000u, 0x00000000u},
     {0x00000000u, 0x00000000u},
     {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
    {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
     {0xffffffffu, 0xffffffffu},
     {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
    {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
     {0xa4093822u, 0x299f31d0u},
     {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
};
const kat kPhilox7[] = {
    {{0x00000000u, 0x00000000u, 0x00000000u, 0x00000000u},
     {0x00000000u, 0x00000000u},
     {0x5f6fb709u, 0x0d893f64u, 0x4f121f81u, 0x4f730a48u}},
    {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
     {0xffffffffu, 0xffffffffu},
     {0x5207ddc2u, 0x45165e59u, 0x4d8ee751u, 0x8c52f662u}},
    {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
     {0xa4093822u, 0x299f31d0u},
     {0x4dfccabau, 0x190a87f0u, 0xc47362bau, 0xb6b5242au}},
};

philox4x32 ctr_of(const std::uint32_t (&c)[4]) { return philox4x32{{c[0], c[1], c[2], c[3]}}; }

bool same_block(const philox4x32& a, const philox4x32& b) {
  return a.v[0] == b.v[0] && a.v[1] == b.v[1] && a.v[2] == b.v[2] && a.v[3] == b.v[3];
}

std::tuple<std::uint32_t, std::uint32_t, std::uint32_t, std::uint32_t> as_tuple(
    const philox4x32& b) {
  return {b.v[0], b.v[1], b.v[2], b.v[3]};
}

}  // namespace

TEST_CASE("philox: Philox-4x32-10 matches the Random123 known-answer vectors") {
  for (const kat& v : kPhilox10) {
    CAPTURE(v.ctr[0]);
    const philox4x32 out = routegrad::philox4x32_10(ctr_of(v.ctr), v.key[0], v.key[1]);
    CHECK(out.v[0] == v.expected[0]);
    CHECK(out.v[1] == v.expected[1]);
    CHECK(out.v[2] == v.expected[2]);
    CHECK(out.v[3] == v.expected[3]);
    const philox4x32 out_r = routegrad::philox4x32_rounds<10>(ctr_of(v.ctr), v.key[0], v.key[1]);
    CHECK(same_block(out, out_r));
  }
}

TEST_CASE("philox: Philox-4x32-7 matches the Random123 known-answer vectors (round schedule)") {
  for (const kat& v : kPhilox7) {
    CAPTURE(v.ctr[0]);
    const philox4x32 out = routegrad::philox4x32_rounds<7>(ctr_of(v.ctr), v.key[0], v.key[1]);
    CHECK(out.v[0] == v.expected[0]);
    CHECK(out.v[1] == v.expected[1]);
    CHECK(out.v[2] == v.expected[2]);
    CHECK(out.v[3] == v.expected[3]);
  }
}

TEST_CASE("philox: uniform_open01 stays inside the open unit interval at the extremes") {
  const float lo = routegrad::uniform_open01(0u);
  const float hi = routegrad::uniform_open01(0xFFFFFFFFu);
  CHECK(lo > 0.0f);
  CHECK(lo < 1.0f);
  CHECK(hi > 0.0f);
  CHECK(hi < 1.0f);
  // Also after widening and in the arithmetic the samplers do with it.
  CHECK(static_cast<double>(hi) < 1.0);
  CHECK(1.0f - hi > 0.0f);
  CHECK(static_cast<double>(lo) > 0.0);
  CHECK(std::log(lo) > -std::numeric_limits<float>::infinity());
  CHECK(std::log(1.0f - hi) > -std::numeric_limits<float>::infinity());
  // The documented extremes: 2^-24 and 1 - 2^-24.
  CHECK(static_cast<double>(lo) == std::ldexp(1.0, -24));
  CHECK(static_cast<double>(hi) == 1.0 - std::ldexp(1.0, -24));
  // Every word with the same top 23 bits maps to the same value; words around the cells too.
  for (std::uint32_t x :
       {0x000001FFu, 0x00000200u, 0x7FFFFFFFu, 0x80000000u, 0xFFFFFE00u, 0xFFFFFDFFu}) {
    const float u = routegrad::uniform_open01(x);
    CHECK(u > 0.0f);
    CHECK(u < 1.0f);
  }
}

TEST_CASE("philox: uniform_open01 is exact and monotone with mean 1/2 on Philox words") {
  // Exactly representable: equals the exact value ((x >> 9) + 1/2) / 2^23 computed in double
  // (which holds it exactly: 24 significant bits).
  const rng_stream s{0x0123456789ABCDEFull, 42, 0};
  const int n_blocks = 250000;  // 10^6 words
  double sum = 0.0;
  std::int64_t n = 0;
  bool all_inside = true, all_exact = true;
  for (int b = 0; b < n_blocks; ++b) {
    const philox4x32 blk = s.block(static_cast<std::uint64_t>(b), rng_purpose::slot, 0);
    for (std::uint32_t w : blk.v) {
      const float u = routegrad::uniform_open01(w);
      const double exact = (static_cast<double>(w >> 9) + 0.5) / 8388608.0;
      all_exact = all_exact && static_cast<double>(u) == exact;
      all_inside = all_inside && u > 0.0f && u < 1.0f;
      sum += static_cast<double>(u);
      ++n;
    }
  }
  CHECK(all_exact);
  CHECK(all_inside);
  // Mean of n uniforms: standard deviation sqrt(1/12/n); allow 6 sigma.
  const double mean = sum / static_cast<double>(n);
  const double sigma = std::sqrt(1.0 / 12.0 / static_cast<double>(n));
  CAPTURE(mean);
  CHECK(std::fabs(mean - 0.5) < 6.0 * sigma);

  // Monotone in the word, and the 2^23 cells are all distinct values.
  float prev = routegrad::uniform_open01(0u);
  bool monotone = true;
  for (std::uint32_t cell = 1; cell < (1u << 23); cell += 997) {
    const float u = routegrad::uniform_open01(cell << 9);
    monotone = monotone && u > prev;
    prev = u;
  }
  CHECK(monotone);
}

TEST_CASE("philox: rng_stream::block follows the documented counter layout") {
  // core/philox.hpp: key = {seed[31:0], seed[63:32]},
  // counter = {first_token + row, purpose << 24 | sub, offset[31:0], offset[63:32]}.
  const std::uint64_t seed = 0xDEADBEEF01234567ull, offset = 0x89ABCDEF13572468ull;
  const rng_stream s{seed, offset, 1000};
  for (std::uint64_t row : {0ull, 1ull, 77ull}) {
    for (rng_purpose p : {rng_purpose::slot, rng_purpose::switch_noise}) {
      for (std::uint32_t sub : {0u, 1u, 5u, 0xFFFFFFu}) {
        const std::uint32_t token = static_cast<std::uint32_t>(1000 + row);
        const philox4x32 ctr{{token, (static_cast<std::uint32_t>(p) << 24) | sub,
                              static_cast<std::uint32_t>(offset),
                              static_cast<std::uint32_t>(offset >> 32)}};
        const philox4x32 expected = routegrad::philox4x32_10(
            ctr, static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
        CHECK(same_block(s.block(row, p, sub), expected));
      }
    }
  }
}

TEST_CASE("philox: rng_stream::block differs across tokens slots purposes offsets and seeds") {
  const rng_stream base{7, 11, 0};
  std::set<std::tuple<std::uint32_t, std::uint32_t, std::uint32_t, std::uint32_t>> seen;
  int made = 0;
  auto add = [&](const philox4x32& b) {
    seen.insert(as_tuple(b));
    ++made;
  };
  // Tokens (rows), slots, purposes.
  for (std::uint64_t row = 0; row < 64; ++row)
    for (std::uint32_t sub = 0; sub < 4; ++sub)
      for (rng_purpose p : {rng_purpose::slot, rng_purpose::switch_noise})
        add(base.block(row, p, sub));
  // Offsets, including ones that differ only in the high 32 bits.
  for (std::uint64_t off : {0ull, 1ull, 12ull, 1ull << 32, (1ull << 32) + 11, ~0ull}) {
    rng_stream s = base;
    s.offset = off;
    add(s.block(0, rng_purpose::slot, 0));
  }
  // Seeds, including ones that differ only in the high 32 bits.
  for (std::uint64_t sd : {0ull, 1ull, 8ull, 1ull << 32, (1ull << 32) + 7, ~0ull}) {
    rng_stream s = base;
    s.seed = sd;
    add(s.block(0, rng_purpose::slot, 0));
  }
  // None of the offsets and seeds above is the base's own (11, 7): every block is distinct.
  CHECK(static_cast<int>(seen.size()) == made);

  // Single-component changes each change the block.
  const philox4x32 b0 = base.block(3, rng_purpose::slot, 1);
  CHECK_FALSE(same_block(b0, base.block(4, rng_purpose::slot, 1)));
  CHECK_FALSE(same_block(b0, base.block(3, rng_purpose::slot, 0)));
  CHECK_FALSE(same_block(b0, base.block(3, rng_purpose::switch_noise, 1)));
  CHECK_FALSE(same_block(b0, rng_stream{7, 12, 0}.block(3, rng_purpose::slot, 1)));
  CHECK_FALSE(same_block(b0, rng_stream{7, 11 + (1ull << 32), 0}.block(3, rng_purpose::slot, 1)));
  CHECK_FALSE(same_block(b0, rng_stream{8, 11, 0}.block(3, rng_purpose::slot, 1)));
  CHECK_FALSE(same_block(b0, rng_stream{7 + (1ull << 32), 11, 0}.block(3, rng_purpose::slot, 1)));
}

TEST_CASE("philox: only first_token + row matters and not how it is split") {
  const std::uint64_t seed = 99, offset = 5;
  CHECK(same_block(rng_stream{seed, offset, 10}.block(0, rng_purpose::slot, 0),
                   rng_stream{seed, offset, 0}.block(10, rng_purpose::slot, 0)));
  for (std::uint64_t ft : {0ull, 1ull, 255ull, 256ull, 4000ull, 0xFFFFFF00ull}) {
    for (std::uint64_t row : {0ull, 1ull, 17ull, 200ull}) {
      const std::uint64_t token = ft + row;
      for (rng_purpose p : {rng_purpose::slot, rng_purpose::switch_noise})
        CHECK(same_block(rng_stream{seed, offset, ft}.block(row, p, 2),
                         rng_stream{seed, offset, 0}.block(token, p, 2)));
    }
  }
  CHECK_FALSE(same_block(rng_stream{seed, offset, 10}.block(0, rng_purpose::slot, 0),
                         rng_stream{seed, offset, 11}.block(0, rng_purpose::slot, 0)));
}
