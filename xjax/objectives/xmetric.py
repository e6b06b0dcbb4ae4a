"""The X-metric as an :class:`~xjax.objectives.Objective`: ``sum_j I(U_j o phi_j; Z)`` with the
E-step of Algorithm 1 as its per-step update, and its state :class:`XState`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax.numpy as jnp

from xjax import validate
from xjax.em import EMState, em_update, init_em, init_em_kmeans
from xjax.grid import Grid
from xjax.interpolate import sample_clamped
from xjax.metrics import FORMS, group_class_information
from xjax.objectives.base import INITS, Objective
from xjax.transforms.base import grid_points

__all__ = ["XMetric", "XState"]


class XState(NamedTuple):
    """The X-metric's state: the common-space parameters and, for X-Reg-GT, fixed appearance models.

    Attributes:
      em: posterior ``Gamma`` ``(V, K)`` on the level grid and ``pi`` ``(K,)``.
      tables: ``None`` (X-Reg-UN: appearance models re-estimated every step from the posterior), or
        fixed ``(N, L + 4, K)`` models from label maps (X-Reg-GT, Eq. 48).
    """

    em: EMState
    tables: Any = None


@dataclasses.dataclass(frozen=True)
class XMetric(Objective):
    """The X-metric ``sum_j I(U_j o phi_j; Z)`` (Eq. 8, 17) with the E-step of Algorithm 1.

    Attributes:
      num_classes: ``K``, classes of the common anatomy.
      form: ``"mi"`` (Eq. 17) or ``"reference"`` (``-H(K | U_j)``, the authors' code); both give the
        same gradient for a fixed posterior.
      init_posterior: the posterior before the first step: ``"kmeans"`` (default), the classes of
        a weighted k-means of the unwarped images' intensity vectors
        (:func:`xjax.em.init_em_kmeans`), or ``"random"``, the paper's softmax of Gaussian noise
        (Eq. 22), which can leave two tissues merged in one class.
    """

    num_classes: int = 4
    form: Literal["mi", "reference"] = "mi"
    init_posterior: Literal["kmeans", "random"] = "kmeans"

    def __post_init__(self):
        validate.check_num_classes(self.num_classes)
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.init_posterior not in INITS:
            raise ValueError(f"init_posterior must be one of {INITS}, got {self.init_posterior!r}")

    def init(self, key, images, weights) -> XState:
        """The posterior and ``pi`` before the first level (see ``init_posterior``)."""
        if self.init_posterior == "random":
            return XState(init_em(key, images.shape[1], self.num_classes, images.dtype))
        return XState(init_em_kmeans(key, images, weights, self.num_classes))

    def update(self, state: XState, warped, weights, lo, hi, bins: int, sample_index) -> XState:
        """Appearance models from the sample ``Omega_S`` (Eq. 20) and the E-step over the whole grid
        (Eq. 12-14)."""
        em = em_update(state.em, warped, weights, lo, hi, bins, state.tables, sample_index)
        return XState(em, state.tables)

    def similarity(self, state: XState, values, weights, sample_index, lo, hi, bins: int):
        """``sum_j I(U_j; K)`` over the sample, weighted by the posterior times ``weights``."""
        gamma = state.em.posterior[sample_index] * weights[:, None]
        return jnp.sum(group_class_information(values, gamma, lo, hi, bins, self.form))

    def to_grid(self, state: XState, source: Grid, target: Grid) -> XState:
        """The posterior resampled linearly (border extended) and renormalised; ``pi`` kept."""
        if source == target:
            return state
        posterior = state.em.posterior
        idx = source.world_to_index(grid_points(target))
        moved = sample_clamped(posterior.reshape(source.shape + posterior.shape[-1:]), idx)
        moved = moved.reshape(-1, posterior.shape[-1])
        moved = moved / jnp.sum(moved, axis=-1, keepdims=True)
        return XState(EMState(moved, state.em.pi), state.tables)
