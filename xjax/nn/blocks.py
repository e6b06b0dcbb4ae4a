"""N-dimensional convolutional building blocks in Flax NNX (2D and 3D; ``ndim`` is static).

Every block takes channels-last feature maps ``(B, *spatial, C)``: ``B`` images, ``spatial`` the
``ndim`` voxel axes in the :mod:`xjax.grid` order ``(x, y[, z])``. Blocks that normalise also take
``modality``, a ``(B,)`` integer array giving each image's modality index in
``[0, num_modalities)`` (``None`` means modality 0 for every image, for blocks built with a single
parameter set).

Normalisation uses instance statistics (mean and variance of each channel over the spatial axes of
each image) and one learned scale/bias per modality and channel. The DCC paper and its authors' code
use domain-specific *batch* normalisation; instance statistics keep the same "shared convolutions,
modality-specific affine" design while having no running averages: training and inference compute
the same function, a model has no mutable state besides its parameters, and any batch or group size
works at inference.

All variables are :class:`flax.nnx.Param`; no block draws random numbers after construction.

Initialisation: build networks with :func:`build`, which traces the constructor abstractly and
draws every parameter on the host with numpy. NNX's own initialisers run as XLA programs, and on a
CPU compiling them costs about a quarter of a second per parameter array (tens of seconds for a
U-Net), more than training a small model for a hundred steps.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "ModalityNorm",
    "ResidualBlock",
    "Downsample",
    "Upsample",
    "Encoder",
    "Decoder",
    "resize_to",
    "build",
    "NEGATIVE_SLOPE",
]

#: Slope of the LeakyReLU used by every block.
NEGATIVE_SLOPE = 0.2


def _check_ndim(ndim: int) -> int:
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
    return ndim


def build(factory, seed: int):
    """Construct an NNX module and initialise its parameters on the host.

    The module is traced with ``nnx.eval_shape`` (no computation), then each
    :class:`~flax.nnx.Param` is drawn from ``numpy.random.default_rng(seed)`` in the module's
    flattening order according to its name: ``kernel`` (shape ``(*window, C_in, C_out)``) from
    LeCun normal ``N(0, 1 / fan_in)`` with ``fan_in = prod(window) * C_in`` (NNX's default
    family, untruncated), ``bias`` zeros, ``scale`` ones. Deterministic for a given seed on any
    machine.

    Args:
      factory: ``rngs -> module``, e.g. ``lambda rngs: Encoder(1, (16, 32), ndim=2, rngs=rngs)``.
      seed: integer seed.

    Returns:
      The module, with float32 parameters. Initialisers passed to the constructor are not used:
      set special values (e.g. zero output layers) on the returned module.
    """
    abstract = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(int(seed))

    def draw(path, leaf):
        name = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, np.sqrt(1.0 / fan_in), leaf.shape), leaf.dtype)
        if name in ("bias", "scale"):
            return jnp.full(leaf.shape, 0.0 if name == "bias" else 1.0, leaf.dtype)
        raise ValueError(f"build does not know how to initialise parameter {jax.tree_util.keystr(path)}")

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def resize_to(x, spatial: Sequence[int]):
    """Multilinear resize of ``x`` ``(B, *s, C)`` to ``(B, *spatial, C)`` (identity if equal)."""
    spatial = tuple(spatial)
    if x.shape[1:-1] == spatial:
        return x
    return jax.image.resize(x, (x.shape[0],) + spatial + (x.shape[-1],), method="linear")


class ModalityNorm(nnx.Module):
    """Instance normalisation with one affine parameter set per modality.

    ``y = (x - mean_s x) / sqrt(var_s x + eps) * scale[m] + bias[m]``, statistics over the spatial
    axes of each image and channel, ``m`` the image's modality.

    Args:
      num_features: channels ``C``.
      num_modalities: number of parameter sets ``M`` (1 for a modality-agnostic block).
      eps: variance floor.

    Params: ``scale`` ``(M, C)`` (ones) and ``bias`` ``(M, C)`` (zeros).
    """

    def __init__(self, num_features: int, num_modalities: int = 1, *, eps: float = 1e-5):
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1, got {num_modalities!r}")
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_modalities, num_features), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_modalities, num_features), jnp.float32))

    def __call__(self, x, modality=None):
        """x: ``(B, *spatial, C)``; modality: ``(B,)`` int or ``None`` (all 0). Returns x's shape."""
        axes = tuple(range(1, x.ndim - 1))
        mean = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        if modality is None:
            modality = jnp.zeros((x.shape[0],), jnp.int32)
        shape = (x.shape[0],) + (1,) * len(axes) + (x.shape[-1],)
        scale = self.scale[...][modality].reshape(shape)
        bias = self.bias[...][modality].reshape(shape)
        return y * scale + bias


