#!/usr/bin/env python3
"""Times routegrad's heun3 top-2 routing step against Hugging Face transformers' PhiMoE
`sparsemixer` (GRIN), both called from eager PyTorch as a training loop calls them.

    python3 examples/pytorch/bench_vs_hf.py            # needs a GPU, transformers, nvcc

One step = forward (choices + gates) + backward to the logits, for a random upstream gradient.
Each figure is the mean over `iters` steps after warm-up, timed with CUDA events around the whole
loop (so it includes each call's launch and host overhead, as a plain training loop sees it).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import routegrad_torch as rt  # noqa: E402


def time_steps(step, iters=50, warmup=5):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) * 1e3 / iters  # µs per step


def main():
    from transformers.models.phimoe.modeling_phimoe import sparsemixer
    rt.load()
    eps = 0.01  # PhiMoE's router_jitter_noise
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, heun3 top-2, eps {eps}")
    print(f"{'T':>7} {'E':>4} {'dtype':>9} {'HF sparsemixer (µs)':>20} {'routegrad (µs)':>15} "
          f"{'speed-up':>9}")
    for dtype in (torch.float32, torch.bfloat16):
        for tokens, experts in ((4096, 16), (32768, 16), (32768, 64), (131072, 16),
                                (131072, 64)):
            z = torch.randn(tokens, experts, device="cuda", dtype=dtype).requires_grad_()
            grad = torch.randn(tokens, 2, device="cuda", dtype=dtype)
            state = {"offset": 0}

            def hf_step():
                gates, _ = sparsemixer(z, jitter_eps=eps, training=True, top_k=2)
                gates.backward(grad)

            def ours_step():
                state["offset"] += 1
                r = rt.route(z, k=2, estimator="sparsemixer_heun3", jitter_eps=eps,
                             offset=state["offset"])
                r.gates.backward(grad)

            try:
                hf = time_steps(hf_step)
            except Exception as ex:  # noqa: BLE001 -- report and go on
                print(f"{tokens:>7} {experts:>4} {str(dtype)[6:]:>9}  HF failed: {ex}")
                continue
            ours = time_steps(ours_step)
            print(f"{tokens:>7} {experts:>4} {str(dtype)[6:]:>9} {hf:>20.1f} {ours:>15.1f} "
                  f"{hf / ours:>8.1f}x", flush=True)


def profile_one_step():
    """Where a step's time goes (the extension's host overhead vs its kernels), T=4096, E=16."""
    z = torch.randn(4096, 16, device="cuda").requires_grad_()
    grad = torch.randn(4096, 2, device="cuda")

    def step():
        rt.route(z, k=2, estimator="sparsemixer_heun3", jitter_eps=0.01).gates.backward(grad)

    time_steps(step)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
    if "--profile" in sys.argv:
        profile_one_step()
