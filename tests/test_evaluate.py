import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xjax.evaluate import (
    compose_displacements,
    gre,
    gre_from_displacements,
    gwi,
    gwi_per_image,
    jacobian_stats,
    pairwise_dice,
    pairwise_dice_per_class,
)
from xjax.grid import Grid


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _rotation(angles):
    if len(angles) == 1:
        c, s = np.cos(angles[0]), np.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    r = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        g = np.eye(3)
        g[i, i], g[i, j], g[j, i], g[j, j] = c, -s, s, c
        r = r @ g
    return r


def _oblique_grid(shape):
    """A grid whose axes are rotated and anisotropic, so that index and world differ."""
    d = len(shape)
    spacing = np.array([1.5, 0.8, 2.0][:d])
    a = np.eye(d + 1)
    a[:d, :d] = _rotation([0.5] if d == 2 else [0.3, -0.2, 0.4]) * spacing
    a[:d, d] = np.array([3.0, -2.0, 1.0][:d])
    return Grid(shape, a)


def _smooth_fields(rng, n, shape, amplitude):
    """``(n, *shape, D)`` sums of random low-frequency waves over the voxel index."""
    d = len(shape)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    out = np.zeros((n,) + tuple(shape) + (d,))
    for j, c, _ in itertools.product(range(n), range(d), range(3)):
        w = rng.normal(scale=0.4, size=d)
        out[j, ..., c] += amplitude * rng.uniform(-1, 1) * np.sin(idx @ w + rng.uniform(0, 6.3))
    return out


def _np_world_points(grid):
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in grid.shape], indexing="ij"), -1)
    return grid.index_to_world_np(idx.astype(float))


def _np_to_index(grid, x):
    a = grid.matrix
    return np.linalg.solve(a[:-1, :-1], x - a[:-1, -1])


def _np_linear_clamped(field, index):
    """Multilinear interpolation at one continuous index, index clamped to the grid."""
    shape = np.array(field.shape[: len(index)])
    p = np.clip(index, 0, shape - 1)
    lo = np.minimum(np.floor(p), shape - 2).astype(int)
    frac = p - lo
    value = 0.0
    for corner in itertools.product((0, 1), repeat=len(index)):
        c = np.array(corner)
        weight = np.prod(np.where(c == 1, frac, 1 - frac))
        value = value + weight * field[tuple(lo + c)]
    return value


def _np_compose(outer, inner, grid):
    x = _np_world_points(grid)
    out = np.zeros_like(inner)
    for v in np.ndindex(*grid.shape):
        p = x[v] + inner[v]
        out[v] = inner[v] + _np_linear_clamped(outer, _np_to_index(grid, p))
    return out


def _np_gwi(true_disp, est_disp, grid, foreground):
    n = true_disp.shape[0]
    r = np.stack([_np_compose(true_disp[j], est_disp[j], grid) for j in range(n)])
    rbar = r - r.mean(0)
    x = _np_world_points(grid)
    shape = np.array(grid.shape)
    per_image = []
    for j in range(n):
        total, count = 0.0, 0
        for v in np.ndindex(*grid.shape):
            k = _np_to_index(grid, x[v] + r[j][v])
            inside = np.all(k >= 0) and np.all(k <= shape - 1)
            if inside and foreground[tuple(np.round(k).astype(int))]:
                total += np.sum(rbar[j][v] ** 2)
                count += 1
        per_image.append(np.sqrt(total / count))
    return np.array(per_image)


def _ellipse_mask(shape, scale=0.35):
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    centre = (np.array(shape) - 1) / 2
    return np.sum(((idx - centre) / (scale * np.array(shape))) ** 2, -1) <= 1


@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 4)])
def test_compose_matches_numpy(shape):
    rng = np.random.default_rng(0)
    grid = _oblique_grid(shape)
    outer, inner = _smooth_fields(rng, 2, shape, amplitude=2.5)
    got = compose_displacements(jnp.asarray(outer), jnp.asarray(inner), grid)
    np.testing.assert_allclose(np.asarray(got), _np_compose(outer, inner, grid), atol=1e-12)


def test_compose_of_translations_is_their_sum():
    grid = _oblique_grid((6, 7, 5))
    a, b = np.array([1.0, -4.0, 2.5]), np.array([-30.0, 0.5, 7.0])  # b leaves the grid
    outer = jnp.broadcast_to(jnp.asarray(a), grid.shape + (3,))
    inner = jnp.broadcast_to(jnp.asarray(b), grid.shape + (3,))
    got = compose_displacements(outer, inner, grid)
    np.testing.assert_allclose(np.asarray(got), np.broadcast_to(a + b, got.shape), atol=1e-12)


