"""Weighted k-means: against a float64 numpy Lloyd iteration, and on separated clusters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xjax import cluster
from xjax import random as xrandom


def lloyd_np(x, w, centres, iterations):
    """Brute force: nearest centre by explicit distances, weighted means, empty clusters kept."""
    centres = centres.copy()
    for _ in range(iterations):
        d2 = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
        assign = d2.argmin(1)
        for k in range(len(centres)):
            mass = w[assign == k].sum()
            if mass > 0:
                centres[k] = (w[assign == k, None] * x[assign == k]).sum(0) / mass
    return centres


def test_kmeans_matches_numpy_lloyd(x64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    w = rng.uniform(size=400) * (rng.uniform(size=400) > 0.3)
    seed = xrandom.seed(jax.random.key(5))
    start = np.asarray(cluster.kmeans(seed, jnp.asarray(x), jnp.asarray(w), 5, 0))
    # The start is k-means++'s: five distinct vectors of positive weight.
    rows = [np.flatnonzero(np.all(x == c, axis=1)) for c in start]
    assert all(len(r) == 1 and w[r[0]] > 0 for r in rows) and len({r[0] for r in rows}) == 5
    got = cluster.kmeans(seed, jnp.asarray(x), jnp.asarray(w), 5, 8)
    np.testing.assert_allclose(got, lloyd_np(x, w, start, 8), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("key", range(4))
def test_kmeans_finds_separated_clusters_under_a_dominant_one(key):
    """Four tight clusters, one holding 85% of the weight (a background): every cluster gets its
    own centre, whatever the key."""
    rng = np.random.default_rng(key)
    means = np.array([[0.0, 0.0], [1.0, 0.2], [0.3, 1.0], [0.8, 0.9]])
    counts = [1700, 100, 100, 100]
    x = np.concatenate([m + 0.02 * rng.normal(size=(c, 2)) for m, c in zip(means, counts)])
    centres = np.asarray(cluster.kmeans(xrandom.seed(jax.random.key(key)), jnp.asarray(x, jnp.float32),
                                        jnp.ones(len(x), jnp.float32), 4, 10))
    nearest_true = np.linalg.norm(centres[:, None] - means[None], axis=-1).argmin(1)
    assert sorted(nearest_true) == [0, 1, 2, 3]
    np.testing.assert_allclose(centres, means[nearest_true], atol=0.01)
    labels = np.asarray(cluster.nearest(jnp.asarray(x, jnp.float32), jnp.asarray(centres)))
    truth = np.repeat(np.arange(4), counts)
    assert np.all(nearest_true[labels] == truth)


def test_restarts_keep_the_run_of_least_inertia(x64):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.uniform(size=(300, 2)))
    w = jnp.asarray(rng.uniform(size=300))
    seed = xrandom.seed(jax.random.key(9))
    runs = [cluster.kmeans(xrandom.fold(seed, 1 + r), x, w, 6, 5) for r in range(4)]
    costs = [float(cluster.inertia(x, w, c)) for c in runs]
    assert len(set(np.round(costs, 9))) > 1  # the starts differ
    np.testing.assert_allclose(cluster.kmeans(seed, x, w, 6, 5, restarts=4), runs[int(np.argmin(costs))])
    d2 = ((np.asarray(x)[:, None] - np.asarray(runs[0])[None]) ** 2).sum(-1)
    np.testing.assert_allclose(costs[0], (np.asarray(w) * d2.min(1)).sum(), rtol=1e-12)
