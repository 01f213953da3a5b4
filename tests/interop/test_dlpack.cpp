// DLPack adapter (include/routegrad/interop/dlpack.hpp) on hand-built DLTensors: valid tensors of
// every supported element type (compact and strided, with a byte offset, empty), then one check
// per invalid case, each asserting the status code, a "dlpack:" message, and that the output view
// was left untouched. Finally, routing through views made from DLTensors gives bitwise the same
// results as routing through views built directly.
#include <doctest/doctest.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <routegrad/interop/dlpack.hpp>

#include "common/test_util.hpp"

namespace {

using namespace routegrad;
using namespace routegrad::test;

/// A DLTensor with its own shape and strides arrays (strides empty: DLTensor::strides is NULL).
struct dl_tensor {
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> strides;
  DLTensor t{};

  dl_tensor(void* data, DLDataType dtype, std::vector<std::int64_t> shape_,
            std::vector<std::int64_t> strides_ = {}, std::uint64_t byte_offset = 0,
            DLDeviceType device = kDLCPU)
      : shape(std::move(shape_)), strides(std::move(strides_)) {
    t.data = data;
    t.device = DLDevice{device, 0};
    t.ndim = static_cast<int>(shape.size());
    t.dtype = dtype;
    t.shape = shape.data();
    t.strides = strides.empty() ? nullptr : strides.data();
    t.byte_offset = byte_offset;
  }
  dl_tensor(const dl_tensor&) = delete;
  dl_tensor& operator=(const dl_tensor&) = delete;

  operator const DLTensor&() const { return t; }
};

DLDataType dtype(DLDataTypeCode code, int bits, int lanes = 1) {
  return DLDataType{static_cast<std::uint8_t>(code), static_cast<std::uint8_t>(bits),
                    static_cast<std::uint16_t>(lanes)};
}
const DLDataType f32 = dtype(kDLFloat, 32);
const DLDataType f64 = dtype(kDLFloat, 64);
const DLDataType i32 = dtype(kDLInt, 32);
const DLDataType i64 = dtype(kDLInt, 64);
const DLDataType u8 = dtype(kDLUInt, 8);

template <class T, int R, memory_space S>
bool same_view(const strided_view<T, R, S>& a, const strided_view<T, R, S>& b) {
  if (a.data_handle() != b.data_handle()) return false;
  for (int i = 0; i < R; ++i)
    if (a.extent(i) != b.extent(i) || a.stride(i) != b.stride(i)) return false;
  return true;
}

/// A recognisable view that a failed conversion must leave as it was.
template <class T, int R, memory_space S>
strided_view<T, R, S> sentinel_view() {
  static typename strided_view<T, R, S>::value_type dummy[8]{};
  index_t ext[R], str[R];
  for (int i = 0; i < R; ++i) {
    ext[i] = 100 + i;
    str[i] = 7 + i;
  }
  return strided_view<T, R, S>(dummy, ext, str);
}

/// Converts `t` into a sentinel-initialised view of type V and checks the failure: the code, a
/// "dlpack:" message, and the view untouched.
template <class V>
void expect_rejected(const DLTensor& t, status_code code) {
  V out = sentinel_view<typename V::element_type, V::rank, V::space>();
  const V before = out;
  const status s = from_dlpack(t, out);
  CAPTURE(s.message());
  CHECK(s.code() == code);
  CHECK(std::string(s.message()).rfind("dlpack: ", 0) == 0);
  CHECK(same_view(out, before));
}

}  // namespace

