// A device offset counter (routing_state::offset_counter) lets a replayed CUDA graph draw anew:
// the kernels read the counter when they run, so [advance_offset_counter, forward, backward]
// captured once gives, on replay r, exactly what direct calls with rng.offset + r give.
#include <cstring>
#include <string>

#include "routing_check.cuh"

namespace {

using namespace routegrad;
using routegrad::test::gpu::device_buffer;

struct outputs {
  std::vector<std::int32_t> experts;
  std::vector<float> gates, grad;
};

template <class V>
bool same_bytes(const std::vector<V>& a, const std::vector<V>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(V)) == 0;
}

template <class Est>
void check_replays_draw_anew() {
  const index_t T = 1001, E = 16;
  const int k = 2;
  std::mt19937_64 gen(77);
  std::uniform_real_distribution<float> near(1.0f, 1.05f);  // every expert a candidate
  std::vector<float> z(static_cast<std::size_t>(T * E)), gg(static_cast<std::size_t>(T * k));
  for (float& x : z) x = near(gen);
  for (float& x : gg) x = near(gen) - 1.02f;
  device_buffer<float> logits(z), grad_gates(gg);
  device_buffer<std::int32_t> experts(std::vector<std::int32_t>(gg.size(), -7));
  device_buffer<std::uint8_t> coins(std::vector<std::uint8_t>(gg.size(), 0xEE));
  device_buffer<float> gates(std::vector<float>(gg.size(), -3.0f));
  device_buffer<float> grad(std::vector<float>(z.size(), -3.0f));
  device_buffer<std::uint64_t> counter(std::vector<std::uint64_t>(1, 0));
  routing_options opt;
  opt.k = k;
  const rng_stream base{0xFEEDull, 40, 0};
  const auto run = [&](const cuda::device_routing_state& state, cudaStream_t s) {
    const cuda::execution exec{s, nullptr, 0};
    REQUIRE(route_forward<Est>(opt, device_view<const float, 2>(logits.ptr, {T, E}), state,
                               device_view<float, 2>(gates.ptr, {T, k}), {}, exec)
                .is_ok());
    REQUIRE(route_backward<Est>(opt, device_view<const float, 2>(logits.ptr, {T, E}), state,
                                device_view<const float, 2>(grad_gates.ptr, {T, k}),
                                device_view<float, 2>(grad.ptr, {T, E}), grad_mode::overwrite, {},
                                exec)
                .is_ok());
  };
  const auto state_with = [&](rng_stream rng, const std::uint64_t* c) {
    return cuda::device_routing_state{device_view<std::int32_t, 2>(experts.ptr, {T, k}),
                                      device_view<std::uint8_t, 2>(coins.ptr, {T, k}), rng, c};
  };
  const auto take = [&] {
    RG_CUDA_REQUIRE(cudaDeviceSynchronize());
    return outputs{experts.download(), gates.download(), grad.download()};
  };

  cudaStream_t stream = nullptr;
  RG_CUDA_REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t replay = nullptr;
  RG_CUDA_REQUIRE(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  REQUIRE(cuda::advance_offset_counter(counter.ptr, 1, stream).is_ok());
  run(state_with(base, counter.ptr), stream);
  RG_CUDA_REQUIRE(cudaStreamEndCapture(stream, &graph));
  RG_CUDA_REQUIRE(cudaGraphInstantiate(&replay, graph, 0));

  std::vector<outputs> replays;
  for (std::uint64_t r = 1; r <= 3; ++r) {
    CAPTURE(r);
    RG_CUDA_REQUIRE(cudaGraphLaunch(replay, stream));
    replays.push_back(take());
    rng_stream direct = base;
    direct.offset += r;
    run(state_with(direct, nullptr), stream);
    const outputs expected = take();
    CHECK(same_bytes(replays.back().experts, expected.experts));
    CHECK(same_bytes(replays.back().gates, expected.gates));
    CHECK(same_bytes(replays.back().grad, expected.grad));
  }
  CHECK(counter.download()[0] == 3);
  std::size_t moved = 0;  // the replays drew differently from one another
  for (std::size_t i = 0; i < replays[0].experts.size(); ++i)
    moved += replays[0].experts[i] != replays[1].experts[i];
  CHECK(moved > replays[0].experts.size() / 10);
  RG_CUDA_REQUIRE(cudaGraphExecDestroy(replay));
  RG_CUDA_REQUIRE(cudaGraphDestroy(graph));
  RG_CUDA_REQUIRE(cudaStreamDestroy(stream));
}

}  // namespace

