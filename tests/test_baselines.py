"""Baseline groupwise similarities: float64 numpy references, finite-difference gradients,
invariants, GMM separation and EM monotonicity, vmap over groups, and registration by each."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xjax
from xjax import objectives, phantoms
from xjax.objectives.cte import _pca_template
from xjax.transforms import Translation

BINS = 8
SHAPE = (6, 10)


# ---- numpy float64 references --------------------------------------------------------------------

def beta3_np(t):
    t = np.abs(t)
    return np.where(t < 1, (4 - 6 * t**2 + 3 * t**3) / 6, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def kernel_np(u, lo, hi, bins):
    """Samples x (L + 4) table of cubic B-spline weights on the padded bin scale."""
    pos = (u - lo) / ((hi - lo) / bins) + 2
    return beta3_np(pos[:, None] - np.arange(bins + 4)[None])


def entropy_np(p):
    return -np.sum(p * np.log(np.maximum(p, 1e-8)))


def joint_np(a, b, w, range_a, range_b, bins):
    h = (kernel_np(a, *range_a, bins) * w[:, None]).T @ kernel_np(b, *range_b, bins)
    return h / h.sum()


def ape_np(values, w, lo, hi, bins):
    total = 0.0
    n = values.shape[0]
    for i in range(n):
        for j in range(i + 1, n):
            p = joint_np(values[i], values[j], w, (lo[i], hi[i]), (lo[j], hi[j]), bins)
            total += entropy_np(p.sum(1)) + entropy_np(p.sum(0)) - entropy_np(p)
    return total


def template_np(images, w):
    """First principal component of the weighted z-scores, by SVD; sign by the mean image."""
    wn = w / w.sum()
    mean = (images * wn).sum(1, keepdims=True)
    z = (images - mean) / np.sqrt((((images - mean) ** 2) * wn).sum(1, keepdims=True))
    e = np.linalg.svd(z * np.sqrt(wn), full_matrices=False)[0][:, 0]
    t = e @ z
    return t if np.sum(wn * t * z.mean(0)) > 0 else -t


def cte_np(t, t_range, values, w, lo, hi, bins):
    total = 0.0
    for i in range(values.shape[0]):
        p = joint_np(t, values[i], w, t_range, (lo[i], hi[i]), bins)
        total -= entropy_np(p) - entropy_np(p.sum(0))
    return total


def normalised_np(values, lo, hi):
    return (values - lo[:, None]) / (hi - lo)[:, None]


def congealing_np(values, w, lo, hi, sigma):
    u = normalised_np(values, lo, hi)
    n, s = u.shape
    stack_entropy = np.zeros(s)
    for x in range(s):
        for i in range(n):
            others = [math.exp(-0.5 * ((u[i, x] - u[j, x]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
                      for j in range(n) if j != i]
            stack_entropy[x] -= math.log(sum(others) / (n - 1)) / n
    return -np.sum(w * stack_entropy) / np.sum(w)


def gmm_log_np(means, covs, pi, x):
    """``(n, K)`` log pi_k + log N(x; mu_k, Sigma_k)."""
    out = []
    for mean, cov, p in zip(means, covs, pi):
        d = x - mean
        maha = np.einsum("vn,vn->v", d, np.linalg.solve(cov, d.T).T)
        out.append(np.log(p) - 0.5 * (maha + np.linalg.slogdet(cov)[1] + len(mean) * np.log(2 * np.pi)))
    return np.stack(out, 1)


def logsumexp_np(a):
    m = a.max(1, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(1, keepdims=True)))[:, 0]


def em_step_np(means, covs, pi, x, w, floor):
    """One weighted EM step; covariance eigenvalues clipped below at ``floor``."""
    log = gmm_log_np(means, covs, pi, x)
    r = np.exp(log - logsumexp_np(log)[:, None]) * w[:, None]
    mass = r.sum(0)
    new_means = (r.T @ x) / mass[:, None]
    new_covs = []
    for k in range(len(mass)):
        d = x - new_means[k]
        c = (d * r[:, k, None]).T @ d / mass[k]
        vals, vecs = np.linalg.eigh(c)
        new_covs.append(vecs @ np.diag(np.maximum(vals, floor)) @ vecs.T)
    return new_means, np.stack(new_covs), mass / mass.sum()


# ---- fixtures and helpers ------------------------------------------------------------------------

@pytest.fixture
def group(x64):
    """A float64 group of 3 images on a 6 x 10 grid, voxel weights (some zero) and a sample."""
    rng = np.random.default_rng(0)
    base = rng.uniform(size=SHAPE)
    images = np.stack([base, (1 - base) ** 2 + 0.1 * rng.normal(size=SHAPE), np.sin(3 * base)])
    images = images.reshape(3, -1) + 0.05 * rng.normal(size=(3, 60))
    weights = rng.uniform(0.2, 1.0, 60) * (rng.uniform(size=60) > 0.1)
    index = rng.choice(60, 24, replace=False)
    lo, hi = images.min(1), images.max(1)
    return images, weights, index, lo, hi


OBJECTIVES = [objectives.APE(), objectives.CTE(), objectives.Congealing(sigma=0.2),
              objectives.GMM(num_classes=3, init_iterations=0, floor=1e-3), objectives.VarianceOfIntensities()]
IDS = ["APE", "CTE", "Congealing", "GMM", "VI"]


def fit(objective, group):
    """The objective's state after init and one update over the whole group (jitted)."""
    images, weights, index, lo, hi = group

    @jax.jit
    def run(key):
        state = objective.init(key, jnp.asarray(images), jnp.asarray(weights))
        return objective.update(state, jnp.asarray(images), jnp.asarray(weights), lo, hi, BINS, index)

    return run(jax.random.key(0))


