"""Regularisers and diagnostics of deformation fields: bending energy, Jacobian determinant,
folding fraction.

Fields are channels-last vector fields in world mm on a regular grid (see :mod:`xjax.grid`).
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
from jax import lax

from xjax.grid import Grid

__all__ = ["bending_energy", "folding_fraction", "jacobian_determinant"]


def _central_difference(f, axis: int, h: float):
    """``(f[i+1] - f[i-1]) / 2h`` along ``axis``; that axis shrinks by 2."""
    n = f.shape[axis]
    hi, lo = lax.slice_in_dim(f, 2, n, axis=axis), lax.slice_in_dim(f, 0, n - 2, axis=axis)
    return (hi - lo) / (2 * h)


def _second_difference(f, axis: int, h: float):
    """``(f[i+1] - 2 f[i] + f[i-1]) / h^2`` along ``axis``; that axis shrinks by 2."""
    n = f.shape[axis]
    lo, mid, hi = (lax.slice_in_dim(f, k, n - 2 + k, axis=axis) for k in range(3))
    return (hi - 2 * mid + lo) / (h * h)


def _interior(f, axes):
    """Drop the first and last point along each of ``axes``."""
    index = tuple(slice(1, -1) if a in axes else slice(None) for a in range(f.ndim))
    return f[index]


def bending_energy(field, spacing):
    """Bending energy of a vector field on a regular mesh.

    ``BE = mean_x sum_c [ sum_a (d2 f_c / dx_a^2)^2 + 2 sum_{a<b} (d2 f_c / dx_a dx_b)^2 ]``

    with derivatives along the mesh axes by central finite differences in mm (second differences
    for the pure terms, products of central first differences for the mixed terms). The mean runs
    over the interior points, where every stencil fits. The sum of squared Hessian entries is
    invariant to rotations, so an oblique mesh needs only its spacing.

    Args:
      field: ``(*shape, C)`` channels-last, in mm; ``D = field.ndim - 1`` spatial axes, each with
        at least 3 points.
      spacing: mesh spacing in mm, a scalar or ``(D,)``.

    Returns:
      Scalar in mm^-2 times the field's unit squared (mm^-2 for a displacement in mm).
    """
    d = field.ndim - 1
    if d < 1 or any(n < 3 for n in field.shape[:d]):
        raise ValueError(f"bending_energy needs a (*shape, C) field with >= 3 points per axis, "
                         f"got shape {field.shape}")
    h = np.broadcast_to(np.asarray(spacing, np.float64), (d,))
    if np.any(h <= 0):
        raise ValueError(f"spacing must be positive, got {spacing}")
    energy = 0.0
    for a in range(d):
        second = _second_difference(field, a, float(h[a]))
        energy = energy + jnp.sum(_interior(second, set(range(d)) - {a}) ** 2, axis=-1)
    for a, b in itertools.combinations(range(d), 2):
        mixed = _central_difference(_central_difference(field, a, float(h[a])), b, float(h[b]))
        energy = energy + 2 * jnp.sum(_interior(mixed, set(range(d)) - {a, b}) ** 2, axis=-1)
    return jnp.mean(energy)


def _check_field(displacement, grid: Grid) -> None:
    if displacement.shape != grid.shape + (grid.ndim,):
        raise ValueError(f"displacement of shape {displacement.shape} does not match {grid!r}: "
                         f"expected {grid.shape + (grid.ndim,)}")
    if any(n < 2 for n in grid.shape):
        raise ValueError(f"Jacobian needs >= 2 voxels per axis, got grid shape {grid.shape}")


def jacobian_determinant(displacement, grid: Grid):
    """Determinant of the Jacobian of ``phi(x) = x + u(x)`` at the voxel centres of ``grid``.

    ``du/dx`` is taken in world mm: derivatives along the index axes (central differences,
    one-sided at the border) are mapped through the inverse of the grid's linear part, so oblique
    and anisotropic grids are handled.

    Args:
      displacement: ``u`` in mm, ``(*grid.shape, D)``.
      grid: the grid the field lives on.

    Returns:
      ``det(I + du/dx)``, ``(*grid.shape)``.
    """
    _check_field(displacement, grid)
    d = grid.ndim
    d_index = jnp.stack(jnp.gradient(displacement, axis=tuple(range(d))), axis=-1)
    index_per_mm = jnp.asarray(np.linalg.inv(grid.matrix[:d, :d]), displacement.dtype)
    # d u_c / d x_w = sum_a d u_c / d i_a * d i_a / d x_w, unrolled (exact float32 on any backend)
    j = jnp.eye(d, dtype=displacement.dtype) + sum(d_index[..., a, None] * index_per_mm[a]
                                                   for a in range(d))
    if d == 2:
        return j[..., 0, 0] * j[..., 1, 1] - j[..., 0, 1] * j[..., 1, 0]
    return (j[..., 0, 0] * (j[..., 1, 1] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 1])
            - j[..., 0, 1] * (j[..., 1, 0] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 0])
            + j[..., 0, 2] * (j[..., 1, 0] * j[..., 2, 1] - j[..., 1, 1] * j[..., 2, 0]))


def folding_fraction(displacement, grid: Grid, mask=None):
    """Fraction of voxels where ``phi(x) = x + u(x)`` folds (``det J <= 0``).

    Args:
      displacement: ``u`` in mm, ``(*grid.shape, D)``.
      grid: the grid the field lives on.
      mask: optional ``(*grid.shape)`` weights in [0, 1] (a binary mask selects voxels).

    Returns:
      Scalar in [0, 1]: the (mask-weighted) mean of the folding indicator; 0 for an empty mask.
    """
    folded = (jacobian_determinant(displacement, grid) <= 0).astype(displacement.dtype)
    if mask is None:
        return jnp.mean(folded)
    if mask.shape != grid.shape:
        raise ValueError(f"mask of shape {mask.shape} does not match grid shape {grid.shape}")
    mask = mask.astype(displacement.dtype)
    return jnp.sum(mask * folded) / jnp.maximum(jnp.sum(mask), 1e-12)
