"""routegrad's routing estimators in JAX, through XLA FFI custom calls (CPU).

    from routegrad_jax import route
    gates, experts, coins = route(logits, offset, k=2, estimator="sparsemixer_heun3", seed=0)
    # gates [T, k] carry routegrad's estimator of dL/dlogits through jax.grad / jax.vjp

`offset` is a uint32[2] array (low, high word of routegrad's 64-bit counter offset): pass a new
one each training step (e.g. offset_words(step)); the same (seed, offset) gives the same choices.
The handlers (routegrad_jax.cc) are compiled on first use with g++ against jax.ffi.include_dir()
into $ROUTEGRAD_JAX_BUILD_DIR (default: <repo>/build/jax-ext).
"""
import ctypes
import functools
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np

ESTIMATORS = ("switch", "topk_softmax", "sparsemixer_euler", "sparsemixer_midpoint",
              "sparsemixer_heun3")

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))
_registered = False


def build(build_directory=None):
    """Compiles routegrad_jax.cc (when the library is missing or older than its sources)."""
    build = build_directory or os.environ.get("ROUTEGRAD_JAX_BUILD_DIR") or os.path.join(
        _REPO, "build", "jax-ext")
    os.makedirs(build, exist_ok=True)
    lib = os.path.join(build, "libroutegrad_jax.so")
    source = os.path.join(_HERE, "routegrad_jax.cc")
    if not os.path.exists(lib) or os.path.getmtime(lib) < os.path.getmtime(source):
        subprocess.run(["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wextra",
                        "-I", os.path.join(_REPO, "include"), "-isystem", jax.ffi.include_dir(),
                        "-isystem", "/usr/include/eigen3", source, "-o", lib], check=True)
    return lib


def register():
    """Builds and registers the two FFI targets with XLA's CPU platform (once per process)."""
    global _registered
    if not _registered:
        lib = ctypes.cdll.LoadLibrary(build())
        jax.ffi.register_ffi_target("routegrad_forward", jax.ffi.pycapsule(lib.RoutegradForward),
                                    platform="cpu")
        jax.ffi.register_ffi_target("routegrad_backward",
                                    jax.ffi.pycapsule(lib.RoutegradBackward), platform="cpu")
        _registered = True


def offset_words(step):
    """routegrad's 64-bit counter offset as the uint32[2] array the handlers read."""
    return jnp.array([step & 0xFFFFFFFF, (step >> 32) & 0xFFFFFFFF], dtype=jnp.uint32)


def _attrs(estimator, seed, jitter_eps, train):
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: {estimator!r} is not one of {ESTIMATORS}")
    return dict(estimator=np.int64(ESTIMATORS.index(estimator)), seed=np.int64(seed),
                jitter_eps=np.float32(jitter_eps), train=bool(train))


def _forward(logits, offset, k, attrs):
    register()
    t = logits.shape[0]
    out = (jax.ShapeDtypeStruct((t, k), jnp.float32), jax.ShapeDtypeStruct((t, k), jnp.int32),
           jax.ShapeDtypeStruct((t, k), jnp.uint8))
    return jax.ffi.ffi_call("routegrad_forward", out)(logits, offset, **attrs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _route(logits, offset, k, estimator, seed, jitter_eps, train):
    return _forward(logits, offset, k, _attrs(estimator, seed, jitter_eps, train))


def _route_fwd(logits, offset, k, estimator, seed, jitter_eps, train):
    gates, experts, coins = _forward(logits, offset, k, _attrs(estimator, seed, jitter_eps, train))
    return (gates, experts, coins), (logits, experts, coins, offset)


def _route_bwd(k, estimator, seed, jitter_eps, train, saved, cotangents):
    logits, experts, coins, offset = saved
    grad_gates = cotangents[0]
    grad = jax.ffi.ffi_call("routegrad_backward", jax.ShapeDtypeStruct(logits.shape, jnp.float32))(
        logits, experts, coins, grad_gates.astype(jnp.float32), offset,
        **_attrs(estimator, seed, jitter_eps, train))
    return grad, np.zeros(offset.shape, dtype=jax.dtypes.float0)


_route.defvjp(_route_fwd, _route_bwd)


def route(logits, offset, k=2, estimator="sparsemixer_heun3", seed=0, jitter_eps=0.1,
          train=True):
    """Routes float32 logits [T, E] to k experts a token: (gates [T, k], experts int32 [T, k],
    coins uint8 [T, k]). Only the gates carry a gradient (routegrad's estimator)."""
    logits = jnp.asarray(logits, jnp.float32)
    offset = jnp.asarray(offset, jnp.uint32)
    return _route(logits, offset, int(k), estimator, int(seed), float(jitter_eps), bool(train))
