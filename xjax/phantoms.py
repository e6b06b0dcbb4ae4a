"""Synthetic multimodal phantoms and random misalignments with a known ground truth.

A phantom is one brain-like anatomy (a tissue label map) seen through ``N`` modalities whose
class -> intensity tables are not monotone-related, so that no single intensity mapping relates two
modalities: the setting of the X-metric's simulated experiments (paper Sec. 4.1).

Misalignments follow the pull convention of :mod:`xjax.grid`: a misalignment
``psi_j(y) = y + t_j(y)`` produces ``misaligned_j(y) = aligned_j(psi_j(y))`` (:func:`warp`), and the
displacement fields ``t_j`` (channels-last, mm) are the ground truth for :mod:`xjax.evaluate`.

This is setup-time data generation, not traced code: random numbers come from a numpy generator
seeded by the data of the JAX key, so every result is a deterministic function of the key.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xjax.grid import Grid
from xjax.transforms.base import apply_linear, grid_points
from xjax.transforms.bspline import BSplineFFD
from xjax.transforms.linear import rotation_matrix
from xjax.warp import warp_points

__all__ = ["TISSUE_TABLE", "MisalignedGroup", "Phantom", "make_phantom", "misaligned_group",
           "random_ffd", "random_rigid", "render", "warp"]

_MAX_CLASSES = 12

# Mean intensity of background, CSF, grey matter and white matter in the first three modalities:
# T1-like (increasing), T2-like (reversed) and PD-like (grey matter brightest).
TISSUE_TABLE = np.array([[0.0, 0.25, 0.55, 0.85],
                         [0.0, 0.95, 0.60, 0.35],
                         [0.0, 0.55, 0.90, 0.70]])
TISSUE_TABLE.flags.writeable = False

# Anatomy in normalised coordinates q = p / semi_axes, p in [-1, 1] across the field of view.
# Boundary b (head / CSF-GM / GM-WM) lies where |q| + amplitude_b * n_b(p) = threshold_b, with n_b a
# smooth random field in [-1, 1] of frequencies up to max_freq_b cycles per unit of p. The
# thresholds are further apart than the summed amplitudes, so every layer is non-empty.
_SEMI_AXES = (0.78, 0.92, 0.80)
_THRESHOLDS = (0.92, 0.80, 0.58)
_AMPLITUDES = (0.03, 0.03, 0.09)
_MAX_FREQ = (0.75, 1.0, 3.0)
_BIAS_MAX_FREQ = 0.4
_BLOB_RING = (0.26, 0.32)  # range of |q| of the blob centres, inside the white matter core


class Phantom(NamedTuple):
    """A multimodal phantom on one grid.

    Attributes:
      images: ``(N, *shape)`` float32, one image per modality.
      labels: ``(*shape)`` int32 tissue map, 0 the background.
      grid: the common :class:`~xjax.grid.Grid` (world mm).
      intensity_table: ``(N, K)`` float32, mean intensity of class ``k`` in modality ``n`` (before
        bias field and noise).
    """

    images: jax.Array
    labels: jax.Array
    grid: Grid
    intensity_table: jax.Array


class MisalignedGroup(NamedTuple):
    """A phantom group after a known misalignment.

    Attributes:
      images: ``(N, *shape)`` misaligned images, ``aligned_j(y + displacements_j(y))``.
      labels: ``(N, *shape)`` int32 label maps warped the same way (nearest neighbour).
      displacements: ``(N, *shape, D)`` ground-truth misalignments ``psi_j - id`` in mm (pull).
    """

    images: jax.Array
    labels: jax.Array
    displacements: jax.Array


def _rng(key) -> np.random.Generator:
    """A numpy generator seeded by the data of a JAX PRNG key (typed or raw)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def _smooth_field(rng, p, max_freq: float, num_waves: int = 6):
    """A smooth random field in [-1, 1] on normalised points ``p`` ``(*shape, D)``: a weighted sum
    of plane waves of ``max_freq / 2 .. max_freq`` cycles per unit of ``p``, divided by the sum of
    the weights."""
    direction = rng.normal(size=(num_waves, p.shape[-1]))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    freq = rng.uniform(max_freq / 2, max_freq, size=(num_waves, 1))
    phase = rng.uniform(0, 2 * np.pi, size=num_waves)
    amp = rng.uniform(0.5, 1.0, size=num_waves)
    return np.cos(2 * np.pi * p @ (direction * freq).T + phase) @ (amp / amp.sum())


