// The Fashion-MNIST trainer (examples/fashion_mnist): a short training run on a subset of the real
// data with every estimator must bring the test loss below a bound no untrained model can reach
// (the labels are balanced, so a model that ignores the image has cross-entropy ≥ ln 10 ≈ 2.30);
// the model's gradient against a finite difference; reproducibility; the table.
// Built when the dataset is installed (ROUTEGRAD_FASHION_MNIST_DIR, Debian: dataset-fashion-mnist).
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "fashion_mnist/dataset.hpp"
#include "fashion_mnist/model.hpp"
#include "fashion_mnist/report.hpp"
#include "fashion_mnist/trainer.hpp"

namespace {

using namespace fmnist;

const dataset& data() {
  static const dataset d = load_fashion_mnist(ROUTEGRAD_FASHION_MNIST_DIR);
  return d;
}

/// A small model and a short run: 300 steps of 64 images from the first 4096 training images.
train_config small_config() {
  train_config c;
  c.model.d_model = 32;
  c.model.d_hidden = 64;
  c.model.experts = 4;
  c.model.k = 2;
  c.model.blocks = 1;
  c.model.threads = 1;
  c.steps = 300;
  c.batch = 64;
  c.eval_points = 2;
  c.eval_every = 0;
  c.log_every = 25;
  c.target_window = 25;
  c.loss_target = 1.0;
  c.adam.lr = 3e-3;
  return c;
}

}  // namespace

