"""The one warp of xjax: pull an image through a displacement field in world mm.

``warp(image, u, grid)`` is ``image(x + u(x))`` at the voxel centres ``x`` of ``grid`` (the pull
convention of :mod:`xjax.grid`), by the one sampler of :mod:`xjax.interpolate`. The registration,
the networks (DCC and BInGo) and the phantoms all warp through it.

**Boundary rule** (one for all callers): beyond the outermost voxel centres the image extends by
its border values (indices clamped onto ``[0, n_a - 1]``), and ``inside`` flags the points that lie
within the voxel-centre hull. A caller that wants a background outside the image writes
``jnp.where(inside, values, 0)``, one that weights a loss or a histogram by the overlap multiplies by
``inside``; inside the hull both are the same values.

Three entry points, one rule:

* :func:`warp`: one image and a displacement field ``u`` in mm on its grid (the networks). The
  voxel index of ``x + u(x)`` is formed as ``i(x) + A^-1 u(x)``, so world coordinates far from the
  origin cost no precision.
* :func:`warp_points`: one image at arbitrary world points (the phantoms, the outputs).
* :func:`warp_group`: a group ``(N, *spatial)``, each image at its own world points, as one fused
  gather with the background (0) written outside (the registration's hot path; the same values as
  ``jnp.where(inside, *warp_points(...))`` image by image).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from xjax.grid import Grid, apply_linear
from xjax.interpolate import sample_inside, sample_stack_inside

__all__ = ["warp", "warp_points", "warp_group", "warp_index", "pull_points"]


def pull_points(displacement, grid: Grid):
    """Continuous voxel indices of ``x + u(x)`` for every voxel ``x`` of ``grid``.

    Args:
      displacement: ``(*grid.shape, D)`` in mm.
      grid: the grid of the image and of the field.
    Returns:
      ``(*grid.shape, D)`` voxel indices into an image on ``grid``.
    """
    d = grid.ndim
    if displacement.shape != grid.shape + (d,):
        raise ValueError(f"displacement of shape {displacement.shape} does not lie on {grid}")
    index_per_mm = jnp.asarray(np.linalg.inv(grid.matrix[:d, :d]), displacement.dtype)
    return grid.index_points(displacement.dtype) + apply_linear(displacement, index_per_mm)


def warp_index(image, index_points, *, order: int = 1):
    """``(values, inside)`` of ``image`` at continuous voxel indices, by the boundary rule above.

    Args:
      image: ``(*spatial)`` or ``(*spatial, C)``.
      index_points: ``(..., D)`` voxel indices.
      order: 1 (multi)linear, 0 nearest neighbour (labels).
    Returns:
      ``values`` ``(...)`` or ``(..., C)``, border-extended outside the image, and ``inside``
      ``(...)`` in {0, 1}.
    """
    upper = jnp.asarray(image.shape[:index_points.shape[-1]], index_points.dtype) - 1
    inside = jnp.all((index_points >= 0) & (index_points <= upper), axis=-1)
    values, _ = sample_inside(image, jnp.clip(index_points, 0, upper), order=order)
    return values, inside.astype(values.dtype)


def warp(image, displacement, grid: Grid, *, order: int = 1):
    """Pull ``image`` (on ``grid``) through ``displacement``: ``image(x + u(x))``.

    Args:
      image: ``(*grid.shape)`` or ``(*grid.shape, C)``.
      displacement: ``(*grid.shape, D)`` in mm.
      grid: the grid of the image and of the field.
      order: 1 (multi)linear, 0 nearest neighbour (labels).
    Returns:
      ``(values, inside)`` as :func:`warp_index`.
    """
    return warp_index(image, pull_points(displacement, grid), order=order)


def warp_points(image, points, grid: Grid, *, order: int = 1):
    """``(values, inside)`` of ``image`` (on ``grid``) at world points ``(..., D)`` in mm."""
    return warp_index(image, grid.world_to_index(points), order=order)


def warp_group(images, points, grid: Grid):
    """Linear interpolation of a group ``(N, *grid.shape)``, image ``j`` at world points
    ``points[j]`` ``(N, ..., D)`` in mm: ``(values, inside)``, each ``(N, ...)``, with values 0
    outside (see the module docstring)."""
    return sample_stack_inside(images, grid.world_to_index(points))
