"""Losses of deep combined computing (paper Eq. 38-47), for one group; ``vmap`` over groups.

Notation (paper Sec. 3.5): ``N`` images ``U_j`` on a common grid of shape ``S`` (``V`` voxels),
``K`` classes; the network predicts probability maps ``rho_hat_j`` ``(N, *S, K)`` and voxel
displacements ``u_j`` ``(N, *S, D)`` with ``phi_j(x) = x + u_j(x)`` pulling image ``j`` into the
common space (:mod:`xjax.grid`; here in voxels of the common grid, which are the mm of
:func:`xjax.nn.dcc.model.unit_grid`, the grid on which :func:`warp` applies :mod:`xjax.warp`).
``J`` is the set of images with observed labels ``Y_j``, whose label probabilities ``rho_j`` come
from signed distances (Eq. 38).

Every probability that enters the posterior or the cross entropy is clipped to
``[zeta, 1 - (K - 1) zeta]`` (paper Sec. 4.4.1: ``zeta = 0.05`` in training, ``0.01`` in testing).

The common-space posterior ``Z[2]`` (Eq. 39-40) is computed without gradient: two E-steps, the
first with appearance models from each image's own (unwarped) probability maps, the second with
appearance models from the first posterior on the warped images (:mod:`xjax.em`).

Choice beyond the paper: the DCC+AT atlas is a common-space prior ``(*S, K)`` multiplied into the
posterior like the ``rho_jk(phi_j(x))`` factors of Eq. (40) but with the identity transform (the
atlas is not an image the network could register).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xjax import em
from xjax.density import EPS, joint_histogram
from xjax.interpolate import sample_inside
from xjax.metrics import group_class_information, information_from_histogram
from xjax.nn.dcc.model import unit_grid
from xjax.regularizers import bending_energy
from xjax.warp import pull_points

__all__ = [
    "LossConfig",
    "Group",
    "Losses",
    "clip_probabilities",
    "signed_distance",
    "label_probabilities",
    "warp",
    "posterior",
    "dcc_losses",
    "soft_dice",
]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static loss settings.

    Attributes:
      num_classes: ``K``.
      bins: ``L`` Parzen intensity bins (the paper: 32).
      zeta: probability clipping (0.05 for training, 0.01 for testing).
      bending_weight: ``lambda`` of Eq. (41) (the paper: 100), on fields in voxel units.
    """

    num_classes: int = 4
    bins: int = 32
    zeta: float = 0.05
    bending_weight: float = 100.0

    def __post_init__(self):
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {self.num_classes!r}")
        if not isinstance(self.bins, int) or self.bins < 2:
            raise ValueError(f"bins must be an int >= 2, got {self.bins!r}")
        if not 0.0 <= self.zeta < 1.0 / self.num_classes:
            raise ValueError(f"zeta must lie in [0, 1/K) = [0, {1.0 / self.num_classes:.3g}), got {self.zeta!r}")
        if self.bending_weight < 0:
            raise ValueError(f"bending_weight must be >= 0, got {self.bending_weight!r}")


class Group(NamedTuple):
    """One training or test group on the common grid.

    Attributes:
      images: ``(N, *S)`` normalised intensities.
      modality: ``(N,)`` int modality indices.
      labels: ``(N, *S)`` int labels (any value where ``labelled`` is False).
      label_probs: ``(N, *S, K)`` label probabilities ``rho_j`` (Eq. 38) of the labels.
      labelled: ``(N,)`` bool, membership of ``J``.
      prior: ``(*S, K)`` common-space prior (the DCC+AT atlas) or uniform ``1/K``.
    """

    images: jax.Array
    modality: jax.Array
    labels: jax.Array
    label_probs: jax.Array
    labelled: jax.Array
    prior: jax.Array


