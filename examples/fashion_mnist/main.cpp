// fashion_mnist: trains a small MoE classifier on Fashion-MNIST with each routing-gradient
// estimator over several seeds and compares them (test accuracy and loss at checkpoints, steps to
// a training-loss target, time per step, wall time; mean ± std over seeds). Writes the curves as
// CSV and a PNG plot (plot.py, matplotlib). See README.md and --help.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "dataset.hpp"
#include "report.hpp"
#include "trainer.hpp"

#ifndef ROUTEGRAD_FASHION_PLOT_SCRIPT
#define ROUTEGRAD_FASHION_PLOT_SCRIPT "plot.py"
#endif

namespace {

using namespace fmnist;

struct settings {
  train_config train;
  std::string data = default_data_dir();
  std::vector<std::string> estimators = estimator_names();
  int seeds = 3;
  std::uint64_t seed_base = 1;
  bool omega_ablation = false;
  bool omega_all = false;
  bool dense_reference = false;
  std::string device = "cpu";
  bool check_device = false;
  std::string out = "fashion_mnist_out";
  bool plot = true;
  bool progress = true;
};

void usage(std::FILE* f) {
  std::fprintf(
      f,
      "usage: fashion_mnist [options]\n"
      "  --data DIR            Fashion-MNIST IDX files (default %s;\n"
      "                        Debian: apt-get install dataset-fashion-mnist)\n"
      "  --estimators LIST     comma-separated, from switch,topk_softmax,euler,midpoint,heun3\n"
      "                        (default: all five)\n"
      "  --seeds N             seeds per estimator (default 3); --seed-base S (default 1)\n"
      "  --omega-ablation      add each SparseMixer rule with the learned output scale omega,\n"
      "                        and switch with omega (the runs without omega stay)\n"
      "  --omega               every run with omega\n"
      "  --dense-reference     add 'dense': every expert on every token, mixed by softmax (the\n"
      "                        exact gradient of the dense objective; E/k times the expert work)\n"
      "  --steps N             training steps per run (default 3000); --long = 12000 steps\n"
      "  --batch B             batch size (default 128); --lr LR Adam learning rate (2e-3),\n"
      "                        cosine decay to 5%% at the end unless --constant-lr\n"
      "  --experts E --k K     experts and experts per token (default 8, 2)\n"
      "  --jitter EPS          SparseMixer mask / Switch noise epsilon (default 0.1)\n"
      "  --d-model D --d-hidden H --blocks L   model size (default 64, 128, 2)\n"
      "  --load-balance A      Switch load-balancing coefficient (default 0.01)\n"
      "  --loss-target X       training-loss target for 'steps to target' (default 0.35)\n"
      "  --eval-points N       table checkpoints per run, evenly spaced (default 3)\n"
      "  --eval-every N        also evaluate every N steps for the curves (default 250; 0: no)\n"
      "  --train-subset N      first N training images (default all 60000)\n"
      "  --test-subset N       first N test images (default all 10000)\n"
      "  --threads N           CPU threads (default 1; 0 = OpenMP's default)\n"
      "  --device cpu|cuda     cuda: the MoE blocks on the GPU (routegrad's CUDA layer, float32;\n"
      "                        the rest on the CPU); needs a build with the CUDA back end\n"
      "  --check-device        with --device cuda: train --steps steps of each estimator on both\n"
      "                        devices from the same initialisation and batches, print the\n"
      "                        largest relative differences of losses, gradients and parameters;\n"
      "                        exit 1 when the first step differs beyond float tolerance, 77 when\n"
      "                        there is no GPU\n"
      "  --out DIR             CSV files and plot (default fashion_mnist_out)\n"
      "  --no-plot             no PNG; --no-progress: no progress bar\n",
      default_data_dir());
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

[[noreturn]] void bad(const std::string& msg) {
  std::fprintf(stderr, "fashion_mnist: %s (see --help)\n", msg.c_str());
  std::exit(2);
}

double number(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (end == v.c_str() || *end != '\0') bad(flag + ": '" + v + "' is not a number");
  return x;
}

long integer(const std::string& flag, const std::string& v, long lo) {
  const double x = number(flag, v);
  if (x != std::floor(x) || x < lo)
    bad(flag + ": '" + v + "' must be an integer >= " + std::to_string(lo));
  return static_cast<long>(x);
}

settings parse(int argc, char** argv) {
  settings s;
  model_config& m = s.train.model;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) bad(a + " needs a value");
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      usage(stdout);
      std::exit(0);
    } else if (a == "--data") {
      s.data = next();
    } else if (a == "--estimators") {
      s.estimators = split_list(next());
      for (const std::string& e : s.estimators) {
        bool known = e == "dense";
        for (const std::string& n : estimator_names()) known = known || n == e;
        if (!known) bad("unknown estimator '" + e + "'");
      }
      if (s.estimators.empty()) bad("--estimators: empty list");
    } else if (a == "--seeds") {
      s.seeds = static_cast<int>(integer(a, next(), 1));
    } else if (a == "--seed-base") {
      s.seed_base = static_cast<std::uint64_t>(integer(a, next(), 0));
    } else if (a == "--omega-ablation") {
      s.omega_ablation = true;
    } else if (a == "--omega") {
      s.omega_all = true;
    } else if (a == "--dense-reference") {
      s.dense_reference = true;
    } else if (a == "--steps") {
      s.train.steps = static_cast<int>(integer(a, next(), 1));
    } else if (a == "--long") {
      s.train.steps = 12000;
    } else if (a == "--batch") {
      s.train.batch = static_cast<int>(integer(a, next(), 1));
    } else if (a == "--lr") {
      s.train.adam.lr = number(a, next());
    } else if (a == "--constant-lr") {
      s.train.cosine = false;
    } else if (a == "--experts") {
      m.experts = static_cast<int>(integer(a, next(), 1));
    } else if (a == "--k") {
      m.k = static_cast<int>(integer(a, next(), 1));
    } else if (a == "--jitter") {
      m.jitter = number(a, next());
      if (!(m.jitter >= 0.0 && m.jitter < 0.5)) bad("--jitter must be in [0, 0.5)");
    } else if (a == "--d-model") {
      m.d_model = static_cast<int>(integer(a, next(), 1));
    } else if (a == "--d-hidden") {
      m.d_hidden = static_cast<int>(integer(a, next(), 1));
    } else if (a == "--blocks") {
      m.blocks = static_cast<int>(integer(a, next(), 0));
    } else if (a == "--load-balance") {
      m.load_balance = number(a, next());
    } else if (a == "--loss-target") {
      s.train.loss_target = number(a, next());
    } else if (a == "--eval-points") {
      s.train.eval_points = static_cast<int>(integer(a, next(), 1));
    } else if (a == "--eval-every") {
      s.train.eval_every = static_cast<int>(integer(a, next(), 0));
    } else if (a == "--train-subset") {
      s.train.train_subset = integer(a, next(), 1);
    } else if (a == "--test-subset") {
      s.train.test_subset = integer(a, next(), 1);
    } else if (a == "--threads") {
      m.threads = static_cast<int>(integer(a, next(), 0));
    } else if (a == "--device") {
      s.device = next();
      if (s.device != "cpu" && s.device != "cuda") bad("--device must be cpu or cuda");
    } else if (a == "--check-device") {
      s.check_device = true;
    } else if (a == "--out") {
      s.out = next();
    } else if (a == "--no-plot") {
      s.plot = false;
    } else if (a == "--no-progress") {
      s.progress = false;
    } else {
      bad("unknown argument '" + a + "'");
    }
  }
  if (m.k > m.experts) bad("--k must not exceed --experts");
  if (s.train.batch > 60000) bad("--batch is larger than the training set");
  if (s.check_device && s.device != "cuda") bad("--check-device needs --device cuda");
  s.train.model.cuda = s.device == "cuda";
  return s;
}

