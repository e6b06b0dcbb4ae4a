"""Building blocks of xjax.nn: shapes in 2D/3D, modality-specific normalisation against a numpy
float64 reference, and which parameter sets gradients reach."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xjax.nn import blocks


def _norm_reference(x, modality, scale, bias, eps):
    x = np.asarray(x, np.float64)
    axes = tuple(range(1, x.ndim - 1))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    shape = (x.shape[0],) + (1,) * len(axes) + (x.shape[-1],)
    return ((x - mean) / np.sqrt(var + eps) * scale[modality].reshape(shape) + bias[modality].reshape(shape))


@pytest.mark.parametrize("spatial", [(7, 6), (4, 5, 3)])
def test_modality_norm_matches_numpy(x64, spatial):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (3,) + spatial + (4,))
    modality = np.array([2, 0, 2])
    norm = blocks.ModalityNorm(4, 3, eps=1e-5)
    scale, bias = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    norm.scale = nnx.Param(jnp.asarray(scale))
    norm.bias = nnx.Param(jnp.asarray(bias))
    got = norm(jnp.asarray(x), jnp.asarray(modality))
    np.testing.assert_allclose(np.asarray(got), _norm_reference(x, modality, scale, bias, 1e-5), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))),
                               _norm_reference(x, np.zeros(3, int), scale, bias, 1e-5), rtol=1e-10, atol=1e-10)


def test_modality_norm_gradients_reach_only_the_used_modalities():
    norm = blocks.ModalityNorm(2, 4)
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 2))

    def loss(model):
        return jnp.sum(model(x, jnp.array([3, 1])) ** 3)

    grads = nnx.grad(loss)(norm)
    used = np.abs(np.asarray(grads.scale[...])).sum(axis=1) + np.abs(np.asarray(grads.bias[...])).sum(axis=1)
    assert np.all(used[[1, 3]] > 0) and np.all(used[[0, 2]] == 0)


def test_residual_block_shapes_and_skip():
    same = blocks.build(lambda rngs: blocks.ResidualBlock(3, 3, ndim=2, rngs=rngs), 0)
    grow = blocks.build(lambda rngs: blocks.ResidualBlock(3, 5, ndim=3, num_modalities=2, rngs=rngs), 0)
    assert same.skip is None and grow.skip is not None
    y2 = same(jnp.ones((2, 9, 8, 3)))
    y3 = grow(jnp.ones((2, 5, 4, 3, 3)), jnp.array([0, 1]))
    chex.assert_shape([y2, y3], [(2, 9, 8, 3), (2, 5, 4, 3, 5)])
    chex.assert_type([y2, y3], jnp.float32)


@pytest.mark.parametrize("spatial", [(33, 32), (9, 8, 7)])
def test_encoder_decoder_shapes(spatial):
    d = len(spatial)
    enc = blocks.build(lambda rngs: blocks.Encoder(1, (4, 6, 8), ndim=d, num_modalities=3, rngs=rngs), 1)
    dec = blocks.build(lambda rngs: blocks.Decoder(8, (4, 6, 8), (5, 6, 7), ndim=d, num_modalities=3,
                                                   rngs=rngs), 2)

    @nnx.jit
    def forward(enc, dec, x, modality):
        feats = enc(x, modality)
        return feats, dec(feats[-1], feats, modality)

    feats, out = forward(enc, dec, jnp.ones((2,) + spatial + (1,)), jnp.array([0, 2]))
    expected = [tuple(-(-s // 2 ** l) for s in spatial) for l in range(3)]
    chex.assert_shape(feats, [(2,) + e + (w,) for e, w in zip(expected, (4, 6, 8))])
    chex.assert_shape(out, [(2,) + e + (w,) for e, w in zip(expected, (5, 6, 7))])


def test_encoder_shares_convolutions_across_modalities():
    """The same image under two modality indices differs only through the normalisation's affine:
    with identical affine parameters for both modalities the outputs agree; changing one
    modality's bias changes that image's features only."""
    enc = blocks.build(lambda rngs: blocks.Encoder(1, (3, 4), ndim=2, num_modalities=2, rngs=rngs), 3)
    x = jax.random.normal(jax.random.key(1), (1, 12, 10, 1))
    forward = nnx.jit(lambda enc, x: enc(jnp.concatenate([x, x]), jnp.array([0, 1])))
    for f in forward(enc, x):
        np.testing.assert_allclose(np.asarray(f[0]), np.asarray(f[1]), rtol=1e-5, atol=1e-5)
    enc.blocks[1].norm2.bias[...] = enc.blocks[1].norm2.bias[...].at[1].add(0.5)
    last = forward(enc, x)[-1]
    assert np.max(np.abs(np.asarray(last[0]) - np.asarray(last[1]))) > 0.05


def test_resize_and_upsample():
    x = jnp.arange(2 * 4 * 3 * 2, dtype=jnp.float32).reshape(2, 4, 3, 2)
    assert blocks.resize_to(x, (4, 3)) is x
    up = blocks.build(lambda rngs: blocks.Upsample(2, 3, ndim=2, rngs=rngs), 0)
    chex.assert_shape(up(x, (7, 6)), (2, 7, 6, 3))


@pytest.mark.parametrize("bad", [1, 4])
def test_invalid_ndim_raises(bad):
    with pytest.raises(ValueError, match="ndim"):
        blocks.ResidualBlock(1, 2, ndim=bad, rngs=nnx.Rngs(0))


def test_invalid_widths_and_modalities_raise():
    with pytest.raises(ValueError, match="widths"):
        blocks.Encoder(1, (), ndim=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_modalities"):
        blocks.ModalityNorm(2, 0)


def test_build_is_seeded_and_follows_the_initialisation_rules():
    def factory(rngs):
        return blocks.ResidualBlock(6, 40, ndim=3, num_modalities=2, rngs=rngs)

    a, b, c = blocks.build(factory, 5), blocks.build(factory, 5), blocks.build(factory, 6)
    chex.assert_trees_all_equal(nnx.state(a, nnx.Param), nnx.state(b, nnx.Param), strict=True)
    assert not np.array_equal(np.asarray(a.conv1.kernel[...]), np.asarray(c.conv1.kernel[...]))
    kernel = np.asarray(a.conv2.kernel[...], np.float64)  # fan_in = 27 * 40
    chex.assert_shape(kernel, (3, 3, 3, 40, 40))
    assert abs(kernel.std() * np.sqrt(27 * 40) - 1.0) < 0.03 and abs(kernel.mean()) < 0.003
    assert np.all(np.asarray(a.conv1.bias[...]) == 0) and np.all(np.asarray(a.norm1.scale[...]) == 1)
    chex.assert_shape(a.norm1.scale[...], (2, 40))


def test_build_rejects_unknown_parameters():
    class Odd(nnx.Module):
        def __init__(self, rngs):
            self.weird = nnx.Param(jnp.zeros(3))

    with pytest.raises(ValueError, match="weird"):
        blocks.build(Odd, 0)
