"""The :class:`Objective` protocol: a groupwise similarity that drives :func:`xjax.register`.

An :class:`Objective` is a static, frozen spec (hashable, so it is part of the compiled program's
key) with three pure functions over a state pytree, in the spirit of optax's ``init`` / ``update``:

* ``init(key, images, weights)``: the state before the first pyramid level, from the unwarped
  level images ``(N, V)`` and voxel weights ``(V,)``;
* ``update(state, warped, weights, lo, hi, bins, sample_index)``: once per step, without gradient,
  over the whole level grid: the warped images ``(N, V)``, the weights (mask times overlap), the
  Parzen ranges ``(N,)`` and the step's voxel sample ``(S,)``. For the X-metric this is the E-step
  (Algorithm 1, lines 3-4); a baseline may re-estimate a template or mixture here, or do nothing;
* ``similarity(state, values, weights, sample_index, lo, hi, bins)``: the scalar similarity
  (higher is better) of the warped intensities ``values`` ``(N, S)`` at the step's sample, with
  their weights ``(S,)``; differentiable with respect to ``values``. The objective of the
  optimiser is its negation (plus the regulariser).

and ``to_grid(state, source, target)`` carrying the state from one pyramid level's grid to the next
(identity unless the state holds a field on the grid).
"""

from __future__ import annotations

import abc
from typing import Any

from xjax.grid import Grid

__all__ = ["Objective", "INITS"]

#: The posterior initialisations of :class:`~xjax.objectives.XMetric`.
INITS = ("kmeans", "random")

State = Any


class Objective(abc.ABC):
    """A groupwise similarity (see the module docstring). Subclasses are frozen dataclasses."""

    def init(self, key, images, weights) -> State:
        """State before the first level; ``images`` ``(N, V)``, ``weights`` ``(V,)``."""
        del key, images, weights
        return ()

    def update(self, state: State, warped, weights, lo, hi, bins: int, sample_index) -> State:
        """The per-step update without gradient (see the module docstring)."""
        del warped, weights, lo, hi, bins, sample_index
        return state

    @abc.abstractmethod
    def similarity(self, state: State, values, weights, sample_index, lo, hi, bins: int):
        """Scalar similarity of the sampled warped intensities ``values`` ``(N, S)``."""

    def to_grid(self, state: State, source: Grid, target: Grid) -> State:
        """The state moved from the grid ``source`` to the grid ``target`` (same field of view)."""
        del source, target
        return state