def _gaussian_blur(images, sigma: float):
    """Separable Gaussian blur of ``(N, *shape)`` over the spatial axes; ``sigma`` in voxels,
    borders extended by their edge values."""
    radius = int(np.ceil(3 * sigma))
    if radius == 0:
        return images
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in range(1, images.ndim):
        n = images.shape[axis]
        pad = [(0, 0)] * images.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(images, pad, mode="edge")
        images = sum(w * np.take(padded, np.arange(o, o + n), axis=axis)
                     for o, w in enumerate(taps))
    return images


def _anatomy(rng, p, num_classes: int):
    """Tissue labels ``(*shape)`` on normalised points ``p`` ``(*shape, D)``: nested layers
    (head, CSF ring, grey matter, white matter core), then ``num_classes - 4`` blobs in the core."""
    d = p.shape[-1]
    q = p / np.asarray(_SEMI_AXES[:d])
    rho = np.linalg.norm(q, axis=-1)
    labels = np.zeros(p.shape[:-1], np.int32)
    inside = np.ones(p.shape[:-1], bool)
    for b in range(min(num_classes, 4) - 1):
        level = rho + _AMPLITUDES[b] * _smooth_field(rng, p, _MAX_FREQ[b])
        inside &= level < _THRESHOLDS[b]
        labels += inside
    num_blobs = num_classes - 4
    if num_blobs > 0:
        # Centres on a ring in the first two axes, evenly spaced in angle; the radius keeps blobs
        # apart: centres at |q| >= r0 are at least 2 r0 sin(pi / num_blobs) from each other.
        r0 = _BLOB_RING[0]
        radius = 0.1 if num_blobs == 1 else min(0.1, 0.8 * r0 * np.sin(np.pi / num_blobs))
        angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(num_blobs) / num_blobs
        ring = rng.uniform(r0, _BLOB_RING[1], size=num_blobs)
        centres = np.zeros((num_blobs, d))
        centres[:, 0], centres[:, 1] = ring * np.cos(angles), ring * np.sin(angles)
        for b in range(num_blobs):
            labels[np.linalg.norm(q - centres[b], axis=-1) < radius] = 4 + b
    return labels


def _intensity_table(rng, num_modalities: int, num_classes: int):
    """``(N, K)`` class means: the T1/T2/PD-like tissue rows for the first three modalities and
    random levels for extra classes; each further modality a random permutation of ``K - 1``
    distinct levels in [0.2, 1] over the foreground classes. Background is 0 everywhere."""
    rows = min(num_modalities, 3)
    extra = rng.uniform(0.15, 1.0, size=(rows, max(num_classes - 4, 0)))
    table = np.concatenate([TISSUE_TABLE[:rows, : min(num_classes, 4)], extra], axis=1)
    if num_modalities > 3:
        levels = np.linspace(0.2, 1.0, num_classes - 1)
        more = np.stack([np.concatenate([[0.0], rng.permutation(levels)])
                         for _ in range(num_modalities - 3)])
        table = np.concatenate([table, more], axis=0)
    return table


def _normalised_points(shape) -> np.ndarray:
    """``(*shape, D)`` voxel positions scaled to [-1, 1] across the field of view."""
    return 2 * np.moveaxis(np.indices(shape), 0, -1) / (np.asarray(shape) - 1.0) - 1


def _bias_and_noise(rng, images, table, p, bias: float, noise: float):
    """``images * (1 + bias * b_n) + noise * range_n * normal``: a smooth bias field ``b_n`` in
    [-1, 1] and Gaussian noise per modality row ``n`` of ``images`` ``(N, *shape)``, the noise
    scaled by the intensity range of ``table[n]``; ``p`` the normalised points."""
    fields = np.stack([_smooth_field(rng, p, _BIAS_MAX_FREQ) for _ in range(images.shape[0])])
    images = images * (1 + bias * fields)
    scale = noise * (table.max(axis=1) - table.min(axis=1))
    return images + scale.reshape((-1,) + (1,) * (images.ndim - 1)) * rng.normal(size=images.shape)


