"""Parzen histograms against brute-force numpy float64 references, with and without jit (chex
variants)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xjax import density


def beta3_np(t):
    t = np.abs(t)
    return np.where(t < 1, (4 - 6 * t**2 + 3 * t**3) / 6, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def dense_kernel_np(u, lo, hi, bins):
    """The samples x bins kernel table, allowed only in this reference."""
    width = (hi - lo) / bins
    pos = (u - lo) / width + 2
    return beta3_np(pos[:, None] - np.arange(bins + 4)[None])


def test_bspline3_matches_formula_and_partition_of_unity(x64):
    t = np.linspace(-3, 3, 601)
    np.testing.assert_allclose(density.bspline3(jnp.asarray(t)), beta3_np(t), atol=1e-15)
    x = np.random.default_rng(0).uniform(-5, 5, 50)
    total = sum(beta3_np(x - k) for k in range(-10, 11))
    np.testing.assert_allclose(total, 1.0, atol=1e-14)


class HistogramTest(chex.TestCase):
    """The Parzen histograms in float64, each test run with and without ``jax.jit`` (chex variants);
    the bin count is static."""

    def setUp(self):
        super().setUp()
        self.enter_context(jax.enable_x64(True))

    @chex.variants(with_jit=True, without_jit=True)
    def test_joint_histogram_matches_dense_reference(self):
        rng = np.random.default_rng(1)
        u = rng.normal(size=500)
        w = rng.dirichlet(np.ones(3), size=500) * rng.uniform(0, 1, (500, 1))
        bins = 12
        histogram = self.variant(lambda v, weights, lo, hi: density.joint_histogram(v, weights, lo, hi, bins))
        got = histogram(jnp.asarray(u), jnp.asarray(w), u.min(), u.max())
        chex.assert_shape(got, (bins + 4, 3))
        chex.assert_type(got, jnp.float64)
        want = dense_kernel_np(u, u.min(), u.max(), bins).T @ w
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        # Samples beyond the padded range on either side touch no bin (none wraps around).
        narrow = histogram(jnp.asarray(u), jnp.asarray(w), -0.5, 0.5)
        np.testing.assert_allclose(narrow, dense_kernel_np(u, -0.5, 0.5, bins).T @ w, rtol=1e-12, atol=1e-12)
        # Partition of unity: every sample deposits exactly its weight.
        np.testing.assert_allclose(got.sum(0), w.sum(0), rtol=1e-12)

    @chex.variants(with_jit=True, without_jit=True)
    def test_pair_histogram_matches_dense_reference(self):
        rng = np.random.default_rng(2)
        a, b = rng.normal(size=(2, 300))
        w = rng.uniform(size=300)
        bins = 8
        histogram = self.variant(lambda x, y, weights, range_b: density.pair_histogram(
            x, y, weights, (-1.0, 1.0), range_b, bins))
        got = histogram(jnp.asarray(a), jnp.asarray(b), jnp.asarray(w), (b.min(), b.max()))
        chex.assert_shape(got, (bins + 4, bins + 4))
        ka = dense_kernel_np(a, -1.0, 1.0, bins)  # a narrow range: samples fall off both ends
        kb = dense_kernel_np(b, b.min(), b.max(), bins)
        np.testing.assert_allclose(got, (ka * w[:, None]).T @ kb, rtol=1e-12, atol=1e-12)

    @chex.variants(with_jit=True, without_jit=True)
    def test_evaluate_histogram_interpolates_between_bin_centres(self):
        bins = 6
        table = jnp.asarray(np.random.default_rng(4).uniform(size=(bins + 4, 2)))
        lo, hi = 0.0, 6.0  # one intensity unit per bin: position = u + 2
        u = jnp.asarray([0.0, 0.5, 3.25, 6.0])
        got = self.variant(lambda t, v: density.evaluate_histogram(t, v, lo, hi, bins))(table, u)
        chex.assert_shape(got, (4, 2))
        pos = np.asarray(u) + 2
        want = np.stack([np.interp(pos, np.arange(bins + 4), np.asarray(table)[:, k]) for k in range(2)], 1)
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_histogram_gradient_matches_finite_differences(x64):
    rng = np.random.default_rng(3)
    u = rng.normal(size=64)
    w = rng.dirichlet(np.ones(4), size=64)

    def f(v):
        h = density.joint_histogram(v, jnp.asarray(w), u.min(), u.max(), 10)
        p = h / h.sum()
        return density.entropy(p) - density.entropy(p.sum(1))

    g = jax.grad(f)(jnp.asarray(u))
    eps = 1e-6
    for i in rng.choice(64, 8, replace=False):
        e = np.zeros(64)
        e[i] = eps
        fd = (f(jnp.asarray(u + e)) - f(jnp.asarray(u - e))) / (2 * eps)
        np.testing.assert_allclose(g[i], fd, rtol=1e-5, atol=1e-8)


def _largest_intermediate(fn, *args):
    """Size of the largest array produced anywhere in ``fn``'s jaxpr (sub-jaxprs included)."""
    sizes = []

    def walk(jx):
        for eqn in jx.eqns:
            sizes.extend(int(np.prod(getattr(v.aval, "shape", ()))) for v in eqn.outvars)
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else (p,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return max(sizes)


@pytest.mark.parametrize("bins", [64, 128])
def test_no_samples_by_bins_table(bins):
    """Memory stays O(samples + L K): no intermediate as large as samples x bins, even in the
    gradient."""
    n, k = 2000, 4
    u = jnp.linspace(0, 1, n)
    w = jnp.full((n, k), 0.25)

    def loss(v):
        h = density.joint_histogram(v, w, 0.0, 1.0, bins)
        return density.entropy(h / h.sum())

    largest = _largest_intermediate(jax.value_and_grad(loss), u)
    assert largest < n * (bins + 4)
    assert largest <= n * 4 * k


def test_group_histograms_equal_per_image_and_never_spill(x64):
    rng = np.random.default_rng(5)
    u = rng.normal(size=(3, 200))
    u[1, :20] = 50.0  # far outside image 1's range below: its taps must be dropped
    w = rng.dirichlet(np.ones(4), size=200)
    lo, hi = np.array([-2.0, -2.0, -1.0]), np.array([2.0, 2.0, 1.5])
    got = density.group_joint_histograms(jnp.asarray(u), jnp.asarray(w), lo, hi, 10)
    for j in range(3):
        want = dense_kernel_np(u[j], lo[j], hi[j], 10).T @ w
        np.testing.assert_allclose(got[j], want, rtol=1e-12, atol=1e-12)
    per_image_weights = rng.dirichlet(np.ones(4), size=(3, 200))
    got = density.group_joint_histograms(jnp.asarray(u), jnp.asarray(per_image_weights), lo, hi, 10)
    for j in (0, 2):
        want = density.joint_histogram(jnp.asarray(u[j]), jnp.asarray(per_image_weights[j]), lo[j], hi[j], 10)
        np.testing.assert_allclose(got[j], want, rtol=1e-12, atol=1e-12)


def test_pair_histograms_beyond_int32_indexing_are_refused():
    """The flat table of all pairs is indexed in int32: 464425 pairs of 68 x 68 bins (APE of
    about 964 images at L = 64) reach 2^31 entries and are refused by name, not overflowed."""
    pairs = 2**31 // 68**2 + 1
    a = jnp.zeros((pairs, 1), jnp.float32)
    r = (jnp.zeros(pairs), jnp.ones(pairs))
    with pytest.raises(ValueError, match="2\\^31"):
        density.group_pair_histograms(a, a, jnp.ones(1), r, r, 64)
    ok = density.group_pair_histograms(a[:2], a[:2], jnp.ones(1), (r[0][:2], r[1][:2]), (r[0][:2], r[1][:2]), 64)
    chex.assert_shape(ok, (2, 68, 68))