def test_compose_rejects_mismatched_field():
    grid = Grid.regular((4, 5))
    with pytest.raises(ValueError, match="inner"):
        compose_displacements(jnp.zeros((4, 5, 2)), jnp.zeros((5, 4, 2)), grid)


@pytest.mark.parametrize("shape", [(8, 9), (5, 6, 5)])
def test_gwi_matches_brute_force(shape):
    rng = np.random.default_rng(1)
    grid = _oblique_grid(shape)
    true_disp = _smooth_fields(rng, 3, shape, amplitude=2.0)
    est_disp = _smooth_fields(rng, 3, shape, amplitude=2.0)
    foreground = _ellipse_mask(shape)
    expected = _np_gwi(true_disp, est_disp, grid, foreground)
    got = gwi_per_image(jnp.asarray(true_disp), jnp.asarray(est_disp), grid,
                        jnp.asarray(foreground))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-10)
    total = jax.jit(gwi, static_argnums=2)(jnp.asarray(true_disp), jnp.asarray(est_disp), grid,
                                           jnp.asarray(foreground))
    np.testing.assert_allclose(float(total), expected.mean(), rtol=1e-10)


def test_gwi_zero_for_exact_inverse_and_common_residual():
    shape = (10, 12)
    grid = _oblique_grid(shape)
    rng = np.random.default_rng(2)
    t = rng.uniform(-3, 3, size=(4, 2))
    true_disp = jnp.broadcast_to(jnp.asarray(t)[:, None, None, :], (4,) + shape + (2,))
    foreground = jnp.asarray(_ellipse_mask(shape))
    assert float(gwi(true_disp, -true_disp, grid, foreground)) == pytest.approx(0.0, abs=1e-12)
    # A common non-constant residual s(x) is a valid choice of common space: gWI stays zero.
    common = jnp.asarray(_smooth_fields(rng, 1, shape, amplitude=1.5))
    est = common - true_disp
    assert float(gwi(true_disp, est, grid, foreground)) == pytest.approx(0.0, abs=1e-12)
    # No estimate at all: the residual of image j is the constant t_j - mean(t).
    expected = np.linalg.norm(t - t.mean(0), axis=1)
    got = gwi_per_image(true_disp, jnp.zeros_like(true_disp), grid, foreground)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12)


def test_gwi_float32():
    shape = (6, 7)
    grid = _oblique_grid(shape)
    rng = np.random.default_rng(3)
    true_disp = _smooth_fields(rng, 2, shape, amplitude=1.0)
    est_disp = _smooth_fields(rng, 2, shape, amplitude=1.0)
    foreground = _ellipse_mask(shape)
    got = gwi(jnp.asarray(true_disp, jnp.float32), jnp.asarray(est_disp, jnp.float32), grid,
              jnp.asarray(foreground))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), _np_gwi(true_disp, est_disp, grid, foreground).mean(),
                               rtol=1e-4)


def test_gre_translations():
    grid = _oblique_grid((5, 6, 4))
    corners = grid.corners()
    common = corners + np.array([3.0, -1.0, 2.0])
    assert float(gre(jnp.asarray(np.stack([common] * 3)))) == pytest.approx(0.0, abs=1e-12)
    t = np.array([[1.0, 2.0, -2.0], [0.0, -3.0, 4.0], [5.0, 1.0, 1.0]])
    composed = corners[None] + t[:, None]
    expected = np.mean(np.linalg.norm(t - t.mean(0), axis=1))
    assert float(gre(jnp.asarray(composed))) == pytest.approx(expected, rel=1e-12)
    # Same through displacement fields: psi_j = x + t_j, no estimate.
    fields = jnp.broadcast_to(jnp.asarray(t)[:, None, None, None, :], (3,) + grid.shape + (3,))
    got = gre_from_displacements(fields, jnp.zeros_like(fields), grid)
    assert float(got) == pytest.approx(expected, rel=1e-12)
    assert float(gre_from_displacements(fields, -fields, grid)) == pytest.approx(0.0, abs=1e-12)


