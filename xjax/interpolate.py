"""The one sampler of xjax: pull values of an image at continuous voxel indices.

Linear interpolation is a gather over the ``2**D`` corners (a Python loop over the static corners,
never over voxels). Points outside the image (beyond the outermost voxel centres) take ``fill`` and
are reported by an ``inside`` weight, so that callers can build overlap masks (Eq. 14's
``Omega_phi``) with static shapes.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp

__all__ = ["sample", "sample_clamped", "sample_inside", "sample_stack_inside", "sample_world"]


#: Flat indices are int32: a stack of this many voxels or more is sampled image by image.
_MAX_FLAT_INDEX = 2**31


def _flat_index(idx, shape):
    flat = idx[..., 0]
    for a in range(1, len(shape)):
        flat = flat * shape[a] + idx[..., a]
    return flat


def sample_inside(image, index_points, *, order: int = 1, fill: float = 0.0):
    """Sample ``image`` at continuous voxel indices.

    Args:
      image: ``(*spatial)`` or ``(*spatial, C)`` array (channels-last vector images are sampled
        per channel).
      index_points: ``(..., D)`` continuous voxel indices (the grid convention of
        :mod:`xjax.grid`: axis ``a`` of the array is index ``a``).
      order: 1 for (multi)linear interpolation, 0 for nearest neighbour (labels).
      fill: value returned for points outside ``[0, n_a - 1]`` on any axis.

    Returns:
      ``(values, inside)``: values ``(...)`` or ``(..., C)``, and ``inside`` ``(...)`` in {0, 1},
      1 where the point lies within the image's voxel-centre hull. Differentiable with respect to
      the image values and (for ``order=1``) the points.
    """
    d = index_points.shape[-1]
    spatial = image.shape[:d]
    if image.ndim not in (d, d + 1):
        raise ValueError(f"image of shape {image.shape} does not match {d}D points")
    channels = image.shape[d:]
    flat_img = image.reshape((-1,) + channels)
    upper = jnp.asarray(spatial, index_points.dtype) - 1
    inside = jnp.all((index_points >= 0) & (index_points <= upper), axis=-1)
    if order == 0:
        idx = jnp.clip(jnp.round(index_points), 0, upper).astype(jnp.int32)
        vals = flat_img[_flat_index(idx, spatial)]
    elif order == 1:
        p = jnp.clip(index_points, 0, upper)
        lo = jnp.clip(jnp.floor(p), 0, jnp.maximum(upper - 1, 0))
        frac = p - lo
        lo = lo.astype(jnp.int32)
        vals = 0.0
        for corner in itertools.product((0, 1), repeat=d):
            c = jnp.asarray(corner, jnp.int32)
            idx = jnp.minimum(lo + c, upper.astype(jnp.int32))
            w = jnp.prod(jnp.where(c == 1, frac, 1.0 - frac), axis=-1)
            v = flat_img[_flat_index(idx, spatial)]
            vals = vals + (w[..., None] * v if channels else w * v)
    else:
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    mask = inside[..., None] if channels else inside
    vals = jnp.where(mask, vals, jnp.asarray(fill, vals.dtype))
    return vals, inside.astype(vals.dtype)


def sample_stack_inside(images, index_points):
    """Linear interpolation of a stack of images, each at its own points: ``(values, inside)``.

    The same values as ``jax.vmap(sample_inside)(images, index_points)``, computed as one gather
    into the flattened stack (image ``j``'s flat indices offset by ``j`` times its size): on a
    group of ten 256 x 256 images XLA:CPU runs it about 1.5 times faster than the batched gather
    that ``vmap`` produces. Stacks of ``2**31`` voxels or more (beyond int32 indices) take the
    ``vmap``.

    Args:
      images: ``(N, *spatial)`` scalar images.
      index_points: ``(N, ..., D)`` continuous voxel indices, one set per image.
    Returns:
      ``values`` and ``inside``, each ``(N, ...)``, as :func:`sample_inside` (fill 0).
    """
    n, spatial = images.shape[0], images.shape[1:]
    d = index_points.shape[-1]
    if len(spatial) != d or index_points.shape[0] != n:
        raise ValueError(f"images {images.shape} do not match index points {index_points.shape}")
    size = math.prod(spatial)
    if n * size >= _MAX_FLAT_INDEX:
        return jax.vmap(sample_inside)(images, index_points)
    upper = jnp.asarray(spatial, index_points.dtype) - 1
    inside = jnp.all((index_points >= 0) & (index_points <= upper), axis=-1)
    p = jnp.clip(index_points, 0, upper)
    lo = jnp.clip(jnp.floor(p), 0, jnp.maximum(upper - 1, 0))
    frac = p - lo
    base = _flat_index(lo.astype(jnp.int32), spatial)
    base = base + (jnp.arange(n, dtype=jnp.int32) * size).reshape((n,) + (1,) * (base.ndim - 1))
    flat = images.reshape(-1)
    strides = [math.prod(spatial[a + 1:]) for a in range(d)]
    vals = 0.0
    for corner in itertools.product((0, 1), repeat=d):
        # along an axis of size 1 the far corner has weight 0 (frac is 0 there): read the near
        # voxel instead of stepping outside the image
        step = sum(c * s for c, s, m in zip(corner, strides, spatial) if m > 1)
        w = math.prod(frac[..., a] if c else 1.0 - frac[..., a] for a, c in enumerate(corner))
        vals = vals + w * flat[base + step]
    vals = jnp.where(inside, vals, jnp.zeros((), vals.dtype))
    return vals, inside.astype(vals.dtype)


def sample(image, index_points, *, order: int = 1, fill: float = 0.0):
    """Like :func:`sample_inside` but returns the values only."""
    return sample_inside(image, index_points, order=order, fill=fill)[0]


def sample_clamped(image, index_points, *, order: int = 1):
    """Like :func:`sample`, but the image extends beyond its border by its border values
    (indices clamped onto ``[0, n_a - 1]``): for fields that continue past the grid."""
    upper = jnp.asarray(image.shape[:index_points.shape[-1]], index_points.dtype) - 1
    return sample(image, jnp.clip(index_points, 0, upper), order=order)


def sample_world(image, grid, world_points, *, order: int = 1, fill: float = 0.0):
    """Sample ``image`` living on ``grid`` at world points ``(..., D)`` in mm (pull)."""
    return sample(image, grid.world_to_index(world_points), order=order, fill=fill)
