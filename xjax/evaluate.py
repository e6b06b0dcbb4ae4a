"""Evaluation of groupwise registration against a known misalignment (paper Eq. 49-52).

The ground truth is a set of misalignments ``psi_j(y) = y + t_j(y)`` that produced the misaligned
images from an aligned group: ``misaligned_j(y) = aligned_j(psi_j(y))``. A registration estimates
``phi_hat_j(x) = x + u_j(x)`` (pull, :mod:`xjax.grid`), so that its warped image is
``misaligned_j(phi_hat_j(x)) = aligned_j(psi_j(phi_hat_j(x)))``. The registration is perfect
when the composed maps ``psi_j o phi_hat_j`` are one and the same map for every ``j`` (any common
map is a valid choice of the common space), which is why the measures subtract the group mean of
the composed maps.

All displacement fields are channels-last in world mm, ``(N, *shape, D)`` for a group. The
functions are jitted (grids and other configuration static); inputs are validated at trace time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from xjax.grid import Grid
from xjax.interpolate import sample_clamped, sample_world
from xjax.regularizers import jacobian_determinant
from xjax.transforms.base import grid_points

__all__ = [
    "compose_displacements",
    "gwi",
    "gwi_per_image",
    "gre",
    "gre_from_displacements",
    "pairwise_dice",
    "pairwise_dice_per_class",
    "jacobian_stats",
]


def _check_field(name, field, grid: Grid, group: bool):
    expected = ((field.shape[0],) if group else ()) + grid.shape + (grid.ndim,)
    if field.ndim != len(expected) or tuple(field.shape) != expected:
        what = "(N, *shape, D)" if group else "(*shape, D)"
        raise ValueError(f"{name} must be a {what} field on {grid}, got shape {field.shape}")


def _sample_field_clamped(field, grid: Grid, world_points):
    """Linear interpolation of a ``(*shape, D)`` field at world points ``(..., D)`` mm, with the
    field extended beyond the grid by its border values."""
    return sample_clamped(field, grid.world_to_index(world_points))


@functools.partial(jax.jit, static_argnames=("grid",))
def compose_displacements(outer, inner, grid: Grid):
    """Displacement of the composition ``(x -> x + outer(x)) o (x -> x + inner(x))``.

    ``w(x) = inner(x) + outer(x + inner(x))``, evaluated at the voxel centres of ``grid``.
    ``outer`` is interpolated linearly at the world points ``x + inner(x)``; where those points
    leave the grid, ``outer`` is extended by its border values (the voxel index is clamped).

    Args:
      outer, inner: ``(*shape, D)`` displacement fields in mm on ``grid``.
      grid: the grid both fields live on.

    Returns:
      ``(*shape, D)`` displacement in mm.
    """
    _check_field("outer", outer, grid, group=False)
    _check_field("inner", inner, grid, group=False)
    x = grid_points(grid, jnp.result_type(inner.dtype, jnp.float32))
    return inner + _sample_field_clamped(outer, grid, x + inner)


@functools.partial(jax.jit, static_argnames=("grid",))
def gwi_per_image(true_disp, est_disp, grid: Grid, foreground):
    """Groupwise warping index of each image, ``(N,)`` in mm (the summands of Eq. 49).

    ``r_j(x) = psi_j(phi_hat_j(x)) - x`` with ``psi_j = x + true_disp_j`` and
    ``phi_hat_j = x + est_disp_j`` (Eq. 50), ``rbar_j = r_j - mean_j' r_j'``, and the result is the
    RMS of ``|rbar_j|`` over ``Omega_f_j = {x : psi_j(phi_hat_j(x)) in F}``, where membership of
    ``F`` is read from ``foreground`` by nearest neighbour at the composed point (points outside
    the grid are not in ``F``). An image whose ``Omega_f_j`` is empty gets NaN.

    Args:
      true_disp: ``(N, *shape, D)`` ground-truth misalignments ``psi_j - id`` in mm.
      est_disp: ``(N, *shape, D)`` estimated pull displacements ``phi_hat_j - id`` in mm.
      grid: the grid of the (common) image space.
      foreground: ``(*shape)`` boolean (or {0, 1}) mask of the aligned phantom's foreground.
    """
    _check_field("true_disp", true_disp, grid, group=True)
    _check_field("est_disp", est_disp, grid, group=True)
    if true_disp.shape != est_disp.shape:
        raise ValueError(f"true_disp {true_disp.shape} and est_disp {est_disp.shape} differ")
    if tuple(foreground.shape) != grid.shape:
        raise ValueError(f"foreground must have shape {grid.shape}, got {foreground.shape}")
    dtype = jnp.result_type(true_disp.dtype, est_disp.dtype, jnp.float32)
    r = jax.vmap(compose_displacements, in_axes=(0, 0, None))(true_disp, est_disp, grid)
    rbar = r - jnp.mean(r, axis=0)
    composed = grid_points(grid, dtype) + r
    in_f = sample_world(jnp.asarray(foreground, dtype), grid, composed, order=0) > 0.5
    axes = tuple(range(1, grid.ndim + 1))
    sq = jnp.sum(rbar**2, axis=-1)
    count = jnp.sum(in_f, axis=axes)
    msd = jnp.sum(jnp.where(in_f, sq, 0.0), axis=axes) / count
    return jnp.sqrt(msd)


@functools.partial(jax.jit, static_argnames=("grid",))
def gwi(true_disp, est_disp, grid: Grid, foreground):
    """Groupwise warping index (Eq. 49-50), a scalar in mm: the mean over images of
    :func:`gwi_per_image`. Zero when every ``psi_j o phi_hat_j`` is the same map."""
    return jnp.mean(gwi_per_image(true_disp, est_disp, grid, foreground))


@jax.jit
def gre(composed_corners):
    """Groupwise registration error (Eq. 51-52), a scalar in mm.

    Args:
      composed_corners: ``(N, V, D)`` world positions ``psi_j(phi_hat_j(v_i))`` in mm of the
        ``V`` evaluation points (the ``2**D`` corners of the volume in the paper) for each image.

    Returns:
      ``mean_j sqrt(mean_i |ebar_j(v_i)|^2)`` with ``ebar_j(v_i)`` the composed position minus
      its mean over the group.
    """
    if composed_corners.ndim != 3:
        raise ValueError(f"composed_corners must be (N, V, D), got shape {composed_corners.shape}")
    ebar = composed_corners - jnp.mean(composed_corners, axis=0)
    return jnp.mean(jnp.sqrt(jnp.mean(jnp.sum(ebar**2, axis=-1), axis=1)))


@functools.partial(jax.jit, static_argnames=("grid",))
def gre_from_displacements(true_disp, est_disp, grid: Grid):
    """:func:`gre` at the ``2**D`` corner voxel centres ``v_i`` of ``grid`` (``grid.corners()``).

    ``psi_j(phi_hat_j(v)) = p + true_disp_j(p)`` with ``p = v + est_disp_j(v)``; ``true_disp`` is
    interpolated linearly and extended by its border values beyond the grid, as in
    :func:`compose_displacements`.

    Args:
      true_disp, est_disp: ``(N, *shape, D)`` displacement fields in mm on ``grid``.
      grid: the grid of the common space.
    """
    _check_field("true_disp", true_disp, grid, group=True)
    _check_field("est_disp", est_disp, grid, group=True)
    corner_idx = np.stack(np.meshgrid(*[[0, s - 1] for s in grid.shape], indexing="ij"), -1)
    corner_idx = corner_idx.reshape(-1, grid.ndim)
    est_at_corners = est_disp[(slice(None),) + tuple(corner_idx.T)]
    dtype = jnp.result_type(true_disp.dtype, est_disp.dtype, jnp.float32)
    p = jnp.asarray(grid.corners(), dtype) + est_at_corners
    composed = p + jax.vmap(_sample_field_clamped, in_axes=(0, None, 0))(true_disp, grid, p)
    return gre(composed)


def _pairs(labels):
    if labels.ndim < 2 or labels.shape[0] < 2:
        raise ValueError(f"labels must be (N, *shape) with N >= 2, got shape {labels.shape}")
    first, second = np.triu_indices(labels.shape[0], 1)
    flat = labels.reshape(labels.shape[0], -1)
    return flat[first], flat[second]


def _nan_safe_mean_dice(intersection, total):
    """Mean of ``2 |A n B| / (|A| + |B|)`` over the pairs (axis 0), skipping pairs where both
    are empty; NaN when every pair is skipped."""
    valid = total > 0
    dice = jnp.where(valid, 2.0 * intersection / jnp.where(valid, total, 1), 0.0)
    return jnp.sum(dice, axis=0) / jnp.sum(valid, axis=0)


@functools.partial(jax.jit, static_argnames=("match_labels",))
def pairwise_dice(labels, *, match_labels: bool = False):
    """Dice of the foreground, averaged over all pairs ``j < j'`` of a group of label maps.

    Args:
      labels: ``(N, *shape)`` integer label maps, 0 the background.
      match_labels: False: Dice of the binary foregrounds ``label > 0``. True: the labels must
        agree as well, ``2 |{a = b > 0}| / (|{a > 0}| + |{b > 0}|)`` (the Dice of all foreground
        classes pooled).

    Returns:
      Scalar in [0, 1]; pairs whose foregrounds are both empty are skipped (NaN if all are).
    """
    a, b = _pairs(labels)
    fa, fb = a > 0, b > 0
    agree = (a == b) & fa if match_labels else fa & fb
    intersection = jnp.sum(agree, axis=1)
    total = jnp.sum(fa, axis=1) + jnp.sum(fb, axis=1)
    return _nan_safe_mean_dice(intersection, total)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def pairwise_dice_per_class(labels, num_classes: int):
    """Dice of each foreground class ``1 .. K-1``, averaged over all pairs ``j < j'``.

    Args:
      labels: ``(N, *shape)`` integer label maps with values in ``[0, num_classes)``.
      num_classes: ``K``, including the background class 0.

    Returns:
      ``(K - 1,)``; for each class, the pairs where the class is absent from both maps are skipped
      (NaN if the class is absent everywhere).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    a, b = _pairs(labels)

    def counts(x, y):
        sizes = jnp.bincount(x, length=num_classes) + jnp.bincount(y, length=num_classes)
        same = jnp.bincount(jnp.where(x == y, x, num_classes), length=num_classes + 1)
        return same[1:num_classes], sizes[1:]

    intersection, total = jax.vmap(counts)(a.astype(jnp.int32), b.astype(jnp.int32))
    return _nan_safe_mean_dice(intersection, total)


