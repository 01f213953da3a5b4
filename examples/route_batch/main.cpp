// Routes one small batch with every estimator and prints the choices, gates and logit gradients.
//
//   route_batch [--tokens T] [--experts E] [--k K] [--seed S] [--eval]
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <routegrad/routegrad.hpp>
#include <string>
#include <vector>

namespace {

struct settings {
  int tokens = 4;
  int experts = 8;
  int k = 2;
  std::uint64_t seed = 2026;
  bool eval = false;
};

settings parse(int argc, char** argv) {
  settings s;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "route_batch: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--tokens")
      s.tokens = std::atoi(next());
    else if (a == "--experts")
      s.experts = std::atoi(next());
    else if (a == "--k")
      s.k = std::atoi(next());
    else if (a == "--seed")
      s.seed = std::strtoull(next(), nullptr, 10);
    else if (a == "--eval")
      s.eval = true;
    else {
      std::fprintf(stderr,
                   "usage: route_batch [--tokens T] [--experts E] [--k K] [--seed S] [--eval]\n");
      std::exit(a == "--help" ? 0 : 2);
    }
  }
  return s;
}

template <class Estimator>
void route_and_print(const char* name, const settings& s, const std::vector<float>& logits,
                     const std::vector<float>& grad_gates) {
  using namespace routegrad;
  const index_t T = s.tokens, E = s.experts;
  std::vector<std::int32_t> experts(static_cast<std::size_t>(T * s.k));
  std::vector<std::uint8_t> coins(experts.size());
  std::vector<float> gates(experts.size()), grad_logits(static_cast<std::size_t>(T * E));
  std::vector<std::int64_t> counts(static_cast<std::size_t>(E));
  double lb_loss = 0, z_loss = 0;
  std::int64_t unroutable = 0;

  routing_options opt;
  opt.k = s.k;
  opt.mode = s.eval ? routing_mode::eval : routing_mode::train;
  opt.load_balance_coef = 0.01;
  opt.z_loss_coef = 0.001;
  const host_routing_state state{
      host_matrix(experts.data(), T, s.k), host_matrix(coins.data(), T, s.k), {s.seed, 0, 0}};
  const host_routing_stats stats{counts.data(), &lb_loss, &z_loss, &unroutable};
  const auto z = host_matrix(logits.data(), T, E);
  check(route_forward<Estimator>(opt, z, state, host_matrix(gates.data(), T, s.k), stats));
  check(route_backward<Estimator>(opt, z, state, host_matrix(grad_gates.data(), T, s.k),
                                  host_matrix(grad_logits.data(), T, E), grad_mode::overwrite,
                                  stats));

  std::printf("\n== %s  (load-balance loss %.5f, z-loss %.5f, unroutable rows %lld)\n", name,
              lb_loss, z_loss, static_cast<long long>(unroutable));
  for (index_t t = 0; t < T; ++t) {
    std::printf("token %lld:", static_cast<long long>(t));
    for (int j = 0; j < s.k; ++j) {
      const std::size_t at = static_cast<std::size_t>(t * s.k + j);
      std::printf("  expert %2d gate %.4f coin %d", experts[at], gates[at], coins[at]);
    }
    std::printf("\n   dL/dz:");
    for (index_t e = 0; e < E; ++e)
      std::printf(" %+.4f", grad_logits[static_cast<std::size_t>(t * E + e)]);
    std::printf("\n");
  }
}

}  // namespace

int main(int argc, char** argv) {
  const settings s = parse(argc, argv);
  std::mt19937_64 gen(s.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  // Logits near 2 so that SparseMixer's jitter mask (ε = 0.1) keeps several experts.
  std::vector<float> logits(static_cast<std::size_t>(s.tokens * s.experts));
  for (float& x : logits) x = 2.0f + 0.2f * normal(gen);
  std::vector<float> grad_gates(static_cast<std::size_t>(s.tokens * s.k));
  for (float& g : grad_gates) g = normal(gen);

  std::printf("routegrad %s: %d tokens, %d experts, top-%d, %s mode, seed %llu\n",
              routegrad::version_string(), s.tokens, s.experts, s.k, s.eval ? "eval" : "train",
              static_cast<unsigned long long>(s.seed));
  try {
    route_and_print<routegrad::switch_router>("switch", s, logits, grad_gates);
    route_and_print<routegrad::topk_softmax>("topk_softmax", s, logits, grad_gates);
    route_and_print<routegrad::sparsemixer_euler>("sparsemixer euler", s, logits, grad_gates);
    route_and_print<routegrad::sparsemixer_midpoint>("sparsemixer midpoint", s, logits, grad_gates);
    route_and_print<routegrad::sparsemixer_heun3>("sparsemixer heun3", s, logits, grad_gates);
  } catch (const routegrad::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
