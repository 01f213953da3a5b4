// Tables (mean ± std over seeds) and CSV files of the Fashion-MNIST comparison.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "trainer.hpp"

namespace fmnist {

struct mean_std {
  double mean = 0.0;
  double std = 0.0;  // sample standard deviation (n − 1); 0 for one value
  int n = 0;
};

inline mean_std stats_of(const std::vector<double>& v) {
  mean_std s;
  s.n = static_cast<int>(v.size());
  if (v.empty()) return s;
  for (double x : v) s.mean += x;
  s.mean /= static_cast<double>(v.size());
  if (v.size() > 1) {
    double ss = 0.0;
    for (double x : v) ss += (x - s.mean) * (x - s.mean);
    s.std = std::sqrt(ss / static_cast<double>(v.size() - 1));
  }
  return s;
}

inline std::string format_ms(const mean_std& s, const char* fmt, double scale = 1.0) {
  if (s.n == 0) return "—";
  char a[64], b[64];
  std::snprintf(a, sizeof a, fmt, s.mean * scale);
  std::snprintf(b, sizeof b, fmt, s.std * scale);
  return std::string(a) + " ± " + b;
}

/// The runs of one configuration (label), in seed order.
struct group {
  std::string label;
  std::vector<const run_result*> runs;
};

inline std::vector<group> group_runs(const std::vector<run_result>& runs) {
  std::vector<group> out;
  for (const run_result& r : runs) {
    const std::string l = r.spec.label();
    auto it = std::find_if(out.begin(), out.end(), [&](const group& g) { return g.label == l; });
    if (it == out.end()) {
      out.push_back({l, {}});
      it = out.end() - 1;
    }
    it->runs.push_back(&r);
  }
  return out;
}

/// The markdown table: test accuracy and loss at each checkpoint, steps to the training-loss
/// target, time per step and wall time; mean ± std over seeds.
inline std::string results_table(const std::vector<run_result>& runs, const train_config& cfg) {
  std::string out;
  const std::vector<group> groups = group_runs(runs);
  const std::vector<int> evals = checkpoint_steps(cfg);
  char buf[256];
  out += "| estimator |";
  for (int s : evals) {
    std::snprintf(buf, sizeof buf, " test acc %% @%d |", s);
    out += buf;
  }
  for (int s : evals) {
    std::snprintf(buf, sizeof buf, " test loss @%d |", s);
    out += buf;
  }
  std::snprintf(buf, sizeof buf, " steps to train loss < %g | ms / step | wall s |\n",
                cfg.loss_target);
  out += buf;
  out += "|---|";
  for (std::size_t i = 0; i < 2 * evals.size() + 3; ++i) out += "---|";
  out += "\n";
  for (const group& g : groups) {
    out += "| " + g.label + " |";
    for (int which = 0; which < 2; ++which) {
      for (int step : evals) {
        std::vector<double> v;
        for (const run_result* r : g.runs)
          for (const eval_point& e : r->evals)
            if (e.step == step) v.push_back(which == 0 ? e.test_accuracy : e.test_loss);
        out +=
            " " +
            (which == 0 ? format_ms(stats_of(v), "%.2f", 100.0) : format_ms(stats_of(v), "%.4f")) +
            " |";
      }
    }
    std::vector<double> reached, sps, wall;
    for (const run_result* r : g.runs) {
      if (r->steps_to_target >= 0) reached.push_back(r->steps_to_target);
      sps.push_back(r->seconds_per_step());
      wall.push_back(r->wall_seconds);
    }
    std::string target = format_ms(stats_of(reached), "%.0f");
    if (reached.size() != g.runs.size()) {
      std::snprintf(buf, sizeof buf, " (%zu of %zu seeds)", reached.size(), g.runs.size());
      target = reached.empty() ? std::string("not reached") : target + buf;
    }
    out += " " + target + " | " + format_ms(stats_of(sps), "%.1f", 1000.0) + " | " +
           format_ms(stats_of(wall), "%.1f") + " |\n";
  }
  return out;
}

/// The router's logits at the last checkpoint, seen through the SparseMixer mask (slot 1).
inline std::string mask_table(const std::vector<run_result>& runs, double eps) {
  std::string out;
  char buf[128];
  std::snprintf(buf, sizeof buf,
                "| estimator | experts the ε = %g mask keeps (slot 1, of E) | tokens left with one "
                "candidate %% |\n|---|---|---|\n",
                eps);
  out += buf;
  for (const group& g : group_runs(runs)) {
    std::vector<double> kept, single;
    for (const run_result* r : g.runs)
      if (!r->evals.empty()) {
        kept.push_back(r->evals.back().mask_candidates);
        single.push_back(r->evals.back().mask_single);
      }
    out += "| " + g.label + " | " + format_ms(stats_of(kept), "%.2f") + " | " +
           format_ms(stats_of(single), "%.1f", 100.0) + " |\n";
  }
  return out;
}

inline bool write_csv_files(const std::string& dir, const std::vector<run_result>& runs,
                            const train_config& cfg) {
  std::ofstream train(dir + "/train_curve.csv"), test(dir + "/test_curve.csv"),
      summary(dir + "/runs.csv");
  if (!train || !test || !summary) return false;
  train << "label,estimator,omega,seed,step,train_loss\n";
  test << "label,estimator,omega,seed,step,test_loss,test_accuracy,mask_candidates,mask_single\n";
  summary << "label,estimator,omega,seed,steps,steps_to_target,loss_target,seconds_per_step,"
             "train_seconds,wall_seconds,final_test_loss,final_test_accuracy,nonfinite_rows\n";
  char buf[512];
  for (const run_result& r : runs) {
    const std::string id = r.spec.label() + "," + r.spec.estimator + "," +
                           (r.spec.omega ? "1" : "0") + "," + std::to_string(r.seed);
    for (const curve_point& p : r.train_curve) {
      std::snprintf(buf, sizeof buf, ",%d,%.6g\n", p.step, p.loss);
      train << id << buf;
    }
    for (const eval_point& p : r.evals) {
      std::snprintf(buf, sizeof buf, ",%d,%.6g,%.6g,%.6g,%.6g\n", p.step, p.test_loss,
                    p.test_accuracy, p.mask_candidates, p.mask_single);
      test << id << buf;
    }
    const eval_point last = r.evals.empty() ? eval_point{0, 0.0, 0.0, 0.0, 0.0} : r.evals.back();
    std::snprintf(buf, sizeof buf, ",%d,%d,%g,%.6g,%.6g,%.6g,%.6g,%.6g,%lld\n", cfg.steps,
                  r.steps_to_target, cfg.loss_target, r.seconds_per_step(), r.train_seconds,
                  r.wall_seconds, last.test_loss, last.test_accuracy,
                  static_cast<long long>(r.nonfinite_rows));
    summary << id << buf;
  }
  return static_cast<bool>(train) && static_cast<bool>(test) && static_cast<bool>(summary);
}

}  // namespace fmnist
