"""Congealing (Learned-Miller; Zollei et al.): minus the voxel-wise entropy of the group's intensity
stack, with a leave-one-out Gaussian Parzen window.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from xjax.objectives._common import _check_positive, _normalised, _weighted_mean
from xjax.objectives.base import Objective

__all__ = ["Congealing"]


@dataclasses.dataclass(frozen=True)
class Congealing(Objective):
    """Congealing: minus the weighted mean over the sampled voxels of the stack entropy ``H_x``.

    With ``u~_ix`` the normalised intensity of image ``i`` at voxel ``x`` (:mod:`xjax.objectives`) and
    ``G_sigma`` the Gaussian density, the leave-one-out Parzen estimate of the entropy of the
    stack ``(u~_1x .. u~_Nx)`` is

        ``H_x = -1/N sum_i log( 1/(N-1) sum_{j != i} G_sigma(u~_ix - u~_jx) )``,

    and the similarity is ``-sum_x w_x H_x / sum_x w_x`` (Eq. 2: the i.i.d. stack model).
    Leave-one-out, because with the ``j = i`` term each density is at least ``G_sigma(0) / N``:
    for the few images of a group that term dominates as soon as the others lie a few ``sigma``
    away, and the gradient that should pull them together vanishes.

    Attributes:
      sigma: Parzen window width in normalised intensity units (a fraction of each image's
        range ``hi - lo``).
    """

    sigma: float = 0.1

    def __post_init__(self):
        _check_positive(self.sigma, "Congealing.sigma")

    def similarity(self, state, values, weights, sample_index, lo, hi, bins: int):
        """``-mean_x H_x`` in nats; ``values`` ``(N, S)`` with ``N >= 2``, ``weights`` ``(S,)``."""
        del state, sample_index, bins
        n = values.shape[0]
        if n < 2:
            raise ValueError(f"congealing needs at least 2 images, got values of shape {values.shape}")
        u = _normalised(values, lo, hi) / self.sigma
        log_kernel = -0.5 * (u[:, None, :] - u[None, :, :]) ** 2  # (N, N, S)
        log_kernel = jnp.where(np.eye(n, dtype=bool)[:, :, None], -jnp.inf, log_kernel)
        log_density = (jax.nn.logsumexp(log_kernel, axis=1) - math.log(n - 1)
                       - math.log(self.sigma * math.sqrt(2.0 * math.pi)))
        return _weighted_mean(jnp.mean(log_density, axis=0), weights)
