"""Weighted k-means of intensity vectors: the starting classes of the mixture models.

X-CoReg's posterior (:func:`xjax.em.init_em_kmeans`) and the GMM baseline
(:class:`xjax.objectives.GMM`) both start from ``K`` clusters of the voxels' intensity vectors
``x`` ``(V, N)`` (one entry per image, each image mapped onto ``[0, 1]`` by its range), with voxel
weights ``(V,)`` (mask times overlap). Randomness comes from an :mod:`xjax.random` seed, so the
clusters are a pure function of the key and vmap over groups.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from xjax import random as xrandom

__all__ = ["unit_vectors", "kmeans_plus_plus", "kmeans", "nearest", "inertia"]

_TINY = 1e-12


def unit_vectors(images):
    """The voxels' intensity vectors ``(V, N)`` of images ``(N, V)``, each image mapped onto
    ``[0, 1]`` by its own min/max (a constant image by a width of one), without gradient."""
    images = jax.lax.stop_gradient(images)
    lo, hi = images.min(axis=1, keepdims=True), images.max(axis=1, keepdims=True)
    return ((images - lo) / jnp.where(hi > lo, hi - lo, 1.0)).T


def kmeans_plus_plus(seed, x, weights, k: int, trials: int | None = None):
    """``k`` initial centres ``(K, N)`` picked among the vectors ``x`` ``(V, N)`` (greedy k-means++).

    The first is drawn with probability proportional to the weight. For each next one, ``trials``
    candidates are drawn with probability proportional to the weight times the squared distance
    to the nearest centre so far, and the one that lowers the weighted sum of those distances most
    is kept (default ``2 + floor(ln k)`` trials, Arthur & Vassilvitskii's greedy variant: one draw
    alone often spends two centres on a cluster that holds most of the weight, such as a
    background). ``seed`` is an :mod:`xjax.random` seed.
    """
    trials = 2 + int(math.log(k)) if trials is None else trials

    def draw(prob, counter, count):
        # Inverse-CDF sampling; counting the CDF entries at or below each draw compiles faster on
        # XLA:CPU than jnp.searchsorted, with the same result.
        cdf = jnp.cumsum(prob)
        u = xrandom.uniform(xrandom.fold(seed, counter), (count,), x.dtype) * cdf[-1]
        return jnp.minimum(jnp.sum(cdf[None] <= u[:, None], axis=1), x.shape[0] - 1)

    def pick(c, carry):
        # Pick 0 draws by the weights alone (and keeps its first candidate): one loop body, so
        # the draw's cumulative sum is compiled once.
        centres, distance = carry
        first = c == 0
        candidates = draw(jnp.where(first, weights, weights * distance), c, trials)  # (T,)
        d2 = jnp.sum((x[None] - x[candidates][:, None]) ** 2, axis=-1)  # (T, V)
        merged = jnp.where(first, d2, jnp.minimum(distance[None], d2))
        best = jnp.where(first, 0, jnp.argmin(merged @ weights))
        return centres.at[c].set(x[candidates[best]]), merged[best]

    init = (jnp.zeros((k, x.shape[1]), x.dtype), jnp.zeros(x.shape[:1], x.dtype))
    return jax.lax.fori_loop(0, k, pick, init)[0]


def nearest(x, centres):
    """Index ``(V,)`` of the nearest centre (squared Euclidean distance) of each vector."""
    d2 = jnp.sum(x**2, axis=-1, keepdims=True) - 2.0 * x @ centres.T + jnp.sum(centres**2, axis=-1)
    return jnp.argmin(d2, axis=-1)


def inertia(x, weights, centres):
    """Weighted sum of squared distances of the vectors to their nearest centre."""
    d2 = jnp.sum((x[:, None, :] - centres[None]) ** 2, axis=-1)
    return jnp.sum(weights * jnp.min(d2, axis=-1))


def kmeans(seed, x, weights, k: int, iterations: int, restarts: int = 1):
    """Weighted k-means (Lloyd's algorithm) from greedy k-means++ starts: centres ``(K, N)``.

    Each iteration assigns every vector to its nearest centre and moves each centre to the
    weighted mean of its vectors; a centre left without weight stays where it was. With
    ``restarts`` > 1, that many runs from independent starts are made and the one of least
    :func:`inertia` is kept.

    Args:
      seed: an :mod:`xjax.random` seed.
      x: ``(V, N)`` vectors; weights: ``(V,)``, non-negative.
      k: clusters; iterations: Lloyd iterations (0: the k-means++ centres); restarts: runs.
    """

    def lloyd(centres, _):
        r = jax.nn.one_hot(nearest(x, centres), k, dtype=x.dtype) * weights[:, None]
        mass = jnp.sum(r, axis=0)
        moved = (r.T @ x) / jnp.maximum(mass, _TINY)[:, None]
        return jnp.where(mass[:, None] > 0, moved, centres), None

    def run(s):
        centres = jax.lax.scan(lloyd, kmeans_plus_plus(s, x, weights, k), None, length=iterations)[0]
        return centres, inertia(x, weights, centres)

    if restarts == 1:
        return run(seed)[0]
    centres, cost = jax.lax.map(run, xrandom.fold(seed, 1 + jnp.arange(restarts, dtype=jnp.uint32)))
    return centres[jnp.argmin(cost)]