class Losses(NamedTuple):
    """Scalars of Eq. (41)-(47): ``total = registration + hybrid + segmentation`` (L1 + L2 + L3);
    ``x_metric`` is ``X(U[phi], Z[2])`` in nats and ``bending`` the summed bending energy."""

    total: jax.Array
    registration: jax.Array
    hybrid: jax.Array
    segmentation: jax.Array
    x_metric: jax.Array
    bending: jax.Array


def clip_probabilities(p, zeta: float):
    """Clip probabilities into ``[zeta, 1 - (K - 1) zeta]`` (no renormalisation), ``K = p.shape[-1]``."""
    return jnp.clip(p, zeta, 1.0 - (p.shape[-1] - 1) * zeta)


def _chamfer(target, max_distance: int):
    """Chamfer distance (voxels; steps of length ``|offset|`` to the ``3**D - 1`` neighbours) from
    every voxel to the nearest voxel of the boolean ``target`` ``(*S)``, capped at ``max_distance``."""
    d = target.ndim
    cap = float(max_distance)
    offsets = [o for o in itertools.product((-1, 0, 1), repeat=d) if any(o)]

    def relax(_, dist):
        padded = jnp.pad(dist, 1, constant_values=cap)
        best = dist
        for o in offsets:
            window = tuple(slice(1 + a, 1 + a + n) for a, n in zip(o, dist.shape))
            best = jnp.minimum(best, padded[window] + float(np.linalg.norm(o)))
        return best

    start = jnp.where(target, 0.0, cap)
    return jnp.minimum(jax.lax.fori_loop(0, max_distance, relax, start), cap)


def signed_distance(mask, max_distance: int = 8):
    """Signed distance ``D`` in voxels to the boundary of a boolean ``mask`` ``(*S)``: positive
    inside, negative outside, ``+-0.5`` on the voxels next to the boundary; a chamfer
    approximation of the Euclidean distance, clipped to ``[-max_distance, max_distance]``."""
    inside = _chamfer(~mask, max_distance) - 0.5
    outside = _chamfer(mask, max_distance) - 0.5
    return jnp.where(mask, inside, -outside)


def label_probabilities(labels, num_classes: int, tau: float = 1.0, max_distance: int = 8):
    """Eq. (38): ``rho_jk(x) ~ exp(tau * D_jk(x))``, normalised over ``k``.

    Args:
      labels: ``(*S)`` int labels in ``[0, K)``.
      tau: slope, per voxel.
      max_distance: cap of the distances (voxels).
    Returns:
      ``(*S, K)`` float32 probabilities.
    """
    sdf = jnp.stack([signed_distance(labels == k, max_distance) for k in range(num_classes)], axis=-1)
    return jax.nn.softmax(tau * sdf, axis=-1)


def warp(values, displacement, *, fill: float = 0.0):
    """Pull one image (or map) through a voxel displacement: ``out(x) = values(x + u(x))``.

    The one warp of xjax on DCC's :func:`~xjax.nn.dcc.model.unit_grid` (a voxel is a millimetre):
    the values are ``jnp.where(inside, xjax.warp.warp(values, u, unit_grid(S))[0], fill)``. They
    are sampled at :func:`xjax.warp.pull_points` with the sampler's own ``fill``
    (:func:`xjax.interpolate.sample_inside`) rather than through the border clamp of
    :func:`xjax.warp.warp`: the values are the same bits, but the clamp in front of the sampler's
    halves the gradient with respect to ``u`` at points exactly on the image's hull, where every
    border voxel lies at the identity (a fresh network), and the losses keep their gradients.

    Args:
      values: ``(*S)`` or ``(*S, C)``.
      displacement: ``(*S, D)`` in voxels.
    Returns:
      ``(warped, inside)``: warped values (``fill`` outside the image) and ``(*S)`` weights, 1
      where ``x + u(x)`` lies inside the image.
    """
    grid = unit_grid(values.shape[:displacement.shape[-1]])
    return sample_inside(values, pull_points(displacement, grid), fill=fill)


def _ranges(images):
    flat = jax.lax.stop_gradient(images.reshape(images.shape[0], -1))
    return flat.min(axis=1), flat.max(axis=1)


