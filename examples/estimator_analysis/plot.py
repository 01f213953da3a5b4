#!/usr/bin/env python3
"""Plots the CSV that estimator_analysis writes.

    plot.py estimator_analysis.csv estimator_analysis.png

One column per (k, mask eps) setting. Top row: median relative bias |E[g] - grad F| / |grad F|
against the number of experts E, one line per estimator. Bottom row: median one-sample relative
error (bias^2 + variance) / |grad F|^2. Needs matplotlib (Debian: python3-matplotlib).
"""
import csv
import statistics
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "grad0_only": ("tab:gray", "o", "-"),
    "euler": ("tab:blue", "s", "-"),
    "midpoint": ("tab:orange", "^", "-"),
    "heun3": ("tab:green", "D", "-"),
    "midpoint*": ("tab:orange", "^", ":"),
    "dense": ("tab:purple", "x", "--"),
    "topk_softmax": ("tab:red", "+", "--"),
}


def main(src, dst):
    rel = defaultdict(list)
    mse = defaultdict(list)
    settings, estimators, experts = [], [], set()
    with open(src, newline="") as f:
        for row in csv.DictReader(f):
            s = (int(row["k"]), row["eps"])
            if s not in settings:
                settings.append(s)
            if row["estimator"] not in estimators:
                estimators.append(row["estimator"])
            key = (s, row["estimator"], int(row["E"]))
            experts.add(int(row["E"]))
            rel[key].append(float(row["rel"]))
            mse[key].append(float(row["relmse"]))
    if not settings:
        sys.exit("plot.py: no rows in " + src)
    experts = sorted(experts)
    fig, axes = plt.subplots(2, len(settings), figsize=(3.2 * len(settings), 6.4), squeeze=False,
                             sharex=True)
    for c, s in enumerate(settings):
        for r, (data, label) in enumerate(
                [(rel, "median relative bias"), (mse, "median one-sample rel. error")]):
            ax = axes[r][c]
            for est in estimators:
                xs = [e for e in experts if (s, est, e) in data]
                ys = [statistics.median(data[(s, est, e)]) for e in xs]
                if not xs:
                    continue
                color, marker, ls = STYLE.get(est, ("black", ".", "-"))
                ax.plot(xs, ys, color=color, marker=marker, linestyle=ls, label=est)
            ax.set_xscale("log", base=2)
            ax.set_xticks(experts)
            ax.set_xticklabels([str(e) for e in experts])
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if r == 0:
                ax.set_title(f"k = {s[0]}, mask eps = {s[1]}")
            else:
                ax.set_xlabel("experts E")
            if c == 0:
                ax.set_ylabel(label)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Exact bias and error of routing-gradient estimators vs grad F (enumeration)")
    fig.tight_layout()
    fig.savefig(dst, dpi=90)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: plot.py estimator_analysis.csv out.png")
    main(sys.argv[1], sys.argv[2])
