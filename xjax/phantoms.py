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
           "random_ffd", "random_rigid", "render", "warp",
           "MR_TISSUES", "MR_PROTOCOLS", "FREESURFER_TISSUE", "MRProtocol", "spin_echo",
           "spoiled_gradient_echo", "protocol_signals", "tissue_images", "inu_field",
           "rician_noise", "simulate_mr"]

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


# ---- exact-truth multimodal MR simulator (BrainWeb's method, rebuilt) --------------------------
#
# Tissue parameters at 1.5 T used by the BrainWeb simulator (Kwan, Evans & Pike 1999, IEEE TMI
# 18(11); Cocosco et al. 1997, NeuroImage 5(4) S425), one row per tissue class:
#
#   class  tissue        T1 (ms)  T2 (ms)  T2* (ms)  PD (relative)
#   0      background        -        -        -      0   (zero signal)
#   1      CSF            2569      329       58      1.00
#   2      grey matter     833       83       69      0.86
#   3      white matter    500       70       61      0.77
#   4      fat             350       70       58      1.00
#   5      muscle/skin     900       47       30      1.00
#
# Columns of MR_TISSUES: T1, T2, T2* (ms), PD. The background row's relaxation times are 1 ms
# placeholders; its PD of 0 makes every signal 0.
MR_TISSUES = np.array([[1.0, 1.0, 1.0, 0.0],
                       [2569.0, 329.0, 58.0, 1.00],
                       [833.0, 83.0, 69.0, 0.86],
                       [500.0, 70.0, 61.0, 0.77],
                       [350.0, 70.0, 58.0, 1.00],
                       [900.0, 47.0, 30.0, 1.00]])
MR_TISSUES.flags.writeable = False

# FreeSurfer (aseg) label -> MR_TISSUES class, for the voxelmorph test data (shared/data/voxelmorph,
# labels 0..255 of FreeSurferColorLUT): ventricles, CSF and choroid plexus -> CSF; cortex, deep grey
# nuclei, hippocampus, amygdala, accumbens, ventral DC-adjacent grey, vessels -> grey matter;
# cerebral/cerebellar white matter, brain stem, ventral DC, optic chiasm, WM hypointensities and
# corpus callosum (251-255) -> white matter. Labels not listed map to background.
FREESURFER_TISSUE = {
    0: 0,
    4: 1, 5: 1, 14: 1, 15: 1, 24: 1, 31: 1, 43: 1, 44: 1, 63: 1, 72: 1,
    3: 2, 8: 2, 10: 2, 11: 2, 12: 2, 13: 2, 17: 2, 18: 2, 26: 2, 30: 2, 42: 2, 47: 2, 49: 2,
    50: 2, 51: 2, 52: 2, 53: 2, 54: 2, 58: 2, 62: 2, 80: 2,
    2: 3, 7: 3, 16: 3, 28: 3, 41: 3, 46: 3, 60: 3, 77: 3, 85: 3, 251: 3, 252: 3, 253: 3,
    254: 3, 255: 3,
}


class MRProtocol(NamedTuple):
    """An MR acquisition: ``sequence`` ``"SE"`` (spin echo) or ``"SPGR"`` (spoiled gradient
    echo / FLASH), repetition time ``tr`` and echo time ``te`` in ms, flip angle ``flip_deg`` in
    degrees (SPGR only)."""

    sequence: str
    tr: float
    te: float
    flip_deg: float = 90.0


# BrainWeb-like protocols: T1w SPGR TR=18 ms, TE=10 ms, 30 deg; T2w SE TR=3300 ms, TE=120 ms;
# PD SE TR=3300 ms, TE=35 ms.
MR_PROTOCOLS = {
    "T1": MRProtocol("SPGR", 18.0, 10.0, 30.0),
    "T2": MRProtocol("SE", 3300.0, 120.0),
    "PD": MRProtocol("SE", 3300.0, 35.0),
}


