"""The common-anatomy update of X-CoReg: appearance models, E-step and M-step (Eq. 12-14, 20, 22, 48).

Voxels are flattened: a group of warped images is ``(N, V)``, the posterior ``Gamma`` is ``(V, K)``.
Everything here is evaluated under ``stop_gradient``: the common-space parameters are held fixed
while the transforms take their gradient step (Algorithm 1, lines 3-5).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from xjax import cluster
from xjax import random as xrandom
from xjax.density import EPS, PADDING, bin_positions, evaluate_histogram, group_joint_histograms, joint_histogram

__all__ = [
    "EMState",
    "init_em",
    "init_em_kmeans",
    "appearance",
    "appearance_from_labels",
    "log_likelihood",
    "e_step",
    "m_step",
    "em_update",
    "e_step_reference",
]


class EMState(NamedTuple):
    """Common-space parameters ``alpha = (Gamma, pi)``.

    Attributes:
      posterior: ``(V, K)`` spatial distribution of the common anatomy, rows sum to one.
      pi: ``(K,)`` prior proportions.
    """

    posterior: jax.Array
    pi: jax.Array


def init_em(key, num_voxels: int, num_classes: int, dtype=jnp.float32) -> EMState:
    """Eq. (22): ``pi = 1/K`` and ``gamma_x = softmax(g_x)`` with ``g_x ~ N(0, I_K)``.

    ``key`` is a ``jax.random`` key; the noise comes from :mod:`xjax.random`.
    """
    g = xrandom.normal(xrandom.seed(key), (num_voxels, num_classes), dtype)
    return EMState(jax.nn.softmax(g, axis=-1), jnp.full((num_classes,), 1.0 / num_classes, dtype))


#: Most voxels :func:`init_em_kmeans` clusters; larger grids are subsampled regularly.
KMEANS_VOXELS = 32768


def init_em_kmeans(key, images, weights, num_classes: int, iterations: int = 20,
                   restarts: int = 4) -> EMState:
    """A posterior from weighted k-means of the voxels' intensity vectors (an alternative to Eq. 22).

    Each image ``(N, V)`` is mapped onto ``[0, 1]`` by its own min/max; the vectors ``(V, N)`` are
    clustered with voxel ``weights`` ``(V,)`` (:func:`xjax.cluster.kmeans`: ``restarts`` runs from
    greedy k-means++ starts drawn from ``key``, ``iterations`` Lloyd iterations each, the run of
    least inertia kept; grids of more than :data:`KMEANS_VOXELS` voxels are clustered on every
    ``ceil(V / KMEANS_VOXELS)``-th voxel); ``Gamma`` is the one-hot nearest cluster of every voxel
    and ``pi`` its weighted share. The first E-step then starts from appearance models that
    already tell the classes apart.

    Why: from Eq. (22)'s near-uniform posterior the classes separate by chance, and with one EM
    update per step they can settle with two tissues in one class and another class spent on a
    sliver of the background. On one misaligned group of the spm12 T1/T2/PD volumes (4 mm), grey
    and white matter merged with each of the three keys tried, and the FFD registration ended
    further from alignment than it started (gWI 1.77 -> 2.24-2.27 mm; from k-means: 1.58 mm).
    """
    x = cluster.unit_vectors(images)
    weights = weights.astype(x.dtype)
    every = -(-x.shape[0] // KMEANS_VOXELS)  # cluster a regular subsample of large grids
    centres = cluster.kmeans(xrandom.seed(key), x[::every], weights[::every], num_classes,
                             iterations, restarts)
    posterior = jax.nn.one_hot(cluster.nearest(x, centres), num_classes, dtype=x.dtype)
    return EMState(posterior, m_step(posterior, weights))


def appearance(u, weights, lo, hi, bins: int):
    """Appearance models ``f_jk`` of one image (Eq. 20), tabulated at the bin centres.

    Args:
      u: ``(V,)`` intensities of the (warped) image.
      weights: ``(V, K)`` posterior of the previous iteration times the voxel mask.
      lo, hi, bins: the image's Parzen range and ``L``.
    Returns:
      ``(L + 4, K)``: for each class a density over bin positions (each column sums to one;
      a class without weight gets the uniform density).
    """
    return _normalised(joint_histogram(u, weights, lo, hi, bins))


def _normalised(hist):
    """Each class column ``(..., L + 4, K)`` normalised over the bins (uniform if empty)."""
    total = hist.sum(axis=-2, keepdims=True)
    uniform = jnp.full_like(hist, 1.0 / hist.shape[-2])
    return jnp.where(total > 0, hist / jnp.where(total > 0, total, 1.0), uniform)


def appearance_from_labels(u, labels, num_classes: int, lo, hi, bins: int, mask=None):
    """Ground-truth appearance models of X-Reg-GT (Eq. 48): ``f_jk`` from a label map of the
    image itself, in its own (unwarped) space, held fixed for all iterations.

    Args:
      u: ``(V,)`` intensities; labels: ``(V,)`` integers in ``[0, K)``; mask: optional ``(V,)``.
    Returns:
      ``(L + 4, K)`` as :func:`appearance`.
    """
    onehot = jax.nn.one_hot(labels, num_classes, dtype=u.dtype)
    if mask is not None:
        onehot = onehot * mask[:, None]
    return appearance(u, onehot, lo, hi, bins)


def log_likelihood(table, u, lo, hi, bins: int):
    """``log f_jk(u_x)`` ``(V, K)``: the appearance KDE at each voxel's own intensity, in log space.

    ``table`` holds the KDE evaluated exactly at the bin centres; its logarithm is interpolated
    linearly between the two centres around ``u_x`` (exact at the centres, one gather per voxel
    instead of a kernel sum over all samples).
    """
    return evaluate_histogram(jnp.log(jnp.maximum(table, EPS)), u, lo, hi, bins)


def _summed_log_likelihood(tables, warped, lo, hi, bins: int):
    """``sum_j log f_jk(u_xj)``, ``(V, K)``, accumulated image by image.

    A scan over the group rather than a ``vmap``: XLA:CPU runs the unbatched row gathers of
    :func:`log_likelihood` an order of magnitude faster than their batched form.
    """
    def add(total, image):
        table, u, lo_j, hi_j = image
        return total + log_likelihood(table, u, lo_j, hi_j, bins), None

    total = jnp.zeros(warped.shape[1:] + tables.shape[-1:], jnp.result_type(tables, warped))
    return jax.lax.scan(add, total, (tables, warped, lo, hi))[0]


def e_step(log_lik, pi):
    """Eq. (12) in log space: ``gamma_x,k = softmax_k(log pi_k + sum_j log f_jk(u_xj))``.

    Args:
      log_lik: ``(V, K)``, the sum over images of ``log f_jk`` at each voxel.
      pi: ``(K,)``.
    """
    return jax.nn.softmax(jnp.log(jnp.maximum(pi, EPS)) + log_lik, axis=-1)


def m_step(posterior, weights):
    """Eq. (14): ``pi_k`` = the weighted (masked, overlap-region) mean of ``gamma_k``."""
    pi = jnp.sum(posterior * weights[:, None], axis=0)
    return pi / jnp.maximum(jnp.sum(pi), EPS)


def em_update(state: EMState, warped, weights, lo, hi, bins: int, tables=None, sample_index=None) -> EMState:
    """One common-space update (Algorithm 1, lines 3-4), without gradient.

    Args:
      state: the previous ``(Gamma, pi)``.
      warped: ``(N, V)`` warped images on the common grid.
      weights: ``(V,)`` voxel weights (user mask times the overlap region ``Omega_phi``).
      lo, hi: ``(N,)`` Parzen ranges; bins: ``L``.
      tables: optional fixed ``(N, L + 4, K)`` appearance models (X-Reg-GT); by default they are
        re-estimated from ``state.posterior`` (X-Reg-UN).
      sample_index: optional ``(S,)`` voxel indices: the sample ``Omega_S`` over which Eq. (20)
        sums for the appearance models (default: every voxel). The posterior is always updated
        over the whole grid.
    """
    warped, weights, state = jax.lax.stop_gradient((warped, weights, state))
    if tables is None:
        w = state.posterior * weights[:, None]
        u = warped
        if sample_index is not None:
            u, w = warped[:, sample_index], w[sample_index]
        tables = _normalised(group_joint_histograms(u, w, lo, hi, bins))
    posterior = e_step(_summed_log_likelihood(tables, warped, lo, hi, bins), state.pi)
    return EMState(posterior, m_step(posterior, weights))


def e_step_reference(images, posterior, bins: int, pi=None):
    """The authors' E-step, reproduced for parity (see REFERENCE.md): ``p(b | k)`` from the joint
    histogram weighted by ``posterior``, each voxel reads bin ``trunc(position)`` (no
    interpolation), the product over images is normalised over classes, then clipped to
    ``[1e-3, 1 - 1e-3 (K - 1)]`` without renormalising. The range is each image's min/max.

    Args:
      images: ``(N, V)``; posterior: ``(V, K)``; pi: ``(K,)``, default uniform.
    Returns:
      ``(V, K)``.
    """
    k = posterior.shape[-1]
    pi = jnp.full((k,), 1.0 / k, posterior.dtype) if pi is None else pi
    lo, hi = images.min(axis=1), images.max(axis=1)

    def one(u, lo_j, hi_j):
        table = appearance(u, posterior, lo_j, hi_j, bins)
        b = jnp.clip(jnp.trunc(bin_positions(u, lo_j, hi_j, bins)), 0, bins + 2 * PADDING - 1)
        return jnp.log(jnp.maximum(table[b.astype(jnp.int32)], EPS))

    log_lik = jnp.sum(jax.vmap(one)(images, lo, hi), axis=0)
    post = e_step(log_lik, pi)
    return jnp.clip(post, 1e-3, 1.0 - 1e-3 * (k - 1))
