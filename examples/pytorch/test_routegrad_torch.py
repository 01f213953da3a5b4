#!/usr/bin/env python3
"""Tests of the routegrad PyTorch extension (plain script: no pytest needed).

    /usr/bin/python3 examples/pytorch/test_routegrad_torch.py

Builds the extension (routegrad_torch.load; build directory: $ROUTEGRAD_TORCH_BUILD_DIR), runs
every check on the CPU (and the CUDA ones when torch has a GPU), prints "N passed, M failed" last
and exits non-zero when a check failed. Checks whose dependency is missing print "skip: ..." and
count as neither.
"""
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import routegrad_torch as rt  # noqa: E402

CHECKS = []
SKIP = "skip"


def check(fn):
    CHECKS.append(fn)
    return fn


def close(a, b, dtype):
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def heun3_top2_reference(z, experts, coins, eps):
    """SparseMixer heun3, top-2, for given choices and coins, in plain PyTorch.

    Per slot: the jitter mask (m - z_i) / max(|z_i|, m) > 2 eps, with m the largest logit not
    taken by an earlier slot (|z_i| is the original logit); pi = softmax over the candidates;
    gate = c * pi_D with c = 1/3 for coin 1, else 1. The gradient is backward weight 1 times
    J = pi_D (delta - pi) over the slot's candidates, without the factor c: the gate is written as
    pi_D + (c pi_D - pi_D).detach(), whose autograd gradient is exactly that rule.
    """
    taken = torch.zeros_like(z, dtype=torch.bool)
    gates = []
    for j in range(2):
        d = experts[:, j:j + 1].long()
        with torch.no_grad():
            m = z.masked_fill(taken, float("-inf")).max(-1, keepdim=True).values
            masked = taken | ((m - z) / torch.maximum(z.abs(), m) > 2 * eps)
        pi_d = z.masked_fill(masked, float("-inf")).softmax(-1).gather(-1, d)
        c = torch.ones_like(pi_d).masked_fill(coins[:, j:j + 1] == 1, 1.0 / 3.0)
        gates.append(pi_d + (c * pi_d - pi_d).detach())
        taken = taken.scatter(-1, d, True)
    return torch.cat(gates, -1)


def test_logits(dtype, device="cpu"):
    """Rows of three kinds: randn, and logits near 4 and near 10 (where the mask keeps more)."""
    g = torch.Generator().manual_seed(1234)
    z = torch.cat([torch.randn(96, 8, generator=g, dtype=torch.float64),
                   4 + 0.5 * torch.randn(96, 8, generator=g, dtype=torch.float64),
                   10 + 0.2 * torch.randn(64, 8, generator=g, dtype=torch.float64)])
    return z.to(device=device, dtype=dtype)


@check
def heun3_top2_matches_pure_pytorch():
    for dtype in (torch.float64, torch.float32):
        for mode in ("train", "eval"):
            for eps in (0.1, 0.01):
                z = test_logits(dtype).requires_grad_()
                r = rt.route(z, k=2, estimator="sparsemixer_heun3", mode=mode, jitter_eps=eps,
                             seed=7, offset=3)
                grad_gates = torch.randn(r.gates.shape, dtype=dtype,
                                         generator=torch.Generator().manual_seed(5))
                r.gates.backward(grad_gates)
                zr = z.detach().clone().requires_grad_()
                ref = heun3_top2_reference(zr, r.experts, r.coins, eps)
                ref.backward(grad_gates)
                close(r.gates, ref.detach(), dtype)
                close(z.grad, zr.grad, dtype)
                assert r.experts.dtype == torch.int32 and r.coins.dtype == torch.uint8
                assert (r.experts[:, 0] != r.experts[:, 1]).all()
                if mode == "train":  # the check covers both coins and sampled non-argmax choices
                    assert (r.coins == 1).any() and (r.coins == 0).any(), (dtype, eps)
                else:
                    assert (r.coins == 0).all()


@check
def topk_softmax_matches_pure_pytorch():
    for dtype in (torch.float64, torch.float32):
        z = test_logits(dtype).requires_grad_()
        r = rt.route(z, k=3, estimator="topk_softmax", seed=1)
        grad_gates = torch.randn(r.gates.shape, dtype=dtype)
        r.gates.backward(grad_gates)
        zr = z.detach().clone().requires_grad_()
        p = torch.softmax(zr, -1)
        idx = p.topk(3, dim=-1).indices
        ref = p.gather(-1, idx)
        ref.backward(grad_gates)
        assert torch.equal(r.experts.long(), idx)
        close(r.gates, ref.detach(), dtype)
        close(z.grad, zr.grad, dtype)