std::vector<run_spec> specs_of(const settings& s) {
  std::vector<run_spec> out;
  for (const std::string& e : s.estimators) out.push_back({e, s.omega_all});
  if (s.dense_reference &&
      std::find(s.estimators.begin(), s.estimators.end(), "dense") == s.estimators.end())
    out.push_back({"dense", s.omega_all});
  if (s.omega_ablation && !s.omega_all)
    for (const std::string& e : s.estimators)
      if (e == "switch" || e == "euler" || e == "midpoint" || e == "heun3")
        out.push_back({e, true});
  return out;
}

std::string duration_text(double secs) {
  char buf[32];
  const long t = static_cast<long>(secs + 0.5);
  if (t >= 60)
    std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  else
    std::snprintf(buf, sizeof buf, "%lds", t);
  return buf;
}

std::string python() {
  if (const char* p = std::getenv("ROUTEGRAD_PYTHON")) return p;
  if (std::ifstream("/usr/bin/python3")) return "/usr/bin/python3";
  return "python3";
}

/// Normwise relative difference ‖a − b‖ / ‖a‖ over [off, off + n) (0 when both are zero).
double rel_diff(const std::vector<float>& a, const std::vector<float>& b, std::size_t off,
                std::size_t n) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = off; i < off + n; ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    num += d * d;
    den += static_cast<double>(a[i]) * static_cast<double>(a[i]);
  }
  if (num == 0.0) return 0.0;
  return den > 0.0 ? std::sqrt(num / den) : HUGE_VAL;
}

