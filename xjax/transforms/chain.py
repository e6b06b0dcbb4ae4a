"""Composition of transform stages (multi-stage and multi-level registration).

A chain of stages ``[(T_1, p_1), ..., (T_m, p_m)]`` listed in optimisation order is the map

``phi = T_1 o T_2 o ... o T_m``,

so the LAST stage acts FIRST on the common-space point: every new stage refines the
correspondence in the common space, where the group-mean constraint of Eq. (37) is imposed on it,
and the earlier, frozen stages then carry the refined point into the image.
"""

from __future__ import annotations

from typing import Sequence

from xjax.grid import Grid
from xjax.transforms.base import Params, Transform, grid_points

__all__ = ["chain_displacement", "compose_points"]

Stage = tuple[Transform, Params]


def compose_points(stages: Sequence[Stage], points):
    """``phi(points) = T_1(T_2(... T_m(points)))`` for one image.

    Args:
      stages: ``(spec, params)`` pairs in optimisation order (bound specs, one image's params).
      points: world mm ``(..., D)`` in the common space.

    Returns:
      World mm ``(..., D)`` in the image's space; ``points`` unchanged for no stages.
    """
    for spec, params in reversed(tuple(stages)):
        points = spec.map_points(params, points)
    return points


def chain_displacement(frozen: Sequence[Stage], spec: Transform, params: Params, grid: Grid):
    """Displacement of ``T_frozen_1 o ... o T_frozen_k o T_current`` at the voxel centres of
    ``grid``, for one image (the caller vmaps over the group).

    The current stage uses its fast :meth:`~xjax.transforms.base.Transform.displacement`; the
    frozen stages map the displaced points with ``map_points``.

    Args:
      frozen: earlier stages ``(spec, params)`` in optimisation order.
      spec: the stage being optimised (bound).
      params: its parameters for one image.
      grid: the bound grid or a pyramid level of it.

    Returns:
      ``(*grid.shape, D)`` in mm.
    """
    u = spec.displacement(params, grid)
    if not frozen:
        return u
    x = grid_points(grid, u.dtype)
    return compose_points(frozen, x + u) - x