class ResidualBlock(nnx.Module):
    """Residual convolutional block (RCB of the DCC paper, Fig. 5).

    ``y = act(norm(conv(act(norm(conv(x))))) + skip(x))`` with 3^ndim convolutions, LeakyReLU
    (:data:`NEGATIVE_SLOPE`) and :class:`ModalityNorm`; ``skip`` is a 1^ndim convolution when the
    channel count changes, else the identity. Spatial size is preserved ("SAME" padding).
    """

    def __init__(self, in_features: int, out_features: int, *, ndim: int, num_modalities: int = 1,
                 rngs: nnx.Rngs):
        k = (3,) * _check_ndim(ndim)
        self.conv1 = nnx.Conv(in_features, out_features, k, rngs=rngs)
        self.norm1 = ModalityNorm(out_features, num_modalities)
        self.conv2 = nnx.Conv(out_features, out_features, k, rngs=rngs)
        self.norm2 = ModalityNorm(out_features, num_modalities)
        self.skip = (nnx.Conv(in_features, out_features, (1,) * ndim, rngs=rngs)
                     if in_features != out_features else None)

    def __call__(self, x, modality=None):
        """x: ``(B, *spatial, C_in)`` -> ``(B, *spatial, C_out)``."""
        h = nnx.leaky_relu(self.norm1(self.conv1(x), modality), NEGATIVE_SLOPE)
        h = self.norm2(self.conv2(h), modality)
        return nnx.leaky_relu(h + (x if self.skip is None else self.skip(x)), NEGATIVE_SLOPE)


class Downsample(nnx.Module):
    """Strided 3^ndim convolution halving every spatial axis (``ceil(n / 2)`` voxels)."""

    def __init__(self, in_features: int, out_features: int, *, ndim: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_features, out_features, (3,) * _check_ndim(ndim), strides=2, rngs=rngs)

    def __call__(self, x):
        """x: ``(B, *spatial, C_in)`` -> ``(B, *ceil(spatial / 2), C_out)``."""
        return self.conv(x)


class Upsample(nnx.Module):
    """Multilinear resize to a given spatial shape followed by a 3^ndim convolution."""

    def __init__(self, in_features: int, out_features: int, *, ndim: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_features, out_features, (3,) * _check_ndim(ndim), rngs=rngs)

    def __call__(self, x, spatial: Sequence[int]):
        """x: ``(B, *s, C_in)``, spatial: target shape (static) -> ``(B, *spatial, C_out)``."""
        return self.conv(resize_to(x, spatial))


class Encoder(nnx.Module):
    """Shared multi-scale encoder: level 0 is a :class:`ResidualBlock` at full resolution, each
    further level a :class:`Downsample` then a :class:`ResidualBlock`.

    Args:
      in_features: input channels (1 for an intensity image).
      widths: channels per level, e.g. ``(16, 32, 64, 128)`` (the paper's ``C * 2**(l - 1)``).
      ndim: 2 or 3.
      num_modalities: parameter sets of the normalisation (convolutions are shared).
    """

    def __init__(self, in_features: int, widths: Sequence[int], *, ndim: int, num_modalities: int = 1,
                 rngs: nnx.Rngs):
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be a non-empty sequence of positive ints, got {widths!r}")
        self.widths = widths
        self.blocks = nnx.List([ResidualBlock(c_in, c_out, ndim=ndim, num_modalities=num_modalities, rngs=rngs)
                                for c_in, c_out in zip((in_features,) + widths[:-1], widths)])
        self.downs = nnx.List([Downsample(c, c, ndim=ndim, rngs=rngs) for c in widths[:-1]])

    def __call__(self, x, modality=None) -> list:
        """x: ``(B, *spatial, in_features)``. Returns the features of every level, finest first:
        level ``l`` is ``(B, *spatial_l, widths[l])`` with ``spatial_l`` halved ``l`` times
        (rounding up)."""
        features = [self.blocks[0](x, modality)]
        for down, block in zip(self.downs, self.blocks[1:]):
            features.append(block(down(features[-1]), modality))
        return features


class Decoder(nnx.Module):
    """U-Net decoder: from the coarsest map up through the skip features, each level an
    :class:`Upsample` to the skip's shape, concatenation with the skip, and a
    :class:`ResidualBlock`.

    Args:
      bottom_features: channels of the coarsest input.
      skip_widths: channels of the skip features, finest first (as :class:`Encoder` returns them).
      widths: output channels per level, finest first (same length as ``skip_widths``).
      ndim, num_modalities: as :class:`Encoder`.
    """

    def __init__(self, bottom_features: int, skip_widths: Sequence[int], widths: Sequence[int], *,
                 ndim: int, num_modalities: int = 1, rngs: nnx.Rngs):
        skip_widths, widths = tuple(skip_widths), tuple(widths)
        if len(skip_widths) != len(widths) or not widths:
            raise ValueError(f"skip_widths {skip_widths!r} and widths {widths!r} must be non-empty and "
                             "of equal length")
        below = widths[1:] + (bottom_features,)
        self.ups = nnx.List([Upsample(b, w, ndim=ndim, rngs=rngs) for b, w in zip(below, widths)])
        self.blocks = nnx.List([ResidualBlock(w + s, w, ndim=ndim, num_modalities=num_modalities, rngs=rngs)
                                for w, s in zip(widths, skip_widths)])

    def __call__(self, bottom, skips, modality=None) -> list:
        """bottom: ``(B, *s, bottom_features)``; skips: finest-first list of ``(B, *s_l, C_l)``.
        Returns the decoded features of every level, finest first, ``(B, *s_l, widths[l])``."""
        x, out = bottom, []
        for level in reversed(range(len(self.blocks))):
            skip = skips[level]
            x = self.ups[level](x, skip.shape[1:-1])
            x = self.blocks[level](jnp.concatenate([x, skip], axis=-1), modality)
            out.append(x)
        return out[::-1]
