"""The counter-based sampler: uniformity, normality, determinism, key handling."""

import jax
import jax.numpy as jnp
import numpy as np

from xjax import random as xr


def test_randint_is_uniform():
    draws = np.asarray(xr.randint(xr.seed(jax.random.key(0)), (200_000,), 50))
    counts = np.bincount(draws, minlength=50)
    expected = draws.size / 50
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert draws.min() == 0 and draws.max() == 49
    assert chi2 < 95  # 49 degrees of freedom: the 99.99th percentile is about 95


def test_consecutive_seeds_are_independent():
    s = xr.seed(jax.random.key(1))
    a = np.asarray(xr.uniform(xr.fold(s, 0), (50_000,)))
    b = np.asarray(xr.uniform(xr.fold(s, 1), (50_000,)))
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.02
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.02


def test_normal_moments():
    z = np.asarray(xr.normal(xr.seed(jax.random.key(2)), (100_000,)), np.float64)
    assert abs(z.mean()) < 0.02
    assert abs(z.var() - 1.0) < 0.03
    assert abs(np.mean(z**3)) < 0.05
    assert abs(np.mean(z**4) - 3.0) < 0.1


def test_deterministic_per_key_and_vmappable():
    k1, k2 = jax.random.key(3), jax.random.key(4)
    a = xr.randint(xr.seed(k1), (100,), 1000)
    np.testing.assert_array_equal(a, xr.randint(xr.seed(k1), (100,), 1000))
    assert np.any(a != xr.randint(xr.seed(k2), (100,), 1000))
    raw = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(xr.seed(raw), xr.seed(k1))
    batched = jax.vmap(lambda k: xr.randint(xr.seed(k), (100,), 1000))(jnp.stack([k1, k2]))
    np.testing.assert_array_equal(batched[0], a)