def reference(objective, state, group):
    """The numpy float64 value of ``objective`` at the group's sample (given its fitted state)."""
    images, weights, index, lo, hi = group
    values, w = images[:, index], weights[index]
    if isinstance(objective, objectives.APE):
        return ape_np(values, w, lo, hi, BINS)
    if isinstance(objective, objectives.CTE):
        t = template_np(values, w)
        inside = w > 0
        return cte_np(t, (t[inside].min(), t[inside].max()), values, w, lo, hi, BINS)
    if isinstance(objective, objectives.Congealing):
        return congealing_np(values, w, lo, hi, objective.sigma)
    if isinstance(objective, objectives.GMM):
        log = gmm_log_np(*map(np.asarray, state), normalised_np(values, lo, hi).T)
        return np.sum(w * logsumexp_np(log)) / np.sum(w)
    return -np.sum(w * normalised_np(values, lo, hi).var(0)) / np.sum(w)


# ---- similarity against the references -----------------------------------------------------------

@pytest.mark.parametrize("objective", OBJECTIVES, ids=IDS)
def test_similarity_and_gradient_match_references(group, objective):
    images, weights, index, lo, hi = group
    state = fit(objective, group)
    similarity = jax.jit(lambda v: objective.similarity(state, v, weights[index], index, lo, hi, BINS))
    values = images[:, index]
    np.testing.assert_allclose(similarity(values), reference(objective, state, group), rtol=1e-10)
    # Gradient with respect to the values against central differences (float64).
    grad = np.asarray(jax.grad(similarity)(values)).reshape(-1)
    step, fd = 1e-6, np.zeros(values.size)
    for e in range(values.size):
        delta = step * np.eye(values.size)[e].reshape(values.shape)
        fd[e] = (similarity(values + delta) - similarity(values - delta)) / (2 * step)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)
    assert np.abs(fd).max() > 1e-3  # the similarity does depend on the values


def test_cte_template_matches_principal_component(group):
    images, weights, _, _, _ = group
    template = jax.jit(_pca_template)(jnp.asarray(images), jnp.asarray(weights))
    np.testing.assert_allclose(template, template_np(images, weights), rtol=1e-10, atol=1e-10)


def test_gmm_update_is_one_em_step(group):
    images, weights, index, lo, hi = group
    gmm = objectives.GMM(num_classes=3, iterations=1, init_iterations=0, floor=1e-3)
    state = fit(gmm, group)
    update = jax.jit(lambda s: gmm.update(s, jnp.asarray(images), jnp.asarray(weights), lo, hi, BINS, index))
    after = update(state)
    x = normalised_np(images, lo, hi).T
    want = objectives.GMMState(*em_step_np(*map(np.asarray, state), x, weights, 1e-3))
    chex.assert_trees_all_close(after, want, rtol=1e-9, atol=1e-12)
    assert np.linalg.eigvalsh(np.asarray(after.covariances)).min() >= 1e-3 * (1 - 1e-9)


@pytest.mark.parametrize("objective", OBJECTIVES, ids=IDS)
def test_vmap_over_groups_equals_loop(group, objective):
    images, weights, index, lo, hi = group
    rng = np.random.default_rng(5)
    batch = images[None] + 0.1 * rng.normal(size=(3,) + images.shape)
    b_lo, b_hi = batch.min(2), batch.max(2)
    keys = jax.random.split(jax.random.key(1), 3)

    @jax.jit
    def one(key, imgs, l, h):
        state = objective.init(key, imgs, weights)
        state = objective.update(state, imgs, weights, l, h, BINS, index)
        return objective.similarity(state, imgs[:, index], weights[index], index, l, h, BINS)

    got = jax.vmap(one)(keys, batch, b_lo, b_hi)
    want = [one(keys[b], batch[b], b_lo[b], b_hi[b]) for b in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-9)


