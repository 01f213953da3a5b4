// estimator_analysis: the SPEC P4 estimator-bias study as a tool.
//
// Random problems (logits, expert outputs, smooth losses, ranges of E and k, jitter masks ε), the
// exact gradient ∇F_k of the sampled objective, and each estimator's exact expectation and
// variance by enumeration over every choice and coin (analysis.hpp). Prints one table per (k, ε),
// writes every per-problem number to a CSV file and plots the medians (plot.py, matplotlib).
//
//   estimator_analysis [--seed S] [--reps N] [--k 1,2] [--eps none,0.1,0.01] [--experts 2,4,8,16]
//                      [--dims 4,16] [--sigmas 0.5,1,2] [--diagnostic] [--by-loss]
//                      [--out DIR | --no-out] [--no-plot] [--quiet]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "analysis.hpp"

#ifndef ROUTEGRAD_ANALYSIS_PLOT_SCRIPT
#define ROUTEGRAD_ANALYSIS_PLOT_SCRIPT "plot.py"
#endif

namespace {

using namespace rg_analysis;

struct settings {
  study_config cfg;
  bool by_loss = false;
  bool plot = true;
  bool quiet = false;
  std::string out = "estimator_analysis_out";
};

[[noreturn]] void usage(int code) {
  std::fprintf(code ? stderr : stdout,
               "usage: estimator_analysis [--seed S] [--reps N] [--k 1,2] [--eps none,0.1,0.01]\n"
               "         [--experts 2,4,8,16] [--dims 4,16] [--sigmas 0.5,1,2] [--diagnostic]\n"
               "         [--by-loss] [--out DIR | --no-out] [--no-plot] [--quiet]\n"
               "  --diagnostic  add midpoint* (midpoint with the coin flipped at D = a too; not a "
               "SPEC rule)\n"
               "  --by-loss     also print the median relative bias per loss\n"
               "  --out DIR     write DIR/estimator_analysis.csv and DIR/estimator_analysis.png\n");
  std::exit(code);
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

double to_double(const std::string& s, const char* flag) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end == s.c_str() || *end != '\0') {
    std::fprintf(stderr, "estimator_analysis: %s: '%s' is not a number\n", flag, s.c_str());
    std::exit(2);
  }
  return v;
}

int to_int(const std::string& s, const char* flag, int lo) {
  const double v = to_double(s, flag);
  if (v != static_cast<int>(v) || v < lo) {
    std::fprintf(stderr, "estimator_analysis: %s: '%s' must be an integer >= %d\n", flag, s.c_str(),
                 lo);
    std::exit(2);
  }
  return static_cast<int>(v);
}

settings parse(int argc, char** argv) {
  settings s;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "estimator_analysis: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--seed") {
      s.cfg.seed = std::strtoull(next().c_str(), nullptr, 0);
    } else if (a == "--reps") {
      s.cfg.reps = to_int(next(), "--reps", 1);
    } else if (a == "--k") {
      s.cfg.ks.clear();
      for (const std::string& v : split_list(next())) s.cfg.ks.push_back(to_int(v, "--k", 1));
    } else if (a == "--eps") {
      s.cfg.eps.clear();
      for (const std::string& v : split_list(next())) {
        const double e = (v == "none") ? ref::no_mask : to_double(v, "--eps");
        if (!(e == ref::no_mask || (e >= 0.0 && e < 0.5))) {
          std::fprintf(stderr, "estimator_analysis: --eps: %s must be 'none' or in [0, 0.5)\n",
                       v.c_str());
          std::exit(2);
        }
        s.cfg.eps.push_back(e);
      }
    } else if (a == "--experts") {
      s.cfg.experts.clear();
      for (const std::string& v : split_list(next()))
        s.cfg.experts.push_back(to_int(v, "--experts", 2));
    } else if (a == "--dims") {
      s.cfg.dims.clear();
      for (const std::string& v : split_list(next())) s.cfg.dims.push_back(to_int(v, "--dims", 1));
    } else if (a == "--sigmas") {
      s.cfg.sigmas.clear();
      for (const std::string& v : split_list(next()))
        s.cfg.sigmas.push_back(to_double(v, "--sigmas"));
    } else if (a == "--diagnostic") {
      s.cfg.estimators.insert(s.cfg.estimators.begin() + 4, estimator_id::midpoint_star);
    } else if (a == "--by-loss") {
      s.by_loss = true;
    } else if (a == "--out") {
      s.out = next();
    } else if (a == "--no-out") {
      s.out.clear();
    } else if (a == "--no-plot") {
      s.plot = false;
    } else if (a == "--quiet") {
      s.quiet = true;
    } else if (a == "--help" || a == "-h") {
      usage(0);
    } else {
      std::fprintf(stderr, "estimator_analysis: unknown argument '%s'\n", a.c_str());
      usage(2);
    }
  }
  if (s.cfg.ks.empty() || s.cfg.eps.empty() || s.cfg.experts.empty() || s.cfg.dims.empty() ||
      s.cfg.sigmas.empty()) {
    std::fprintf(stderr, "estimator_analysis: every list needs at least one value\n");
    std::exit(2);
  }
  return s;
}

