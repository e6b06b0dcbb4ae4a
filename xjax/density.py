"""Parzen (kernel) density estimation with the cubic B-spline kernel (paper Eq. 20-21).

Intensities of one image are mapped to a continuous *bin position* on a scale of ``L + 4`` bins:
the intensity range ``[lo, hi]`` spans ``L`` bins of width ``h = (hi - lo) / L`` and two bins of
padding lie on each side, so ``position(u) = (u - lo) / h + 2`` and the bins are centred at the
integer positions ``0 .. L + 3``. The kernel bandwidth is one bin, so every sample touches the four
bins ``floor(position) - 1 .. floor(position) + 2``. A (class x intensity) histogram is built by
four scatter-adds of the per-sample weights: memory stays ``O(samples + L * K)``; no
samples-by-bins table is ever formed. Everything is written for one image; ``vmap`` over the group.

The range ``[lo, hi]`` carries no gradient (as in the authors' code); the histogram is
differentiable with respect to the intensities through the kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "bspline3",
    "bin_positions",
    "parzen_taps",
    "joint_histogram",
    "group_joint_histograms",
    "group_pair_histograms",
    "pair_histogram",
    "evaluate_histogram",
    "entropy",
    "PADDING",
]

#: Bins of padding on each side of the ``L`` intensity bins.
PADDING = 2
#: Floor inside logarithms, as in the authors' code.
EPS = 1e-8


def bspline3(t):
    """Cubic B-spline kernel: ``(4 - 6t^2 + 3|t|^3)/6`` on ``|t| < 1``, ``(2 - |t|)^3/6`` on
    ``1 <= |t| < 2``, 0 elsewhere. Sums to one over integer shifts (partition of unity)."""
    a = jnp.abs(t)
    inner = (4.0 - 6.0 * a**2 + 3.0 * a**3) / 6.0
    outer = (2.0 - a) ** 3 / 6.0
    return jnp.where(a < 1.0, inner, jnp.where(a < 2.0, outer, 0.0))


def bin_positions(u, lo, hi, bins: int):
    """Continuous bin position of intensities ``u`` on the padded scale (see module docstring).

    Args:
      u: intensities, any shape.
      lo, hi: scalar intensity range (gradient stopped).
      bins: ``L``, the number of bins spanning ``[lo, hi]``.
    """
    lo = jax.lax.stop_gradient(lo)
    hi = jax.lax.stop_gradient(hi)
    width = (hi - lo) / bins
    width = jnp.where(width > 0, width, 1.0)
    return (u - lo) / width + PADDING


def parzen_taps(pos):
    """The 4 bins touched by each sample and the kernel weights there.

    Args:
      pos: ``(n,)`` bin positions.
    Returns:
      ``(first, weights)``: ``first`` ``(n,)`` int32 index of the lowest touched bin
      (``floor(pos) - 1``) and ``weights`` ``(n, 4)`` = ``beta3(pos - (first + t))`` for t = 0..3.
    """
    base = jnp.floor(pos)
    frac = pos - base  # in [0, 1)
    offsets = jnp.arange(-1, 3, dtype=pos.dtype)
    weights = bspline3(frac[..., None] - offsets)
    return (base - 1).astype(jnp.int32), weights


def joint_histogram(u, weights, lo, hi, bins: int):
    """Class x intensity Parzen histogram of one image (unnormalised; Eq. 20-21).

    ``hist[b, k] = sum_x weights[x, k] * beta3(position(u_x) - b)``, for ``b = 0 .. L + 3``.

    Args:
      u: ``(n,)`` intensities of the sampled voxels.
      weights: ``(n, K)`` per-sample class weights (posterior times voxel mask).
      lo, hi: scalar intensity range of the image.
      bins: ``L``.
    Returns:
      ``(L + 4, K)`` histogram. Samples outside the padded range are dropped.
    """
    size = bins + 2 * PADDING
    first, w = parzen_taps(bin_positions(u, lo, hi, bins))
    hist = jnp.zeros((size, weights.shape[-1]), jnp.result_type(u, weights))
    for t in range(4):
        hist = hist.at[_in_range(first + t, size)].add(w[:, t, None] * weights, mode="drop")
    return hist


def _in_range(index, size: int):
    """``index`` where it lies in ``[0, size)``, else ``size``: dropped by a ``mode="drop"``
    scatter (a negative index would wrap around to the top bins instead)."""
    return jnp.where((index >= 0) & (index < size), index, size)


def group_joint_histograms(u, weights, lo, hi, bins: int):
    """Class x intensity Parzen histograms of a whole group at once, ``(N, L + 4, K)``.

    The same as ``vmap(joint_histogram)`` but as ONE scatter-add into an ``(N (L + 4), K)`` table
    (rows offset by image): on CPU it runs and compiles faster than the batched scatters of a
    ``vmap``. Taps outside an image's ``L + 4`` bins are dropped, never spilled into the next image.

    Args:
      u: ``(N, n)`` intensities.
      weights: ``(n, K)`` class weights shared by the images (the posterior), or ``(N, n, K)``.
      lo, hi: ``(N,)`` intensity ranges; bins: ``L``.
    """
    n_images, size = u.shape[0], bins + 2 * PADDING
    pos = jax.vmap(bin_positions, in_axes=(0, 0, 0, None))(u, lo, hi, bins)
    first, taps = parzen_taps(pos)  # (N, n), (N, n, 4)
    index = _in_range(first[..., None] + jnp.arange(4, dtype=first.dtype), size)
    index = jnp.where(index < size, index + (jnp.arange(n_images, dtype=first.dtype) * size)[:, None, None],
                      n_images * size)
    updates = taps[..., None] * (weights[None, :, None, :] if weights.ndim == 2 else weights[:, :, None, :])
    k = weights.shape[-1]
    hist = jnp.zeros((n_images * size, k), jnp.result_type(u, weights))
    hist = hist.at[index.reshape(-1)].add(updates.reshape(-1, k), mode="drop")
    return hist.reshape(n_images, size, k)


def group_pair_histograms(a, b, weights, range_a, range_b, bins: int):
    """Joint Parzen histograms of ``P`` pairs of intensity rows, ``(P, L + 4, L + 4)``, unnormalised.

    Each voxel spreads ``4 x 4`` kernel weights (tensor product of the two 1D cubic B-spline
    kernels); taps outside the ``L + 4`` bins are dropped. All pairs are built by ONE scatter-add
    into a flat table (rows offset by pair): on CPU a ``vmap`` of per-pair scatters takes several
    times longer to compile. The table must have fewer than ``2**31`` entries (APE of about 960
    images at ``L = 64``); a larger one raises ``ValueError``.

    Args:
      a, b: ``(P, n)`` intensities of the same ``n`` voxels in the two members of each pair.
      weights: ``(n,)`` voxel weights.
      range_a, range_b: ``(lo, hi)`` of each member, ``(P,)`` each.
      bins: ``L``.
    """
    size = bins + 2 * PADDING
    pairs = a.shape[0]
    if pairs * size * size >= 2**31:
        raise ValueError(f"{pairs} joint histograms of {size} x {size} bins exceed the 2^31 entries "
                         "that one scatter can index: use fewer images (pairs) or bins")
    taps = jnp.arange(4, dtype=jnp.int32)

    def spread(u, lo, hi):
        first, w = parzen_taps(bin_positions(u, lo[:, None], hi[:, None], bins))
        index = first[..., None] + taps  # (P, n, 4)
        return index, w, (index >= 0) & (index < size)

    ia, wa, ok_a = spread(a, *range_a)
    ib, wb, ok_b = spread(b, *range_b)
    offset = jnp.arange(pairs, dtype=jnp.int32)[:, None, None, None] * size * size
    index = offset + ia[..., :, None] * size + ib[..., None, :]  # (P, n, 4, 4)
    index = jnp.where(ok_a[..., :, None] & ok_b[..., None, :], index, pairs * size * size)
    updates = wa[..., :, None] * wb[..., None, :] * weights[:, None, None]
    hist = jnp.zeros(pairs * size * size, updates.dtype)
    hist = hist.at[index.reshape(-1)].add(updates.reshape(-1), mode="drop")
    return hist.reshape(pairs, size, size)


def pair_histogram(a, b, weights, range_a, range_b, bins: int):
    """Joint Parzen histogram of two images' intensities, ``(L + 4, L + 4)``, unnormalised
    (one pair of :func:`group_pair_histograms`).

    Args:
      a, b: ``(n,)`` intensities of the same voxels in two images.
      weights: ``(n,)`` voxel weights.
      range_a, range_b: ``(lo, hi)`` of each image.
    """
    one = [tuple(jnp.reshape(x, (1,)) for x in r) for r in (range_a, range_b)]
    return group_pair_histograms(a[None], b[None], weights, *one, bins)[0]


def evaluate_histogram(table, u, lo, hi, bins: int):
    """Evaluate a per-class density tabulated at the bin centres at intensities ``u``.

    ``table[b, k]`` is a kernel density estimate evaluated exactly at bin centre ``b``; the value
    at a voxel's own intensity is interpolated linearly between the two neighbouring centres.

    Args:
      table: ``(L + 4, K)``.
      u: ``(n,)`` intensities.
    Returns:
      ``(n, K)``.
    """
    pos = jnp.clip(bin_positions(u, lo, hi, bins), 0.0, bins + 2 * PADDING - 1.0)
    below = jnp.clip(jnp.floor(pos), 0, bins + 2 * PADDING - 2).astype(jnp.int32)
    frac = (pos - below)[:, None]
    return (1.0 - frac) * table[below] + frac * table[below + 1]


def entropy(p, axis=None):
    """Shannon entropy in nats, ``-sum p log max(p, 1e-8)`` (the floor of the authors' code)."""
    return -jnp.sum(p * jnp.log(jnp.maximum(p, EPS)), axis=axis)