TEST_SUITE("examples") {
  TEST_CASE("fashion_mnist: a short run with each estimator learns") {
    const train_config cfg = small_config();
    const split train = head(data().train, 4096);
    const split test = head(data().test, 1000);
    // The bound: ln 10 is the best an image-blind model can do on balanced labels; 0.9 is far
    // below it (and the untrained model is checked to be near ln 10).
    const double bound = 0.9;
    for (const std::string& name : estimator_names()) {
      CAPTURE(name);
      const double untrained = with_estimator(name, [&](auto tag) {
        using Est = typename decltype(tag)::type;
        cpu_model m(cfg.model, 7);
        return m.evaluate<Est>(test).loss;
      });
      CHECK(untrained > 2.0);
      const run_result r = train_run(train, test, cfg, {name, false}, 7);
      REQUIRE(r.evals.size() == 2);
      REQUIRE(!r.train_curve.empty());
      MESSAGE(name, ": untrained test loss ", untrained, ", after 300 steps ",
              r.evals.back().test_loss, " (accuracy ", r.evals.back().test_accuracy,
              "), last training window ", r.train_curve.back().loss);
      CHECK(r.evals.back().test_loss < bound);
      CHECK(r.train_curve.back().loss < bound);
      CHECK(r.evals.back().test_accuracy > 0.7);
      CHECK(r.steps_to_target > 0);
      CHECK(r.nonfinite_rows == 0);
    }
  }

  TEST_CASE("fashion_mnist: ω and the same seed twice") {
    train_config cfg = small_config();
    cfg.steps = 60;
    const split train = head(data().train, 1024);
    const split test = head(data().test, 200);
    const run_result a = train_run(train, test, cfg, {"midpoint", true}, 3);
    const run_result b = train_run(train, test, cfg, {"midpoint", true}, 3);
    REQUIRE(a.train_curve.size() == b.train_curve.size());
    for (std::size_t i = 0; i < a.train_curve.size(); ++i)
      CHECK(a.train_curve[i].loss == b.train_curve[i].loss);  // bit-identical
    CHECK(a.evals.back().test_loss == b.evals.back().test_loss);
    const run_result c = train_run(train, test, cfg, {"midpoint", true}, 4);
    CHECK(c.train_curve.back().loss != a.train_curve.back().loss);
    CHECK(a.spec.label() == "midpoint+omega");
  }

  TEST_CASE("fashion_mnist: the model's gradient against central differences") {
    // The directional derivative along a random direction, no load-balancing term (so the
    // returned cross-entropy is the whole loss), with ω.
    //  - dense mixing: the model is smooth in every parameter; the direction moves all of them.
    //  - sparse top-k routing: the loss jumps where a token's choice flips, so the direction
    //    moves only what does not change the routing (the experts, ω, the head).
    model_config mc = small_config().model;
    mc.load_balance = 0.0;
    mc.use_omega = true;
    const split s = head(data().train, 32);
    const param_layout L(mc);
    const param_layout::block& b = L.blocks[0];
    for (bool dense : {true, false}) {
      CAPTURE(dense);
      mc.dense = dense;
      cpu_model m(mc, 11);
      using Est = routegrad::topk_softmax;
      m.train_step<Est>(s.pixels.data(), s.labels.data(), 32, 1);
      const std::vector<float> g = m.gradients();
      std::vector<float>& theta = m.parameters();
      const std::vector<float> theta0 = theta;
      std::mt19937 rng(5);
      std::normal_distribution<float> normal(0.0f, 1.0f);
      std::vector<float> v(theta.size(), 0.0f);
      double gv = 0.0;
      // (the layout puts the experts, ω and the head after the router; padding has gradient 0)
      for (std::size_t i = dense ? 0 : b.w1; i < theta.size(); ++i) {
        v[i] = normal(rng);
        gv += static_cast<double>(g[i]) * v[i];
      }
      const float h = 2e-3f;
      auto loss_at = [&](float sign) {
        for (std::size_t i = 0; i < theta.size(); ++i) theta[i] = theta0[i] + sign * h * v[i];
        return m.train_step<Est>(s.pixels.data(), s.labels.data(), 32, 1);
      };
      const double fd = (loss_at(1.0f) - loss_at(-1.0f)) / (2.0 * h);
      MESSAGE("directional derivative: backward ", gv, ", central difference ", fd);
      CHECK(std::fabs(fd - gv) <= 5e-3 * std::fabs(gv));
    }
  }

  TEST_CASE("fashion_mnist: table, checkpoints and estimator names") {
    train_config cfg;
    cfg.steps = 3000;
    cfg.eval_points = 3;
    CHECK(checkpoint_steps(cfg) == std::vector<int>{1000, 2000, 3000});
    cfg.eval_every = 750;
    CHECK(eval_steps(cfg) == std::vector<int>{750, 1000, 1500, 2000, 2250, 3000});
    cfg.eval_every = 0;
    CHECK(eval_steps(cfg) == checkpoint_steps(cfg));
    CHECK(learning_rate(cfg, 1) == doctest::Approx(cfg.adam.lr));
    CHECK(learning_rate(cfg, cfg.steps) == doctest::Approx(cfg.adam.lr * cfg.lr_floor));
    CHECK_THROWS_AS(with_estimator("nope", [](auto) { return 0; }), std::invalid_argument);

    std::vector<run_result> runs(4);
    for (int i = 0; i < 4; ++i) {
      run_result& r = runs[static_cast<std::size_t>(i)];
      r.spec = {i < 2 ? "euler" : "heun3", false};
      r.seed = static_cast<std::uint64_t>(i % 2);
      r.train_curve = {{3000, 0.3}};
      r.train_seconds = 3.0 * (1 + i % 2);
      r.wall_seconds = 4.0;
      for (int s : eval_steps(cfg)) r.evals.push_back({s, 0.4, 0.80 + 0.02 * (i % 2), 4.0, 0.0});
      r.steps_to_target = i == 3 ? -1 : 1000;
    }
    const std::string t = results_table(runs, cfg);
    MESSAGE(t);
    CHECK(t.find("| euler | 81.00 ± 1.41 |") != std::string::npos);
    CHECK(t.find("1000 ± 0 (1 of 2 seeds)") != std::string::npos);
    CHECK(t.find("1.5 ± 0.7 | 4.0 ± 0.0 |") != std::string::npos);  // ms per step, wall s
    CHECK(stats_of({1.0, 2.0, 3.0}).std == doctest::Approx(1.0));
  }
}