# ---- invariants ----------------------------------------------------------------------------------

def test_ape_of_four_identical_copies_is_six_times_self_information(x64):
    u = np.random.default_rng(2).normal(size=50)
    p = joint_np(u, u, np.ones(50), (u.min(), u.max()), (u.min(), u.max()), BINS)
    self_information = 2 * entropy_np(p.sum(0)) - entropy_np(p)
    values = jnp.tile(jnp.asarray(u), (4, 1))
    ape = jax.jit(lambda v: objectives.APE().similarity((), v, jnp.ones(50), jnp.arange(50), v.min(1), v.max(1),
                                                       BINS))
    np.testing.assert_allclose(ape(values), 6 * self_information, rtol=1e-12)


def test_ape_builds_one_histogram_per_pair():
    """The only scatter-add fills ``N (N - 1) / 2`` histograms of ``(L + 4)^2`` bins: O(N^2)."""
    for n in (2, 3, 5, 8):
        values = jnp.zeros((n, 16))
        jaxpr = jax.make_jaxpr(lambda v: objectives.APE().similarity(
            (), v, jnp.ones(16), jnp.arange(16), jnp.zeros(n), jnp.ones(n), BINS))(values)
        sizes = [e.outvars[0].aval.size for e in jaxpr.jaxpr.eqns if e.primitive.name == "scatter-add"]
        assert sizes == [n * (n - 1) // 2 * (BINS + 4) ** 2]


def test_cte_template_of_identical_images_is_scaled_normalised_image(x64):
    u = np.random.default_rng(3).normal(size=40) * 2 + 1
    w = np.ones(40)
    template = jax.jit(lambda images: _pca_template(images, jnp.asarray(w)))
    for n in (2, 4):
        np.testing.assert_allclose(template(np.tile(u, (n, 1))), math.sqrt(n) * (u - u.mean()) / u.std(),
                                   rtol=1e-10)
    # An inverted copy still gives a template correlated positively with the mean z-score image.
    images = np.stack([u, -u + 0.1 * np.random.default_rng(4).normal(size=40), u ** 2])
    t = np.asarray(template(images))
    z = (images - images.mean(1, keepdims=True)) / images.std(1, keepdims=True)
    assert np.sum(t * z.mean(0)) > 0


def test_identical_images_maximise_variance_and_congealing(x64):
    u = np.random.default_rng(6).normal(size=30)
    same = np.tile(u, (3, 1))
    other = np.stack([u, np.roll(u, 1), u**2])
    scaled = other * np.array([[1.0], [3.0], [0.5]]) + np.array([[0.0], [2.0], [7.0]])
    shuffled = np.stack([u, np.roll(u, 1), np.roll(u, 2)])
    for obj in (objectives.VarianceOfIntensities(), objectives.Congealing(sigma=0.1)):
        value = jax.jit(lambda v: obj.similarity((), v, jnp.ones(30), jnp.arange(30), v.min(1), v.max(1),
                                                 BINS))
        if isinstance(obj, objectives.Congealing):  # every stack is one point: H_x = -log G_sigma(0)
            np.testing.assert_allclose(value(same), -math.log(0.1 * math.sqrt(2 * math.pi)), rtol=1e-12)
        else:
            np.testing.assert_allclose(value(same), 0.0, atol=1e-15)
        # Gains and offsets per image change nothing once the ranges follow (normalised intensities).
        np.testing.assert_allclose(value(scaled), value(other), rtol=1e-10)
        assert value(shuffled) < value(same)


# ---- GMM: separation and monotone EM on a phantom -----------------------------------------------

@pytest.fixture(scope="module")
def phantom():
    return phantoms.make_phantom(jax.random.key(0), (48, 48), num_modalities=3)


def test_gmm_components_separate_on_phantom(phantom):
    images = phantom.images.reshape(3, -1)
    weights, lo, hi = jnp.ones(images.shape[1]), images.min(1), images.max(1)
    labels = np.asarray(phantom.labels).reshape(-1)
    x = (images - lo[:, None]) / (hi - lo)[:, None]
    pick = jax.jit(lambda key: objectives.GMM(num_classes=4, init_iterations=0).init(key, images, weights))
    gmm = objectives.GMM(num_classes=4, iterations=20)
    em = jax.jit(lambda s: gmm.update(s, images, weights, lo, hi, BINS, None))
    for seed in range(3):
        state = em(pick(jax.random.key(seed)))
        means = np.asarray(state.means)
        assert min(np.linalg.norm(means[a] - means[b]) for a in range(4) for b in range(a)) > 0.1
        assigned = gmm_log_np(*map(np.asarray, state), np.asarray(x.T, np.float64)).argmax(1)
        majority = [np.bincount(assigned[labels == k], minlength=4).argmax() for k in range(4)]
        assert sorted(majority) == [0, 1, 2, 3]  # each tissue class has its own component
        assert np.mean(np.asarray(majority)[labels] == assigned) > 0.9
    # The original's start (every mean at the global mean) is a fixed point: nothing separates.
    centred = x - x.mean(1, keepdims=True)
    cov = centred @ centred.T / x.shape[1]
    degenerate = objectives.GMMState(jnp.tile(x.mean(1), (4, 1)), jnp.tile(cov, (4, 1, 1)), jnp.full(4, 0.25))
    np.testing.assert_allclose(em(degenerate).means, degenerate.means, atol=1e-5)


def test_gmm_em_never_decreases_the_log_likelihood(x64, phantom):
    images = jnp.asarray(phantom.images.reshape(3, -1), jnp.float64)[:, ::2]
    weights = jnp.asarray(np.random.default_rng(7).uniform(0.5, 1.0, images.shape[1]))
    lo, hi, index = images.min(1), images.max(1), jnp.arange(images.shape[1])
    gmm = objectives.GMM(num_classes=4, iterations=1, init_iterations=0, floor=1e-4)
    step = jax.jit(lambda s: gmm.update(s, images, weights, lo, hi, BINS, index))
    log_likelihood = jax.jit(lambda s: gmm.similarity(s, images, weights, index, lo, hi, BINS))
    state = jax.jit(lambda key: gmm.init(key, images, weights))(jax.random.key(1))
    history = []
    for _ in range(25):
        history.append(float(log_likelihood(state)))
        state = step(state)
    assert np.all(np.diff(history) >= -1e-12 * np.abs(history[1:]))
    assert history[-1] > history[0] + 0.5


# ---- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, text", [
    (lambda: objectives.Congealing(sigma=0.0), "sigma.*0.0"),
    (lambda: objectives.Congealing(sigma=float("nan")), "sigma.*nan"),
    (lambda: objectives.Congealing(sigma=True), "sigma.*True"),
    (lambda: objectives.GMM(num_classes=1), "classes.*1"),
    (lambda: objectives.GMM(iterations=0), "iterations.*0"),
    (lambda: objectives.GMM(init_iterations=-1), "init_iterations.*-1"),
    (lambda: objectives.GMM(floor=-1e-3), "floor.*-0.001"),
    (lambda: objectives.GMM(iterations=2.5), "iterations.*2.5"),
])
def test_bad_hyper_parameters_are_named(make, text):
    with pytest.raises(ValueError, match=text):
        make()


