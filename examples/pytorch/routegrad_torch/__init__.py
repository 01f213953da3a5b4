"""routegrad's routing estimators for PyTorch: CPU and CUDA tensors, autograd.

    from routegrad_torch import route
    r = route(logits, k=2, estimator="sparsemixer_heun3", seed=0, offset=step)
    y = (r.gates.unsqueeze(-1) * expert_outputs(r.experts)).sum(1)   # r.gates carries the gradient

The C++ extension (../routegrad_ext.cpp, plus ../routegrad_ext_cuda*.cu when torch has CUDA and
nvcc is found) is compiled on first use with torch.utils.cpp_extension.load into
$ROUTEGRAD_TORCH_BUILD_DIR (default: <repo>/build/pytorch-ext).
"""
import collections
import os

import torch
from torch.utils import cpp_extension

ESTIMATORS = ("switch", "topk_softmax", "sparsemixer_euler", "sparsemixer_midpoint",
              "sparsemixer_heun3")

_EXAMPLE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPO = os.path.dirname(os.path.dirname(_EXAMPLE_DIR))
_ext = None


def _cuda_buildable():
    home = cpp_extension.CUDA_HOME
    return (torch.cuda.is_available() and home is not None
            and os.path.exists(os.path.join(home, "bin", "nvcc")))


def load(build_directory=None, verbose=False):
    """Builds (once per process; ninja skips an up-to-date build) and returns the extension."""
    global _ext
    if _ext is None:
        build = (build_directory or os.environ.get("ROUTEGRAD_TORCH_BUILD_DIR")
                 or os.path.join(_REPO, "build", "pytorch-ext"))
        os.makedirs(build, exist_ok=True)
        with_cuda = _cuda_buildable()
        sources = [os.path.join(_EXAMPLE_DIR, "routegrad_ext.cpp")]
        flags = ["-O2", "-std=c++17"]
        if with_cuda:
            # One file per logits type, so that ninja compiles them in parallel (cuh's note).
            sources += [os.path.join(_EXAMPLE_DIR, "routegrad_ext_cuda" + part + ".cu")
                        for part in ("", "_float", "_double", "_half", "_bfloat16")]
            flags.append("-DROUTEGRAD_EXT_CUDA=1")
        _ext = cpp_extension.load(
            name="routegrad_ext_cuda" if with_cuda else "routegrad_ext_cpu",
            sources=sources,
            extra_include_paths=[os.path.join(_REPO, "include")],
            # OpenMP threads for the CPU back end (bit-identical results for any thread count).
            extra_cflags=flags + ["-fopenmp", "-DROUTEGRAD_HAS_OPENMP=1"],
            extra_cuda_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=build,
            with_cuda=with_cuda,
            verbose=verbose)
    return _ext


class RouteFunction(torch.autograd.Function):
    """forward: routegrad's forward; backward: routegrad's estimator of dL/dlogits.

    apply(logits, k, estimator, mode, jitter_eps, seed, offset, renormalize, load_balance_coef,
    z_loss_coef, offset_counter) -> (gates, experts, coins, load_balance_loss, z_loss,
    expert_counts, nonfinite_rows). gates and the two losses are differentiable; a loss that is
    used costs one host synchronisation in the backward (its upstream gradient scales the
    coefficient).
    """

    @staticmethod
    def forward(ctx, logits, k, estimator, mode, jitter_eps, seed, offset, renormalize,
                load_balance_coef, z_loss_coef, offset_counter):
        ctx.options = (k, estimator, mode, jitter_eps, seed, offset, renormalize)
        ctx.coefs = (load_balance_coef, z_loss_coef)
        ctx.offset_counter = offset_counter
        gates, experts, coins, stats = load().forward(logits, k, estimator, mode, jitter_eps, seed,
                                                      offset, renormalize, load_balance_coef,
                                                      z_loss_coef, offset_counter)
        counts, nonfinite = stats["expert_counts"], stats["nonfinite_rows"]
        ctx.save_for_backward(logits, experts, coins, counts)
        ctx.mark_non_differentiable(experts, coins, counts, nonfinite)
        ctx.set_materialize_grads(False)
        return (gates, experts, coins, stats["load_balance_loss"], stats["z_loss"], counts,
                nonfinite)

    @staticmethod
    def backward(ctx, grad_gates, _experts, _coins, grad_lb, grad_z, _counts, _nonfinite):
        logits, experts, coins, counts = ctx.saved_tensors
        alpha, beta = ctx.coefs
        alpha = alpha * float(grad_lb) if grad_lb is not None else 0.0
        beta = beta * float(grad_z) if grad_z is not None else 0.0
        if grad_gates is None:
            grad_gates = torch.zeros(experts.shape, dtype=logits.dtype, device=logits.device)
        grad = load().backward(logits, experts, coins, grad_gates, *ctx.options, alpha, beta,
                               counts, ctx.offset_counter)
        return (grad,) + (None,) * 10


Routing = collections.namedtuple(
    "Routing", "gates experts coins load_balance_loss z_loss expert_counts nonfinite_rows")


def route(logits, k=2, estimator="sparsemixer_heun3", mode="train", jitter_eps=0.1, seed=0,
          offset=0, renormalize=False, load_balance_coef=0.0, z_loss_coef=0.0,
          offset_counter=None):
    """Routes logits [T, E] (CPU: float32/64; CUDA: also float16/bfloat16) to k experts a token.

    Use a new offset (or seed) per training step; the same (seed, offset) gives the same
    choices. Returns a Routing; gates [T, k] and the two auxiliary losses carry gradients.

    offset_counter: optional one-element int64 tensor on the logits' device whose value is added
    to offset when the forward and the backward run (on CUDA, read by the kernels: a step captured
    in a CUDA graph with `counter += 1` ahead of it draws anew on every replay). Keep its value
    between a step's forward and backward.
    """
    return Routing(*RouteFunction.apply(logits, int(k), estimator, mode, float(jitter_eps),
                                        int(seed), int(offset), bool(renormalize),
                                        float(load_balance_coef), float(z_loss_coef),
                                        offset_counter))
