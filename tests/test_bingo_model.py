"""BInGo's networks: shapes (2D, 3D, group sizes 2..8), equivariance to the group's order,
chunked inference, inverse deformations and input validation."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import xjax.warp
from xjax.grid import Grid
from xjax.nn import bingo
from xjax.nn.bingo.losses import ElboWeights

CONFIG = bingo.BingoConfig(ndim=2, num_modalities=3, features=(4, 8, 8), latent=2, reg_features=8,
                           decoder_features=(4, 4, 8), svf_steps=5)
GRID = Grid.regular((24, 20), (1.5, 1.0))
TWO_LEVELS = dataclasses.replace(CONFIG, features=(4, 8), decoder_features=(4, 8))


def _model(config=CONFIG, seed=0):
    """A model whose velocity heads are random (not the identity start), so that the group's
    deformations are non-trivial."""
    model = bingo.create(config, seed)
    rng = np.random.default_rng(seed + 100)
    for reg in model.reg:
        reg.mean.kernel[...] = jnp.asarray(0.02 * rng.normal(size=reg.mean.kernel[...].shape),
                                           jnp.float32)
    return model


@functools.partial(jax.jit, static_argnames=("graphdef", "grid"),
                   compiler_options={"xla_backend_optimization_level": 0})  # compiles faster
def _forward(graphdef, state, images, modalities, grid, key=None):
    outputs = bingo.forward(nnx.merge(graphdef, state), images, modalities, grid, key)
    return outputs, bingo.loss_terms(outputs, images, ElboWeights())


def _images(m, shape=GRID.shape, seed=1):
    return jax.random.uniform(jax.random.key(seed), (m,) + shape)


@pytest.mark.parametrize("ndim, m", [(2, m) for m in range(2, 9)] + [(3, 3)])
def test_shapes_for_2d_3d_and_group_sizes(ndim, m):
    config = CONFIG if ndim == 2 else bingo.BingoConfig(ndim=3, num_modalities=3, features=(4, 8, 8),
                                                         latent=2, reg_features=8,
                                                         decoder_features=(4, 4, 8))
    grid = GRID if ndim == 2 else Grid.regular((16, 12, 10), 2.0)
    model = nnx.eval_shape(lambda: bingo.BInGo(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    images = jax.ShapeDtypeStruct((m,) + grid.shape, jnp.float32)
    modalities = jax.ShapeDtypeStruct((m,), jnp.int32)

    def run(s, x, mo):
        out = bingo.forward(nnx.merge(graphdef, s), x, mo, grid, jax.random.key(0))
        return out, bingo.loss_terms(out, x, ElboWeights())

    out, (loss, terms) = jax.eval_shape(run, state, images, modalities)
    d, c = grid.ndim, config.latent
    chex.assert_shape([out.displacement, out.inverse], (m,) + grid.shape + (d,))
    chex.assert_shape([out.warped, out.reconstruction, out.reconstruction_original], (m,) + grid.shape)
    level_shapes = [tuple(-(-n // 2 ** (2 - l)) for n in grid.shape) for l in range(3)]
    for l, s in enumerate(level_shapes):
        chex.assert_shape(out.velocity[l], (m,) + s + (d,))
        chex.assert_shape(out.experts[l][0], (m,) + s + (c,))
        chex.assert_shape(out.common[l][1], s + (c,))
        assert bingo.level_grids(grid, 3)[l].shape == s
    chex.assert_shape(loss, ())
    assert set(terms) == {"reconstruction", "velocity_kl", "structure_kl"}


def test_forward_runs_finite_and_is_equivariant_to_the_group_order():
    model = _model()
    graphdef, state = nnx.split(model)
    images, modalities = _images(4), jnp.array([0, 1, 2, 1])
    out, (loss, _) = _forward(graphdef, state, images, modalities, GRID)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(out))
    assert float(jnp.abs(out.displacement).max()) > 0.5  # a real deformation
    perm = jnp.array([2, 0, 3, 1])
    out_p, (loss_p, _) = _forward(graphdef, state, images[perm], modalities[perm], GRID)
    # Equal up to float32 summation order (the geometric mean sums over the group).
    for a, b, tol in [(out.displacement, out_p.displacement, 1e-3), (out.warped, out_p.warped, 1e-3),
                      (out.reconstruction_original, out_p.reconstruction_original, 1e-3)]:
        np.testing.assert_allclose(np.asarray(a[perm]), np.asarray(b), atol=tol)
    for (mu, lv), (mu_p, lv_p) in zip(out.common, out_p.common):
        np.testing.assert_allclose(np.asarray(mu), np.asarray(mu_p), atol=1e-3)
    np.testing.assert_allclose(float(loss), float(loss_p), rtol=1e-5)


def test_inverse_composes_to_the_identity_and_warps_are_consistent():
    model = _model()
    graphdef, state = nnx.split(model)
    images, modalities = _images(4), jnp.array([0, 1, 2, 1])
    out, _ = _forward(graphdef, state, images, modalities, GRID)
    # phi o phi^-1 = id: w(y) = inv(y) + u(y + inv(y)), away from the border. The random heads
    # give velocities that change by their own size from voxel to voxel, so exp(-v) inverts
    # exp(v) only up to interpolation error: a tenth of the displacement on average.
    composed = jax.vmap(lambda u, w: xjax.warp.warp(u, w, GRID)[0])(out.displacement, out.inverse)
    residual = np.linalg.norm(np.asarray(out.inverse + composed)[:, 4:-4, 4:-4], axis=-1)
    size = np.linalg.norm(np.asarray(out.displacement)[:, 4:-4, 4:-4], axis=-1)
    assert size.max() > 1.0  # mm, on 1-1.5 mm voxels
    assert residual.mean() < 0.15 * size.mean()
    # The registered image is the input pulled through phi (brute-force bilinear, isotropic index).
    index = np.stack(np.meshgrid(*map(np.arange, GRID.shape), indexing="ij"), -1)
    p = index + np.asarray(out.displacement[0]) / np.array([1.5, 1.0])
    n = np.array(GRID.shape) - 1
    p = np.clip(p, 0, n)
    lo = np.minimum(np.floor(p).astype(int), n - 1)
    f = p - lo
    img = np.asarray(images[0], np.float64)
    ref = sum(((f[..., 0] if a else 1 - f[..., 0]) * (f[..., 1] if b else 1 - f[..., 1]))
              * img[lo[..., 0] + a, lo[..., 1] + b] for a in (0, 1) for b in (0, 1))
    np.testing.assert_allclose(np.asarray(out.warped[0]), ref, atol=1e-5)


def test_velocities_are_centred_on_the_group():
    model = _model()
    graphdef, state = nnx.split(model)
    images, modalities = _images(4, seed=5), jnp.array([0, 1, 2, 1])
    out, _ = _forward(graphdef, state, images, modalities, GRID)
    for mu, _ in out.velocity:  # the group mean of every level's velocity is removed
        assert float(jnp.abs(mu).max()) > 1e-2
        np.testing.assert_allclose(np.asarray(jnp.mean(mu, axis=0)), 0.0, atol=1e-6)
    one, _ = _forward(graphdef, state, images[:1], modalities[:1], GRID)
    np.testing.assert_array_equal(np.asarray(one.displacement), 0.0)  # nothing to register
    np.testing.assert_allclose(np.asarray(one.warped), np.asarray(images[:1]), atol=1e-6)


def test_chunked_registration_equals_one_pass():
    model = _model(TWO_LEVELS)
    graphdef, state = nnx.split(model)
    images, modalities = _images(5, seed=3), jnp.array([0, 1, 2, 2, 0])
    out, _ = _forward(graphdef, state, images, modalities, GRID)
    reg = bingo.register_group(model, images, modalities, GRID, chunk=2)  # 3 chunks, 1 padded
    chex.assert_trees_all_close((reg.displacement, reg.warped, reg.common),
                                (out.displacement, out.warped, tuple(mu for mu, _ in out.common)), rtol=0, atol=1e-3)


def test_validation_names_the_input():
    model = nnx.eval_shape(lambda: bingo.BInGo(CONFIG, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="modalities must lie"):
        bingo.check_group(CONFIG, np.zeros((2,) + GRID.shape), np.array([0, 3]), GRID)
    with pytest.raises(ValueError, match="images must be"):
        bingo.check_group(CONFIG, np.zeros((2, 8, 8)), np.array([0, 1]), GRID)
    with pytest.raises(ValueError, match="3D"):
        bingo.check_group(CONFIG, np.zeros((2, 4, 4, 4)), np.array([0, 1]), Grid.regular((4, 4, 4)))
    with pytest.raises(ValueError, match="chunk"):
        bingo.register_group(model, np.zeros((2,) + GRID.shape), np.array([0, 1]), GRID, chunk=0)
    with pytest.raises(ValueError, match="features"):
        bingo.BingoConfig(features=())
    with pytest.raises(ValueError, match="decoder_features"):
        bingo.BingoConfig(features=(4, 8), decoder_features=(4, 8, 8))
    with pytest.raises(ValueError, match="ndim"):
        bingo.BingoConfig(ndim=4)