TEST_CASE("cuda graph: replays with an advancing offset counter draw anew (midpoint, switch)") {
  check_replays_draw_anew<sparsemixer_midpoint>();
  check_replays_draw_anew<switch_router>();  // its backward redraws the jitter noise
}

TEST_CASE("cuda graph: a bad offset counter is rejected before any launch") {
  const index_t T = 10, E = 8;
  device_buffer<float> logits(std::vector<float>(static_cast<std::size_t>(T * E), 1.0f));
  device_buffer<std::int32_t> experts(std::vector<std::int32_t>(T, -7));
  device_buffer<std::uint8_t> coins(std::vector<std::uint8_t>(T, 0xEE));
  device_buffer<float> gates(std::vector<float>(T, -3.0f));
  std::uint64_t host_counter = 0;
  const cuda::device_routing_state state{device_view<std::int32_t, 2>(experts.ptr, {T, 1}),
                                         device_view<std::uint8_t, 2>(coins.ptr, {T, 1}),
                                         {1, 2, 0},
                                         &host_counter};
  const status s = route_forward<sparsemixer_midpoint>(
      routing_options{}, device_view<const float, 2>(logits.ptr, {T, E}), state,
      device_view<float, 2>(gates.ptr, {T, 1}));
  CHECK(s.code() == status_code::wrong_memory_space);
  CHECK(std::string(s.message()).find("state.offset_counter") != std::string::npos);
  CHECK(cuda::advance_offset_counter(&host_counter, 1).code() == status_code::wrong_memory_space);
  CHECK(cuda::advance_offset_counter(nullptr, 1).code() == status_code::null_pointer);
  // Device memory, but not 8-byte aligned: the forward, the backward and the advance refuse it.
  device_buffer<std::uint64_t> words(std::vector<std::uint64_t>(2, 5));
  auto* odd = reinterpret_cast<std::uint64_t*>(reinterpret_cast<char*>(words.ptr) + 4);
  cuda::device_routing_state misaligned = state;
  misaligned.offset_counter = odd;
  const status f = route_forward<sparsemixer_midpoint>(
      routing_options{}, device_view<const float, 2>(logits.ptr, {T, E}), misaligned,
      device_view<float, 2>(gates.ptr, {T, 1}));
  CHECK(f.code() == status_code::misaligned);
  CHECK(std::string(f.message()).find("state.offset_counter") != std::string::npos);
  device_buffer<float> grad_gates(std::vector<float>(T, 1.0f));
  device_buffer<float> grad(std::vector<float>(static_cast<std::size_t>(T * E), -3.0f));
  CHECK(route_backward<sparsemixer_midpoint>(
            routing_options{}, device_view<const float, 2>(logits.ptr, {T, E}), misaligned,
            device_view<const float, 2>(grad_gates.ptr, {T, 1}),
            device_view<float, 2>(grad.ptr, {T, E}))
            .code() == status_code::misaligned);
  CHECK(cuda::advance_offset_counter(odd, 1).code() == status_code::misaligned);
  RG_CUDA_REQUIRE(cudaDeviceSynchronize());
  CHECK(host_counter == 0);
  for (std::int32_t e : experts.download()) CHECK(e == -7);
  for (float g : gates.download()) CHECK(g == -3.0f);
  for (float g : grad.download()) CHECK(g == -3.0f);
  for (std::uint64_t w : words.download()) CHECK(w == 5);
}
