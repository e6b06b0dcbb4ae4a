"""Host-side checks of user input, shared by :func:`xjax.register`, the metrics and the command line.

Every check raises ValueError naming the offending input (by ``names`` when given, else by index)
and its value. Shape and dtype checks always run; value checks (finiteness, sign, constancy,
integrality) are skipped for jax tracers, so the checks can be called inside ``jit`` or ``vmap``.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_bins", "check_images", "check_labels", "check_mask", "check_num_classes",
           "check_posterior"]


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _xp(x):
    """numpy for host arrays, jax.numpy for device arrays (reductions stay on the device)."""
    return jnp if isinstance(x, jax.Array) else np


def _name(j: int, names: Sequence[str] | None, what: str = "image") -> str:
    return f"{what} {j} ({names[j]})" if names is not None else f"{what} {j}"


def _array(x):
    """Arrays and tracers pass through; anything else (lists) becomes a numpy array."""
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)


def _check_real(x, what: str) -> None:
    """Refuse a dtype that is not a real number (complex, bool, ...), rather than cast it (a
    complex array would silently lose its imaginary part). The dtype is static, so this holds
    for tracers too."""
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        complex_ = jnp.issubdtype(x.dtype, jnp.complexfloating)
        hint = " (pass np.abs(x) or x.real explicitly)" if complex_ else ""
        raise ValueError(f"{what} must be real numbers, got dtype {x.dtype}{hint}")


def _fail_each(counts, describe) -> None:
    """Raise one ValueError listing every ``j`` with ``counts[j] != 0`` as ``describe(j)``."""
    offenders = [describe(j) for j in np.flatnonzero(counts)]
    if offenders:
        raise ValueError("; ".join(offenders))


def _per_image(x, fn):
    """``fn`` reduced over all but the leading axis, as a host numpy array ``(N,)``."""
    xp = _xp(x)
    return np.asarray(fn(xp, xp.reshape(x, (x.shape[0], -1))))


def check_images(images, names: Sequence[str] | None = None) -> None:
    """Check a group of images on one grid.

    Args:
      images: ``(N, X, Y)`` or ``(N, X, Y, Z)`` with ``N >= 2``.
      names: optional names of the ``N`` images (file paths) for error messages.

    Raises:
      ValueError: fewer than two images, spatial rank not 2 or 3, a dtype that is not real
      (complex: checked under ``jit`` too), NaN/Inf voxels (the image and the count are named), or
      a constant image.
    """
    images = _array(images)
    shape = tuple(images.shape)
    if len(shape) < 3:
        raise ValueError(f"images must be an array (N, X, Y) or (N, X, Y, Z); got shape {shape}")
    if len(shape) > 4:
        raise ValueError(f"images of shape {shape} have {len(shape) - 1} spatial axes: "
                         f"{len(shape) - 1}D input not supported (2D or 3D images only)")
    if shape[0] < 2:
        raise ValueError(f"groupwise registration needs at least 2 images, got {shape[0]} "
                         f"(images of shape {shape})")
    if names is not None and len(names) != shape[0]:
        raise ValueError(f"got {len(names)} names for {shape[0]} images")
    _check_real(images, "images")
    if _is_tracer(images):
        return
    bad = _per_image(images, lambda xp, x: xp.sum(~xp.isfinite(x), axis=1))
    _fail_each(bad, lambda j: f"{_name(j, names)} has {int(bad[j])} NaN/Inf voxels")
    lo = _per_image(images, lambda xp, x: xp.min(x, axis=1))
    hi = _per_image(images, lambda xp, x: xp.max(x, axis=1))
    _fail_each(lo == hi, lambda j: f"{_name(j, names)} is constant (every voxel is {lo[j]:g}); "
                                   "it holds nothing to register")


def check_mask(mask, spatial_shape: Sequence[int]) -> None:
    """Check a voxel weight mask ``(*spatial)``: matching shape, finite, non-negative, not empty."""
    mask = _array(mask)
    shape = tuple(mask.shape)
    spatial_shape = tuple(int(s) for s in spatial_shape)
    if shape != spatial_shape:
        raise ValueError(f"mask of shape {shape} does not match the images' spatial shape "
                         f"{spatial_shape}")
    if _is_tracer(mask):
        return
    xp = _xp(mask)
    bad = int(xp.sum(~xp.isfinite(mask)))
    if bad:
        raise ValueError(f"mask has {bad} NaN/Inf voxels")
    if bool(xp.any(mask < 0)):
        raise ValueError(f"mask weights must be non-negative, got a minimum of {float(xp.min(mask)):g}")
    if not float(xp.sum(mask)) > 0:
        raise ValueError("mask is empty (its weights sum to 0)")


def check_posterior(posterior) -> None:
    """Check a posterior (class probabilities) ``(*spatial, K)``: real dtype, ``K >= 2`` and, when
    not traced, finite and non-negative values.

    Raises:
      ValueError: naming the count of NaN/Inf values, or the most negative value.
    """
    posterior = _array(posterior)
    _check_real(posterior, "posterior")
    check_num_classes(posterior.shape[-1] if posterior.ndim else 0)
    if _is_tracer(posterior):
        return
    xp = _xp(posterior)
    bad = int(xp.sum(~xp.isfinite(posterior)))
    if bad:
        raise ValueError(f"posterior has {bad} NaN/Inf values (class probabilities must be finite)")
    if bool(xp.any(posterior < 0)):
        raise ValueError(f"posterior must be non-negative, got a minimum of {float(xp.min(posterior)):g}")


def check_labels(labels, images_shape: Sequence[int], names: Sequence[str] | None = None) -> None:
    """Check label maps for a group of images of shape ``images_shape = (N, *spatial)``.

    Args:
      labels: ``(N, *spatial)`` (one map per image) or ``(*spatial)`` (one shared map), holding
        non-negative integers (integer dtype, or floats with integral values).
      names: optional names of the ``N`` label maps.
    """
    labels = _array(labels)
    shape = tuple(labels.shape)
    images_shape = tuple(int(s) for s in images_shape)
    if shape not in (images_shape, images_shape[1:]):
        raise ValueError(f"labels of shape {shape} match neither the images {images_shape} nor "
                         f"their spatial shape {images_shape[1:]}")
    if _is_tracer(labels):
        return
    per_image = shape == images_shape
    xp = _xp(labels)
    flat = xp.reshape(labels, (shape[0] if per_image else 1, -1))
    if jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == bool:
        fractional = np.zeros(flat.shape[0], int)
    else:
        fractional = np.asarray(xp.sum(~(xp.isfinite(flat) & (flat == xp.round(flat))), axis=1))
    negative = np.asarray(xp.sum(flat < 0, axis=1))
    who = (lambda j: _name(j, names, "label map")) if per_image else (lambda j: "the label map")
    for what, counts in (("non-integer (or NaN/Inf)", fractional), ("negative", negative)):
        _fail_each(counts, lambda j: f"{who(j)} has {int(counts[j])} {what} values "
                                     "(labels must be non-negative integers)")


def _check_int(value, what: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")


def check_num_classes(num_classes) -> None:
    """The number of classes ``K`` of the common-space model must be an integer >= 2."""
    _check_int(num_classes, "number of classes K", 2)


def check_bins(num_bins) -> None:
    """The number of intensity bins ``L`` of the Parzen histograms must be an integer >= 4."""
    _check_int(num_bins, "number of intensity bins L", 4)