@check
def aux_losses_and_their_gradients():
    # load balancing alpha*E*sum_e f_e P_e and z-loss beta*mean(lse^2), with upstream weights.
    alpha, beta, k = 0.01, 0.001, 2
    z = test_logits(torch.float64).requires_grad_()
    T, E = z.shape
    r = rt.route(z, k=k, estimator="topk_softmax", load_balance_coef=alpha, z_loss_coef=beta)
    (3 * r.load_balance_loss + 2 * r.z_loss).backward()
    zr = z.detach().clone().requires_grad_()
    f = torch.bincount(zr.topk(k, -1).indices.flatten(), minlength=E).double() / (T * k)
    lb = alpha * E * (f * zr.softmax(-1).mean(0)).sum()
    zl = beta * (torch.logsumexp(zr, -1) ** 2).mean()
    (3 * lb + 2 * zl).backward()
    assert torch.equal(r.expert_counts, (f * T * k).long())
    close(r.load_balance_loss, lb.detach(), torch.float64)
    close(r.z_loss, zl.detach(), torch.float64)
    close(z.grad, zr.grad, torch.float64)
    # Without coefficients the loss values are not computed: both are exactly 0.
    r0 = rt.route(z.detach(), k=k, estimator="topk_softmax")
    assert float(r0.load_balance_loss) == 0.0 and float(r0.z_loss) == 0.0


@check
def same_seed_and_offset_same_choices():
    z = test_logits(torch.float32)
    for est in rt.ESTIMATORS:
        a = rt.route(z, k=2, estimator=est, seed=11, offset=5)
        b = rt.route(z, k=2, estimator=est, seed=11, offset=5)
        assert torch.equal(a.experts, b.experts) and torch.equal(a.coins, b.coins), est
        assert torch.equal(a.gates, b.gates), est
    a = rt.route(z, k=2, seed=11, offset=5)
    c = rt.route(z, k=2, seed=11, offset=6)
    assert not torch.equal(a.experts, c.experts), "another offset should draw other choices"


@check
def offset_counter_adds_to_the_offset():
    # A counter holding c draws as offset + c, forward and backward (Switch's backward redraws
    # its noise from the same stream); a bad counter is refused naming it.
    z = test_logits(torch.float32)
    gg = torch.randn(z.shape[0], 2, dtype=torch.float64).float()
    for est in rt.ESTIMATORS:
        counter = torch.tensor([4], dtype=torch.int64)
        za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
        a = rt.route(za, k=2, estimator=est, seed=11, offset=1, offset_counter=counter)
        b = rt.route(zb, k=2, estimator=est, seed=11, offset=5)
        assert torch.equal(a.experts, b.experts) and torch.equal(a.coins, b.coins), est
        assert torch.equal(a.gates, b.gates), est
        a.gates.backward(gg)
        b.gates.backward(gg)
        assert torch.equal(za.grad, zb.grad), est
    c = rt.route(z, k=2, seed=11, offset=1, offset_counter=torch.tensor([5]))
    assert not torch.equal(c.experts, b.experts), "another counter value should draw anew"
    raises(lambda: rt.route(z, k=2, offset_counter=torch.tensor([1, 2])), "offset_counter")
    raises(lambda: rt.route(z, k=2, offset_counter=torch.tensor([1.0])), "offset_counter", "Long")


def raises(fn, *words):
    try:
        fn()
    except RuntimeError as ex:
        for w in words:
            assert w in str(ex), f"message {str(ex)!r} does not mention {w!r}"
        return
    raise AssertionError(f"no RuntimeError (expected one mentioning {words})")


@check
def bad_input_raises_runtime_error_naming_the_argument():
    ext = rt.load()
    z = torch.randn(4, 8)
    raises(lambda: rt.route(z, k=9), "options.k", "1 <= k <= E")  # routegrad's own message
    raises(lambda: rt.route(z, k=0), "options.k")
    raises(lambda: rt.route(z.view(2, 2, 8), k=2), "logits", "2-D")
    raises(lambda: rt.route(torch.ones(4, 8, dtype=torch.int64), k=2), "logits", "float32")
    raises(lambda: rt.route(z, k=2, jitter_eps=0.5), "options.jitter_eps")
    raises(lambda: rt.route(z, k=2, estimator="top1"), "estimator", "top1")
    raises(lambda: rt.route(z, k=2, mode="test"), "mode")
    r = rt.route(z, k=2)
    opts = (2, "sparsemixer_heun3", "train", 0.1, 0, 0, False, 0.0, 0.0)
    bad = r.experts.clone()
    bad[1, 1] = 8
    raises(lambda: ext.backward(z, bad, r.coins, r.gates, *opts), "state.experts", "[0, E)")
    raises(lambda: ext.backward(z, r.experts.long(), r.coins, r.gates, *opts), "experts", "Int")
    raises(lambda: ext.backward(z, r.experts, None, r.gates, *opts), "state.coins")
    raises(lambda: ext.backward(z, r.experts, r.coins, r.gates[:3], *opts), "grad_gates")
    lb = opts[:7] + (0.01, 0.0)
    raises(lambda: ext.backward(z, r.experts, r.coins, r.gates, *lb), "stats.expert_counts")


