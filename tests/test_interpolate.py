"""The sampler against a brute-force float64 multilinear reference, with and without jit (chex
variants)."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from xjax.interpolate import sample, sample_clamped, sample_inside, sample_stack_inside


def linear_np(image, points):
    """Multilinear interpolation by explicit corner sums, clamped to the voxel-centre hull."""
    d = points.shape[-1]
    spatial = np.array(image.shape[:d])
    out = []
    for p in points.reshape(-1, d):
        q = np.clip(p, 0, spatial - 1)
        lo = np.minimum(np.floor(q).astype(int), np.maximum(spatial - 2, 0))
        f = q - lo
        v = 0.0
        for c in itertools.product((0, 1), repeat=d):
            idx = np.minimum(lo + np.array(c), spatial - 1)
            w = np.prod([f[a] if c[a] else 1 - f[a] for a in range(d)])
            v = v + w * image[tuple(idx)]
        out.append(v)
    return np.array(out).reshape(points.shape[:-1] + image.shape[d:])


class SamplerTest(chex.TestCase):
    """The sampler in float64, each test run with and without ``jax.jit`` (chex variants)."""

    def setUp(self):
        super().setUp()
        self.enter_context(jax.enable_x64(True))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("2d", (6, 7)), ("3d", (5, 4, 3)), ("2d_channels", (6, 7, 2)),
                                    ("singleton_axis", (5, 1)))
    def test_linear_matches_reference(self, shape):
        rng = np.random.default_rng(0)
        d = 2 if len(shape) == 2 or shape == (6, 7, 2) else 3
        image = rng.normal(size=shape)
        spatial = np.array(shape[:d])
        points = rng.uniform(-0.5, spatial - 0.5, size=(40, d))
        values, inside = self.variant(sample_inside)(jnp.asarray(image), jnp.asarray(points))
        chex.assert_shape(values, (40,) + shape[d:])
        chex.assert_shape(inside, (40,))
        chex.assert_type([values, inside], jnp.float64)
        want = linear_np(image, points)
        expect_inside = np.all((points >= 0) & (points <= spatial - 1), axis=-1)
        mask = expect_inside.reshape((-1,) + (1,) * (image.ndim - d))
        np.testing.assert_allclose(values, np.where(mask, want, 0.0), rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(inside, expect_inside)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("2d", (3, 6, 7)), ("3d", (2, 5, 4, 3)), ("2d_singleton", (3, 5, 1)),
                                    ("2d_singleton_first", (2, 1, 4)))
    def test_stack_sampling_matches_the_reference_per_image(self, shape):
        rng = np.random.default_rng(3)
        images = jnp.asarray(rng.normal(size=shape))
        spatial = np.array(shape[1:])
        points = rng.uniform(-0.5, spatial - 0.5, size=(shape[0], 25, len(spatial)))
        values, inside = self.variant(sample_stack_inside)(images, jnp.asarray(points))
        chex.assert_shape([values, inside], (shape[0], 25))
        for j in range(shape[0]):
            expect_inside = np.all((points[j] >= 0) & (points[j] <= spatial - 1), axis=-1)
            want = np.where(expect_inside, linear_np(np.asarray(images[j]), points[j]), 0.0)
            np.testing.assert_allclose(values[j], want, rtol=1e-12, atol=1e-12)
            np.testing.assert_array_equal(inside[j], expect_inside)
        # the gradient with respect to the points is that of the per-image sampler
        g_stack = self.variant(jax.grad(lambda p: jnp.sum(sample_stack_inside(images, p)[0] ** 2)))
        g_vmap = self.variant(jax.grad(lambda p: jnp.sum(jax.vmap(sample_inside)(images, p)[0] ** 2)))
        chex.assert_trees_all_close(g_stack(jnp.asarray(points)), g_vmap(jnp.asarray(points)),
                                    rtol=1e-12, atol=1e-12)

    @chex.variants(with_jit=True, without_jit=True)
    def test_integer_points_are_exact_and_nearest_rounds(self):
        image = jnp.arange(20.0).reshape(4, 5)
        idx = jnp.stack(jnp.meshgrid(jnp.arange(4.0), jnp.arange(5.0), indexing="ij"), -1)
        np.testing.assert_array_equal(self.variant(sample)(image, idx), image)
        labels = jnp.arange(20).reshape(4, 5)
        got = self.variant(functools.partial(sample, order=0))(labels, jnp.array([[1.4, 2.6], [0.2, 3.9]]))
        chex.assert_type(got, labels.dtype)
        np.testing.assert_array_equal(got, [labels[1, 3], labels[0, 4]])


def test_stack_sampling_beyond_int32_indices_samples_image_by_image(x64, monkeypatch):
    """A stack too large for int32 flat indices takes the per-image path, with the same values."""
    import xjax.interpolate as interpolate

    rng = np.random.default_rng(4)
    images = jnp.asarray(rng.normal(size=(3, 6, 5)))
    points = jnp.asarray(rng.uniform(-0.5, 5.5, size=(3, 20, 2)))
    flat = sample_stack_inside(images, points)
    monkeypatch.setattr(interpolate, "_MAX_FLAT_INDEX", 3 * 6 * 5)
    per_image = sample_stack_inside(images, points)
    for a, b in zip(flat, per_image):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_gradient_with_respect_to_points(x64):
    rng = np.random.default_rng(1)
    image = jnp.asarray(rng.normal(size=(6, 6, 5)))
    points = jnp.asarray(rng.uniform(0.2, 3.8, size=(7, 3)))

    def f(p):
        return jnp.sum(sample(image, p) ** 2)

    g = jax.grad(f)(points)
    eps = 1e-6
    for i, a in [(0, 0), (3, 1), (6, 2)]:
        e = np.zeros(points.shape)
        e[i, a] = eps
        fd = (f(points + e) - f(points - e)) / (2 * eps)
        np.testing.assert_allclose(g[i, a], fd, rtol=1e-6, atol=1e-9)


def test_clamped_sampling_extends_the_border(x64):
    rng = np.random.default_rng(2)
    field = rng.normal(size=(5, 6, 2))
    points = rng.uniform(-3, 9, size=(30, 2))
    want = linear_np(field, np.clip(points, 0, np.array([4, 5])))
    np.testing.assert_allclose(sample_clamped(jnp.asarray(field), jnp.asarray(points)), want, rtol=1e-12)