def test_gre_from_displacements_matches_composition_at_corners():
    shape = (6, 5, 4)
    grid = _oblique_grid(shape)
    rng = np.random.default_rng(4)
    true_disp = _smooth_fields(rng, 3, shape, amplitude=2.0)
    est_disp = _smooth_fields(rng, 3, shape, amplitude=2.0)
    corner_idx = [(i, j, k) for i in (0, 5) for j in (0, 4) for k in (0, 3)]
    x = _np_world_points(grid)
    composed = np.stack([
        [x[c] + _np_compose(true_disp[j], est_disp[j], grid)[c] for c in corner_idx]
        for j in range(3)
    ])
    ebar = composed - composed.mean(0)
    expected = np.mean(np.sqrt(np.mean(np.sum(ebar**2, -1), 1)))
    got = gre_from_displacements(jnp.asarray(true_disp), jnp.asarray(est_disp), grid)
    assert float(got) == pytest.approx(expected, rel=1e-10)


def _np_pair_dice(labels, select):
    values = []
    for j, k in itertools.combinations(range(len(labels)), 2):
        a, b = select(labels[j], labels[k])
        if a.sum() + b.sum() > 0:
            values.append(2 * np.sum(a & b) / (a.sum() + b.sum()))
    return np.mean(values) if values else np.nan


def test_pairwise_dice_matches_numpy():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, size=(4, 9, 8, 3))
    fg = _np_pair_dice(labels, lambda a, b: (a > 0, b > 0))
    assert float(pairwise_dice(jnp.asarray(labels))) == pytest.approx(fg, rel=1e-12)
    # Pooled over classes: a voxel counts when both maps carry the same foreground label.
    pooled = []
    for j, k in itertools.combinations(range(4), 2):
        a, b = labels[j], labels[k]
        pooled.append(2 * np.sum((a == b) & (a > 0)) / (np.sum(a > 0) + np.sum(b > 0)))
    got = pairwise_dice(jnp.asarray(labels), match_labels=True)
    assert float(got) == pytest.approx(np.mean(pooled), rel=1e-12)
    assert float(pairwise_dice(jnp.asarray(np.stack([labels[0]] * 3)))) == 1.0


def test_pairwise_dice_per_class_matches_numpy_and_skips_absent():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 3, size=(3, 10, 7))
    labels[0][labels[0] == 2] = 1  # class 2 absent from image 0 only
    labels[1, :2, :2] = 4  # class 4 only in image 1; class 3 absent everywhere
    expected = [_np_pair_dice(labels, lambda a, b, k=k: (a == k, b == k)) for k in range(1, 5)]
    got = jax.jit(pairwise_dice_per_class, static_argnums=1)(jnp.asarray(labels), 5)
    assert got.shape == (4,)
    assert np.isnan(expected[2]) and np.isnan(float(got[2]))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="labels"):
        pairwise_dice(jnp.zeros((1, 4, 4), jnp.int32))


@pytest.mark.parametrize("shape", [(7, 8), (5, 6, 4)])
def test_jacobian_stats_of_affine_field(shape):
    grid = _oblique_grid(shape)
    d = len(shape)
    rng = np.random.default_rng(7)
    x = _np_world_points(grid)
    maps = [np.eye(d) + rng.uniform(-0.2, 0.2, (d, d)), np.diag([-1.0] + [1.0] * (d - 1))]
    fields = np.stack([x @ (a - np.eye(d)).T + 1.0 for a in maps])
    stats = jacobian_stats(jnp.asarray(fields), grid)
    dets = [np.linalg.det(a) for a in maps]
    assert float(stats["min"]) == pytest.approx(min(dets), rel=1e-10)
    assert float(stats["max"]) == pytest.approx(max(dets), rel=1e-10)
    assert float(stats["mean"]) == pytest.approx(np.mean(dets), rel=1e-10)
    assert float(stats["std"]) == pytest.approx(np.std(dets), rel=1e-10)
    assert float(stats["folding"]) == pytest.approx(0.5)


def test_jacobian_stats_matches_numpy_gradient_with_mask():
    shape = (9, 10)
    grid = _oblique_grid(shape)
    rng = np.random.default_rng(8)
    fields = _smooth_fields(rng, 2, shape, amplitude=2.0)
    mask = _ellipse_mask(shape)
    inv = np.linalg.inv(grid.matrix[:2, :2])
    dets = []
    for u in fields:
        du_di = np.stack(np.gradient(u, axis=(0, 1)), -1)
        dets.append(np.linalg.det(np.eye(2) + du_di @ inv)[mask])
    dets = np.concatenate(dets)
    stats = jax.jit(jacobian_stats, static_argnums=1)(jnp.asarray(fields), grid, jnp.asarray(mask))
    np.testing.assert_allclose(
        [float(stats[k]) for k in ("min", "max", "mean", "std", "folding")],
        [dets.min(), dets.max(), dets.mean(), dets.std(), np.mean(dets <= 0)], rtol=1e-10)
