"""Dense transforms: a displacement field and a stationary velocity field (SVF), one vector per
voxel of the bound grid, channels-last in world mm.

Fields are read between voxel centres by linear interpolation (:func:`xjax.interpolate.sample`);
points beyond the outermost voxel centres are clamped onto the border, so the field is extended
by its border values.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Self

import jax.numpy as jnp
import numpy as np
from jax import lax

from xjax.grid import Grid
from xjax.interpolate import sample_clamped
from xjax.regularizers import bending_energy
from xjax.transforms.base import Params, Transform, apply_affine, apply_linear

__all__ = ["DenseDisplacement", "StationaryVelocity", "resample_field", "scaling_and_squaring"]


def resample_field(field, source: Grid, target: Grid):
    """A channels-last field on ``source`` read at the voxel centres of ``target``.

    Args:
      field: ``(*source.shape, C)``.
      source: the grid the field lives on.
      target: any grid of the same dimension (e.g. a pyramid level of ``source``).

    Returns:
      ``(*target.shape, C)``, linearly interpolated, border-clamped; ``field`` itself when
      ``target == source``.
    """
    if target == source:
        return field
    to_source = np.linalg.solve(source.matrix, target.matrix)  # target index -> source index
    return sample_clamped(field, apply_affine(to_source, target.index_points(field.dtype)))


def scaling_and_squaring(velocity, grid: Grid, steps: int):
    """Displacement ``u`` of ``exp(v)``, the flow of the stationary velocity ``v`` at time 1.

    ``u = v / 2**steps``, then ``steps`` times ``u <- u + u o (x + u)``, composing by linear
    interpolation (border-clamped) at the displaced voxel centres.

    Args:
      velocity: ``(*grid.shape, D)`` in mm (per unit time).
      grid: the grid the field lives on.
      steps: number of squarings.

    Returns:
      ``(*grid.shape, D)`` displacement in mm.
    """
    d = grid.ndim
    u = velocity / 2.0**steps
    index = grid.index_points(u.dtype)
    index_per_mm = jnp.asarray(np.linalg.inv(grid.matrix[:d, :d]), u.dtype)

    def square(_, u):
        return u + sample_clamped(u, index + apply_linear(u, index_per_mm))

    return lax.fori_loop(0, steps, square, u)


@dataclasses.dataclass(frozen=True)
class _DenseField(Transform):
    """A vector field ``params[key]``, ``(*grid.shape, D)`` in mm, on the bound grid.

    Attributes:
      grid: the grid the field lives on, filled by :meth:`bind`.
    """

    grid: Grid | None = dataclasses.field(default=None, kw_only=True)
    linear = False
    key: ClassVar[str]

    def bind(self, grid: Grid) -> Self:
        return dataclasses.replace(self, grid=grid)

    @property
    def is_bound(self) -> bool:
        return self.grid is not None

    @property
    def ndim(self) -> int:
        self._require_bound()
        return self.grid.ndim

    def identity(self) -> Params:
        d = self.ndim
        return {self.key: jnp.zeros(self.grid.shape + (d,), jnp.float32)}

    def _read(self, field, points):
        """``field`` (on the bound grid) at world points ``(..., D)``."""
        self._check_points(points, self.ndim)
        return sample_clamped(field, self.grid.world_to_index(points))

    def regularizer(self, params: Params):
        """Bending energy (mm units) of the field by finite differences on the bound grid."""
        self._require_bound()
        return bending_energy(params[self.key], self.grid.spacing)

    def lr_scale(self) -> Params:
        return {self.key: 1.0}


@dataclasses.dataclass(frozen=True)
class DenseDisplacement(_DenseField):
    """A free displacement field: params ``{"displacement": (*grid.shape, D)}`` in mm, ``u`` at
    the bound grid's voxel centres; read elsewhere by linear interpolation, border-clamped.

    Group centring (Eq. 37) subtracts the mean field: exact.
    """

    key = "displacement"

    def map_points(self, params: Params, points):
        return points + self._read(params[self.key], points)

    def displacement(self, params: Params, grid: Grid):
        """The field resampled to ``grid`` (itself on the bound grid)."""
        self._check_grid(grid, self.ndim)
        return resample_field(params[self.key], self.grid, grid)


@dataclasses.dataclass(frozen=True)
class StationaryVelocity(_DenseField):
    """Diffeomorphic map ``phi = exp(v)`` of a stationary velocity field, by scaling and squaring.

    Params ``{"velocity": (*grid.shape, D)}`` in mm on the bound grid. The regulariser is the
    bending energy of the velocity. Group centring (Eq. 37) subtracts the mean velocity: the
    log-domain approximation (``exp`` of the mean velocity is the identity, while the mean of the
    displacements vanishes only to first order in ``v``).

    Attributes:
      steps: number of squarings (the velocity is divided by ``2**steps``).
    """

    steps: int = 7
    key = "velocity"

    def __post_init__(self):
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"StationaryVelocity steps must be an integer >= 0, "
                             f"got {self.steps!r}")

    def map_points(self, params: Params, points):
        """Integrates on the bound grid, then reads the displacement at ``points``."""
        self._require_bound()
        u = scaling_and_squaring(params[self.key], self.grid, self.steps)
        return points + self._read(u, points)

    def displacement(self, params: Params, grid: Grid):
        """The velocity resampled to ``grid``, then integrated there (on a coarse pyramid level
        this costs a fraction of a full-resolution integration)."""
        self._check_grid(grid, self.ndim)
        velocity = resample_field(params[self.key], self.grid, grid)
        return scaling_and_squaring(velocity, grid, self.steps)
