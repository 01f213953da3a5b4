// Trains a tiny Mixture-of-Experts layer with libtorch, routing with routegrad's SparseMixer
// (heun3, top-2) through the autograd Function of routegrad_torch.hpp, and prints the loss.
//
//   libtorch_router [--steps N]
//
// Synthetic task: a teacher routes each token to one of E linear experts (argmax of its own
// router); the student (router W_r, experts A) learns to reproduce the teacher's output with
// Adam. Exits 0 when the mean loss of the last 50 steps is below 3/4 of that of the first 50.
#include <torch/optim/adam.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

#include "routegrad_torch.hpp"

int main(int argc, char** argv) try {
  int steps = 300;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--steps") == 0 && i + 1 < argc) {
      steps = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: libtorch_router [--steps N]\n");
      return 2;
    }
  }
  if (steps < 100) steps = 100;

  constexpr std::int64_t T = 256, d = 16, E = 8, d_out = 4;
  torch::manual_seed(2026);
  const auto f64 = torch::dtype(torch::kFloat64);

  // Teacher: a router and E experts; target = the argmax expert's output.
  const torch::Tensor teacher_router = torch::randn({d, E}, f64);
  const torch::Tensor teacher_experts = torch::randn({E, d, d_out}, f64);

  // Student parameters.
  torch::Tensor router = (0.1 * torch::randn({d, E}, f64)).requires_grad_();
  torch::Tensor experts = (0.3 * torch::randn({E, d, d_out}, f64)).requires_grad_();
  torch::optim::Adam adam({router, experts}, torch::optim::AdamOptions(3e-2));

  routegrad_torch::options opt;
  opt.routing.k = 2;
  opt.routing.jitter_eps = 0.1;
  opt.routing.load_balance_coef = 0.01;  // fused load-balancing loss (r.load_balance_loss)
  opt.rng.seed = 0x5eed;

  std::vector<double> losses;
  for (int step = 0; step < steps; ++step) {
    const torch::Tensor x = torch::randn({T, d}, f64);
    torch::Tensor target;
    {
      torch::NoGradGuard no_grad;
      const torch::Tensor best = x.matmul(teacher_router).argmax(1);  // [T]
      const torch::Tensor all = torch::einsum("td,edo->teo", {x, teacher_experts});
      target = all.gather(1, best.view({T, 1, 1}).expand({T, 1, d_out})).squeeze(1);
    }

    // [route] One routing step: the forward samples experts and coins, the backward (run by
    // loss.backward()) turns dL/dgates into dL/dlogits with the heun3 rule.
    opt.rng.offset = static_cast<std::uint64_t>(step);  // fresh randomness every step
    const torch::Tensor logits = x.matmul(router);      // [T, E]
    const routegrad_torch::routed r =
        routegrad_torch::route(logits, opt, routegrad_torch::estimator::sparsemixer_heun3);
    // r.gates [T, 2] (differentiable), r.experts int32 [T, 2]
    const torch::Tensor all = torch::einsum("td,edo->teo", {x, experts});  // [T, E, d_out]
    const torch::Tensor chosen =
        all.gather(1, r.experts.to(torch::kLong).unsqueeze(-1).expand({T, 2, d_out}));
    const torch::Tensor y = (r.gates.unsqueeze(-1) * chosen).sum(1);  // [T, d_out]
    const torch::Tensor mse = (y - target).pow(2).mean();
    const torch::Tensor loss = mse + r.load_balance_loss;  // its gradient is fused too
    adam.zero_grad();
    loss.backward();
    adam.step();
    // [route]

    losses.push_back(mse.item<double>());
    if (step % 50 == 0 || step == steps - 1) {
      std::printf("step %4d  mse %.5f  load-balancing loss %.5f\n", step, losses.back(),
                  r.load_balance_loss.item<double>());
    }
  }

  double first = 0, last = 0;
  for (int i = 0; i < 50; ++i) {
    first += losses[static_cast<std::size_t>(i)] / 50;
    last += losses[static_cast<std::size_t>(steps - 50 + i)] / 50;
  }
  std::printf("mean mse: first 50 steps %.5f, last 50 steps %.5f\n", first, last);
  if (!(last < 0.75 * first)) {
    std::fprintf(stderr, "libtorch_router: the loss did not fall by a quarter\n");
    return 1;
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "libtorch_router: %s\n", e.what());
  return 1;
}