def _check_appearance(bias: float, noise: float) -> None:
    if not 0 <= bias < 1:
        raise ValueError(f"bias must be in [0, 1), got {bias}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")


def make_phantom(key, shape: Sequence[int], *, num_modalities: int = 3, num_classes: int = 4,
                 spacing: float | Sequence[float] = 1.0, bias: float = 0.2, noise: float = 0.03,
                 smooth: float = 0.6) -> Phantom:
    """A brain-like multimodal phantom, 2D or 3D by ``len(shape)``.

    Anatomy: background (0), an outer CSF ring (1), a grey-matter layer (2) and a white-matter
    core (3), nested ellipses/ellipsoids whose boundaries are perturbed by smooth random fields;
    classes ``4 .. K-1`` are round blobs inside the core (radius about 4% of the field of view;
    use >= 32 voxels per axis to resolve them). ``num_classes < 4`` keeps the outer layers only
    (2: background and head; 3: background, CSF and brain).

    Appearance of modality ``n``: ``intensity_table[n, labels]``, blurred by a Gaussian of
    ``smooth`` voxels (partial volume), times a smooth bias field ``1 + bias * b_n(x)`` with
    ``b_n`` in [-1, 1], plus Gaussian noise of standard deviation ``noise`` times the intensity
    range of the table row. The tables are T1-like, T2-like and PD-like (grey matter brightest)
    for the first three modalities, so no monotone map relates them; further modalities take
    random permutations of distinct levels.

    Args:
      key: PRNG key; the phantom is a deterministic function of it.
      shape: ``(X, Y)`` or ``(X, Y, Z)`` voxels, at least 8 per axis.
      num_modalities: ``N >= 1``.
      num_classes: ``K`` in ``[2, 12]``, including the background.
      spacing: voxel size in mm (scalar or per axis); the grid is centred on the world origin and
        the anatomy fills the field of view whatever the spacing.
      bias: relative amplitude of the multiplicative bias field, in ``[0, 1)``.
      noise: noise standard deviation relative to each modality's intensity range, ``>= 0``.
      smooth: partial-volume blur in voxels, ``>= 0``.

    Returns:
      :class:`Phantom` with float32 images ``(N, *shape)`` and int32 labels ``(*shape)``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 8:
        raise ValueError(f"shape must be 2D or 3D with >= 8 voxels per axis, got {shape}")
    if num_modalities < 1:
        raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
    if not 2 <= num_classes <= _MAX_CLASSES:
        raise ValueError(f"num_classes must be in [2, {_MAX_CLASSES}], got {num_classes}")
    _check_appearance(bias, noise)
    if smooth < 0:
        raise ValueError(f"smooth must be >= 0 voxels, got {smooth}")
    grid = Grid.regular(shape, spacing)
    rng = _rng(key)
    p = _normalised_points(shape)
    labels = _anatomy(rng, p, num_classes)
    table = _intensity_table(rng, num_modalities, num_classes)
    images = _gaussian_blur(table[:, labels], smooth)
    images = _bias_and_noise(rng, images, table, p, bias, noise)
    return Phantom(jnp.asarray(images, jnp.float32), jnp.asarray(labels), grid,
                   jnp.asarray(table, jnp.float32))


def render(key, probabilities, table=TISSUE_TABLE, *, bias: float = 0.2, noise: float = 0.03):
    """Images of an anatomy given as class probabilities (e.g. tissue priors), with the phantoms'
    appearance model.

    Modality ``n`` is the partial-volume mixture ``sum_k probabilities_k * table[n, k]``, times a
    smooth bias field ``1 + bias * b_n(x)`` with ``b_n`` in [-1, 1], plus Gaussian noise of standard
    deviation ``noise`` times the intensity range of ``table[n]`` (as :func:`make_phantom`).

    Args:
      key: PRNG key; bias fields and noise are a deterministic function of it.
      probabilities: ``(*shape, K)`` class probabilities (2D or 3D), channels-last.
      table: ``(N, K)`` class means per modality; default :data:`TISSUE_TABLE` (background, CSF,
        grey matter, white matter in T1-, T2- and PD-like modalities).
      bias: relative amplitude of the bias field, in ``[0, 1)``.
      noise: noise standard deviation relative to each row's intensity range, ``>= 0``.

    Returns:
      ``(N, *shape)`` float32 images.
    """
    probabilities = np.asarray(probabilities, np.float64)
    table = np.asarray(table, np.float64)
    if probabilities.ndim not in (3, 4) or table.ndim != 2 or table.shape[1] != probabilities.shape[-1]:
        raise ValueError(f"probabilities must be (*shape, K) in 2D or 3D and table (N, K), got "
                         f"{probabilities.shape} and {table.shape}")
    _check_appearance(bias, noise)
    shape = probabilities.shape[:-1]
    clean = np.moveaxis(probabilities @ table.T, -1, 0)
    images = _bias_and_noise(_rng(key), clean, table, _normalised_points(shape), bias, noise)
    return images.astype(np.float32)


def _levels(name: str, value, count: int | None = None) -> tuple[float, ...]:
    values = tuple(float(v) for v in np.atleast_1d(np.asarray(value, np.float64)))
    if count is not None and len(values) == 1:
        values = values * count
    if not values or (count is not None and len(values) != count):
        raise ValueError(f"{name} must be a scalar or one value per level, got {value!r}")
    return values


def random_ffd(key, grid: Grid, n: int, *, spacing: float | Sequence[float] = 16.0,
               magnitude: float | Sequence[float] = 4.0):
    """Random cubic B-spline FFD displacement fields (pull, mm).

    Each level is a :class:`~xjax.transforms.BSplineFFD` with control-point spacing ``spacing``
    mm bound to ``grid``, whose coefficients are drawn independently, per component, uniformly in
    ``[-magnitude, magnitude]`` mm. Several levels (a tuple of spacings, coarse to fine, with one
    magnitude or one per level) are added; per-axis spacings are not taken here.

    Diffeomorphism: a cubic B-spline FFD whose coefficients stay below ``0.4 * spacing`` per
    component (on a grid whose axes are the world axes) has a positive Jacobian everywhere; the
    derivative bounds add over levels, so ``sum_l magnitude_l / spacing_l < 0.4`` is safe. The
    defaults give ``0.25``.

    Args:
      key: PRNG key.
      grid: the grid the fields live on.
      n: number of fields.
      spacing: control-point spacing in mm, one per level.
      magnitude: coefficient bound in mm, a scalar or one per level.

    Returns:
      ``(n, *grid.shape, D)`` float32 displacements in mm.
    """
    spacings = _levels("spacing", spacing)
    magnitudes = _levels("magnitude", magnitude, len(spacings))
    if any(s <= 0 for s in spacings) or any(m < 0 for m in magnitudes):
        raise ValueError(f"spacing must be positive and magnitude >= 0, got spacing={spacing!r}, "
                         f"magnitude={magnitude!r}")
    rng = _rng(key)
    total = jnp.zeros((n,) + grid.shape + (grid.ndim,), jnp.float32)
    for s, m in zip(spacings, magnitudes):
        ffd = BSplineFFD(s).bind(grid)
        coefficients = rng.uniform(-m, m, size=(n,) + ffd.mesh.shape + (grid.ndim,))
        fields = jax.vmap(lambda c: ffd.displacement({"coefficients": c}, grid))(
            jnp.asarray(coefficients, jnp.float32))
        total = total + fields
    return total


def random_rigid(key, grid: Grid, n: int, *, max_angle_deg: float = 15.0,
                 max_shift_mm: float = 20.0):
    """Random rigid misalignments about the grid centre (the ranges of paper Sec. 4.2).

    ``phi_j(x) = R_j (x - c) + c + t_j`` with ``c = grid.center`` (world mm), ``R_j`` from angles
    uniform in ``[-max_angle_deg, max_angle_deg]`` (one in 2D; three in 3D, about the world x, y
    and z axes, ``R = Rz @ Ry @ Rx`` as in :func:`~xjax.transforms.rotation_matrix` and
    :class:`~xjax.transforms.Rigid`), and ``t_j`` uniform in ``[-max_shift_mm, max_shift_mm]``
    per axis.

    Returns:
      ``(angles, translations, displacements)``: ``(n, 1)`` or ``(n, 3)`` radians, ``(n, D)`` mm,
      and the fields ``phi_j(x) - x`` at the voxel centres of ``grid``, ``(n, *grid.shape, D)``
      mm, all float32.
    """
    if max_angle_deg < 0 or max_shift_mm < 0:
        raise ValueError(f"max_angle_deg and max_shift_mm must be >= 0, got {max_angle_deg}, "
                         f"{max_shift_mm}")
    d = grid.ndim
    rng = _rng(key)
    max_angle = np.deg2rad(max_angle_deg)
    angles = jnp.asarray(rng.uniform(-max_angle, max_angle, size=(n, 1 if d == 2 else 3)),
                         jnp.float32)
    translations = jnp.asarray(rng.uniform(-max_shift_mm, max_shift_mm, size=(n, d)), jnp.float32)
    centred = grid_points(grid) - jnp.asarray(grid.center, jnp.float32)

    def displacement(angle, translation):
        return apply_linear(centred, rotation_matrix(angle) - jnp.eye(d)) + translation

    return angles, translations, jax.vmap(displacement)(angles, translations)


@functools.partial(jax.jit, static_argnames=("grid", "order"))
def warp(images, grid: Grid, displacements, *, order: int = 1):
    """Pull each image through its displacement: ``out_j(x) = images_j(x + displacements_j(x))``.

    Args:
      images: ``(N, *grid.shape)``.
      grid: the grid of the images and the fields.
      displacements: ``(N, *grid.shape, D)`` in mm.
      order: 1 linear (intensities), 0 nearest neighbour (labels, dtype kept).

    Returns:
      ``(N, *grid.shape)``; points pulled from outside the grid take 0 (the background).
    """
    n = images.shape[0]
    if images.shape != (n,) + grid.shape or displacements.shape != (n,) + grid.shape + (grid.ndim,):
        raise ValueError(f"images {images.shape} and displacements {displacements.shape} do not "
                         f"match (N, *{grid.shape}) and (N, *{grid.shape}, {grid.ndim})")
    x = grid_points(grid, displacements.dtype)

    def one(image, u):
        values, inside = warp_points(image, x + u, grid, order=order)
        return jnp.where(inside, values, 0)

    return jax.vmap(one)(images, displacements)


def misaligned_group(key, phantom: Phantom, kind: str = "ffd", **kwargs) -> MisalignedGroup:
    """Misalign each modality of ``phantom`` by its own random transform.

    Args:
      key: PRNG key.
      phantom: the aligned group (:func:`make_phantom`).
      kind: ``"ffd"`` (:func:`random_ffd`) or ``"rigid"`` (:func:`random_rigid`).
      **kwargs: keyword arguments of that generator (``spacing``, ``magnitude`` or
        ``max_angle_deg``, ``max_shift_mm``).

    Returns:
      :class:`MisalignedGroup`: ``images_j(y) = phantom.images_j(y + psi_j(y))``, the labels
      warped by nearest neighbour, and ``psi_j`` as ``(N, *shape, D)`` mm.
    """
    n = phantom.images.shape[0]
    if kind == "ffd":
        displacements = random_ffd(key, phantom.grid, n, **kwargs)
    elif kind == "rigid":
        displacements = random_rigid(key, phantom.grid, n, **kwargs)[2]
    else:
        raise ValueError(f"kind must be 'ffd' or 'rigid', got {kind!r}")
    images = warp(phantom.images, phantom.grid, displacements)
    labels = warp(jnp.broadcast_to(phantom.labels, phantom.images.shape), phantom.grid,
                  displacements, order=0)
    return MisalignedGroup(images, labels, displacements)
