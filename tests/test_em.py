"""E-step and M-step: parity with the authors' E-step and float64 brute-force references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from xjax import em, phantoms
from conftest import PARITY
from test_density import dense_kernel_np


def test_reference_estep_matches_golden(x64, golden):
    images, posteriors, values, bins = golden
    folder_post = np.load(PARITY / "xmetric_golden" / "estep_posterior.npy")
    k = posteriors["soft"].shape[-1]
    got = em.e_step_reference(jnp.asarray(images.reshape(3, -1)),
                              jnp.asarray(posteriors["soft"].reshape(-1, k)), bins)
    want = np.moveaxis(folder_post, 0, -1).reshape(-1, k)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    ref = values["estep_from_soft"]
    np.testing.assert_allclose(np.asarray(got).mean(0), ref["post_mean_per_class"], rtol=1e-6)
    side = images.shape[1]
    np.testing.assert_allclose(got.reshape(side, side, k)[0, 0], ref["post_at_00"], rtol=1e-6)


def em_update_np(images, gamma, pi, weights, bins):
    """Brute force: f_jk tabulated exactly at the bin centres from the dense kernel table, its
    logarithm interpolated linearly at each voxel's intensity, posterior normalised in float64."""
    log_post = np.log(pi)[None].repeat(images.shape[1], 0)
    for u in images:
        lo, hi = u.min(), u.max()
        table = dense_kernel_np(u, lo, hi, bins).T @ (gamma * weights[:, None])
        table = table / table.sum(0, keepdims=True)
        pos = (u - lo) / ((hi - lo) / bins) + 2
        log_table = np.log(np.maximum(table, 1e-8))
        log_post += np.stack([np.interp(pos, np.arange(bins + 4), log_table[:, k])
                              for k in range(gamma.shape[1])], 1)
    post = np.exp(log_post - log_post.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    new_pi = (post * weights[:, None]).sum(0)
    return post, new_pi / new_pi.sum()


class EMUpdateTest(chex.TestCase):
    """The E-step in float64, with and without ``jax.jit`` (chex variants)."""

    def setUp(self):
        super().setUp()
        self.enter_context(jax.enable_x64(True))

    @chex.variants(with_jit=True, without_jit=True)
    def test_em_update_matches_numpy(self):
        rng = np.random.default_rng(0)
        images = rng.normal(size=(3, 200))
        gamma = rng.dirichlet(np.ones(4), size=200)
        pi = rng.dirichlet(np.ones(4))
        weights = (rng.uniform(size=200) > 0.2).astype(float)
        update = self.variant(lambda state, u, w, lo, hi: em.em_update(state, u, w, lo, hi, 16))
        state = update(em.EMState(jnp.asarray(gamma), jnp.asarray(pi)), jnp.asarray(images),
                       jnp.asarray(weights), images.min(1), images.max(1))
        chex.assert_shape([state.posterior, state.pi], [(200, 4), (4,)])
        chex.assert_type([state.posterior, state.pi], jnp.float64)
        want_post, want_pi = em_update_np(images, gamma, pi, weights, 16)
        np.testing.assert_allclose(state.posterior, want_post, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(state.pi, want_pi, rtol=1e-9)


def test_em_update_has_no_gradient(x64):
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(2, 50)))
    state = em.init_em(jax.random.key(0), 50, 3, jnp.float64)

    def f(x):
        return jnp.sum(em.em_update(state, x, jnp.ones(50), x.min(1), x.max(1), 8).posterior ** 2)

    assert np.all(np.asarray(jax.grad(f)(images)) == 0)


def test_init_em_is_a_softmax_of_noise():
    state = em.init_em(jax.random.key(3), 1000, 5)
    np.testing.assert_allclose(state.posterior.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(state.pi, 0.2)
    logits = np.log(np.asarray(state.posterior))
    centred = logits - logits.mean(1, keepdims=True)
    # Differences of two N(0, 1) draws have variance 2: the noise is standard normal.
    assert 1.8 < np.var(centred[:, 0] - centred[:, 1]) < 2.2
    again = em.init_em(jax.random.key(3), 1000, 5)
    np.testing.assert_array_equal(state.posterior, again.posterior)


def test_appearance_from_labels_recovers_class_histograms(x64):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 300)
    u = np.array([0.0, 5.0, 10.0])[labels] + rng.normal(scale=0.3, size=300)
    table = em.appearance_from_labels(jnp.asarray(u), jnp.asarray(labels), 3, u.min(), u.max(), 32)
    onehot = np.eye(3)[labels]
    want = dense_kernel_np(u, u.min(), u.max(), 32).T @ onehot
    np.testing.assert_allclose(table, want / want.sum(0), rtol=1e-10)
    # The GT E-step then classifies the voxels by their intensity alone.
    state = em.em_update(em.EMState(jnp.full((300, 3), 1 / 3), jnp.full(3, 1 / 3)), jnp.asarray(u[None]),
                         jnp.ones(300), u.min()[None], u.max()[None], 32, tables=table[None])
    assert np.mean(np.argmax(state.posterior, 1) == labels) > 0.99


def test_m_step_is_masked_mean(x64):
    rng = np.random.default_rng(4)
    post = rng.dirichlet(np.ones(3), size=40)
    w = rng.uniform(size=40)
    np.testing.assert_allclose(em.m_step(jnp.asarray(post), jnp.asarray(w)),
                               (post * w[:, None]).sum(0) / w.sum(), rtol=1e-12)


def test_init_em_kmeans_recovers_phantom_classes_in_any_units():
    """On a noisy, biased 3-modality phantom the k-means classes match the true labels up to a
    permutation, ``pi`` is their weighted share, and rescaling an image changes nothing."""
    ph = phantoms.make_phantom(jax.random.key(2), (48, 48), num_modalities=3, noise=0.02, bias=0.05)
    images = ph.images.reshape(3, -1)
    labels = np.asarray(ph.labels).reshape(-1)
    weights = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.0, labels.size), jnp.float32)
    state = em.init_em_kmeans(jax.random.key(0), images, weights, 4)
    post = np.asarray(state.posterior)
    assert set(np.unique(post)) == {0.0, 1.0} and np.all(post.sum(1) == 1)
    classes = post.argmax(1)
    majority = [np.bincount(classes[labels == k], minlength=4).argmax() for k in range(4)]
    assert sorted(majority) == [0, 1, 2, 3]
    assert np.mean(np.asarray(majority)[labels] == classes) > 0.9
    w = np.asarray(weights, np.float64)
    np.testing.assert_allclose(state.pi, (post * w[:, None]).sum(0) / w.sum(), rtol=1e-5)
    scaled = images * jnp.asarray([[1000.0], [1.0], [0.01]]) + jnp.asarray([[5.0], [-3.0], [0.0]])
    rescaled = em.init_em_kmeans(jax.random.key(0), scaled, weights, 4)
    np.testing.assert_array_equal(rescaled.posterior.argmax(1), classes)
