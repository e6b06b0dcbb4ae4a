"""Linear transforms: translation, rigid and affine maps in world mm.

Rigid and affine maps act about a pivot ``c``, the bound grid's centre in world mm:
``phi(x) = A (x - c) + c + t``. Everything is in millimetres, so anisotropic voxel spacing and
oblique grids are respected without special cases.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Self

import jax.numpy as jnp

from xjax.grid import Grid
from xjax.transforms.base import Params, Transform, apply_linear, grid_points

__all__ = ["Affine", "Rigid", "Translation", "rotation_matrix"]


@dataclasses.dataclass(frozen=True)
class Translation(Transform):
    """``phi(x) = x + t``; params ``{"translation": (D,)}`` in mm.

    Group centring (Eq. 37) subtracts the mean translation: exact.

    Attributes:
      ndim: spatial dimension, filled by :meth:`bind`.
    """

    ndim: int | None = None
    linear = True

    def bind(self, grid: Grid) -> Self:
        return dataclasses.replace(self, ndim=grid.ndim)

    @property
    def is_bound(self) -> bool:
        return self.ndim is not None

    def identity(self) -> Params:
        self._require_bound()
        return {"translation": jnp.zeros((self.ndim,), jnp.float32)}

    def map_points(self, params: Params, points):
        self._require_bound()
        self._check_points(points, self.ndim)
        return points + params["translation"]

    def displacement(self, params: Params, grid: Grid):
        self._require_bound()
        self._check_grid(grid, self.ndim)
        t = params["translation"]
        return jnp.broadcast_to(t, grid.shape + t.shape)

    def lr_scale(self) -> Params:
        return {"translation": 1.0}


@dataclasses.dataclass(frozen=True)
class _AboutPivot(Transform):
    """``phi(x) = A (x - c) + c + t`` with ``A`` given by :meth:`matrix` and ``c`` the pivot.

    Attributes:
      pivot: centre ``c`` of the linear part in world mm, ``(D,)``; :meth:`bind` sets it to the
        grid's centre.
    """

    pivot: tuple[float, ...] | None = None
    linear = True

    def bind(self, grid: Grid) -> Self:
        return dataclasses.replace(self, pivot=tuple(float(v) for v in grid.center))

    @property
    def is_bound(self) -> bool:
        return self.pivot is not None

    @property
    def ndim(self) -> int:
        self._require_bound()
        return len(self.pivot)

    @abc.abstractmethod
    def matrix(self, params: Params):
        """The linear part ``A``, ``(D, D)``."""

    def map_points(self, params: Params, points):
        self._check_points(points, self.ndim)
        a = self.matrix(params)
        c = jnp.asarray(self.pivot, a.dtype)
        return apply_linear(points - c, a) + c + params["translation"]

    def displacement(self, params: Params, grid: Grid):
        self._check_grid(grid, self.ndim)
        a = self.matrix(params)
        c = jnp.asarray(self.pivot, a.dtype)
        x = grid_points(grid, a.dtype)
        return apply_linear(x - c, a - jnp.eye(self.ndim, dtype=a.dtype)) + params["translation"]


def rotation_matrix(angles):
    """Rotation matrix from angles in radians.

    Args:
      angles: ``(1,)`` in 2D (counter-clockwise from world axis x towards y), or ``(3,)`` in 3D:
        rotations about the world axes x, y and z, composed as ``R = Rz @ Ry @ Rx`` (the rotation
        about x acts first).

    Returns:
      ``(D, D)`` with ``D = 2`` for one angle and ``D = 3`` for three.
    """
    if angles.shape not in ((1,), (3,)):
        raise ValueError(f"angles must have shape (1,) or (3,), got {angles.shape}")
    c, s = jnp.cos(angles), jnp.sin(angles)
    if angles.shape == (1,):
        return jnp.array([[c[0], -s[0]], [s[0], c[0]]])
    one, zero = jnp.ones_like(c[0]), jnp.zeros_like(c[0])
    rx = jnp.array([[one, zero, zero], [zero, c[0], -s[0]], [zero, s[0], c[0]]])
    ry = jnp.array([[c[1], zero, s[1]], [zero, one, zero], [-s[1], zero, c[1]]])
    rz = jnp.array([[c[2], -s[2], zero], [s[2], c[2], zero], [zero, zero, one]])
    return rz @ ry @ rx


@dataclasses.dataclass(frozen=True)
class Rigid(_AboutPivot):
    """Rotation about the grid centre then translation: ``phi(x) = R (x - c) + c + t``.

    Params in 2D: ``{"angle": (1,) rad, "translation": (2,) mm}``; in 3D:
    ``{"angles": (3,) rad, "translation": (3,) mm}`` with ``R = Rz @ Ry @ Rx`` (see
    :func:`rotation_matrix`).

    Group centring (Eq. 37) subtracts the mean angles and the mean translation. The mean of the
    rotations is then the identity to second order in the angles only (rotations do not form a
    vector space); the translation part is exact.
    """

    @property
    def _angle_key(self) -> str:
        return "angle" if self.ndim == 2 else "angles"

    def identity(self) -> Params:
        n_angles = 1 if self.ndim == 2 else 3
        return {self._angle_key: jnp.zeros((n_angles,), jnp.float32),
                "translation": jnp.zeros((self.ndim,), jnp.float32)}

    def matrix(self, params: Params):
        return rotation_matrix(params[self._angle_key])

    def lr_scale(self) -> Params:
        return {self._angle_key: 0.01, "translation": 1.0}


@dataclasses.dataclass(frozen=True)
class Affine(_AboutPivot):
    """General affine map about the grid centre: ``phi(x) = (I + M) (x - c) + c + t``.

    Params ``{"matrix": (D, D) = M = A - I, "translation": (D,) mm}``; the identity is all zeros.

    Group centring (Eq. 37) subtracts the mean of ``A - I`` and of ``t``: exact, since ``phi`` is
    linear in the parameters.
    """

    def identity(self) -> Params:
        return {"matrix": jnp.zeros((self.ndim, self.ndim), jnp.float32),
                "translation": jnp.zeros((self.ndim,), jnp.float32)}

    def matrix(self, params: Params):
        m = params["matrix"]
        return jnp.eye(self.ndim, dtype=m.dtype) + m

    def lr_scale(self) -> Params:
        return {"matrix": 0.01, "translation": 1.0}
