"""APE, accumulated pairwise estimates (Wachinger & Navab): the sum of the Parzen MI of every pair
of images, ``N (N - 1) / 2`` joint histograms.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from xjax.density import entropy, group_pair_histograms
from xjax.objectives.base import Objective

__all__ = ["APE"]


def _pair_information(hist):
    """``I(A; B) = H(A) + H(B) - H(A, B)`` in nats from unnormalised ``(..., B_a, B_b)`` histograms."""
    p = hist / jnp.sum(hist, axis=(-2, -1), keepdims=True)
    return entropy(p.sum(-1), axis=-1) + entropy(p.sum(-2), axis=-1) - entropy(p, axis=(-2, -1))


@dataclasses.dataclass(frozen=True)
class APE(Objective):
    """Accumulated pairwise estimates: ``APE(U) = sum_{i < j} I(U_i; U_j)`` (paper Eq. 3).

    Each ``I(U_i; U_j)`` is the Parzen MI of the sampled intensities of images ``i`` and ``j``
    (cubic B-spline, ``4 x 4`` taps per voxel, the estimator of :func:`xjax.density.pair_histogram`),
    each image binned over its own range with ``L`` bins. The ``N (N - 1) / 2`` pair histograms are
    built by one scatter-add: cost and memory grow as ``O(N^2)``. The sum over pairs is not normalised
    (the authors' code divides it by ``(N - 1) / 2``, a constant factor). No state.
    """

    def similarity(self, state, values, weights, sample_index, lo, hi, bins: int):
        """``sum_{i<j} I(U_i; U_j)`` in nats; ``values`` ``(N, S)``, ``weights`` ``(S,)``."""
        del state, sample_index
        first, second = np.triu_indices(values.shape[0], k=1)
        hist = group_pair_histograms(values[first], values[second], weights, (lo[first], hi[first]),
                                (lo[second], hi[second]), bins)
        return jnp.sum(_pair_information(hist))