TEST_SUITE("interop") {
  TEST_CASE("dlpack: compact float32 matrix (strides NULL is row-major)") {
    std::vector<float> buf = random_logits<float>(1, 3, 4);
    const dl_tensor t(buf.data(), f32, {3, 4});
    host_view<float, 2> v;
    REQUIRE(from_dlpack(t, v).is_ok());
    CHECK(v.data_handle() == buf.data());
    CHECK(v.extent(0) == 3);
    CHECK(v.extent(1) == 4);
    CHECK(v.stride(0) == 4);
    CHECK(v.stride(1) == 1);
    for (index_t i = 0; i < 3; ++i)
      for (index_t j = 0; j < 4; ++j) CHECK(v(i, j) == buf[static_cast<std::size_t>(i * 4 + j)]);

    // A view of const elements, and rank 1 and rank 3.
    host_view<const float, 2> cv;
    REQUIRE(from_dlpack(t, cv).is_ok());
    CHECK(cv.data_handle() == buf.data());
    const dl_tensor t1(buf.data(), f32, {12});
    host_view<const float, 1> v1;
    REQUIRE(from_dlpack(t1, v1).is_ok());
    CHECK(v1.extent(0) == 12);
    CHECK(v1.stride(0) == 1);
    const dl_tensor t3(buf.data(), f32, {2, 3, 2});
    host_view<const float, 3> v3;
    REQUIRE(from_dlpack(t3, v3).is_ok());
    CHECK(v3.stride(0) == 6);
    CHECK(v3.stride(1) == 2);
    CHECK(v3.stride(2) == 1);
  }

  TEST_CASE("dlpack: strided float32 matrices (padded rows, column-major, broadcast)") {
    std::vector<float> buf = random_logits<float>(2, 3, 8);
    {
      // Every other column of a [3, 8] buffer.
      const dl_tensor t(buf.data(), f32, {3, 4}, {8, 2});
      host_view<const float, 2> v;
      REQUIRE(from_dlpack(t, v).is_ok());
      CHECK(v.stride(0) == 8);
      CHECK(v.stride(1) == 2);
      for (index_t i = 0; i < 3; ++i)
        for (index_t j = 0; j < 4; ++j)
          CHECK(v(i, j) == buf[static_cast<std::size_t>(i * 8 + j * 2)]);
    }
    {
      // Column-major [4, 6].
      const dl_tensor t(buf.data(), f32, {4, 6}, {1, 4});
      host_view<const float, 2> v;
      REQUIRE(from_dlpack(t, v).is_ok());
      for (index_t i = 0; i < 4; ++i)
        for (index_t j = 0; j < 6; ++j) CHECK(v(i, j) == buf[static_cast<std::size_t>(i + j * 4)]);
    }
    {
      // Stride 0 broadcasts (valid for inputs; the routing calls reject it for outputs).
      const dl_tensor t(buf.data(), f32, {5, 8}, {0, 1});
      host_view<const float, 2> v;
      REQUIRE(from_dlpack(t, v).is_ok());
      CHECK(v(4, 3) == buf[3]);
    }
  }

  TEST_CASE("dlpack: byte_offset moves the data pointer") {
    std::vector<double> buf = random_logits<double>(3, 4, 5);
    // Rows 1..3 of a [4, 5] buffer.
    const dl_tensor t(buf.data(), f64, {3, 5}, {}, 5 * sizeof(double));
    host_view<const double, 2> v;
    REQUIRE(from_dlpack(t, v).is_ok());
    CHECK(v.data_handle() == buf.data() + 5);
    CHECK(v(0, 0) == buf[5]);
    CHECK(v(2, 4) == buf[19]);
  }

  TEST_CASE("dlpack: int32 experts, uint8 coins, int64 counts") {
    std::vector<std::int32_t> experts(6 * 2, 0);
    std::vector<std::uint8_t> coins(6 * 2, 0);
    std::vector<std::int64_t> counts(5, 0);
    const dl_tensor te(experts.data(), i32, {6, 2});
    const dl_tensor tc(coins.data(), u8, {6, 2}, {1, 6});  // column-major
    const dl_tensor tn(counts.data(), i64, {5});
    host_view<std::int32_t, 2> ve;
    host_view<std::uint8_t, 2> vc;
    host_view<std::int64_t, 1> vn;
    REQUIRE(from_dlpack(te, ve).is_ok());
    REQUIRE(from_dlpack(tc, vc).is_ok());
    REQUIRE(from_dlpack(tn, vn).is_ok());
    ve(5, 1) = 42;
    vc(5, 1) = 7;
    vn(4) = -3;
    CHECK(experts[11] == 42);
    CHECK(coins[11] == 7);
    CHECK(counts[4] == -3);
    // An odd byte offset is fine for one-byte elements.
    const dl_tensor tc1(coins.data(), u8, {11}, {}, 1);
    host_view<std::uint8_t, 1> vc1;
    REQUIRE(from_dlpack(tc1, vc1).is_ok());
    CHECK(vc1.data_handle() == coins.data() + 1);
  }

  TEST_CASE("dlpack: empty tensors may have null data") {
    const dl_tensor t(nullptr, f32, {0, 6});
    host_view<const float, 2> v = sentinel_view<const float, 2, memory_space::host>();
    REQUIRE(from_dlpack(t, v).is_ok());
    CHECK(v.data_handle() == nullptr);
    CHECK(v.extent(0) == 0);
    CHECK(v.extent(1) == 6);
    CHECK(v.stride(1) == 1);
    CHECK(v.empty());
    // A zero leading extent with huge trailing ones is still empty (no overflow).
    const dl_tensor big(nullptr, f32, {0, std::int64_t(1) << 40}, {std::int64_t(1) << 40, 1});
    host_view<const float, 2> vb;
    REQUIRE(from_dlpack(big, vb).is_ok());
    CHECK(vb.empty());
  }

  TEST_CASE("dlpack: device types accepted by each memory space") {
    std::vector<float> buf(12);
    for (DLDeviceType d : {kDLCPU, kDLCUDAHost}) {
      CAPTURE(static_cast<int>(d));
      const dl_tensor t(buf.data(), f32, {3, 4}, {}, 0, d);
      host_view<float, 2> v;
      CHECK(from_dlpack(t, v).is_ok());
    }
    // A device view is only built here, never dereferenced: any aligned address will do.
    for (DLDeviceType d : {kDLCUDA, kDLCUDAManaged}) {
      CAPTURE(static_cast<int>(d));
      const dl_tensor t(buf.data(), f32, {3, 4}, {}, 0, d);
      device_view<float, 2> v;
      REQUIRE(from_dlpack(t, v).is_ok());
      CHECK(v.data_handle() == buf.data());
    }
  }

  TEST_CASE("dlpack: wrong rank") {
    std::vector<float> buf(24);
    const dl_tensor t(buf.data(), f32, {2, 3, 4});
    expect_rejected<host_view<float, 2>>(t, status_code::invalid_shape);
    const dl_tensor t1(buf.data(), f32, {24});
    expect_rejected<host_view<float, 2>>(t1, status_code::invalid_shape);
  }

  TEST_CASE("dlpack: null shape") {
    std::vector<float> buf(12);
    dl_tensor t(buf.data(), f32, {3, 4});
    t.t.shape = nullptr;
    expect_rejected<host_view<float, 2>>(t, status_code::null_pointer);
  }

  TEST_CASE("dlpack: dtype code does not match") {
    std::vector<float> buf(12);
    const dl_tensor as_int(buf.data(), i32, {3, 4});
    expect_rejected<host_view<float, 2>>(as_int, status_code::invalid_argument);
    const dl_tensor as_uint(buf.data(), dtype(kDLUInt, 32), {3, 4});
    expect_rejected<host_view<std::int32_t, 2>>(as_uint, status_code::invalid_argument);
    const dl_tensor as_bf16(buf.data(), dtype(kDLBfloat, 16), {3, 4});
    expect_rejected<host_view<float, 2>>(as_bf16, status_code::invalid_argument);
    const dl_tensor as_int8(buf.data(), dtype(kDLInt, 8), {3, 4});
    expect_rejected<host_view<std::uint8_t, 2>>(as_int8, status_code::invalid_argument);
  }

  TEST_CASE("dlpack: dtype bits do not match") {
    std::vector<double> buf(12);
    const dl_tensor f64_as_f32(buf.data(), f64, {3, 4});
    expect_rejected<host_view<const float, 2>>(f64_as_f32, status_code::invalid_argument);
    const dl_tensor f16(buf.data(), dtype(kDLFloat, 16), {3, 4});
    expect_rejected<host_view<const float, 2>>(f16, status_code::invalid_argument);
    const dl_tensor i64_as_i32(buf.data(), i64, {3, 4});
    expect_rejected<host_view<std::int32_t, 2>>(i64_as_i32, status_code::invalid_argument);
  }

  TEST_CASE("dlpack: vector lanes") {
    std::vector<float> buf(48);
    const dl_tensor t(buf.data(), dtype(kDLFloat, 32, 4), {3, 4});
    expect_rejected<host_view<float, 2>>(t, status_code::invalid_argument);
  }

  TEST_CASE("dlpack: null data for a non-empty tensor") {
    const dl_tensor t(nullptr, f32, {3, 4});
    expect_rejected<host_view<float, 2>>(t, status_code::null_pointer);
  }

  TEST_CASE("dlpack: misaligned byte_offset or data pointer") {
    std::vector<float> buf(16);
    const dl_tensor odd_offset(buf.data(), f32, {3, 4}, {}, 2);
    expect_rejected<host_view<float, 2>>(odd_offset, status_code::misaligned);
    // byte_offset a multiple of 4 but data itself misaligned.
    const dl_tensor odd_data(reinterpret_cast<unsigned char*>(buf.data()) + 1, f32, {3, 4}, {}, 4);
    expect_rejected<host_view<float, 2>>(odd_data, status_code::misaligned);
    std::vector<double> dbuf(16);
    const dl_tensor half_double(reinterpret_cast<unsigned char*>(dbuf.data()) + 4, f64, {3, 4});
    expect_rejected<host_view<const double, 2>>(half_double, status_code::misaligned);
  }

  TEST_CASE("dlpack: negative stride") {
    std::vector<float> buf(12);
    const dl_tensor t(buf.data(), f32, {3, 4}, {-4, 1}, 8 * sizeof(float));
    expect_rejected<host_view<float, 2>>(t, status_code::invalid_stride);
    const dl_tensor t2(buf.data(), f32, {3, 4}, {4, -1}, 3 * sizeof(float));
    expect_rejected<host_view<const float, 2>>(t2, status_code::invalid_stride);
  }

  TEST_CASE("dlpack: negative shape entry") {
    std::vector<float> buf(12);
    const dl_tensor t(buf.data(), f32, {3, -4});
    expect_rejected<host_view<float, 2>>(t, status_code::invalid_shape);
    const dl_tensor t0(buf.data(), f32, {-1, 0});
    expect_rejected<host_view<float, 2>>(t0, status_code::invalid_shape);
  }

  TEST_CASE("dlpack: sizes beyond index_t") {
    std::vector<float> buf(12);
    const std::int64_t big = std::int64_t(1) << 40;
    const dl_tensor count(buf.data(), f32, {big, big});
    expect_rejected<host_view<float, 2>>(count, status_code::invalid_shape);
    // The count fits in index_t but not in bytes (int64 max / 4 elements of float).
    const dl_tensor bytes(buf.data(), f32, {std::numeric_limits<std::int64_t>::max() / 2});
    expect_rejected<host_view<float, 1>>(bytes, status_code::invalid_shape);
    // A small tensor whose strides reach too far.
    const dl_tensor reach(buf.data(), f32, {3, 4}, {std::numeric_limits<std::int64_t>::max(), 1});
    expect_rejected<host_view<float, 2>>(reach, status_code::invalid_shape);
    // Each stride's reach fits, their sum does not (the limit for float is about 2^61).
    const std::int64_t half_reach = std::int64_t(1) << 60;
    const dl_tensor sum(buf.data(), f32, {2, 2}, {half_reach, half_reach});
    expect_rejected<host_view<float, 2>>(sum, status_code::invalid_shape);
  }

  TEST_CASE("dlpack: device type not accepted by a host view") {
    std::vector<float> buf(12);
    for (DLDeviceType d : {kDLCUDA, kDLCUDAManaged, kDLOpenCL, kDLROCM, kDLExtDev}) {
      CAPTURE(static_cast<int>(d));
      const dl_tensor t(buf.data(), f32, {3, 4}, {}, 0, d);
      expect_rejected<host_view<float, 2>>(t, status_code::wrong_memory_space);
    }
  }

  TEST_CASE("dlpack: device type not accepted by a device view") {
    std::vector<float> buf(12);
    for (DLDeviceType d : {kDLCPU, kDLCUDAHost, kDLROCM, kDLVulkan, kDLMetal}) {
      CAPTURE(static_cast<int>(d));
      const dl_tensor t(buf.data(), f32, {3, 4}, {}, 0, d);
      expect_rejected<device_view<float, 2>>(t, status_code::wrong_memory_space);
    }
  }

  TEST_CASE("dlpack: routing through DLTensor views equals routing through direct views") {
    constexpr index_t T = 37, E = 9, pad = 3;
    constexpr int K = 2;
    routing_options opt;
    opt.k = K;
    opt.jitter_eps = 0.1;
    opt.load_balance_coef = 0.01;
    opt.z_loss_coef = 0.001;

    // Logits with padded rows behind a one-row byte offset; everything else compact.
    const std::vector<float> logits = random_logits<float>(11, T + 1, E + pad, -3.0, 3.0);
    const std::vector<float> grad_gates = random_logits<float>(12, T, K, -1.0, 1.0);

    for_each_estimator([&](auto tag) {
      using Est = typename decltype(tag)::type;
      CAPTURE(estimator_name<Est>());

      struct outputs {
        std::vector<std::int32_t> experts = std::vector<std::int32_t>(T * K, -1);
        std::vector<std::uint8_t> coins = std::vector<std::uint8_t>(T * K, 0xEE);
        std::vector<float> gates = std::vector<float>(T * K, -3.0f);
        std::vector<float> grad_logits = std::vector<float>(T * E, 0.5f);
        std::vector<std::int64_t> counts = std::vector<std::int64_t>(E, -1);
        double lb = 0, zl = 0;
        std::int64_t nonfinite = -1;
        host_routing_stats stats() { return {counts.data(), &lb, &zl, &nonfinite}; }
      };
      const rng_stream rng{2024, 5, 100};

      // Direct views.
      outputs a;
      {
        const host_view<const float, 2> z(logits.data() + (E + pad), {T, E}, {E + pad, 1});
        const host_routing_state state{host_matrix(a.experts.data(), T, K),
                                       host_matrix(a.coins.data(), T, K), rng};
        REQUIRE(route_forward<Est>(opt, z, state, host_matrix(a.gates.data(), T, K), a.stats())
                    .is_ok());
        REQUIRE(route_backward<Est>(opt, z, state, host_matrix(grad_gates.data(), T, K),
                                    host_matrix(a.grad_logits.data(), T, E), grad_mode::accumulate,
                                    a.stats())
                    .is_ok());
      }

      // The same buffers described by DLTensors, as a framework would hand them over.
      outputs b;
      {
        const dl_tensor dz(const_cast<float*>(logits.data()), f32, {T, E}, {E + pad, 1},
                           (E + pad) * sizeof(float));
        const dl_tensor de(b.experts.data(), i32, {T, K});
        const dl_tensor dc(b.coins.data(), u8, {T, K});
        const dl_tensor dg(b.gates.data(), f32, {T, K});
        const dl_tensor dgg(const_cast<float*>(grad_gates.data()), f32, {T, K}, {K, 1});
        const dl_tensor dgl(b.grad_logits.data(), f32, {T, E});

        host_view<const float, 2> z, gg;
        host_view<float, 2> gates, gl;
        host_routing_state state;
        state.rng = rng;
        REQUIRE(from_dlpack(dz, z).is_ok());
        REQUIRE(from_dlpack(de, state.experts).is_ok());
        REQUIRE(from_dlpack(dc, state.coins).is_ok());
        REQUIRE(from_dlpack(dg, gates).is_ok());
        REQUIRE(from_dlpack(dgg, gg).is_ok());
        REQUIRE(from_dlpack(dgl, gl).is_ok());
        const host_routing_stats stats = b.stats();
        REQUIRE(route_forward<Est>(opt, z, state, gates, stats).is_ok());
        REQUIRE(route_backward<Est>(opt, z, state, gg, gl, grad_mode::accumulate, stats).is_ok());
      }

      CHECK(a.experts == b.experts);
      CHECK(a.coins == b.coins);
      CHECK(bitwise_equal(a.gates, b.gates));
      CHECK(bitwise_equal(a.grad_logits, b.grad_logits));
      CHECK(a.counts == b.counts);
      CHECK(bitwise_equal_value(a.lb, b.lb));
      CHECK(bitwise_equal_value(a.zl, b.zl));
      CHECK(a.nonfinite == b.nonfinite);
      // The calls did something: every slot got an expert in range and the gradients moved.
      for (const std::int32_t e : b.experts) CHECK((e >= 0 && e < E));
      CHECK_FALSE(b.grad_logits == std::vector<float>(T * E, 0.5f));
    });
  }
}