def _appearances(images, weights, lo, hi, bins: int):
    return jax.vmap(em.appearance, in_axes=(0, 0, 0, 0, None))(images, weights, lo, hi, bins)


def _summed_log_likelihood(tables, images, lo, hi, bins: int):
    return jnp.sum(jax.vmap(em.log_likelihood, in_axes=(0, 0, 0, 0, None))(tables, images, lo, hi, bins), axis=0)


def posterior(images, warped, weights, own_probs, warped_label_probs, labelled, prior, bins: int):
    """The common-space anatomy ``Z[2]`` of Eq. (39)-(40), without gradient.

    ``t = 0``: appearance models ``f[0]_jk`` of each image from its own probability maps (Eq. 39),
    ``q[0] ~ pi[0] prior prod_{j in J} rho_jk(phi_j(x)) prod_j f[0]_jk(U_j(phi_j(x)))`` (Eq. 40)
    with ``pi[0] = 1/K``, then ``pi[1]`` by Eq. (14); ``t = 1``: ``f[1]_jk`` from ``q[0]`` on the
    warped images (Eq. 20), ``q[1]`` by Eq. (40) and ``pi[2]`` by Eq. (14).

    Args (flattened voxels; probabilities already clipped):
      images: ``(N, V)`` images in their own space; warped: ``(N, V)`` on the common grid.
      weights: ``(V,)`` voxel weights (the overlap region).
      own_probs: ``(N, V, K)`` ``rho_j`` (``j in J``) or ``rho_hat_j`` in the images' own space.
      warped_label_probs: ``(N, V, K)`` ``rho_j(phi_j(x))``, used where ``labelled``.
      labelled: ``(N,)`` bool; prior: ``(V, K)``.
    Returns:
      :class:`xjax.em.EMState` ``(posterior (V, K), pi (K,))``.
    """
    images, warped, weights, own_probs, warped_label_probs, prior = jax.lax.stop_gradient(
        (images, warped, weights, own_probs, warped_label_probs, prior))
    k = own_probs.shape[-1]
    lo, hi = _ranges(images)
    log_prior = jnp.log(jnp.maximum(prior, EPS)) + jnp.sum(
        jnp.where(labelled[:, None, None], jnp.log(jnp.maximum(warped_label_probs, EPS)), 0.0), axis=0)
    tables = _appearances(images, own_probs, lo, hi, bins)
    q = em.e_step(log_prior + _summed_log_likelihood(tables, warped, lo, hi, bins), jnp.full((k,), 1.0 / k))
    pi = em.m_step(q, weights)
    tables = _appearances(warped, jnp.broadcast_to(q * weights[:, None], own_probs.shape), lo, hi, bins)
    q = em.e_step(log_prior + _summed_log_likelihood(tables, warped, lo, hi, bins), pi)
    return em.EMState(q, em.m_step(q, weights))


def soft_dice(onehot, probs):
    """Soft Dice ``2 sum(y p) / (sum y + sum p)`` per class (last axis), averaged over the classes
    present in ``onehot`` or ``probs``; ``onehot``, ``probs``: ``(..., K)``."""
    axes = tuple(range(onehot.ndim - 1))
    inter = jnp.sum(onehot * probs, axis=axes)
    total = jnp.sum(onehot, axis=axes) + jnp.sum(probs, axis=axes)
    present = total > EPS
    return jnp.sum(jnp.where(present, 2.0 * inter / jnp.where(present, total, 1.0), 0.0)) / jnp.maximum(
        jnp.sum(present), 1)


