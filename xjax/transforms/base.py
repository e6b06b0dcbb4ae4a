"""The transform interface shared by every spatial transform of xjax.

A transform is a frozen, hashable dataclass (static under ``jax.jit``): its constructor arguments
are the user's knobs, and :meth:`Transform.bind` fills the geometry fields from the full-resolution
common grid. Its parameters are a pytree (a dict of float arrays) for ONE image; a group stacks
them on a leading axis ``N`` and the caller ``vmap``s.

Every transform is a pull map from the common space (world mm) into one image's world space,
``phi(x) = x + u(x)`` (see :mod:`xjax.grid`).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Self

import jax
import jax.numpy as jnp

from xjax.grid import Grid, apply_affine, apply_linear

__all__ = ["Params", "Transform", "apply_affine", "apply_linear", "grid_points",
           "subtract_group_mean"]

Params = dict[str, Any]
"""Parameters of one transform for one image: a dict of float arrays (a pytree)."""


def grid_points(grid: Grid, dtype=jnp.float32):
    """World coordinates (mm) of the voxel centres of ``grid``, ``(*grid.shape, D)``.

    Behind an optimisation barrier: otherwise XLA folds these constants, and everything computed
    from them alone, at compile time with its slow evaluator, which can take seconds.
    """
    return jax.lax.optimization_barrier(grid.points(dtype))


def subtract_group_mean(group_params: Params) -> Params:
    """Subtract the mean over the leading group axis ``N`` from every leaf.

    This is the projection onto the constraint of Eq. (37), ``1/N sum_j phi_j(x) = x``, for every
    parameterisation in which the displacement is linear in the parameters; for the others it is
    the approximation stated in the transform's docstring.
    """
    return jax.tree.map(lambda a: a - jnp.mean(a, axis=0, keepdims=True), group_params)


class Transform(abc.ABC):
    """A spatial transform spec: a pull map ``phi(x) = x + u(x)`` in world mm.

    Subclasses are frozen dataclasses. Methods other than :meth:`bind` need a bound spec and
    raise ``ValueError`` otherwise.
    """

    linear: ClassVar[bool]
    """True for transforms whose map is affine in the point (no regulariser, no dense field)."""

    @abc.abstractmethod
    def bind(self, grid: Grid) -> Self:
        """A copy with the geometry fields filled from the full-resolution common ``grid``.

        Binding again to the same grid returns an equal spec.
        """

    @property
    @abc.abstractmethod
    def is_bound(self) -> bool:
        """Whether :meth:`bind` has filled the geometry fields."""

    @abc.abstractmethod
    def identity(self) -> Params:
        """Parameters of the identity map for one image."""

    @abc.abstractmethod
    def map_points(self, params: Params, points):
        """``phi(points)``: world mm ``(..., D)`` -> world mm ``(..., D)`` for one image."""

    @abc.abstractmethod
    def displacement(self, params: Params, grid: Grid):
        """``u(x) = phi(x) - x`` in mm at the voxel centres of ``grid``, ``(*grid.shape, D)``.

        ``grid`` is the bound grid or one of its pyramid levels (``grid.downsample(2**l)``).
        """

    @abc.abstractmethod
    def lr_scale(self) -> Params:
        """Per-leaf step-size multipliers (Python floats), same structure as :meth:`identity`."""

    def center(self, group_params: Params) -> Params:
        """Project group parameters (leading axis ``N``) onto Eq. (37), ``1/N sum_j phi_j = id``.

        Subtracts the group mean of every leaf (see :func:`subtract_group_mean`); each transform's
        docstring says whether that is exact for it.
        """
        return subtract_group_mean(group_params)

    def regularizer(self, params: Params):
        """Bending energy of the transform for one image (mm units), a scalar; 0 if linear."""
        return jnp.zeros((), jnp.result_type(*jax.tree.leaves(params)))

    # ---- helpers ----------------------------------------------------------------------------
    def _require_bound(self) -> None:
        if not self.is_bound:
            raise ValueError(f"{self!r} is not bound to a grid: call .bind(grid) first")

    def _check_grid(self, grid: Grid, ndim: int) -> None:
        if not isinstance(grid, Grid) or grid.ndim != ndim:
            raise ValueError(f"{type(self).__name__} is bound in {ndim}D, got grid {grid!r}")

    def _check_points(self, points, ndim: int) -> None:
        if points.shape[-1:] != (ndim,):
            raise ValueError(f"{type(self).__name__} is bound in {ndim}D, got points of shape "
                             f"{points.shape}")
