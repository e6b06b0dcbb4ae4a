"""X-metric and Parzen MI: parity with the authors' code and brute-force float64 references, with and
without jit (chex variants)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import xjax
from xjax import metrics, validate
from test_density import dense_kernel_np


def entropy_np(p):
    return -np.sum(p * np.log(np.maximum(p, 1e-8)))


def class_information_np(u, gamma, bins, form):
    """Reference: dense kernel table, joint p(b, k), entropies with the 1e-8 floor."""
    h = dense_kernel_np(u, u.min(), u.max(), bins).T @ gamma
    p = h / h.sum()
    value = entropy_np(p.sum(1)) - entropy_np(p)
    return value + entropy_np(p.sum(0)) if form == "mi" else value


@pytest.mark.parametrize("case", ["onehot", "soft", "uniform"])
def test_x_metric_reference_form_matches_golden(x64, golden, case):
    images, posteriors, values, bins = golden
    got = xjax.x_metric(images, posteriors[case], bins=bins, form="reference")
    np.testing.assert_allclose(got, values[case]["xmetric_sum"], rtol=1e-6)
    flat = jnp.asarray(images.reshape(3, -1))
    w = jnp.asarray(posteriors[case].reshape(-1, posteriors[case].shape[-1]))
    for j, ref in enumerate(values[case]["per_image"]):
        lo, hi = flat[j].min(), flat[j].max()
        got_j = metrics.class_information(flat[j], w, lo, hi, bins, "reference")
        np.testing.assert_allclose(got_j, ref["negHcond"], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(lo - 2 * (hi - lo) / bins, ref["pad_min"], rtol=1e-12)
        np.testing.assert_allclose((hi - lo) / bins, ref["bin_width"], rtol=1e-12)


def test_pairwise_mi_matches_golden(x64, golden):
    images, _, values, bins = golden
    np.testing.assert_allclose(xjax.mutual_information(images[0], images[1], bins=bins),
                               values["MI_01"], rtol=1e-6)


class XMetricTest(chex.TestCase):
    """The X-metric in float64, with and without ``jax.jit`` (chex variants)."""

    def setUp(self):
        super().setUp()
        self.enter_context(jax.enable_x64(True))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("mi", "reference")
    def test_x_metric_matches_numpy_reference(self, form):
        rng = np.random.default_rng(0)
        images = rng.normal(size=(4, 9, 11))
        gamma = rng.dirichlet(np.ones(3), size=(9, 11))
        want = sum(class_information_np(images[j].ravel(), gamma.reshape(-1, 3), 20, form) for j in range(4))
        got = self.variant(lambda i, g: xjax.x_metric(i, g, bins=20, form=form))(images, gamma)
        chex.assert_shape(got, ())
        chex.assert_type(got, jnp.float64)
        np.testing.assert_allclose(got, want, rtol=1e-10)


def test_forms_differ_by_class_entropy(x64):
    rng = np.random.default_rng(1)
    images = rng.normal(size=(3, 8, 8))
    gamma = rng.dirichlet(np.ones(4), size=(8, 8))
    diff = xjax.x_metric(images, gamma, bins=16) - xjax.x_metric(images, gamma, bins=16, form="reference")
    np.testing.assert_allclose(diff, 3 * entropy_np(gamma.reshape(-1, 4).mean(0)), rtol=1e-10)


def test_x_metric_with_mask_counts_only_masked_voxels(x64):
    rng = np.random.default_rng(2)
    images = rng.normal(size=(2, 10, 10))
    gamma = rng.dirichlet(np.ones(3), size=(10, 10))
    mask = np.zeros((10, 10))
    mask[2:8, 1:9] = 1
    got = xjax.x_metric(images, gamma, bins=12, mask=mask)
    sel = mask.ravel() > 0
    want = sum(class_information_np(images[j].ravel()[sel], gamma.reshape(-1, 3)[sel], 12, "mi") for j in range(2))
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_self_information_equals_entropy_of_levels(x64):
    """With levels further apart than the kernel support, I(A; A) and I(A; K) for K the level
    labels both equal the discrete entropy of the level proportions."""
    rng = np.random.default_rng(3)
    labels = rng.choice(4, size=(20, 20), p=[0.1, 0.2, 0.3, 0.4])
    levels = np.array([0.0, 10.0, 20.0, 30.0])
    a = levels[labels]
    freq = np.bincount(labels.ravel(), minlength=4) / labels.size
    h = entropy_np(freq)
    np.testing.assert_allclose(xjax.mutual_information(a, a, bins=30), h, rtol=1e-10)
    np.testing.assert_allclose(xjax.x_metric(np.stack([a, a]), np.eye(4)[labels], bins=30), 2 * h, rtol=1e-10)


def test_x_metric_gradient_matches_finite_differences(x64):
    rng = np.random.default_rng(4)
    images = rng.normal(size=(2, 6, 7))
    gamma = jnp.asarray(rng.dirichlet(np.ones(3), size=(6, 7)))
    flat = images.reshape(2, -1)
    lo, hi = flat.min(1) - 0.1, flat.max(1) + 0.1  # fixed ranges: no kink from min/max

    def f(x):
        w = gamma.reshape(-1, 3)
        return sum(metrics.class_information(x[j], w, lo[j], hi[j], 10) for j in range(2))

    g = jax.grad(f)(jnp.asarray(flat))
    eps = 1e-6
    for j, i in [(0, 3), (1, 17), (0, 40), (1, 0)]:
        e = np.zeros_like(flat)
        e[j, i] = eps
        fd = (f(jnp.asarray(flat + e)) - f(jnp.asarray(flat - e))) / (2 * eps)
        np.testing.assert_allclose(g[j, i], fd, rtol=1e-5, atol=1e-9)


def test_x_metric_rejects_bad_input():
    rng = np.random.default_rng(5)
    images = rng.normal(size=(3, 8, 8)).astype(np.float32)
    gamma = np.full((8, 8, 4), 0.25, np.float32)
    with pytest.raises(ValueError, match="form"):
        xjax.x_metric(images, gamma, form="nmi")
    with pytest.raises(ValueError, match="posterior"):
        xjax.x_metric(images, gamma[:7])
    with pytest.raises(ValueError):
        xjax.x_metric(images, gamma, bins=3)
    with pytest.raises(ValueError):
        xjax.x_metric(images, np.full((8, 8, 1), 1.0, np.float32))
    with pytest.raises(ValueError):
        xjax.x_metric(images[:1], gamma)
    with pytest.raises(ValueError):
        xjax.x_metric(images, gamma, mask=np.zeros((8, 8)))


def test_x_metric_refuses_a_nan_or_negative_posterior_and_complex_images():
    """A posterior with NaN or negative values is refused on the host (not traced: under jit the
    value checks are skipped); complex images are refused, traced or not, instead of being cast."""
    rng = np.random.default_rng(6)
    images = rng.normal(size=(2, 8, 8)).astype(np.float32)
    gamma = np.full((8, 8, 4), 0.25, np.float32)
    nan, negative = gamma.copy(), gamma.copy()
    nan[1, 2, 0] = np.nan
    negative[3, 4, 1] = -0.5
    with pytest.raises(ValueError, match=r"posterior has 1 NaN/Inf values"):
        xjax.x_metric(images, nan)
    with pytest.raises(ValueError, match=r"posterior must be non-negative, got a minimum of -0\.5"):
        xjax.x_metric(images, negative)
    assert np.isnan(jax.jit(xjax.x_metric)(images, nan))  # traced: no value checks
    complex_images = images + 1j * images
    for run in (xjax.x_metric, jax.jit(xjax.x_metric)):
        with pytest.raises(ValueError, match="images must be real numbers, got dtype complex64"):
            run(complex_images, gamma)
    with pytest.raises(ValueError, match="images must be real numbers, got dtype complex"):
        jax.jit(lambda x: validate.check_images(x) or 0.0)(complex_images)
