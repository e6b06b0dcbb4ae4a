"""Similarities (higher is better): the X-metric (Eq. 8, 17) and Parzen mutual information.

Objectives negate these explicitly.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp

from xjax import validate
from xjax.density import entropy, group_joint_histograms, joint_histogram, pair_histogram

__all__ = ["class_information", "group_class_information", "information_from_histogram", "x_metric", "mutual_information", "intensity_entropy", "FORMS"]

Form = Literal["mi", "reference"]
#: ``"mi"``: the paper's ``I(U_j; K)`` (Eq. 17). ``"reference"``: the authors' code,
#: ``H(U_j) - H(K, U_j) = -H(K | U_j)``; the two differ by ``H(K)``, constant for a fixed posterior.
FORMS = ("mi", "reference")


def information_from_histogram(hist, form: Form = "mi"):
    """``I(U; K)`` or ``-H(K | U)`` from unnormalised class x intensity histograms ``(..., B, K)``."""
    p = hist / jnp.sum(hist, axis=(-2, -1), keepdims=True)
    value = entropy(jnp.sum(p, axis=-1), axis=-1) - entropy(p, axis=(-2, -1))
    if form == "mi":
        value = value + entropy(jnp.sum(p, axis=-2), axis=-1)
    return value


def class_information(u, weights, lo, hi, bins: int, form: Form = "mi"):
    """Information between one image's intensities and the common anatomy.

    Args:
      u: ``(n,)`` intensities of the sampled voxels of the warped image ``U_j o phi_j``.
      weights: ``(n, K)`` posterior ``gamma`` at those voxels times the voxel mask.
      lo, hi: the image's Parzen range; bins: ``L``.
      form: see :data:`FORMS`.
    Returns:
      Scalar ``I(U_j; K)`` (``form="mi"``) or ``-H(K | U_j)`` (``form="reference"``), in nats.
    """
    return information_from_histogram(joint_histogram(u, weights, lo, hi, bins), form)


def group_class_information(u, weights, lo, hi, bins: int, form: Form = "mi"):
    """:func:`class_information` of every image of a group, ``(N,)``, from one scatter-add.

    Args:
      u: ``(N, n)``; weights: ``(n, K)`` shared by the images; lo, hi: ``(N,)``.
    """
    return information_from_histogram(group_joint_histograms(u, weights, lo, hi, bins), form)


def _check_form(form):
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def _masked_range(images, mask):
    """Per-image ``(lo, hi)`` over the voxels with positive mask weight: ``(N,)`` each."""
    if mask is None:
        return images.min(axis=1), images.max(axis=1)
    inside = mask[None] > 0
    lo = jnp.min(jnp.where(inside, images, jnp.inf), axis=1)
    hi = jnp.max(jnp.where(inside, images, -jnp.inf), axis=1)
    return lo, hi


def x_metric(images, posterior, *, bins: int = 64, form: Form = "mi", mask=None):
    """The X-metric ``X(U, Z) = sum_j I(U_j; Z)`` (Eq. 8, 17), counting every voxel.

    The Parzen range of each image is its min/max over the counted voxels, so ``form="reference"``
    reproduces the authors' binning exactly (``L + 4`` bins, origin ``min - 2 h``, ``h = (max - min)/L``).

    Args:
      images: ``(N, *spatial)`` warped images on the common grid.
      posterior: ``(*spatial, K)`` spatial distribution of the common anatomy (rows sum to one;
        NaN or negative values are refused when not traced).
      bins: ``L`` intensity bins (plus 4 padding bins).
      form: ``"mi"`` (the paper) or ``"reference"`` (sum of ``-H(K | U_j)``, the authors' code).
      mask: optional ``(*spatial)`` voxel weights.
    Returns:
      Scalar similarity in nats (higher is better).
    """
    _check_form(form)
    images = jnp.asarray(images)
    posterior = jnp.asarray(posterior)
    validate.check_num_classes(posterior.shape[-1])
    validate.check_bins(bins)
    spatial = images.shape[1:]
    if posterior.shape[:-1] != spatial:
        raise ValueError(
            f"posterior of shape {posterior.shape} does not match images of shape {images.shape}: "
            f"expected {spatial + (posterior.shape[-1],)}")
    validate.check_images(images)
    validate.check_posterior(posterior)
    if mask is not None:
        mask = jnp.asarray(mask, images.dtype)
        validate.check_mask(mask, spatial)
        mask = mask.reshape(-1)
    flat = images.reshape(images.shape[0], -1)
    weights = posterior.reshape(-1, posterior.shape[-1]).astype(flat.dtype)
    if mask is not None:
        weights = weights * mask[:, None]
    lo, hi = _masked_range(flat, mask)
    return jnp.sum(group_class_information(flat, weights, lo, hi, bins, form))


def mutual_information(a, b, *, bins: int = 64, mask=None):
    """Parzen mutual information ``I(A; B)`` of two images (cubic B-spline, 4 x 4 taps per voxel),
    every voxel counted, each image binned over its own (masked) min/max.

    Args:
      a, b: images of one shape ``(*spatial)``; mask: optional ``(*spatial)`` weights.
    Returns:
      Scalar, in nats.
    """
    a = jnp.asarray(a).reshape(-1)
    b = jnp.asarray(b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"images of different sizes: {a.shape} and {b.shape}")
    w = jnp.ones_like(a) if mask is None else jnp.asarray(mask, a.dtype).reshape(-1)
    (lo_a, lo_b), (hi_a, hi_b) = _masked_range(jnp.stack([a, b]), None if mask is None else w)
    hist = pair_histogram(a, b, w, (lo_a, hi_a), (lo_b, hi_b), bins)
    p = hist / jnp.sum(hist)
    return entropy(p.sum(1)) + entropy(p.sum(0)) - entropy(p)


def intensity_entropy(a, *, bins: int = 64, mask=None):
    """Parzen entropy ``H(A)`` of one image's intensities (the marginal of the same estimator)."""
    a = jnp.asarray(a).reshape(-1)
    w = jnp.ones_like(a) if mask is None else jnp.asarray(mask, a.dtype).reshape(-1)
    lo, hi = _masked_range(a[None], None if mask is None else w)
    hist = joint_histogram(a, w[:, None], lo[0], hi[0], bins)[:, 0]
    return entropy(hist / jnp.sum(hist))