@functools.partial(jax.jit, static_argnames=("grid",))
def jacobian_stats(displacement, grid: Grid, mask=None):
    """Statistics of the Jacobian determinant of ``x -> x + u_j(x)`` over a group of fields
    (:func:`xjax.regularizers.jacobian_determinant`: world-mm central differences).

    Args:
      displacement: ``(N, *shape, D)`` displacement fields in mm on ``grid``.
      grid: their grid.
      mask: optional ``(*shape)`` or ``(N, *shape)`` boolean region; default the whole grid.

    Returns:
      dict of scalars pooled over images and masked voxels: ``min``, ``max``, ``mean``, ``std``
      of ``det J`` and ``folding`` (the fraction of voxels with ``det J <= 0``).
    """
    _check_field("displacement", displacement, grid, group=True)
    det = jax.vmap(jacobian_determinant, in_axes=(0, None))(displacement, grid)
    w = jnp.ones(det.shape, bool) if mask is None else jnp.broadcast_to(mask, det.shape) > 0
    n = jnp.sum(w)
    mean = jnp.sum(jnp.where(w, det, 0.0)) / n
    return {
        "min": jnp.min(jnp.where(w, det, jnp.inf)),
        "max": jnp.max(jnp.where(w, det, -jnp.inf)),
        "mean": mean,
        "std": jnp.sqrt(jnp.sum(jnp.where(w, (det - mean) ** 2, 0.0)) / n),
        "folding": jnp.sum(w & (det <= 0)) / n,
    }