def dcc_losses(probs, displacement, group: Group, config: LossConfig) -> Losses:
    """The DCC loss of one group, Eq. (47): ``L = L1 + L2 + L3``.

    * L1 (Eq. 41): ``-X(U[phi], Z[2]) + lambda sum_j BE(u_j)``, the X-metric (MI form, Eq. 17) of
      the warped images weighted by the detached posterior, plus bending energy of the voxel fields.
    * L2 (Eq. 42-44): ``sum_j -mean_x sum_k gamma[2]_xk log rho*_jk(phi_j(x))`` over the overlap,
      ``rho* = rho_j`` (a constant: gradient through ``phi_j`` only) for ``j in J``, else
      ``rho_hat_j`` (gradient through ``phi_j`` and ``rho_hat_j``).
    * L3 (Eq. 45-46): ``-sum_j I(U_j; Y_hat_j) + sum_{j not in J} H(Y_hat_j) + sum_{j in J}
      [CE(Y_j, Y_hat_j) + 1 - Dice(Y_j, Y_hat_j)]`` in the images' own space, with the unclipped
      ``rho_hat``; ``H`` is the mean voxel-wise entropy.

    Args:
      probs: ``(N, *S, K)`` network probabilities ``rho_hat``.
      displacement: ``(N, *S, D)`` voxel displacements.
      group: the :class:`Group`.
      config: :class:`LossConfig`.
    Returns:
      :class:`Losses`.
    """
    n, k, bins = probs.shape[0], probs.shape[-1], config.bins
    if k != config.num_classes:
        raise ValueError(f"probs have {k} classes, config.num_classes is {config.num_classes}")
    labelled = group.labelled.astype(bool)
    images = group.images
    warped, inside = jax.vmap(warp)(images, displacement)
    clipped_hat = clip_probabilities(probs, config.zeta)
    clipped_lab = clip_probabilities(jax.lax.stop_gradient(group.label_probs), config.zeta)
    fill = 1.0 / k
    warped_hat = jax.vmap(lambda p, u: warp(p, u, fill=fill)[0])(clipped_hat, displacement)
    warped_lab = jax.vmap(lambda p, u: warp(p, u, fill=fill)[0])(clipped_lab, displacement)
    weights = jnp.prod(inside, axis=0).reshape(-1)
    spatial_ndim = images.ndim - 1

    def flat(a):  # (N, *S, ...) -> (N, V, ...)
        return a.reshape((n, -1) + a.shape[1 + spatial_ndim:])

    own = jnp.where(labelled[:, None, None], flat(clipped_lab), flat(clipped_hat))
    state = posterior(flat(images), flat(warped), weights, own, flat(warped_lab), labelled,
                      clip_probabilities(group.prior, config.zeta).reshape(-1, k), bins)
    gamma = state.posterior * weights[:, None]

    lo, hi = _ranges(images)
    x_metric = jnp.sum(group_class_information(flat(warped), gamma, lo, hi, bins, "mi"))
    bending = jnp.sum(jax.vmap(lambda u: bending_energy(u, 1.0))(displacement))
    l1 = -x_metric + config.bending_weight * bending

    rho_star = jnp.where(labelled[:, None, None], flat(warped_lab), flat(warped_hat))
    cross = -jnp.sum(gamma[None] * jnp.log(rho_star), axis=(1, 2)) / jnp.maximum(jnp.sum(weights), 1.0)
    l2 = jnp.sum(cross)

    p_flat = flat(probs)
    log_p = jnp.log(jnp.maximum(p_flat, EPS))
    information = jax.vmap(lambda u, p, a, b: information_from_histogram(joint_histogram(u, p, a, b, bins)))(
        flat(images), p_flat, lo, hi)
    entropy = -jnp.mean(jnp.sum(p_flat * log_p, axis=-1), axis=1)
    onehot = jax.nn.one_hot(flat(group.labels), k, dtype=probs.dtype)
    ce = -jnp.mean(jnp.sum(onehot * log_p, axis=-1), axis=1)
    dice = jax.vmap(soft_dice)(onehot, p_flat)
    l3 = -jnp.sum(information) + jnp.sum(jnp.where(labelled, ce + 1.0 - dice, entropy))
    return Losses(l1 + l2 + l3, l1, l2, l3, x_metric, bending)
