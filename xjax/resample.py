"""Resampling of images between grids, on the host: :func:`pull_image` (one image onto a target grid,
optionally through a displacement), :func:`to_common_space` (a group onto one common grid) and
:func:`same_grid` (whether two grids coincide within a tolerance).

Points are composed in float64 with numpy and sampled by the one sampler of
:mod:`xjax.interpolate` (jitted once per shape); the results are numpy arrays. No file I/O here:
:mod:`xjax.io` reads and writes the images.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from xjax.grid import Grid, bounding_grid
from xjax.interpolate import sample

__all__ = ["pull_image", "same_grid", "to_common_space"]

_GRID_TOL_MM = 1e-3
_SNAP_VOXELS = 1e-4


def _edge_corners(grid: Grid) -> np.ndarray:
    """World positions (mm) of the grid's voxel-edge corners (sensitive to spacing on every axis,
    singleton axes included), ``(2**D, D)``."""
    idx = np.stack(np.meshgrid(*[[-0.5, s - 0.5] for s in grid.shape], indexing="ij"), -1)
    return grid.index_to_world_np(idx.reshape(-1, grid.ndim))


def _corner_gap(a: Grid, b: Grid) -> float:
    """Largest distance (mm) between corresponding voxel-edge corners of two grids."""
    return float(np.max(np.linalg.norm(_edge_corners(a) - _edge_corners(b), axis=-1)))


def same_grid(a: Grid, b: Grid, tol_mm: float = _GRID_TOL_MM) -> bool:
    """True if both grids have the same shape and their voxel-edge corners agree within
    ``tol_mm``."""
    return a.shape == b.shape and _corner_gap(a, b) <= tol_mm


_sample_jit = jax.jit(sample, static_argnames=("order",))


def pull_image(image, grid: Grid, target: Grid, displacement=None, *, order: int = 1) -> np.ndarray:
    """Sample ``image`` (on ``grid``) at the world points ``x + u(x)`` of ``target``'s voxels (pull).

    Points are composed in float64 on the host, ``index = grid^-1 (target(i) + u)``, then sampled
    with the one sampler of :mod:`xjax.interpolate`; composing the affines in float64 keeps world
    coordinates far from the origin exact. Points outside ``image`` take 0.

    Args:
      image: ``(*grid.shape)`` or ``(*grid.shape, C)``.
      grid, target: source and target grids (same dimensionality ``D``).
      displacement: ``(*target.shape, D)`` in mm, or None for the identity.
      order: 1 linear, 0 nearest neighbour (labels).

    Returns:
      ``(*target.shape[, C])`` numpy array, dtype of ``image`` for ``order=0`` else float32.
    """
    if grid.ndim != target.ndim:
        raise ValueError(f"cannot sample a {grid.ndim}D image on a {target.ndim}D grid")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    index = np.stack(np.meshgrid(*[np.arange(s) for s in target.shape], indexing="ij"), -1)
    world = target.index_to_world_np(index)
    if displacement is not None:
        u = np.asarray(displacement, np.float64)
        if u.shape != target.shape + (target.ndim,):
            raise ValueError(f"displacement of shape {u.shape} does not lie on {target}")
        world = world + u
    inv = np.linalg.inv(grid.matrix)
    index = world @ inv[:-1, :-1].T + inv[:-1, -1]
    # Voxel centres that coincide up to round-off land exactly on them (so a border voxel at
    # index -1e-16 stays inside, and an identical grid copies the image).
    nearest = np.round(index)
    index = np.where(np.abs(index - nearest) < _SNAP_VOXELS, nearest, index).astype(np.float32)
    image = np.asarray(image)
    integer = order == 0 and np.issubdtype(image.dtype, np.integer)
    image = image.astype(np.int32 if integer else np.float32)
    return np.asarray(_sample_jit(image, index, order=order))


def to_common_space(images: Sequence[np.ndarray], grids: Sequence[Grid], reference: int | str = 0,
                    *, order: int = 1, names: Sequence[str] | None = None
                    ) -> tuple[np.ndarray, Grid]:
    """Resample a group of images onto one common grid.

    Args:
      images: ``N`` arrays, image ``j`` of shape ``grids[j].shape``.
      grids: their grids (all 2D or all 3D).
      reference: index of the image whose grid is the common grid, or ``"bounds"`` for a grid that
        bounds the whole group (:func:`xjax.grid.bounding_grid`, finest spacing of the group).
      order: 1 linear, 0 nearest neighbour.
      names: names of the inputs (file paths) for error messages.

    Returns:
      ``(group (N, *common.shape) float32, common)``. Each image is pulled from the common grid's
      world points; an image already on the common grid is copied exactly.
    """
    n = len(images)
    names = list(names) if names is not None else [f"image {j}" for j in range(n)]
    if len(grids) != n or len(names) != n:
        raise ValueError(f"got {n} images, {len(grids)} grids and {len(names)} names")
    if n == 0:
        raise ValueError("to_common_space needs at least one image")
    dims = {g.ndim for g in grids}
    if len(dims) > 1:
        listing = ", ".join(f"{nm} ({g.ndim}D)" for nm, g in zip(names, grids))
        raise ValueError(f"cannot register 2D and 3D images together: {listing}")
    for img, g, nm in zip(images, grids, names):
        if np.shape(img) != g.shape:
            raise ValueError(f"{nm}: array of shape {np.shape(img)} does not match its grid {g}")
    if isinstance(reference, str):
        if reference != "bounds":
            raise ValueError(f"reference must be an image index or 'bounds', got {reference!r}")
        common = bounding_grid(list(grids))
    else:
        if not (isinstance(reference, (int, np.integer)) and 0 <= reference < n):
            raise ValueError(f"reference index must be in [0, {n}), got {reference!r}")
        common = grids[int(reference)]
    out = [np.array(img, np.float32) if same_grid(g, common) else pull_image(img, g, common, order=order)
           for img, g in zip(images, grids)]
    return np.stack(out), common