def spin_echo(pd, t1, t2, tr: float, te: float):
    """Spin-echo signal ``S = PD (1 - exp(-TR/T1)) exp(-TE/T2)`` (the refocusing term
    ``exp(-(TR - TE/2)/T1)`` correction is not included, as TE << TR). Times in ms; arrays
    broadcast; numpy float64 out."""
    pd, t1, t2 = (np.asarray(a, np.float64) for a in (pd, t1, t2))
    return pd * (1 - np.exp(-tr / t1)) * np.exp(-te / t2)


def spoiled_gradient_echo(pd, t1, t2s, tr: float, te: float, flip_deg: float):
    """Spoiled gradient-echo (FLASH / SPGR) steady-state signal
    ``S = PD sin(a) (1 - E1) / (1 - cos(a) E1) exp(-TE/T2*)``, ``E1 = exp(-TR/T1)``; times in ms,
    flip angle ``a`` in degrees; arrays broadcast; numpy float64 out. T2* is taken from the table
    (BrainWeb used T2* for its FLASH images)."""
    pd, t1, t2s = (np.asarray(a, np.float64) for a in (pd, t1, t2s))
    a = np.deg2rad(flip_deg)
    e1 = np.exp(-tr / t1)
    return pd * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1) * np.exp(-te / t2s)


def _protocol(p) -> MRProtocol:
    if isinstance(p, str):
        if p not in MR_PROTOCOLS:
            raise ValueError(f"unknown protocol {p!r}; known: {sorted(MR_PROTOCOLS)}")
        return MR_PROTOCOLS[p]
    if not isinstance(p, MRProtocol) or p.sequence not in ("SE", "SPGR"):
        raise ValueError(f"protocol must be a name or an MRProtocol with sequence SE or SPGR, got {p!r}")
    return p


def protocol_signals(protocols=("T1", "T2", "PD"), tissues=MR_TISSUES):
    """``(N, K)`` float64 noise-free signal of each tissue class (rows of ``tissues``, columns T1,
    T2, T2* in ms and PD) under each protocol (names of :data:`MR_PROTOCOLS` or
    :class:`MRProtocol`)."""
    tissues = np.asarray(tissues, np.float64)
    t1, t2, t2s, pd = tissues.T
    rows = []
    for p in map(_protocol, protocols):
        if p.sequence == "SE":
            rows.append(spin_echo(pd, t1, t2, p.tr, p.te))
        else:
            rows.append(spoiled_gradient_echo(pd, t1, t2s, p.tr, p.te, p.flip_deg))
    return np.stack(rows)


def tissue_images(anatomy, signals, mapping=None):
    """Noise-free images ``(N, *shape)`` float64 of an anatomy from class signals ``(N, K)``.

    ``anatomy`` is either an int label map ``(*shape)`` (``mapping``, a dict label -> class, maps
    its labels to the classes, unlisted labels to background 0; without it labels are classes), or
    fuzzy tissue probabilities ``(*shape, K - 1)`` float, channels-last over classes ``1 .. K-1``
    (the rest, ``1 - sum``, is background): the image is the probability-weighted sum of the class
    signals (partial volume, as BrainWeb's fuzzy models)."""
    signals = np.asarray(signals, np.float64)
    anatomy = np.asarray(anatomy)
    if np.issubdtype(anatomy.dtype, np.integer):
        if mapping is not None:
            lut = np.zeros(max(int(anatomy.max()), max(mapping)) + 1, np.int64)
            for label, cls in mapping.items():
                lut[label] = cls
            anatomy = lut[anatomy]
        if anatomy.min() < 0 or anatomy.max() >= signals.shape[1]:
            raise ValueError(f"classes must be in [0, {signals.shape[1]}), got "
                             f"[{anatomy.min()}, {anatomy.max()}]")
        return signals[:, anatomy]
    k = anatomy.shape[-1]
    if k + 1 > signals.shape[1]:
        raise ValueError(f"{k} tissue maps need >= {k + 1} class signals, got {signals.shape}")
    probs = anatomy.astype(np.float64)
    background = 1 - probs.sum(-1, keepdims=True)
    probs = np.concatenate([background, probs], axis=-1)
    return np.moveaxis(probs @ signals[:, : k + 1].T, -1, 0)