/// The parameter tensors, by name, offset and size (ω only when the model uses it).
struct tensor_ref {
  std::string name;
  std::size_t off, n;
};
std::vector<tensor_ref> tensors_of(const model_config& m, const param_layout& L) {
  const std::size_t d = static_cast<std::size_t>(m.d_model);
  const std::size_t h = static_cast<std::size_t>(m.d_hidden);
  const std::size_t E = static_cast<std::size_t>(m.experts);
  std::vector<tensor_ref> t = {{"W_in", L.w_in, d * num_pixels}, {"b_in", L.b_in, d}};
  for (std::size_t l = 0; l < L.blocks.size(); ++l) {
    const param_layout::block& b = L.blocks[l];
    const std::string p = "block" + std::to_string(l) + ".";
    t.push_back({p + "W_r", b.router_w, E * d});
    t.push_back({p + "b_r", b.router_b, E});
    t.push_back({p + "W1", b.w1, E * h * d});
    t.push_back({p + "b1", b.b1, E * h});
    t.push_back({p + "W2", b.w2, E * d * h});
    t.push_back({p + "b2", b.b2, E * d});
    if (m.use_omega) t.push_back({p + "omega", b.omega, d});
  }
  t.push_back({"W_out", L.w_out, num_classes * d});
  t.push_back({"b_out", L.b_out, num_classes});
  return t;
}

/// The largest normwise relative difference over the tensors, and the tensor's name.
std::pair<double, std::string> worst_tensor(const std::vector<tensor_ref>& ts,
                                            const std::vector<float>& a,
                                            const std::vector<float>& b) {
  std::pair<double, std::string> w{0.0, "-"};
  for (const tensor_ref& t : ts) {
    const double r = rel_diff(a, b, t.off, t.n);
    if (!(r <= w.first)) w = {r, t.name};
  }
  return w;
}

