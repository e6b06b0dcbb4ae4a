"""Variance of intensities, the monomodal baseline: minus the variance across the group of the
normalised intensities.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from xjax.objectives._common import _normalised, _weighted_mean
from xjax.objectives.base import Objective

__all__ = ["VarianceOfIntensities"]


@dataclasses.dataclass(frozen=True)
class VarianceOfIntensities(Objective):
    """Variance of intensities (monomodal): ``-sum_x w_x Var_i(u~_ix) / sum_x w_x``.

    ``Var_i`` is the population variance across the group (divided by ``N``) of the normalised
    intensities ``u~`` (:mod:`xjax.objectives`), so the value does not depend on the images' units and
    images of one modality with different gains still compare. No state.
    """

    def similarity(self, state, values, weights, sample_index, lo, hi, bins: int):
        """Minus the weighted mean variance; ``values`` ``(N, S)``, ``weights`` ``(S,)``."""
        del state, sample_index, bins
        return -_weighted_mean(jnp.var(_normalised(values, lo, hi), axis=0), weights)