template <class T, class F>
std::string join(const std::vector<T>& v, F&& fmt) {
  std::string s;
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + fmt(v[i]);
  return s;
}

void print_setting(const settings& s, const study_result& res, int k, double eps, int degenerate) {
  auto keep = [&](const problem_result& p) { return p.k == k && p.eps == eps; };
  const std::vector<summary_row> rows = summarize(s.cfg, res, keep);
  const int n = rows.empty() ? 0 : rows[0].problems;
  std::printf("\n### k = %d, mask eps = %s  (%d problems; %d with grad F = 0 skipped)\n\n", k,
              eps_text(eps).c_str(), n, degenerate);
  std::printf(
      "| estimator | mean cos | mean rel | median rel | median relvar | median relmse | rel < "
      "euler | rel < grad0_only |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  for (const summary_row& r : rows)
    std::printf("| %s | %.4f | %.3f | %.3f | %.3g | %.3g | %.2f | %.2f |\n", r.estimator.c_str(),
                r.mean_cos, r.mean_rel, r.median_rel, r.median_relvar, r.median_relmse,
                r.win_vs_euler, r.win_vs_grad0);

  // The paper's ordering claim: midpoint closer than euler, both closer than "∇₀ only".
  const std::size_t ie = index_of(s.cfg, estimator_id::euler);
  const std::size_t im = index_of(s.cfg, estimator_id::midpoint);
  const std::size_t ig = index_of(s.cfg, estimator_id::grad0_only);
  if (ie < rows.size() && im < rows.size() && ig < rows.size() && n > 0) {
    const bool med =
        rows[im].median_rel < rows[ie].median_rel && rows[ie].median_rel < rows[ig].median_rel;
    std::printf(
        "\nclaim 'midpoint closer than euler, both closer than grad0_only' (median rel): %s; "
        "midpoint beats euler on %.0f%% of problems, euler beats grad0_only on %.0f%%\n",
        med ? "HOLDS" : "FAILS", 100.0 * rows[im].win_vs_euler, 100.0 * rows[ie].win_vs_grad0);
  }

  if (s.by_loss) {
    std::printf("\nmedian rel by loss:\n\n| estimator |");
    for (ref::loss_type lt : s.cfg.losses) std::printf(" %s |", ref::loss_name(lt));
    std::printf("\n|---|");
    for (std::size_t i = 0; i < s.cfg.losses.size(); ++i) std::printf("---|");
    std::printf("\n");
    std::vector<std::vector<summary_row>> by;
    for (ref::loss_type lt : s.cfg.losses)
      by.push_back(
          summarize(s.cfg, res, [&](const problem_result& p) { return keep(p) && p.loss == lt; }));
    for (std::size_t i = 0; i < s.cfg.estimators.size(); ++i) {
      std::printf("| %s |", estimator_name(s.cfg.estimators[i]));
      for (const auto& b : by) std::printf(" %.3f |", b[i].median_rel);
      std::printf("\n");
    }
  }
}

bool write_csv(const std::string& path, const settings& s, const study_result& res) {
  std::ofstream out(path);
  if (!out) return false;
  out << "k,eps,E,d,sigma,loss,grad_norm,estimator,cos,rel,relvar,relmse\n";
  char buf[256];
  for (const problem_result& p : res.problems) {
    for (std::size_t i = 0; i < p.m.size(); ++i) {
      const metric& m = p.m[i];
      std::snprintf(buf, sizeof buf, "%d,%s,%d,%d,%g,%s,%.9g,%s,%.9g,%.9g,%.9g,%.9g\n", p.k,
                    eps_text(p.eps).c_str(), p.E, p.d, p.sigma, ref::loss_name(p.loss), p.grad_norm,
                    estimator_name(s.cfg.estimators[i]), m.cos, m.rel, m.relvar, m.relmse);
      out << buf;
    }
  }
  return static_cast<bool>(out);
}

/// The Python with matplotlib: $ROUTEGRAD_PYTHON, else Debian's /usr/bin/python3 (where
/// python3-matplotlib installs it), else python3 on the PATH.
std::string python() {
  if (const char* p = std::getenv("ROUTEGRAD_PYTHON")) return p;
  if (std::ifstream("/usr/bin/python3")) return "/usr/bin/python3";
  return "python3";
}

}  // namespace

