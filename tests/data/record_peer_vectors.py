#!/usr/bin/python3
"""Record routing vectors from the published-algorithm PyTorch peers for tests/cpu/test_peer_vectors.cpp.

Run with Debian's python3 (python3-torch), on the CPU:

    /usr/bin/python3 tests/data/record_peer_vectors.py [PEERS_DIR] [OUTPUT]

PEERS_DIR defaults to <repository>/../shared/peers (it must hold routing_peers.py); OUTPUT defaults
to tests/data/peer_vectors.txt next to this script. Everything is float64 and seeded, so the output
is reproducible and rounding in the peer is negligible (~1e-16 relative).

What is recorded (see the header written into the output for the line format):
- sparsemixer_v1 (SparseMixer top-1, midpoint rule, eps = 0.1): per token the sampled expert D, the
  coin (derived from the forward value: mult == p_D -> 0, mult == p_D / 2 -> 1), the forward gate
  mult, a random upstream gradient gy and logits.grad after mult.backward(gy). Also the argmax a
  and the peer's masked softmax p_a, taken from a later peer call (same logits) in which that
  token happened to sample its argmax (then mult == p_a exactly: the argmax always keeps scale 1).
- switch_router with eps = 0 (noise == 1 exactly: the peer's eval behaviour; the peer has no
  eval flag): per token argmax, gate p_D, gy and logits.grad.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PEERS = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "..", "shared", "peers")
OUTPUT = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "peer_vectors.txt")
sys.path.insert(0, os.path.abspath(PEERS))

import torch  # noqa: E402
from routing_peers import sparsemixer_v1, switch_router  # noqa: E402  (dev = "cuda" is unused here)

SEED = 20240611
T = 6
EPS = 0.1


def fmt(x):
    return "%.17g" % float(x)


def draw_logits(kind, E):
    if kind == "near":  # N(3, 0.3^2): the eps-mask keeps several experts; a few low outliers
        z = 3.0 + 0.3 * torch.randn(T, E, dtype=torch.float64)
        n_out = max(1, E // 4)
        for t in range(T):
            idx = torch.randperm(E)[:n_out]
            z[t, idx] = torch.randn(n_out, dtype=torch.float64)
        return z
    if kind == "negative":  # all negative: the mask denominator is |z_i|, not the max
        return -3.0 + 0.3 * torch.randn(T, E, dtype=torch.float64)
    if kind == "normal":
        return torch.randn(T, E, dtype=torch.float64)
    raise ValueError(kind)


def record_sparsemixer(lines, name, kind, E):
    z0 = draw_logits(kind, E)
    gy = torch.randn(T, 1, dtype=torch.float64)
    x = z0.clone().requires_grad_(True)
    state = torch.get_rng_state()
    sample, mult = sparsemixer_v1(x, eps=EPS)
    mult.backward(gy)
    # p_D: the same peer call again from the same random state (so the same Gumbel draws and the
    # same D), with the coin forced to "keep" (torch.rand_like -> 1 > 0.5), so its mult is p_D.
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    rand_like = torch.rand_like
    torch.rand_like = lambda a, **kw: torch.ones_like(a, **kw)
    try:
        with torch.no_grad():
            sample_full, p_D = sparsemixer_v1(z0.clone(), eps=EPS)
    finally:
        torch.rand_like = rand_like
        torch.set_rng_state(after)
    assert torch.equal(sample_full, sample)
    top_idx = z0.argmax(dim=-1)
    # p_a from the peer itself: call again until each token has sampled its argmax once.
    p_a = [None] * T
    for _ in range(1000):
        if all(v is not None for v in p_a):
            break
        with torch.no_grad():
            s2, m2 = sparsemixer_v1(z0.clone(), eps=EPS)
        for t in range(T):
            if p_a[t] is None and int(s2[t, 0]) == int(top_idx[t]):
                p_a[t] = float(m2[t, 0])
    assert all(v is not None for v in p_a), "argmax never sampled"
    lines.append("case sparsemixer_midpoint %s %d %d %s" % (name, T, E, fmt(EPS)))
    for t in range(T):
        d = int(sample[t, 0])
        m = float(mult[t, 0])
        g = float(gy[t, 0])
        pd = float(p_D[t, 0])
        if m == pd:
            coin = 0
        elif m == 0.5 * pd:
            coin = 1
        else:
            raise AssertionError((name, t, m, pd))
        if d == int(top_idx[t]):
            assert coin == 0 and m == p_a[t], "the argmax keeps scale 1"
        lines.append("z %d %s" % (t, " ".join(fmt(v) for v in z0[t])))
        lines.append("pick %d %d %d %s %s %d %s" % (t, d, coin, fmt(m), fmt(g), int(top_idx[t]),
                                                    fmt(p_a[t])))
        lines.append("grad %d %s" % (t, " ".join(fmt(v) for v in x.grad[t])))
    lines.append("end")


def record_switch(lines, name, kind, E):
    z0 = draw_logits(kind, E)
    gy = torch.randn(T, 1, dtype=torch.float64)
    x = z0.clone().requires_grad_(True)
    sample, gate = switch_router(x, eps=0.0)  # noise = rand * 0 + 1 - 0 == 1 exactly
    gate.backward(gy)
    lines.append("case switch %s %d %d %s" % (name, T, E, fmt(0.0)))
    for t in range(T):
        d = int(sample[t, 0])
        lines.append("z %d %s" % (t, " ".join(fmt(v) for v in z0[t])))
        lines.append("pick %d %d 0 %s %s %d %s" % (t, d, fmt(gate[t, 0]), fmt(gy[t, 0]), d,
                                                   fmt(gate[t, 0])))
        lines.append("grad %d %s" % (t, " ".join(fmt(v) for v in x.grad[t])))
    lines.append("end")


def main():
    torch.manual_seed(SEED)
    lines = []
    for kind in ("near", "normal"):
        for E in (4, 8, 16):
            record_sparsemixer(lines, "%s_E%d" % (kind, E), kind, E)
    record_sparsemixer(lines, "negative_E8", "negative", 8)
    for kind, E in (("normal", 4), ("normal", 8), ("near", 16)):
        record_switch(lines, "%s_E%d" % (kind, E), kind, E)

    header = [
        "# Routing vectors recorded from the published-algorithm PyTorch peers",
        "# (routing_peers.py: sparsemixer_v1 = SparseMixer top-1 midpoint, switch_router).",
        "# Produced by: /usr/bin/python3 %s  (torch %s, float64, CPU,"
        % (" ".join([os.path.relpath(os.path.abspath(sys.argv[0]), REPO)] + sys.argv[1:]),
           torch.__version__),
        "#   torch.manual_seed(%d)); do not edit by hand: rerun the script." % SEED,
        "# Format, whitespace separated; blocks of",
        "#   case <estimator> <name> <T> <E> <eps>     estimator: sparsemixer_midpoint | switch",
        "#   then per token t = 0..T-1:",
        "#     z <t> <E logits>",
        "#     pick <t> <D> <coin> <gate> <gy> <argmax a> <p_a>",
        "#         D: the peer's choice; coin: 0 = scale 1, 1 = scale 1/2 (derived from the forward",
        "#         value); gate: the peer's forward value; gy: upstream gradient of the gate;",
        "#         p_a: the peer's (masked) softmax at the argmax (the eval-mode gate)",
        "#     grad <t> <E values of d(gy * gate)/d logits from the peer's autograd>",
        "#   end",
        "# switch was run with eps = 0 (noise == 1): deterministic, equal to eval mode.",
    ]
    with open(OUTPUT, "w") as f:
        f.write("\n".join(header + lines) + "\n")
    n_reduced = sum(1 for l in lines if l.startswith("pick") and l.split()[3] == "1")
    n_nonarg = sum(1 for l in lines if l.startswith("pick") and l.split()[2] != l.split()[6])
    print("wrote %s (%d bytes): %d reduced-scale picks, %d non-argmax picks"
          % (OUTPUT, os.path.getsize(OUTPUT), n_reduced, n_nonarg))


if __name__ == "__main__":
    main()
