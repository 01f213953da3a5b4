#!/usr/bin/env python3
"""Plots the curves that fashion_mnist writes.

    plot.py OUT_DIR out.png      (reads OUT_DIR/train_curve.csv and OUT_DIR/test_curve.csv)

Three panels against the training step, one line per configuration (estimator, +omega): the
training cross-entropy (mean over each logging window), the test loss and the test accuracy at
the checkpoints. Lines are the mean over seeds, bands span min to max. Needs matplotlib (Debian:
python3-matplotlib).
"""
import csv
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {
    "switch": "tab:gray",
    "topk_softmax": "tab:red",
    "euler": "tab:blue",
    "midpoint": "tab:orange",
    "heun3": "tab:green",
    "dense": "tab:purple",
}


def read(path, value_cols):
    """label -> step -> column -> [values over seeds]"""
    data = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    order = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            label = row["label"]
            if label not in order:
                order.append(label)
            for c in value_cols:
                data[label][int(row["step"])][c].append(float(row[c]))
    return data, order


def draw(ax, data, order, col, scale=1.0):
    for label in order:
        steps = sorted(data[label])
        vals = [data[label][s][col] for s in steps]
        mean = [scale * sum(v) / len(v) for v in vals]
        lo = [scale * min(v) for v in vals]
        hi = [scale * max(v) for v in vals]
        est = label.split("+")[0]
        color = COLORS.get(est, "black")
        ls = "--" if label.endswith("+omega") else "-"
        ax.plot(steps, mean, color=color, linestyle=ls, label=label,
                marker="o" if len(steps) < 12 else None)
        ax.fill_between(steps, lo, hi, color=color, alpha=0.12, linewidth=0)


def main(out_dir, dst):
    train, order = read(os.path.join(out_dir, "train_curve.csv"), ["train_loss"])
    test, _ = read(os.path.join(out_dir, "test_curve.csv"), ["test_loss", "test_accuracy"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    draw(axes[0], train, order, "train_loss")
    axes[0].set_title("training loss (window mean)")
    axes[0].set_yscale("log")
    draw(axes[1], test, order, "test_loss")
    axes[1].set_title("test loss (eval routing)")
    draw(axes[2], test, order, "test_accuracy", scale=100.0)
    axes[2].set_title("test accuracy %")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.suptitle("Fashion-MNIST MoE classifier per routing-gradient estimator "
                 "(mean over seeds, band = min..max)")
    fig.tight_layout()
    fig.savefig(dst, dpi=90)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: plot.py OUT_DIR out.png")
    main(sys.argv[1], sys.argv[2])