int main(int argc, char** argv) {
  const settings s = parse(argc, argv);
  const auto t0 = std::chrono::steady_clock::now();
  const study_result res = run_study(s.cfg, [&](long done, long total) {
    if (!s.quiet) std::fprintf(stderr, "\r  problems %ld / %ld", done, total);
  });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!s.quiet) std::fprintf(stderr, "\n");

  std::printf(
      "estimator_analysis: seed %#llx, %d problems per cell; E in {%s}, d in {%s}, sigma "
      "in {%s}, losses {",
      s.cfg.seed, s.cfg.reps, join(s.cfg.experts, [](int v) { return std::to_string(v); }).c_str(),
      join(s.cfg.dims, [](int v) { return std::to_string(v); }).c_str(),
      join(s.cfg.sigmas, [](double v) { return eps_text(v); }).c_str());
  for (std::size_t i = 0; i < s.cfg.losses.size(); ++i)
    std::printf("%s%s", i ? "," : "", ref::loss_name(s.cfg.losses[i]));
  std::printf("}; %.1f s\n", secs);
  std::printf(
      "Exact expectations by enumeration (no sampling). Target: grad F_k, the exact gradient of "
      "the sampled objective.\nrel = |E[g] - grad F| / |grad F|, relvar = tr Cov[g] / |grad "
      "F|^2, relmse = rel^2 + relvar (one sample);\n'rel < X' = fraction of problems with a "
      "strictly smaller rel than X. dense and topk_softmax are deterministic (no mask).\n");

  std::size_t setting = 0;
  for (int k : s.cfg.ks)
    for (double eps : s.cfg.eps)
      print_setting(s, res, k, eps, res.degenerate_by_setting[setting++]);

  if (s.out.empty()) return 0;
  std::error_code ec;
  std::filesystem::create_directories(s.out, ec);
  if (ec) {
    std::fprintf(stderr, "estimator_analysis: cannot create %s\n", s.out.c_str());
    return 1;
  }
  const std::string csv = s.out + "/estimator_analysis.csv";
  if (!write_csv(csv, s, res)) {
    std::fprintf(stderr, "estimator_analysis: cannot write %s\n", csv.c_str());
    return 1;
  }
  std::printf("\nwrote %s\n", csv.c_str());
  if (s.plot) {
    const std::string png = s.out + "/estimator_analysis.png";
    const std::string cmd =
        python() + " '" + ROUTEGRAD_ANALYSIS_PLOT_SCRIPT + "' '" + csv + "' '" + png + "'";
    if (std::system(cmd.c_str()) == 0)
      std::printf("wrote %s\n", png.c_str());
    else
      std::fprintf(stderr,
                   "estimator_analysis: plotting failed (needs matplotlib: Debian "
                   "python3-matplotlib); the CSV is there. Command: %s\n",
                   cmd.c_str());
  }
  return 0;
}