def inu_field(key, shape: Sequence[int], inu: float):
    """A smooth multiplicative intensity non-uniformity ``1 + (inu / 200) * f`` on ``shape``
    voxels, ``f`` a smooth random field (:func:`_smooth_field`) rescaled to span exactly [-1, 1]:
    ``inu = 20`` (percent) gives a field spanning [0.9, 1.1]. float64 ``(*shape)``."""
    if not 0 <= inu < 200:
        raise ValueError(f"inu must be a percentage in [0, 200), got {inu}")
    f = _smooth_field(_rng(key), _normalised_points(tuple(shape)), _BIAS_MAX_FREQ)
    f = 2 * (f - f.min()) / max(f.max() - f.min(), 1e-12) - 1
    return 1 + inu / 200 * f


def rician_noise(key, image, sigma: float):
    """Rician magnitude ``|(S + n1) + i n2|``, ``n1, n2 ~ N(0, sigma)`` i.i.d., of a real image
    (any shape); float64 out."""
    rng = _rng(key)
    image = np.asarray(image, np.float64)
    n1, n2 = rng.normal(0, sigma, size=(2,) + image.shape)
    return np.hypot(image + n1, n2)


def simulate_mr(key, anatomy, *, protocols=("T1", "T2", "PD"), tissues=MR_TISSUES, mapping=None,
                noise: float = 3.0, inu: float = 20.0):
    """A group of ``N`` multimodal MR images of one anatomy, BrainWeb's way (Kwan et al. 1999).

    Each image is the partial-volume mixture of tissue signals (:func:`tissue_images`, signal
    equations :func:`spin_echo` / :func:`spoiled_gradient_echo`), times its own INU field
    (:func:`inu_field`, ``inu`` percent), plus Rician noise (:func:`rician_noise`) of
    ``sigma = noise / 100 * max tissue signal`` of that protocol. All images share one anatomy, so
    the group is aligned by construction; misalign it with :func:`misaligned_group`-style warps.

    Loader-agnostic: callers load the anatomy (e.g. voxelmorph FreeSurfer labels with
    ``mapping=FREESURFER_TISSUE``, or spm12 tissue priors as fuzzy maps) themselves.

    Args:
      key: PRNG key; the result is a deterministic function of it.
      anatomy: int labels ``(*shape)`` or tissue probabilities ``(*shape, K - 1)`` (2D or 3D).
      protocols: names in :data:`MR_PROTOCOLS` or :class:`MRProtocol` values.
      tissues: ``(K, 4)`` table of T1, T2, T2* (ms) and PD, default :data:`MR_TISSUES`.
      mapping: dict label -> class for label maps.
      noise: Rician noise level in percent of the brightest tissue, ``>= 0``.
      inu: non-uniformity in percent (field spanning ``1 +- inu / 200``).

    Returns:
      ``(images, labels)``: ``(N, *shape)`` float32 images and the ``(*shape)`` int32 class map
      (the argmax class of fuzzy maps, background where it dominates).
    """
    if noise < 0:
        raise ValueError(f"noise must be >= 0 percent, got {noise}")
    protocols = tuple(protocols)
    signals = protocol_signals(protocols, tissues)
    clean = tissue_images(anatomy, signals, mapping)
    shape = clean.shape[1:]
    keys = jax.random.split(key, 2 * len(protocols))
    images = []
    for n in range(len(protocols)):
        image = clean[n] * inu_field(keys[2 * n], shape, inu)
        images.append(rician_noise(keys[2 * n + 1], image, noise / 100 * signals[n].max()))
    anatomy = np.asarray(anatomy)
    if np.issubdtype(anatomy.dtype, np.integer):
        # The class map: class indices as a one-row "signal" table.
        labels = tissue_images(anatomy, np.arange(signals.shape[1])[None], mapping)[0]
    else:
        probs = anatomy.astype(np.float64)
        full = np.concatenate([1 - probs.sum(-1, keepdims=True), probs], axis=-1)
        labels = full.argmax(-1)
    return np.stack(images).astype(np.float32), np.asarray(labels, np.int32)
