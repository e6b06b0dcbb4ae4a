"""Tests of xjax.regularizers against analytic answers and float64 numpy references."""

import itertools

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from xjax.grid import Grid
from xjax.regularizers import bending_energy, folding_fraction, jacobian_determinant


pytestmark = pytest.mark.usefixtures("x64")  # float64 references


def mesh_coordinates(shape, spacing):
    """Coordinates in mm along the mesh axes, ``(*shape, D)``, float64."""
    axes = [np.arange(n) * h for n, h in zip(shape, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1)


def oblique_grid(shape, spacing, angle):
    """A grid whose axes are rotated by ``angle`` about world z (and x in 3D)."""
    d = len(shape)
    c, s = np.cos(angle), np.sin(angle)
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    rotation = (rx @ rz)[:d, :d] if d == 3 else rz[:2, :2]
    a = np.eye(d + 1)
    a[:d, :d] = rotation @ np.diag(spacing)
    a[:d, d] = np.arange(1, d + 1) * 3.0
    return Grid(shape, a)


def world_np(grid):
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in grid.shape], indexing="ij"), -1)
    return grid.index_to_world_np(idx.astype(np.float64))


@pytest.mark.parametrize("shape,spacing", [((9, 7), (1.0, 2.5)), ((6, 5, 7), (0.5, 1.5, 2.0))])
def test_bending_energy_of_linear_field_is_zero(shape, spacing):
    d = len(shape)
    rng = np.random.default_rng(0)
    x = mesh_coordinates(shape, spacing)
    field = x @ rng.normal(size=(d, d)).T + rng.normal(size=d)
    assert abs(float(bending_energy(jnp.asarray(field), spacing))) < 1e-20


@pytest.mark.parametrize("shape,spacing", [((9, 7), (1.0, 2.5)), ((6, 5, 7), (0.5, 1.5, 2.0))])
def test_bending_energy_of_quadratic_field_is_analytic(shape, spacing):
    d = len(shape)
    rng = np.random.default_rng(1)
    x = mesh_coordinates(shape, spacing)
    q = rng.normal(size=(d, d, d))  # f_c(x) = x^T Q_c x + linear terms; Hessian Q_c + Q_c^T
    field = np.einsum("...a,cab,...b->...c", x, q, x) + x @ rng.normal(size=(d, d))
    hessians = q + np.swapaxes(q, 1, 2)
    # sum over components of the squared pure second derivatives plus twice the squared mixed
    # ones, i.e. the squared Frobenius norm of each component's Hessian; constant in space.
    pairs = list(itertools.combinations(range(d), 2))
    expected = (sum(hessians[c, a, a] ** 2 for c in range(d) for a in range(d))
                + sum(2 * hessians[c, a, b] ** 2 for c in range(d) for a, b in pairs))
    np.testing.assert_allclose(float(bending_energy(jnp.asarray(field), spacing)), expected,
                               rtol=1e-9)


def test_bending_energy_scalar_spacing_and_validation():
    x = mesh_coordinates((5, 6), (2.0, 2.0))
    # Hessians diag(2, 0) and [[0, 1], [1, 0]]: energy 2^2 + 2 * 1^2
    field = np.stack([x[..., 0] ** 2, x[..., 0] * x[..., 1]], -1)
    np.testing.assert_allclose(float(bending_energy(jnp.asarray(field), 2.0)), 6.0, rtol=1e-12)
    with pytest.raises(ValueError, match="3 points"):
        bending_energy(jnp.zeros((2, 6, 2)), 1.0)
    with pytest.raises(ValueError, match="spacing"):
        bending_energy(jnp.zeros((4, 6, 2)), (1.0, -1.0))


@pytest.mark.parametrize("shape,spacing", [((8, 6), (1.0, 1.7)), ((5, 6, 4), (1.2, 0.8, 2.0))])
def test_jacobian_of_affine_displacement_is_det_a(shape, spacing):
    d = len(shape)
    grid = oblique_grid(shape, spacing, 0.35)
    rng = np.random.default_rng(2)
    a = np.eye(d) + 0.3 * rng.normal(size=(d, d))
    x = world_np(grid)
    u = x @ (a - np.eye(d)).T + rng.normal(size=d)
    det = np.asarray(jacobian_determinant(jnp.asarray(u), grid))
    chex.assert_shape(det, shape)
    np.testing.assert_allclose(det, np.linalg.det(a), rtol=1e-10)


def test_jacobian_matches_numpy_gradient():
    grid = Grid.regular((9, 8, 7), (1.0, 1.5, 0.8), origin=(4.0, -2.0, 1.0))
    x = world_np(grid)
    rng = np.random.default_rng(3)
    u = np.stack([np.sin(0.3 * x[..., 1] + 0.2 * x[..., 2]),
                  np.cos(0.25 * x[..., 0]) * x[..., 2] * 0.1,
                  0.05 * x[..., 0] * x[..., 1]], -1) + 0.01 * rng.normal(size=x.shape)
    grads = np.stack([np.stack(np.gradient(u[..., c], *grid.spacing), -1) for c in range(3)], -2)
    expected = np.linalg.det(np.eye(3) + grads)
    np.testing.assert_allclose(jacobian_determinant(jnp.asarray(u), grid), expected, rtol=1e-10,
                               atol=1e-12)


def test_folding_fraction():
    grid = Grid.regular((10, 8), (1.0, 1.5))
    x = world_np(grid)
    np.testing.assert_array_equal(folding_fraction(jnp.zeros(grid.shape + (2,)), grid), 0.0)
    # u = (-1.5 x0 s(j), 0) with s = 1 on the index columns j >= 5: since u1 = 0, det J =
    # 1 + d u0 / d x0 = 1 - 1.5 s, whatever d u0 / d x1 is. Three of eight columns fold.
    s = (np.arange(grid.shape[1]) >= 5).astype(np.float64)[None, :]
    u = jnp.asarray(np.stack([-1.5 * x[..., 0] * s, np.zeros(grid.shape)], -1))
    np.testing.assert_allclose(jacobian_determinant(u, grid),
                               np.broadcast_to(1 - 1.5 * s, grid.shape), rtol=1e-12)
    assert float(folding_fraction(u, grid)) == pytest.approx(3 / 8, rel=1e-12)
    mask = np.zeros(grid.shape)
    mask[:, 4:] = 1.0  # columns 4..7, three of which fold
    assert float(folding_fraction(u, grid, jnp.asarray(mask))) == pytest.approx(3 / 4, rel=1e-12)
    assert float(folding_fraction(u, grid, jnp.zeros(grid.shape))) == 0.0
    with pytest.raises(ValueError, match="mask"):
        folding_fraction(u, grid, jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="does not match"):
        jacobian_determinant(jnp.zeros((10, 8, 3)), grid)
