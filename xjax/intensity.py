"""Intensity normalisation, one place for the command line, the registration inputs and the networks.

* :func:`zscore`: each image to zero mean and unit standard deviation over its voxels (optionally
  weighted by a mask): what the command line feeds :func:`xjax.register` and what DCC expects.
* :func:`unit_range`: each image to ``[0, 1]`` by two of its percentiles, clipped: what BInGo
  expects.

Both are written for a group ``(N, *spatial)``, statistics taken per image.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["zscore", "unit_range"]


def zscore(images, mask=None):
    """Per-image z-score over the spatial axes: ``(N, *S)`` -> ``(N, *S)`` float32.

    Args:
      images: ``(N, *S)`` intensities.
      mask: optional ``(N, *S)`` or ``(*S)`` weights for the statistics (default: every voxel).
    Returns:
      float32 jax array; a constant image (standard deviation below 1e-6 of its largest
      magnitude) is divided by that floor.

    Each image is first divided by its largest magnitude (the z-score does not depend on the
    scale): squared intensities near 1e20 would overflow float32 and those near 1e-30 underflow,
    making a varying image look constant or NaN.
    """
    images = jnp.asarray(images, jnp.float32)
    axes = tuple(range(1, images.ndim))
    peak = jnp.max(jnp.abs(images), axis=axes, keepdims=True)
    images = images / jnp.where(peak > 0, peak, 1.0)
    w = jnp.ones_like(images) if mask is None else jnp.broadcast_to(jnp.asarray(mask, jnp.float32), images.shape)
    count = jnp.maximum(jnp.sum(w, axis=axes, keepdims=True), 1.0)
    mean = jnp.sum(w * images, axis=axes, keepdims=True) / count
    std = jnp.sqrt(jnp.sum(w * jnp.square(images - mean), axis=axes, keepdims=True) / count)
    return (images - mean) / jnp.maximum(std, 1e-6)


def unit_range(images, low: float = 0.5, high: float = 99.5):
    """Per-image intensities to [0, 1] by their ``low`` and ``high`` percentiles, clipped.

    Args:
      images: ``(N, *spatial)`` array.
      low, high: percentiles (0-100) mapped to 0 and 1.
    Returns:
      float32 numpy array of the same shape (computed in float64 on the host).
    """
    x = np.asarray(images, np.float64)
    flat = x.reshape(x.shape[0], -1)
    lo = np.percentile(flat, low, axis=1).reshape((-1,) + (1,) * (x.ndim - 1))
    hi = np.percentile(flat, high, axis=1).reshape((-1,) + (1,) * (x.ndim - 1))
    return np.clip((x - lo) / np.maximum(hi - lo, 1e-12), 0, 1).astype(np.float32)