/// --check-device: for each estimator, from one seed, three models see the same batches: the
/// CPU model, a GPU model trained on its own (the training result: losses, parameters and test
/// metrics at the end), and a GPU model that takes the CPU model's parameters before every step
/// (the layer's agreement at each step: loss and gradients from identical parameters).
int check_device(const settings& s, const split& train, const split& test) {
  const index_t B = s.train.batch;
  if (train.n < B) throw std::invalid_argument("the training set is smaller than one batch");
  const int steps = s.train.steps;
  // The first step from identical parameters: float32 on both devices, different summation
  // orders; a routing choice flipped by a near-tie would show as a much larger difference.
  const double tol_loss = 1e-4, tol_grad = 1e-3;
  std::printf(
      "check-device: %d steps per estimator, batch %d, seed %llu; CPU vs GPU (normwise relative "
      "differences, worst tensor)\n",
      steps, static_cast<int>(B), static_cast<unsigned long long>(s.seed_base));
  std::vector<float> xb(static_cast<std::size_t>(B) * num_pixels);
  std::vector<std::uint8_t> yb(static_cast<std::size_t>(B));
  bool ok = true;
  for (const run_spec& spec : specs_of(s)) {
    model_config mc = s.train.model;
    mc.use_omega = spec.omega;
    mc.dense = spec.estimator == "dense";
    with_estimator(spec.estimator, [&](auto tag) {
      using Est = typename decltype(tag)::type;
      model_config cpu_cfg = mc;
      cpu_cfg.cuda = false;
      model_config gpu_cfg = mc;
      gpu_cfg.cuda = true;
      cpu_model cpu(cpu_cfg, s.seed_base), gpu(gpu_cfg, s.seed_base), lock(gpu_cfg, s.seed_base);
      const std::vector<tensor_ref> ts = tensors_of(mc, cpu.layout());
      double first_loss = 0.0, first_grad = 0.0, max_lock_loss = 0.0, max_lock_grad = 0.0,
             max_free_loss = 0.0, last_cpu_loss = 0.0, last_gpu_loss = 0.0;
      std::string first_grad_at, max_lock_grad_at;
      int max_lock_step = 0;
      bool finite = true;
      for (int step = 1; step <= steps; ++step) {
        for (index_t i = 0; i < B; ++i) {  // consecutive images, wrapping around
          const std::int64_t src =
              (static_cast<std::int64_t>(step - 1) * B + i) % static_cast<std::int64_t>(train.n);
          std::copy_n(train.pixels.data() + src * num_pixels, num_pixels,
                      xb.data() + static_cast<std::size_t>(i) * num_pixels);
          yb[static_cast<std::size_t>(i)] = train.labels[static_cast<std::size_t>(src)];
        }
        const std::uint64_t st = static_cast<std::uint64_t>(step);
        lock.parameters() = cpu.parameters();
        const double lc = cpu.template train_step<Est>(xb.data(), yb.data(), B, st);
        const double lg = gpu.template train_step<Est>(xb.data(), yb.data(), B, st);
        const double ll = lock.template train_step<Est>(xb.data(), yb.data(), B, st);
        finite = finite && std::isfinite(lc) && std::isfinite(lg) && std::isfinite(ll);
        const double dl = std::fabs(ll - lc) / std::max(std::fabs(lc), 1e-30);
        const auto dg = worst_tensor(ts, cpu.gradients(), lock.gradients());
        if (step == 1) {
          first_loss = dl;
          first_grad = dg.first;
          first_grad_at = dg.second;
        }
        max_lock_loss = std::max(max_lock_loss, dl);
        if (!(dg.first <= max_lock_grad)) {
          max_lock_grad = dg.first;
          max_lock_grad_at = dg.second;
          max_lock_step = step;
        }
        max_free_loss =
            std::max(max_free_loss, std::fabs(lg - lc) / std::max(std::fabs(lc), 1e-30));
        last_cpu_loss = lc;
        last_gpu_loss = lg;
        adam_config adam = s.train.adam;
        adam.lr = learning_rate(s.train, step);
        cpu.adam_step(adam);
        gpu.adam_step(adam);
      }
      const auto dp = worst_tensor(ts, cpu.parameters(), gpu.parameters());
      const eval_result ec = cpu.template evaluate<Est>(test);
      const eval_result eg = gpu.template evaluate<Est>(test);
      const bool pass = finite && first_loss <= tol_loss && first_grad <= tol_grad;
      ok = ok && pass;
      std::printf(
          "%-15s %s\n"
          "  step 1, same parameters:      loss %.2e  gradients %.2e (%s)\n"
          "  every step, same parameters:  loss %.2e  gradients %.2e (%s, step %d)\n"
          "  trained apart for %d steps:   loss %.2e (last: CPU %.5f GPU %.5f), parameters %.2e "
          "(%s)\n"
          "  test set at the end:          CPU acc %.2f%% loss %.5f | GPU acc %.2f%% loss %.5f\n",
          spec.label().c_str(), pass ? "ok" : "FAILED", first_loss, first_grad,
          first_grad_at.c_str(), max_lock_loss, max_lock_grad, max_lock_grad_at.c_str(),
          max_lock_step, steps, max_free_loss, last_cpu_loss, last_gpu_loss, dp.first,
          dp.second.c_str(), 100.0 * ec.accuracy, ec.loss, 100.0 * eg.accuracy, eg.loss);
      std::fflush(stdout);
      return 0;
    });
  }
  std::printf(
      "check-device: %s (step 1 from the same parameters: loss within %.0e, every "
      "gradient tensor within %.0e; later steps may differ more where a near-tie "
      "flips a routing choice)\n",
      ok ? "passed" : "FAILED", tol_loss, tol_grad);
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const settings s = parse(argc, argv);
  if (s.device == "cuda") {
#ifdef FMNIST_WITH_CUDA
    std::string why;
    if (!cuda_device_available(why)) {
      std::fprintf(stderr, "fashion_mnist: --device cuda: no usable CUDA device (%s)%s\n",
                   why.c_str(), s.check_device ? "; --check-device skipped" : "");
      return s.check_device ? 77 : 1;
    }
#else
    std::fprintf(stderr,
                 "fashion_mnist: --device cuda: this build has no CUDA back end (configure with "
                 "a CUDA toolkit and -DROUTEGRAD_ENABLE_CUDA=ON or AUTO); use --device cpu\n");
    return 2;
#endif
  }

  dataset data;
  try {
    data = load_fashion_mnist(s.data);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fashion_mnist: %s\n", e.what());
    return 1;
  }
  const split train = head(data.train, s.train.train_subset);
  const split test = head(data.test, s.train.test_subset);
  if (s.check_device) {
    try {
      return check_device(s, train, test);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "fashion_mnist: %s\n", e.what());
      return 1;
    }
  }

  const std::vector<run_spec> specs = specs_of(s);
  const int total_runs = static_cast<int>(specs.size()) * s.seeds;
  const model_config& m = s.train.model;
  const double epochs = static_cast<double>(s.train.steps) * s.train.batch / train.n;
  std::printf(
      "fashion_mnist: %lld training / %lld test images from %s\n"
      "model: 784 -> %d (linear) -> %d residual MoE block%s (E = %d, k = %d, GELU experts %d -> "
      "%d -> %d, jitter %g, load balance %g) -> 10\n"
      "training: Adam lr %g (%s), batch %d, %d steps (%.1f epochs), %d seed%s per "
      "configuration, %d runs, %d CPU thread%s\n",
      static_cast<long long>(train.n), static_cast<long long>(test.n), s.data.c_str(), m.d_model,
      m.blocks, m.blocks == 1 ? "" : "s", m.experts, m.k, m.d_model, m.d_hidden, m.d_model,
      m.jitter, m.load_balance, s.train.adam.lr, s.train.cosine ? "cosine decay" : "constant",
      s.train.batch, s.train.steps, epochs, s.seeds, s.seeds == 1 ? "" : "s", total_runs, m.threads,
      m.threads == 1 ? "" : "s");
  std::fflush(stdout);

  const bool tty = s.progress && isatty(fileno(stderr));
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<run_result> results;
  int run_index = 0;
  for (const run_spec& spec : specs) {
    for (int si = 0; si < s.seeds; ++si) {
      ++run_index;
      const std::uint64_t seed = s.seed_base + static_cast<std::uint64_t>(si);
      auto progress = [&](const progress_info& p) {
        if (!s.progress) return;
        const double elapsed =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const double done = (run_index - 1) + static_cast<double>(p.step) / p.steps;
        const double eta = done > 0 ? elapsed / done * (total_runs - done) : 0.0;
        if (tty) {
          const int width = 24;
          const int filled = static_cast<int>(width * static_cast<double>(p.step) / p.steps);
          std::string bar(static_cast<std::size_t>(filled), '#');
          bar.append(static_cast<std::size_t>(width - filled), '.');
          std::fprintf(stderr,
                       "\r[%2d/%d] %-15s seed %llu |%s| %3d%% loss %.4f  %6.0f img/s  ETA %s   ",
                       run_index, total_runs, spec.label().c_str(),
                       static_cast<unsigned long long>(seed), bar.c_str(), 100 * p.step / p.steps,
                       p.recent_loss, p.images_per_second, duration_text(eta).c_str());
          if (p.step == p.steps) std::fprintf(stderr, "\n");
        }
        if (p.evaluated && p.checkpoint) {
          std::fprintf(stderr,
                       "%s[%2d/%d] %-15s seed %llu step %5d/%d  train loss %.4f  test acc "
                       "%.2f%%  test loss %.4f  %.0f img/s  (elapsed %s, ETA %s)\n",
                       tty && p.step != p.steps ? "\n" : "", run_index, total_runs,
                       spec.label().c_str(), static_cast<unsigned long long>(seed), p.step, p.steps,
                       p.recent_loss, 100.0 * p.last_eval.test_accuracy, p.last_eval.test_loss,
                       p.images_per_second, duration_text(elapsed).c_str(),
                       duration_text(eta).c_str());
        }
      };
      try {
        results.push_back(train_run(train, test, s.train, spec, seed, progress));
      } catch (const std::exception& e) {
        std::fprintf(stderr, "\nfashion_mnist: %s\n", e.what());
        return 1;
      }
    }
  }
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::printf("\nResults: mean ± std over %d seed%s (test set: %lld images, eval-mode routing)\n\n",
              s.seeds, s.seeds == 1 ? "" : "s", static_cast<long long>(test.n));
  std::printf("%s", results_table(results, s.train).c_str());
  std::printf("\ntotal wall time %s (%.1f s) for %d runs\n", duration_text(total).c_str(), total,
              total_runs);
  std::printf(
      "\nThe router logits at the end, through the SparseMixer jitter mask (SPEC §2; mean ± std "
      "over seeds, every block, test set):\n\n%s",
      mask_table(results, s.train.model.jitter).c_str());
  std::int64_t nonfinite = 0;
  for (const run_result& r : results) nonfinite += r.nonfinite_rows;
  if (nonfinite > 0)
    std::printf("warning: the router saw %lld non-finite logit rows\n",
                static_cast<long long>(nonfinite));

  if (s.out.empty()) return 0;
  std::error_code ec;
  std::filesystem::create_directories(s.out, ec);
  if (ec || !write_csv_files(s.out, results, s.train)) {
    std::fprintf(stderr, "fashion_mnist: cannot write the CSV files in %s\n", s.out.c_str());
    return 1;
  }
  std::printf("wrote %s/train_curve.csv, test_curve.csv, runs.csv\n", s.out.c_str());
  if (s.plot) {
    const std::string png = s.out + "/fashion_mnist.png";
    const std::string cmd =
        python() + " '" + ROUTEGRAD_FASHION_PLOT_SCRIPT + "' '" + s.out + "' '" + png + "'";
    if (std::system(cmd.c_str()) == 0)
      std::printf("wrote %s\n", png.c_str());
    else
      std::fprintf(stderr,
                   "fashion_mnist: plotting failed (needs matplotlib: Debian python3-matplotlib); "
                   "the CSV files are there. Command: %s\n",
                   cmd.c_str());
  }
  return 0;
}
