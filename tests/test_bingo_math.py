"""BInGo's probabilistic terms and SVF integration against independent float64 references."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from xjax.grid import Grid
from xjax.nn import bingo
from xjax.nn.bingo.losses import (ElboWeights, gaussian_kl, kl_bound, l1_reconstruction,
                                  poe_from_sums, poe_sums, product_of_experts, velocity_kl)


def _experts(rng, m, shape):
    return rng.normal(size=(m,) + shape), rng.uniform(-1.5, 1.5, size=(m,) + shape)


def test_product_of_experts_matches_eq5_with_matrices(x64):
    rng = np.random.default_rng(0)
    m, c = 4, 3
    mu, logvar = _experts(rng, m, (5, c))
    got_mu, got_logvar = product_of_experts(jnp.asarray(mu), jnp.asarray(logvar))
    for v in range(5):  # Eq. 5 with explicit covariance matrices, voxel by voxel
        cov = [np.diag(np.exp(logvar[k, v])) for k in range(m)]
        sigma = m * np.linalg.inv(sum(np.linalg.inv(s) for s in cov))
        mean = sigma / m @ sum(np.linalg.inv(s) @ mu[k, v] for k, s in enumerate(cov))
        np.testing.assert_allclose(np.asarray(got_mu[v]), mean, rtol=1e-12)
        np.testing.assert_allclose(np.exp(np.asarray(got_logvar[v])), np.diag(sigma), rtol=1e-12)


def test_product_of_experts_is_the_normalised_geometric_mean(x64):
    """[prod_m N(z; mu_m, s_m)]^(1/M), normalised, is N(mu, s) of Eq. 5: check on a 1D grid."""
    rng = np.random.default_rng(1)
    mu, logvar = _experts(rng, 3, (1,))
    z = np.linspace(-12, 12, 200001)
    log_density = np.mean([-0.5 * (z - mu[k]) ** 2 / np.exp(logvar[k]) - 0.5 * logvar[k]
                           for k in range(3)], axis=0)
    density = np.exp(log_density - log_density.max())
    density /= np.trapezoid(density, z)
    mean = np.trapezoid(z * density, z)
    var = np.trapezoid((z - mean) ** 2 * density, z)
    got_mu, got_logvar = product_of_experts(jnp.asarray(mu), jnp.asarray(logvar))
    np.testing.assert_allclose(float(got_mu[0]), mean, atol=1e-7)
    np.testing.assert_allclose(float(np.exp(got_logvar[0])), var, rtol=1e-6)


def test_weights_drop_experts_and_sums_split_over_chunks(x64):
    rng = np.random.default_rng(2)
    mu, logvar = (jnp.asarray(a) for a in _experts(rng, 6, (4, 2)))
    w = jnp.asarray([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    keep = np.flatnonzero(np.asarray(w))
    for a, b in zip(product_of_experts(mu, logvar, w), product_of_experts(mu[keep], logvar[keep])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13)
    halves = [poe_sums(mu[i:i + 3], logvar[i:i + 3]) for i in (0, 3)]
    summed = poe_from_sums(*(a + b for a, b in zip(*halves)))
    for a, b in zip(summed, product_of_experts(mu, logvar)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(kl_bound(mu, logvar, w)),
                               np.asarray(kl_bound(mu[keep], logvar[keep])), rtol=1e-12)


def test_gaussian_kl_matches_the_matrix_formula(x64):
    rng = np.random.default_rng(3)
    mu_q, mu_p = rng.normal(size=(2, 3))
    lv_q, lv_p = rng.uniform(-2, 2, size=(2, 3))
    sq, sp = np.diag(np.exp(lv_q)), np.diag(np.exp(lv_p))
    ref = 0.5 * (np.trace(np.linalg.solve(sp, sq)) + (mu_p - mu_q) @ np.linalg.solve(sp, mu_p - mu_q)
                 - 3 + np.log(np.linalg.det(sp) / np.linalg.det(sq)))
    got = jnp.sum(gaussian_kl(*(jnp.asarray(a) for a in (mu_q, lv_q, mu_p, lv_p))))
    np.testing.assert_allclose(float(got), ref, rtol=1e-12)


def test_kl_bound_against_monte_carlo(x64):
    """Eq. 6: the closed form equals a Monte-Carlo estimate of (1/M) sum_m KL(q || q_m), and
    bounds a Monte-Carlo estimate of KL(q || (1/M) sum_m q_m) from above."""
    rng = np.random.default_rng(4)
    m, c, n = 3, 2, 400_000
    mu = rng.normal(scale=1.5, size=(m, 1, c))
    logvar = rng.uniform(-1.0, 1.0, size=(m, 1, c))
    bound = float(kl_bound(jnp.asarray(mu), jnp.asarray(logvar))[0])
    mu_c, lv_c = (np.asarray(a)[0] for a in product_of_experts(jnp.asarray(mu), jnp.asarray(logvar)))
    z = mu_c + np.exp(0.5 * lv_c) * rng.normal(size=(n, c))

    def log_normal(z, mean, lv):
        return np.sum(-0.5 * (z - mean) ** 2 / np.exp(lv) - 0.5 * lv - 0.5 * np.log(2 * np.pi), -1)

    log_q = log_normal(z, mu_c, lv_c)
    log_experts = np.stack([log_normal(z, mu[k, 0], logvar[k, 0]) for k in range(m)])
    per_expert = log_q - log_experts  # Monte-Carlo samples of KL(q || q_m), one row per m
    means, ses = per_expert.mean(1), per_expert.std(1) / np.sqrt(n)
    closed = np.asarray(jnp.sum(gaussian_kl(jnp.asarray(mu_c), jnp.asarray(lv_c),
                                            jnp.asarray(mu[:, 0]), jnp.asarray(logvar[:, 0])), -1))
    assert np.all(np.abs(means - closed) < 4 * ses)
    assert abs(means.mean() - bound) < 4 * np.sqrt(np.sum(ses**2)) / m
    mixture = log_q - (np.logaddexp.reduce(log_experts, axis=0) - np.log(m))
    assert mixture.mean() + 4 * mixture.std() / np.sqrt(n) < bound
    assert mixture.mean() > 0


def test_kl_bound_vanishes_for_identical_experts(x64):
    mu = jnp.broadcast_to(jnp.arange(6.0).reshape(3, 2), (4, 3, 2))
    logvar = jnp.full((4, 3, 2), 0.3)
    np.testing.assert_allclose(np.asarray(kl_bound(mu, logvar)), 0.0, atol=1e-14)


def test_velocity_kl_matches_the_laplacian_prior(x64):
    """0.5 [tr(lambda D Sigma) - log det Sigma + mu^T (lambda L) mu] with the grid graph built
    edge by edge, per component, divided by the voxel count."""
    rng = np.random.default_rng(5)
    shape, lam = (4, 3), 2.5
    mu = rng.normal(size=shape + (2,))
    logvar = rng.uniform(-2, 1, size=shape + (2,))
    voxels = list(itertools.product(*map(range, shape)))
    index = {v: i for i, v in enumerate(voxels)}
    adjacency = np.zeros((len(voxels),) * 2)
    for v in voxels:
        for a in range(2):
            w = list(v)
            w[a] += 1
            if tuple(w) in index:
                adjacency[index[v], index[tuple(w)]] = adjacency[index[tuple(w)], index[v]] = 1
    degree = np.diag(adjacency.sum(1))
    laplacian = degree - adjacency
    ref = 0.0
    for c in range(2):
        m = np.array([mu[v][c] for v in voxels])
        var = np.array([np.exp(logvar[v][c]) for v in voxels])
        ref += 0.5 * (np.trace(lam * degree @ np.diag(var)) - np.sum(np.log(var))
                      + lam * m @ laplacian @ m)
    got = velocity_kl(jnp.asarray(mu), jnp.asarray(logvar), lam)
    np.testing.assert_allclose(float(got), ref / len(voxels), rtol=1e-12)


def test_l1_reconstruction(x64):
    a = np.random.default_rng(6).normal(size=(3, 4, 5))
    b = np.random.default_rng(7).normal(size=(3, 4, 5))
    np.testing.assert_allclose(float(l1_reconstruction(jnp.asarray(a), jnp.asarray(b))),
                               np.abs(a - b).mean(), rtol=1e-13)


def _bilinear_clamped(field, p):
    """Brute-force bilinear interpolation of ``field`` (X, Y, C) at index points ``p`` (N, 2),
    indices clamped to the grid (border extension)."""
    n = np.array(field.shape[:2]) - 1
    p = np.clip(p, 0, n)
    lo = np.minimum(np.floor(p).astype(int), n - 1)
    f = p - lo
    out = 0.0
    for dx, dy in itertools.product((0, 1), repeat=2):
        w = (f[:, 0] if dx else 1 - f[:, 0]) * (f[:, 1] if dy else 1 - f[:, 1])
        out = out + w[:, None] * field[lo[:, 0] + dx, lo[:, 1] + dy]
    return out


def test_svf_integration_against_an_rk4_ode_solve(x64):
    """exp(v) by scaling and squaring vs the flow d phi/dt = v(phi), t in [0, 1], solved by 200
    RK4 steps in numpy from every voxel centre (world mm, anisotropic grid)."""
    grid = Grid.regular((28, 24), (1.5, 2.0))
    i, j = np.meshgrid(np.arange(28.0), np.arange(24.0), indexing="ij")
    v_vox = np.stack([1.2 * np.sin(2 * np.pi * j / 23) * np.cos(np.pi * i / 27),
                      0.9 * np.cos(2 * np.pi * i / 27) + 0.3 * np.sin(np.pi * j / 23)], -1)
    spacing = np.array([1.5, 2.0])
    got = np.asarray(bingo.integrate(jnp.asarray(v_vox[None]), grid, 10))[0]
    points = np.stack([i, j], -1).reshape(-1, 2)  # voxel indices; v in voxels per unit time
    h = 1.0 / 200
    p = points.copy()
    for _ in range(200):
        k1 = _bilinear_clamped(v_vox, p)
        k2 = _bilinear_clamped(v_vox, p + 0.5 * h * k1)
        k3 = _bilinear_clamped(v_vox, p + 0.5 * h * k2)
        k4 = _bilinear_clamped(v_vox, p + h * k3)
        p = p + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    ref = ((p - points) * spacing).reshape(28, 24, 2)
    inner = (slice(4, -4), slice(4, -4))
    assert np.abs(ref[inner]).max() > 1.5  # a deformation of a few mm
    np.testing.assert_allclose(got[inner], ref[inner], atol=0.03)


def test_elbo_weights_validation():
    with pytest.raises(ValueError, match="velocity"):
        ElboWeights(velocity=-1.0)
    with pytest.raises(ValueError, match="smoothness"):
        ElboWeights(smoothness="x")
