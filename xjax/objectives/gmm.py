"""GMM (Orchard & Mann): log-likelihood of the intensity vectors under a mixture of ``K``
full-covariance Gaussians, refitted by EM every step; its state :class:`GMMState` and the EM helpers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from xjax import random as xrandom
from xjax import validate
from xjax.cluster import kmeans_plus_plus, unit_vectors
from xjax.objectives._common import _TINY, _check_count, _check_positive, _normalised, _weighted_mean
from xjax.objectives.base import Objective

__all__ = ["GMM", "GMMState"]


class GMMState(NamedTuple):
    """A mixture of ``K`` Gaussians over normalised intensity vectors (:mod:`xjax.objectives`).

    Attributes:
      means: ``(K, N)``.
      covariances: ``(K, N, N)``, every eigenvalue at least the floor.
      pi: ``(K,)`` mixing proportions.
    """

    means: jax.Array
    covariances: jax.Array
    pi: jax.Array


def _component_log_densities(state: GMMState, x):
    """``log pi_k + log N(x_v; mu_k, Sigma_k)`` for vectors ``x`` ``(n, N)``: ``(n, K)``.

    The ``N x N`` inverse Cholesky factors are formed once per component, so the ``n`` vectors are
    whitened by one small matrix product (a batched triangular solve is far slower on CPU)."""
    dim = x.shape[-1]
    chol = jnp.linalg.cholesky(state.covariances)
    eye = jnp.broadcast_to(jnp.eye(dim, dtype=chol.dtype), chol.shape)
    inverse = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)  # (K, N, N)
    white = jnp.einsum("kmn,vkn->vkm", inverse, x[:, None, :] - state.means[None])
    log_det = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    log_normal = -0.5 * (jnp.sum(white**2, axis=-1) + log_det + dim * math.log(2.0 * math.pi))
    return log_normal + jnp.log(jnp.maximum(state.pi, _TINY))


def _floor_eigenvalues(cov, floor: float):
    """Symmetric ``(..., N, N)`` matrices with their eigenvalues raised to at least ``floor``:
    the maximiser of the Gaussian likelihood over covariances ``>= floor I``, so EM stays monotone."""
    values, vectors = jnp.linalg.eigh(cov)
    return (vectors * jnp.maximum(values, floor)[..., None, :]) @ jnp.swapaxes(vectors, -1, -2)


def _em_step(state: GMMState, x, weights, floor: float) -> GMMState:
    """One EM iteration over vectors ``x`` ``(V, N)`` with voxel weights ``(V,)``: responsibilities,
    then weighted means, covariances (eigenvalues floored) and proportions. A component without
    mass keeps its mean and covariance."""
    r = jax.nn.softmax(_component_log_densities(state, x), axis=-1) * weights[:, None]  # (V, K)
    mass = jnp.sum(r, axis=0)
    safe = jnp.maximum(mass, _TINY)
    means = (r.T @ x) / safe[:, None]
    diff = x[:, None, :] - means[None]  # (V, K, N)
    cov = jnp.einsum("vk,vkn,vkm->knm", r, diff, diff) / safe[:, None, None]
    cov = _floor_eigenvalues(0.5 * (cov + jnp.swapaxes(cov, -1, -2)), floor)
    alive = mass > _TINY
    return GMMState(jnp.where(alive[:, None], means, state.means),
                    jnp.where(alive[:, None, None], cov, state.covariances),
                    mass / jnp.maximum(jnp.sum(mass), _TINY))


def _em(state: GMMState, x, weights, floor: float, iterations: int) -> GMMState:
    return jax.lax.fori_loop(0, iterations, lambda _, s: _em_step(s, x, weights, floor), state)


@dataclasses.dataclass(frozen=True)
class GMM(Objective):
    """Gaussian mixture of the joint intensity distribution (Orchard & Mann).

    The normalised intensity vector of a voxel ``x~ = (u~_1 .. u~_N)`` (:mod:`xjax.objectives`) follows
    ``p(x~) = sum_k pi_k N(x~; mu_k, Sigma_k)`` with full ``N x N`` covariances. The similarity is
    the weighted mean log-likelihood over the sample, ``sum_x w_x log p(x~_x) / sum_x w_x``.

    The mixture is fitted by EM over the whole level grid in :meth:`update` (``iterations`` per
    step, warm-started from the state). The original starts every mean at the global mean, a fixed
    point of EM where the components never separate; here :meth:`init` draws the means by a
    key-driven greedy k-means++ pick (:func:`xjax.cluster.kmeans_plus_plus`), starts every
    covariance at the global one and runs ``init_iterations`` of EM. Every covariance eigenvalue
    is kept at least ``floor``, a constrained M-step that keeps EM's log-likelihood non-decreasing.

    Attributes:
      num_classes: ``K``, the mixture's components (the classes of the common anatomy).
      iterations: EM iterations per registration step.
      init_iterations: EM iterations after the k-means++ pick in :meth:`init`.
      floor: least covariance eigenvalue, in squared normalised units ((fraction of range)^2).
    """

    num_classes: int = 4
    iterations: int = 1
    init_iterations: int = 20
    floor: float = 1e-4

    def __post_init__(self):
        validate.check_num_classes(self.num_classes)
        _check_count(self.iterations, "GMM.iterations", 1)
        _check_count(self.init_iterations, "GMM.init_iterations", 0)
        _check_positive(self.floor, "GMM.floor")

    def init(self, key, images, weights) -> GMMState:
        """k-means++ means, the global covariance, uniform ``pi``, then ``init_iterations`` of EM over
        the unwarped images ``(N, V)`` (each normalised by its own min/max)."""
        x = unit_vectors(images)
        w = weights / jnp.maximum(jnp.sum(weights), _TINY)
        means = kmeans_plus_plus(xrandom.seed(key), x, w, self.num_classes)
        centred = x - w @ x
        cov = _floor_eigenvalues((centred * w[:, None]).T @ centred, self.floor)
        k = self.num_classes
        state = GMMState(means, jnp.broadcast_to(cov, (k,) + cov.shape),
                         jnp.full((k,), 1.0 / k, x.dtype))
        return _em(state, x, weights, self.floor, self.init_iterations)

    def update(self, state: GMMState, warped, weights, lo, hi, bins: int, sample_index) -> GMMState:
        """``iterations`` of EM over the warped images ``(N, V)`` under the weights ``(V,)``."""
        del bins, sample_index
        x = jax.lax.stop_gradient(_normalised(warped, lo, hi).T)
        return _em(state, x, jax.lax.stop_gradient(weights), self.floor, self.iterations)

    def similarity(self, state: GMMState, values, weights, sample_index, lo, hi, bins: int):
        """Weighted mean ``log p(x~)`` (nats) of the sampled vectors; ``values`` ``(N, S)``."""
        del sample_index, bins
        log_joint = _component_log_densities(jax.lax.stop_gradient(state), _normalised(values, lo, hi).T)
        return _weighted_mean(jax.nn.logsumexp(log_joint, axis=-1), weights)
