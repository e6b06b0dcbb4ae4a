"""Helpers that the baseline objectives share (private): the normalised intensities, weighted means
over the sample and the checks of their hyper-parameters.

Congealing, GMM and VarianceOfIntensities compare intensities of different images directly, so they
first map each image onto ``[0, 1]`` by its Parzen range ``[lo, hi]`` ``(N,)`` (the one the
registration uses for its histograms; no gradient through it): ``u~ = (u - lo) / (hi - lo)``; their
scale parameters are in those units (fractions of the range).
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

__all__ = ["_TINY", "_normalised", "_weighted_mean", "_check_positive", "_check_count"]

#: Floor of weight totals and component masses, against division by zero on empty samples.
_TINY = 1e-12


def _normalised(u, lo, hi):
    """Intensities ``(N, n)`` mapped onto ``[0, 1]`` by the per-image ranges ``lo, hi`` ``(N,)``
    (gradient stopped through the ranges; a zero-width range counts as width one)."""
    lo = jax.lax.stop_gradient(lo)[:, None]
    width = jax.lax.stop_gradient(hi)[:, None] - lo
    return (u - lo) / jnp.where(width > 0, width, 1.0)


def _weighted_mean(f, weights):
    """``sum_x w_x f_x / sum_x w_x`` over the sample (``(S,)`` each)."""
    return jnp.sum(weights * f) / jnp.maximum(jnp.sum(weights), _TINY)


def _check_positive(value, what: str) -> None:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or value <= 0):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")


def _check_count(value, what: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
