"""The deep combined computing (DCC) network of the X-metric paper (Sec. 3.5.3, Fig. 5), in NNX.

One group of ``N`` images on a common voxel grid goes in; for each image come out a ``K``-class
probability map ``rho_hat_j`` (segmentation branch) and a dense displacement ``u_j`` (registration
branch) such that ``phi_j(x) = x + u_j(x)`` pulls image ``j`` into the common space (the
:mod:`xjax.grid` convention), with ``sum_j u_j = 0`` (Eq. 37).

Architecture:
  * encoder ``E``: :class:`~xjax.nn.blocks.Encoder`, residual blocks of widths ``C * 2**(l-1)``,
    ``l = 1 .. L_R``, convolutions shared across modalities, normalisation affine per modality;
  * bottleneck: a downsampling and a residual block of width ``2 * C * 2**(L_R - 1)``;
  * segmentation decoder ``D_s`` with skip connections, and a 1x1 convolution to ``K`` logits,
    softmax over classes;
  * moment fusion: at every scale (and the bottleneck) the mean and the variance over the group of
    the image features;
  * registration decoder ``D_r``: per image, its own features concatenated with the group's moments
    at every scale, decoded with skip connections; zero-initialised flow heads at the finest
    ``flow_scales`` levels, each upsampled to full resolution and summed; the group mean of the
    fields is subtracted.

Where this differs from the authors' code (see REFERENCE.md): normalisation uses instance statistics
with per-modality affine parameters instead of per-modality batch norm (no running statistics;
training and inference compute the same function); there is no dropout (training is deterministic
given the seed); and ``D_r`` decodes each image's features next to the fused moments instead of the
moments alone, so that one set of weights serves any group size ``N`` and any modality order.

Units: displacements are in **voxels** along the index axes of the common grid, which are the
millimetres of DCC's :func:`unit_grid` (1 mm voxels, no rotation): the losses and the augmentation
warp through :mod:`xjax.warp` on that grid. Convert to the world mm of the images' own grid with
:func:`displacement_to_mm`. Images are expected z-scored per image (:func:`xjax.intensity.zscore`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xjax.grid import Grid, apply_linear
from xjax.nn import blocks

__all__ = ["DCCConfig", "DCC", "DCCOutput", "create", "unit_grid", "displacement_to_mm", "REGISTRATION_BRANCH"]

#: Attribute names of the registration branch ``D_r`` (everything else, the encoder, bottleneck
#: and segmentation decoder, is the segmentation branch ``(E, D_s)``).
REGISTRATION_BRANCH = ("reg_decoder", "flow_heads")


@dataclasses.dataclass(frozen=True)
class DCCConfig:
    """Static description of a DCC network.

    Attributes:
      ndim: 2 or 3 spatial dimensions.
      num_classes: ``K`` segmentation classes (background included).
      num_modalities: parameter sets of the modality-specific normalisation.
      width: ``C``, the channels of the first level (the paper: 16).
      levels: ``L_R``, encoder levels (the paper: 4); the bottleneck is one level below.
      flow_scales: number of finest decoder levels with a flow head (the authors' code: 4).
    """

    ndim: int = 2
    num_classes: int = 4
    num_modalities: int = 3
    width: int = 16
    levels: int = 4
    flow_scales: int = 4

    def __post_init__(self):
        for name in ("num_modalities", "width", "levels", "flow_scales"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {self.ndim!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {self.num_classes!r}")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.width * 2 ** l for l in range(self.levels))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class DCCOutput(NamedTuple):
    """Network outputs for one group of ``N`` images on a grid of shape ``S``.

    Attributes:
      probs: ``(N, *S, K)`` segmentation probabilities ``rho_hat_j`` (softmax; rows sum to one).
      displacement: ``(N, *S, D)`` displacements ``u_j`` in voxels (mm of :func:`unit_grid`), group
        mean zero (Eq. 37).
    """

    probs: jax.Array
    displacement: jax.Array


def _moments(features):
    """Group mean and (biased) variance of ``(N, *s, C)`` features, broadcast back to ``N``."""
    mean = jnp.mean(features, axis=0, keepdims=True)
    var = jnp.mean(jnp.square(features - mean), axis=0, keepdims=True)
    fused = jnp.broadcast_to(jnp.concatenate([mean, var], axis=-1),
                             features.shape[:-1] + (2 * features.shape[-1],))
    return jnp.concatenate([features, fused], axis=-1)


class DCC(nnx.Module):
    """The DCC network (see the module docstring). Build with :func:`create`."""

    def __init__(self, config: DCCConfig, *, rngs: nnx.Rngs):
        c, d = config, config.ndim
        widths = c.widths
        bottom = 2 * widths[-1]
        self.config = c
        self.encoder = blocks.Encoder(1, widths, ndim=d, num_modalities=c.num_modalities, rngs=rngs)
        self.down = blocks.Downsample(widths[-1], widths[-1], ndim=d, rngs=rngs)
        self.bottleneck = blocks.ResidualBlock(widths[-1], bottom, ndim=d, num_modalities=c.num_modalities,
                                               rngs=rngs)
        self.seg_decoder = blocks.Decoder(bottom, widths, widths, ndim=d, num_modalities=c.num_modalities,
                                          rngs=rngs)
        self.seg_head = nnx.Conv(widths[0], c.num_classes, (1,) * d, rngs=rngs)
        self.reg_decoder = blocks.Decoder(3 * bottom, tuple(3 * w for w in widths), widths, ndim=d, rngs=rngs)
        self.flow_heads = nnx.List([
            nnx.Conv(w, d, (3,) * d, rngs=rngs)
            for w in widths[:min(c.flow_scales, c.levels)]])

    def __call__(self, images, modality) -> DCCOutput:
        """Predict segmentations and displacements for one group.

        Args:
          images: ``(N, *S)`` z-scored intensities (:func:`xjax.intensity.zscore`) on the common
            grid (``N >= 1``, any ``N``).
          modality: ``(N,)`` int modality index of each image, in ``[0, num_modalities)``.
        """
        spatial = images.shape[1:]
        if len(spatial) != self.config.ndim:
            raise ValueError(f"images of shape {images.shape} do not match ndim={self.config.ndim}: "
                             "expected (N, *spatial)")
        feats = self.encoder(images[..., None], modality)
        bottom = self.bottleneck(self.down(feats[-1]), modality)
        seg = self.seg_decoder(bottom, feats, modality)[0]
        probs = jax.nn.softmax(self.seg_head(seg), axis=-1)
        decoded = self.reg_decoder(_moments(bottom), [_moments(f) for f in feats])
        flow = 0.0
        for level, head in enumerate(self.flow_heads):
            # a voxel of level l spans 2**l full-resolution voxels
            flow = flow + (2.0 ** level) * blocks.resize_to(head(decoded[level]), spatial)
        flow = flow - jnp.mean(flow, axis=0, keepdims=True)
        return DCCOutput(probs, flow)


def create(config: DCCConfig, seed: int = 0) -> DCC:
    """A freshly initialised :class:`DCC` (:func:`~xjax.nn.blocks.build`, seeded), flow heads zero
    so that every displacement starts at the identity."""
    model = blocks.build(lambda rngs: DCC(config, rngs=rngs), seed)
    for head in model.flow_heads:
        head.kernel[...] = jnp.zeros_like(head.kernel[...])
    return model


def unit_grid(shape) -> Grid:
    """The grid DCC's displacements live on: ``shape`` voxels of 1 mm along the index axes (no
    rotation), so that a displacement in voxels is one in mm and :mod:`xjax.warp` applies as is."""
    return Grid.regular(tuple(shape), 1.0)


def displacement_to_mm(displacement, grid: Grid):
    """Voxel displacements ``(..., D)`` along ``grid``'s index axes (the mm of :func:`unit_grid`)
    -> world mm ``(..., D)`` of ``grid``, the images' own common grid."""
    d = grid.ndim
    return apply_linear(displacement, jnp.asarray(np.asarray(grid.matrix[:d, :d]), displacement.dtype))
