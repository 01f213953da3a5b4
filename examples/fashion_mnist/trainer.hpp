// The experiment driver of the Fashion-MNIST trainer: one training run of one (estimator, ω,
// seed), its curves and timings, and the choice of estimator type from its name.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "dataset.hpp"
#include "model.hpp"

namespace fmnist {

/// The estimators the trainer knows, by the names used on the command line.
inline const std::vector<std::string>& estimator_names() {
  static const std::vector<std::string> names = {"switch", "topk_softmax", "euler", "midpoint",
                                                 "heun3"};
  return names;
}

template <class T>
struct type_tag {
  using type = T;
};

/// Calls f(type_tag<Est>{}) with the estimator type named `name`; throws for an unknown name.
/// "dense" (every expert on every token, mixed by softmax(z): the exact gradient of the dense
/// objective, mixing::dense) takes topk_softmax's type, which the dense layer does not use.
template <class F>
decltype(auto) with_estimator(const std::string& name, F&& f) {
  if (name == "switch") return f(type_tag<routegrad::switch_router>{});
  if (name == "topk_softmax" || name == "dense") return f(type_tag<routegrad::topk_softmax>{});
  if (name == "euler") return f(type_tag<routegrad::sparsemixer_euler>{});
  if (name == "midpoint") return f(type_tag<routegrad::sparsemixer_midpoint>{});
  if (name == "heun3") return f(type_tag<routegrad::sparsemixer_heun3>{});
  throw std::invalid_argument("unknown estimator '" + name +
                              "' (switch, topk_softmax, euler, midpoint, heun3, dense)");
}

/// One configuration of the comparison: an estimator with or without ω.
struct run_spec {
  std::string estimator;
  bool omega = false;
  std::string label() const { return omega ? estimator + "+omega" : estimator; }
};

struct train_config {
  model_config model;
  adam_config adam;
  int steps = 3000;
  int batch = 128;
  bool cosine = true;  // learning rate: cosine decay from adam.lr to lr_floor · adam.lr
  double lr_floor = 0.05;
  int eval_points = 3;            // table checkpoints, evenly spaced, the last at the final step
  int eval_every = 250;           // further test evaluations for the curves (0: checkpoints only)
  int log_every = 25;             // training-loss curve: mean over windows of this many steps
  int target_window = 50;         // steps to target: the mean of the last target_window batches
  double loss_target = 0.35;      // ... first below this
  std::int64_t train_subset = 0;  // use the first N training images (0: all)
  std::int64_t test_subset = 0;   // evaluate on the first N test images (0: all)
};

struct curve_point {
  int step;     // last step of the window
  double loss;  // mean training cross-entropy over the window
};

struct eval_point {
  int step;
  double test_loss;
  double test_accuracy;
  double mask_candidates;  // eval_result's mask statistics at this step
  double mask_single;
};

struct run_result {
  run_spec spec;
  std::uint64_t seed = 0;
  std::vector<curve_point> train_curve;
  std::vector<eval_point> evals;
  int steps_to_target = -1;    // −1: not reached
  double train_seconds = 0.0;  // training steps only (no evaluation)
  double wall_seconds = 0.0;   // the whole run, evaluations included
  double seconds_per_step() const {
    return train_curve.empty() ? 0.0 : train_seconds / train_curve.back().step;
  }
  std::int64_t nonfinite_rows = 0;
};

/// What the progress callback sees.
struct progress_info {
  int step = 0;
  int steps = 0;
  double recent_loss = 0.0;  // mean of the last target_window batches
  double images_per_second = 0.0;
  bool evaluated = false;   // an evaluation just finished
  bool checkpoint = false;  // ... at one of the table's checkpoints
  eval_point last_eval{};
};

/// The table's checkpoints: eval_points steps evenly spaced, the last = steps.
inline std::vector<int> checkpoint_steps(const train_config& c) {
  std::vector<int> s;
  const int n = std::max(1, c.eval_points);
  for (int i = 1; i <= n; ++i) s.push_back(static_cast<int>(std::lround(1.0 * c.steps * i / n)));
  s.erase(std::unique(s.begin(), s.end()), s.end());
  return s;
}

/// Every step at which the test set is evaluated: the checkpoints and every eval_every steps.
inline std::vector<int> eval_steps(const train_config& c) {
  std::vector<int> s = checkpoint_steps(c);
  if (c.eval_every > 0)
    for (int t = c.eval_every; t < c.steps; t += c.eval_every) s.push_back(t);
  std::sort(s.begin(), s.end());
  s.erase(std::unique(s.begin(), s.end()), s.end());
  return s;
}

/// The learning rate of step (1-based): constant, or cosine decay to lr_floor · lr at the end.
inline double learning_rate(const train_config& c, int step) {
  if (!c.cosine || c.steps <= 1) return c.adam.lr;
  const double t = static_cast<double>(step - 1) / (c.steps - 1);
  const double pi = 3.14159265358979323846;
  return c.adam.lr * (c.lr_floor + (1.0 - c.lr_floor) * 0.5 * (1.0 + std::cos(pi * t)));
}

/// A view of the first n rows of a split (n = 0 or n >= size: all of it).
inline split head(const split& s, std::int64_t n) {
  if (n <= 0 || n >= s.n) return s;
  split out;
  out.n = n;
  out.pixels.assign(s.pixels.begin(), s.pixels.begin() + n * num_pixels);
  out.labels.assign(s.labels.begin(), s.labels.begin() + n);
  return out;
}

/// Trains one model from scratch with estimator Est; evaluates it on `test` at eval_steps().
template <class Est, class Model = cpu_model>
run_result train_run(const split& train, const split& test, const train_config& cfg,
                     const run_spec& spec, std::uint64_t seed,
                     const std::function<void(const progress_info&)>& progress = {}) {
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  model_config mc = cfg.model;
  mc.use_omega = spec.omega;
  mc.dense = spec.estimator == "dense";
  Model model(mc, seed);
  run_result res;
  res.spec = spec;
  res.seed = seed;

  const index_t B = cfg.batch;
  const std::int64_t n = train.n;
  if (n < B) throw std::invalid_argument("the training set is smaller than one batch");
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 shuffle_rng(seed ^ 0xDA7A5E7ULL);
  std::int64_t cursor = n;  // start with a shuffle

  std::vector<float> xb(static_cast<std::size_t>(B) * num_pixels);
  std::vector<std::uint8_t> yb(static_cast<std::size_t>(B));
  const std::vector<int> evals = eval_steps(cfg);
  const std::vector<int> checkpoints = checkpoint_steps(cfg);
  std::size_t next_eval = 0;
  std::vector<double> window(static_cast<std::size_t>(std::max(1, cfg.target_window)), 0.0);
  double window_sum = 0.0;
  double log_sum = 0.0;
  int log_count = 0;
  double train_secs = 0.0;
  auto last_report = clock::now();

  for (int step = 1; step <= cfg.steps; ++step) {
    const auto t0 = clock::now();
    for (index_t i = 0; i < B; ++i) {
      if (cursor == n) {
        std::shuffle(order.begin(), order.end(), shuffle_rng);
        cursor = 0;
      }
      const std::int64_t src = order[static_cast<std::size_t>(cursor++)];
      std::copy_n(train.pixels.data() + src * num_pixels, num_pixels,
                  xb.data() + static_cast<std::size_t>(i) * num_pixels);
      yb[static_cast<std::size_t>(i)] = train.labels[static_cast<std::size_t>(src)];
    }
    const double loss =
        model.template train_step<Est>(xb.data(), yb.data(), B, static_cast<std::uint64_t>(step));
    adam_config adam = cfg.adam;
    adam.lr = learning_rate(cfg, step);
    model.adam_step(adam);
    train_secs += std::chrono::duration<double>(clock::now() - t0).count();
    if (!std::isfinite(loss))
      throw std::runtime_error(spec.label() + " seed " + std::to_string(seed) +
                               ": the training loss is not finite at step " + std::to_string(step));

    // windows: the curve (log_every) and the steps-to-target running mean (target_window)
    const std::size_t wi = static_cast<std::size_t>(step - 1) % window.size();
    window_sum += loss - window[wi];
    window[wi] = loss;
    const double recent =
        window_sum / static_cast<double>(std::min<int>(step, static_cast<int>(window.size())));
    if (res.steps_to_target < 0 && step >= static_cast<int>(window.size()) &&
        recent < cfg.loss_target)
      res.steps_to_target = step;
    log_sum += loss;
    if (++log_count == cfg.log_every || step == cfg.steps) {
      res.train_curve.push_back({step, log_sum / log_count});
      log_sum = 0.0;
      log_count = 0;
    }

    progress_info info;
    info.step = step;
    info.steps = cfg.steps;
    info.recent_loss = recent;
    info.images_per_second = train_secs > 0 ? static_cast<double>(step) * B / train_secs : 0.0;
    if (next_eval < evals.size() && step == evals[next_eval]) {
      const eval_result e = model.template evaluate<Est>(test);
      res.evals.push_back({step, e.loss, e.accuracy, e.mask_candidates, e.mask_single});
      ++next_eval;
      info.evaluated = true;
      info.checkpoint =
          std::find(checkpoints.begin(), checkpoints.end(), step) != checkpoints.end();
      info.last_eval = res.evals.back();
    }
    const auto now = clock::now();
    if (progress && (info.evaluated || step == cfg.steps ||
                     std::chrono::duration<double>(now - last_report).count() > 0.2)) {
      progress(info);
      last_report = now;
    }
  }
  res.train_seconds = train_secs;
  res.nonfinite_rows = model.nonfinite_rows();
  res.wall_seconds = std::chrono::duration<double>(clock::now() - t_start).count();
  return res;
}

/// train_run with the estimator chosen by name.
inline run_result train_run(const split& train, const split& test, const train_config& cfg,
                            const run_spec& spec, std::uint64_t seed,
                            const std::function<void(const progress_info&)>& progress = {}) {
  return with_estimator(spec.estimator, [&](auto tag) {
    using Est = typename decltype(tag)::type;
    return train_run<Est>(train, test, cfg, spec, seed, progress);
  });
}

}  // namespace fmnist