def test_congealing_needs_two_images():
    with pytest.raises(ValueError, match=r"at least 2 images.*\(1, 4\)"):
        objectives.Congealing().similarity((), jnp.zeros((1, 4)), jnp.ones(4), jnp.arange(4), jnp.zeros(1),
                                          jnp.ones(1), BINS)


# ---- registration ----------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", [objectives.APE(), objectives.CTE(), objectives.Congealing(),
                                       objectives.GMM(), objectives.VarianceOfIntensities()], ids=IDS)
def test_register_recovers_translation(phantom, objective):
    size = phantom.images.shape[1]
    shifts = np.array([[2.0, -1.5], [-1.5, 2.0], [0.5, -1.0]])
    fields = jnp.broadcast_to(jnp.asarray(shifts, jnp.float32)[:, None, None, :], (3, size, size, 2))
    aligned = phantom.images
    if isinstance(objective, objectives.VarianceOfIntensities):  # monomodal: one modality, three gains
        gains, offsets = jnp.array([1.0, 1.5, 0.7]), jnp.array([0.0, 0.2, -0.1])
        aligned = phantom.images[:1] * gains[:, None, None] + offsets[:, None, None]
    images = phantoms.warp(aligned, phantom.grid, fields)
    stage = xjax.Stage(Translation(), iterations=40, levels=1, learning_rate=1.0, bins=32, sample_rate=0.25)
    res = xjax.register(images, phantom.grid, xjax.Config((stage,), objective=objective), key=jax.random.key(2))
    assert int(res.status) == 0
    # Unbiased: phi_j(x) = x + t_j, sum_j t_j = 0; the misalignment pulls by s_j, so t_j = -(s_j - mean s).
    np.testing.assert_allclose(res.params[0]["translation"], -(shifts - shifts.mean(0)), atol=0.5)
