#!/usr/bin/env python3
"""Tests of routegrad's JAX FFI example (plain script; prints "N passed, M failed" last and exits
non-zero when a check failed).

    python3 examples/jax/test_routegrad_jax.py      # needs jax (pip install "jax[cpu]") and g++
"""
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import routegrad_jax as rj  # noqa: E402

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def test_logits(tokens=96, experts=8, seed=0):
    """randn rows, and rows near 4 and near 10 (where the jitter mask keeps several experts)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((tokens, experts)).astype(np.float32)
    z[tokens // 3:2 * tokens // 3] = 4 + 0.2 * z[tokens // 3:2 * tokens // 3]
    z[2 * tokens // 3:] = 10 + 0.3 * z[2 * tokens // 3:]
    return jnp.asarray(z)


def heun3_top2_reference(z, experts, coins, eps):
    """SparseMixer heun3 top-2 for given choices and coins, in plain JAX: per slot the jitter mask
    (m − z_i)/max(|z_i|, m) > 2ε over the experts not taken, π = softmax over the candidates,
    gate c·π_D with c = 1/3 for coin 1; the gradient is π_D's, without c (weight 1)."""
    taken = jnp.zeros(z.shape, bool)
    gates = []
    for j in range(2):
        d = experts[:, j:j + 1]
        zs = jax.lax.stop_gradient(z)
        m = jnp.where(taken, -jnp.inf, zs).max(-1, keepdims=True)
        masked = taken | ((m - zs) / jnp.maximum(jnp.abs(zs), m) > 2 * eps)
        pi_d = jnp.take_along_axis(jax.nn.softmax(jnp.where(masked, -jnp.inf, z), -1), d, -1)
        c = jnp.where(coins[:, j:j + 1] == 1, 1.0 / 3.0, 1.0)
        gates.append(pi_d + jax.lax.stop_gradient(c * pi_d - pi_d))
        taken = taken | (jnp.arange(z.shape[1])[None, :] == d)
    return jnp.concatenate(gates, -1)


@check
def heun3_top2_gates_and_gradient_match_plain_jax():
    z = test_logits()
    w = jnp.asarray(np.random.default_rng(1).standard_normal((z.shape[0], 2)), jnp.float32)
    offset = rj.offset_words(5)
    gates, experts, coins = rj.route(z, offset, k=2, seed=7)
    assert int((coins == 1).sum()) > 0 and int((coins == 0).sum()) > 0
    ref = heun3_top2_reference(z, experts, coins, 0.1)
    np.testing.assert_allclose(gates, ref, rtol=1e-6, atol=1e-6)
    ours = jax.grad(lambda z: (rj.route(z, offset, k=2, seed=7)[0] * w).sum())(z)
    theirs = jax.grad(lambda z: (heun3_top2_reference(z, experts, coins, 0.1) * w).sum())(z)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(ours).sum()) > 0


@check
def jit_step_takes_the_offset_as_data():
    z = test_logits()

    @jax.jit
    def step(z, offset):
        return rj.route(z, offset, k=2, seed=1)[1]

    a, b, a2 = step(z, rj.offset_words(1)), step(z, rj.offset_words(2)), step(z, rj.offset_words(1))
    np.testing.assert_array_equal(a, a2)
    assert bool((a != b).any()), "different offsets gave the same choices on every token"
    assert step._cache_size() == 1  # one compilation for every offset


@check
def eval_mode_picks_the_argmax():
    z = test_logits()
    gates, experts, _ = rj.route(z, rj.offset_words(0), k=1, train=False)
    np.testing.assert_array_equal(experts[:, 0], jnp.argmax(z, -1))


@check
def every_estimator_runs_and_gives_finite_gradients():
    z = test_logits()
    for name in rj.ESTIMATORS:
        g = jax.grad(lambda z: rj.route(z, rj.offset_words(3), k=2, estimator=name)[0].sum())(z)
        assert bool(jnp.isfinite(g).all()), name


@check
def bad_input_is_an_error_naming_the_argument():
    z = test_logits()
    for kwargs, words in (({"k": 9}, ("options.k", "1 <= k <= E")),
                          ({"k": 2, "jitter_eps": 0.5}, ("options.jitter_eps",))):
        try:
            jax.block_until_ready(rj.route(z, rj.offset_words(0), **kwargs))
        except Exception as ex:  # noqa: BLE001 -- XLA's runtime error type varies by version
            for w in words:
                assert w in str(ex), f"message {str(ex)!r} does not mention {w!r}"
        else:
            raise AssertionError(f"no error for {kwargs}")
    try:
        rj.route(z, rj.offset_words(0), estimator="top1")
    except ValueError as ex:
        assert "estimator" in str(ex)
    else:
        raise AssertionError("no error for an unknown estimator")


def main():
    rj.register()
    print(f"jax {jax.__version__}, handlers built and registered")
    passed = failed = 0
    for fn in CHECKS:
        try:
            fn()
        except Exception:  # noqa: BLE001 -- report every failure, then go on
            failed += 1
            print(f"FAIL {fn.__name__}")
            traceback.print_exc()
            continue
        passed += 1
        print(f"ok   {fn.__name__}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