@check
def cuda_matches_cpu():
    if not (torch.cuda.is_available() and rt.load().with_cuda):
        return SKIP + ": no CUDA device, or the extension was built without its CUDA path"
    ext = rt.load()
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        z = test_logits(dtype, "cuda").requires_grad_()
        r = rt.route(z, k=2, seed=3, offset=9)
        grad_gates = torch.randn(r.gates.shape, dtype=dtype, device="cuda")
        r.gates.backward(grad_gates)
        # The CPU on the GPU's choices (a hand-built state), in float32 math as on the GPU.
        zc = z.detach().cpu().to(torch.float64 if dtype == torch.float64 else torch.float32)
        opts = (2, "sparsemixer_heun3", "train", 0.1, 3, 9, False, 0.0, 0.0)
        ref = heun3_top2_reference(zc, r.experts.cpu(), r.coins.cpu(), 0.1)
        grad = ext.backward(zc, r.experts.cpu(), r.coins.cpu(), grad_gates.cpu().to(zc.dtype),
                            *opts)
        tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)
        torch.testing.assert_close(r.gates.cpu().to(zc.dtype), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(z.grad.cpu().to(zc.dtype), grad, rtol=tol, atol=tol)
        same = (r.experts.cpu() == rt.route(zc, k=2, seed=3, offset=9).experts).float().mean()
        assert same >= 0.99, (dtype, same)


@check
def cuda_graph_with_offset_counter_draws_anew():
    # A step captured in a CUDA graph as [counter += 1, route]: replay r draws as offset + r.
    if not (torch.cuda.is_available() and rt.load().with_cuda):
        return SKIP + ": no CUDA device, or the extension was built without its CUDA path"
    z = test_logits(torch.float32, "cuda")
    counter = torch.zeros(1, dtype=torch.int64, device="cuda")
    out = {}

    def step():
        counter.add_(1)
        out["r"] = rt.route(z, k=2, seed=7, offset=100, offset_counter=counter)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    counter.zero_()
    drawn = []
    for r in range(1, 4):
        graph.replay()
        torch.cuda.synchronize()
        assert int(counter.item()) == r
        direct = rt.route(z, k=2, seed=7, offset=100 + r)
        assert torch.equal(out["r"].experts, direct.experts), r
        assert torch.equal(out["r"].coins, direct.coins), r
        assert torch.equal(out["r"].gates, direct.gates), r
        drawn.append(out["r"].experts.clone())
    assert not torch.equal(drawn[0], drawn[1]), "replays should draw anew"


@check
def heun3_top2_matches_hf_phimoe_sparsemixer():
    try:
        from transformers.models.phimoe.modeling_phimoe import sparsemixer
    except Exception as ex:  # noqa: BLE001 -- any import failure means "not available"
        return f"{SKIP}: transformers' PhiMoE sparsemixer is not importable ({type(ex).__name__})"
    ext = rt.load()
    eps = 0.01  # PhiMoE's router_jitter_noise
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ext.with_cuda else [])
    for device in devices:
        torch.manual_seed(0)
        z = test_logits(torch.float32, device).requires_grad_()
        hf_gates, hf_experts = sparsemixer(z, jitter_eps=eps, training=True, top_k=2)
        grad_gates = torch.randn(hf_gates.shape, device=device)
        hf_gates.backward(grad_gates)
        experts = hf_experts.to(torch.int32)
        # HF's coin, read off its gate: c = 0.3333 (its constant; ours is 1/3) or 1.
        zr = z.detach().clone().requires_grad_()
        pi = heun3_top2_reference(zr, experts, torch.zeros_like(experts), eps).detach()
        coins = (hf_gates.detach() < 0.5 * pi).to(torch.uint8)
        assert (coins == 1).any() and (coins == 0).any()
        torch.testing.assert_close(hf_gates.detach(), pi * torch.where(coins == 1, 0.3333, 1.0))
        # Our gates for these choices and coins, and our backward from this (hand-built) state.
        ours = heun3_top2_reference(zr, experts, coins, eps)
        torch.testing.assert_close(ours.detach(), pi * torch.where(coins == 1, 1 / 3, 1.0))
        grad = ext.backward(z.detach(), experts, coins, grad_gates, 2, "sparsemixer_heun3",
                            "train", eps, 0, 0, False, 0.0, 0.0)
        torch.testing.assert_close(grad, z.grad, rtol=1e-5, atol=1e-6)
        print(f"  HF PhiMoE sparsemixer ({device}): same gates (up to 0.3333 vs 1/3) and logit "
              f"gradients for {z.shape[0]} tokens")


def main():
    t0 = time.time()
    ext = rt.load(verbose=os.environ.get("ROUTEGRAD_TORCH_VERBOSE") == "1")
    print(f"extension ready in {time.time() - t0:.1f} s (torch {torch.__version__}, "
          f"CUDA path: {ext.with_cuda})")
    torch.manual_seed(0)
    passed = failed = 0
    for fn in CHECKS:
        try:
            outcome = fn()
        except Exception:  # noqa: BLE001 -- report every failure, then go on
            failed += 1
            print(f"FAIL {fn.__name__}")
            traceback.print_exc()
            continue
        if isinstance(outcome, str) and outcome.startswith(SKIP):
            print(f"{outcome} ({fn.__name__})")
        else:
            passed += 1
            print(f"ok   {fn.__name__}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
