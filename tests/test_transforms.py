"""Tests of xjax.transforms against float64 numpy references, analytic answers and invariants."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xjax.grid import Grid
from xjax.transforms import (
    Affine,
    BSplineFFD,
    DenseDisplacement,
    Rigid,
    StationaryVelocity,
    Translation,
    chain_displacement,
    compose_points,
    ffd_levels,
)


# ---- independent numpy references ----------------------------------------------------------------
def axis_rotation(axis, angle):
    """Rotation by ``angle`` about the unit vector ``axis`` (Rodrigues' formula), float64."""
    k = np.asarray(axis, np.float64)
    k = k / np.linalg.norm(k)
    skew = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * skew + (1 - np.cos(angle)) * skew @ skew


def rotation_np(angles):
    if len(angles) == 1:
        return axis_rotation([0, 0, 1], angles[0])[:2, :2]
    rx, ry, rz = (axis_rotation(np.eye(3)[a], angles[a]) for a in range(3))
    return rz @ ry @ rx


def oblique_grid(shape, spacing, rotation, origin):
    d = len(shape)
    a = np.eye(d + 1)
    a[:d, :d] = rotation @ np.diag(spacing)
    a[:d, d] = origin
    return Grid(shape, a)


GRIDS = {
    2: oblique_grid((10, 8), (1.5, 2.0), rotation_np([0.3]), (4.0, -3.0)),
    3: oblique_grid((7, 6, 5), (1.0, 1.5, 2.0), axis_rotation([1, 2, 3], 0.4), (2.0, -1.0, 3.0)),
}

SPECS = {
    "translation": Translation(),
    "rigid": Rigid(),
    "affine": Affine(),
    "ffd": BSplineFFD(5.0),
    "dense": DenseDisplacement(),
    "svf": StationaryVelocity(4),
}


def world_np(grid):
    """Voxel-centre world coordinates in float64 numpy, ``(*shape, D)``."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in grid.shape], indexing="ij"), -1)
    return grid.index_to_world_np(idx.astype(np.float64))


def to_index_np(grid, points):
    inv = np.linalg.inv(grid.matrix)
    d = grid.ndim
    return points @ inv[:d, :d].T + inv[:d, d]


def tent_interpolate(field, idx):
    """Multilinear interpolation as a sum of tent kernels over every voxel, border-clamped:
    ``field`` ``(*spatial, C)`` at continuous indices ``idx`` ``(..., D)``."""
    d = idx.shape[-1]
    flat = np.clip(idx.reshape(-1, d), 0, np.asarray(field.shape[:d]) - 1)
    tents = [np.maximum(0.0, 1 - np.abs(flat[:, a, None] - np.arange(field.shape[a])))
             for a in range(d)]
    out = tents[0] @ field.reshape(field.shape[0], -1)
    for a in range(1, d):
        out = np.einsum("pi,pir->pr", tents[a], out.reshape(len(flat), field.shape[a], -1))
    return out.reshape(idx.shape[:-1] + field.shape[d:])


def beta3(t):
    a = np.abs(t)
    return np.where(a < 1, (4 - 6 * a**2 + 3 * a**3) / 6, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def ffd_brute_force(mesh, coefficients, points):
    """Cubic B-spline tensor product summed over every control point, float64."""
    t = to_index_np(mesh, points)
    out = np.zeros(points.shape)
    for k in np.ndindex(mesh.shape):
        out += np.prod(beta3(t - np.asarray(k)), axis=-1)[..., None] * coefficients[k]
    return out


def random_params(spec, seed, scale=1.0, dtype=np.float32):
    """Random parameters, each leaf ~ N(0, (2 * scale * lr_scale)^2)."""
    rng = np.random.default_rng(seed)
    lr = spec.lr_scale()
    return {k: jnp.asarray(rng.normal(size=v.shape) * 2 * scale * lr[k], dtype)
            for k, v in spec.identity().items()}


def to_np(params):
    return {k: np.asarray(v, np.float64) for k, v in params.items()}


# Jitted entry points (specs and grids are static): one compilation per case instead of one per
# primitive in eager mode keeps the file fast.
displacement = jax.jit(lambda spec, p, grid: spec.displacement(p, grid), static_argnums=(0, 2))
map_points = jax.jit(lambda spec, p, x: spec.map_points(p, x), static_argnums=0)
regularizer = jax.jit(lambda spec, p: spec.regularizer(p), static_argnums=0)


# ---- the common interface ------------------------------------------------------------------------
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("name", list(SPECS))
def test_identity_params_give_zero_displacement(name, d):
    grid = GRIDS[d]
    levels = (grid, grid.downsample(4))
    spec = SPECS[name].bind(grid)
    ident = spec.identity()
    chex.assert_type(list(ident.values()), jnp.float32)
    pts = jnp.asarray(np.random.default_rng(0).normal(size=(5, d)) * 10, jnp.float32)

    @jax.jit
    def evaluate(p):
        return ([spec.displacement(p, level) for level in levels], spec.map_points(p, pts),
                spec.regularizer(p))

    fields, mapped, energy = evaluate(ident)
    for level, u in zip(levels, fields):
        chex.assert_shape(u, level.shape + (d,))
        np.testing.assert_array_equal(np.asarray(u), 0.0)
    np.testing.assert_allclose(mapped, pts, atol=1e-5)
    assert float(energy) == 0.0


@pytest.mark.parametrize("name", list(SPECS))
def test_bind_is_idempotent_hashable_and_required(name):
    spec = SPECS[name]
    grid = GRIDS[3]
    bound = spec.bind(grid)
    assert bound.bind(grid) == bound and hash(bound.bind(grid)) == hash(bound)
    assert bound != spec and bound.bind(GRIDS[2]) != bound
    expected_lr = {"translation": {"translation": 1.0},
                   "rigid": {"angles": 0.01, "translation": 1.0},
                   "affine": {"matrix": 0.01, "translation": 1.0},
                   "ffd": {"coefficients": 1.0}, "dense": {"displacement": 1.0},
                   "svf": {"velocity": 1.0}}[name]
    assert bound.lr_scale() == expected_lr and set(bound.identity()) == set(expected_lr)
    assert all(type(v) is float for v in bound.lr_scale().values())
    with pytest.raises(ValueError, match="not bound"):
        spec.identity()
    with pytest.raises(ValueError, match="points of shape"):
        map_points(bound, bound.identity(), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="3D"):
        displacement(bound, bound.identity(), GRIDS[2])


def test_invalid_knobs_raise():
    for bad in (0.0, -3.0, (10.0, -1.0), float("nan")):
        with pytest.raises(ValueError, match="spacing"):
            BSplineFFD(bad)
    with pytest.raises(ValueError, match="spacing"):
        BSplineFFD((10.0, 10.0)).bind(GRIDS[3])
    with pytest.raises(ValueError, match="steps"):
        StationaryVelocity(-1)
    with pytest.raises(ValueError, match="at least one"):
        ffd_levels(())
    assert [f.spacing for f in ffd_levels((40, 20, 10))] == [40.0, 20.0, 10.0]


# ---- linear transforms ---------------------------------------------------------------------------
@pytest.mark.parametrize("d", [2, 3])
def test_translation_rigid_affine_match_numpy(d):
    grid = GRIDS[d]
    rng = np.random.default_rng(d)
    c = world_np(grid).reshape(-1, d).mean(0)  # the grid centre, computed independently
    pts = rng.normal(size=(6, d)) * 20
    t = rng.normal(size=d) * 3
    angles = rng.normal(size=1 if d == 2 else 3) * 0.3
    m = rng.normal(size=(d, d)) * 0.1
    expected = {
        "translation": lambda x: x + t,
        "rigid": lambda x: (x - c) @ rotation_np(angles).T + c + t,
        "affine": lambda x: (x - c) @ (np.eye(d) + m).T + c + t,
    }
    angle_key = "angle" if d == 2 else "angles"
    params = {
        "translation": {"translation": t},
        "rigid": {angle_key: angles, "translation": t},
        "affine": {"matrix": m, "translation": t},
    }
    for name, phi in expected.items():
        spec = SPECS[name].bind(grid)
        p = {k: jnp.asarray(v, jnp.float32) for k, v in params[name].items()}
        np.testing.assert_allclose(map_points(spec, p, jnp.asarray(pts, jnp.float32)), phi(pts),
                                   atol=2e-4)
        for level in (grid, grid.downsample(2)):
            x = world_np(level)
            np.testing.assert_allclose(displacement(spec, p, level), phi(x) - x, atol=2e-4)


# ---- B-spline FFD --------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [2, 3])
def test_ffd_mesh_geometry(d):
    grid = GRIDS[d]
    delta = (4.0, 5.0, 7.0)[:d]
    mesh = BSplineFFD(delta).bind(grid).mesh
    np.testing.assert_allclose(mesh.spacing, delta)
    # Aligned with the grid's axes and centred on its field of view.
    np.testing.assert_allclose(mesh.matrix[:d, :d] / mesh.spacing,
                               grid.matrix[:d, :d] / grid.spacing)
    np.testing.assert_allclose(mesh.center, grid.center, atol=1e-9)
    # Every voxel-edge corner has full 4**D support, with the fewest intervals that achieve it.
    edges = np.stack(np.meshgrid(*[[-0.5, s - 0.5] for s in grid.shape], indexing="ij"), -1)
    t = to_index_np(mesh, grid.index_to_world_np(edges.reshape(-1, d)))
    assert np.all(t >= 1 - 1e-9) and np.all(t <= np.asarray(mesh.shape) - 2 + 1e-9)
    extent = np.asarray(grid.shape) * grid.spacing
    np.testing.assert_array_equal(np.asarray(mesh.shape) - 3, np.ceil(extent / delta))


@pytest.mark.parametrize("d", [2, 3])
def test_ffd_separable_matches_gather_and_brute_force(d, x64):
    grid = GRIDS[d]
    spec = BSplineFFD(4.0).bind(grid)
    params = random_params(spec, 1, dtype=np.float64)
    coefficients = to_np(params)["coefficients"]
    levels = (grid, grid.downsample(2), grid.downsample(4))
    centres = [world_np(level) for level in levels]
    # Random points inside the support, away from voxel centres, share the one map_points call.
    t = np.random.default_rng(2).uniform(1, np.asarray(spec.mesh.shape) - 2, size=(50, d))
    pts = np.concatenate([x.reshape(-1, d) for x in centres] + [spec.mesh.index_to_world_np(t)])
    mapped = np.asarray(map_points(spec, params, jnp.asarray(pts))) - pts
    reference = ffd_brute_force(spec.mesh, coefficients, pts)
    np.testing.assert_allclose(mapped[-50:], reference[-50:], atol=1e-10)
    start = 0
    for level, x in zip(levels, centres):
        u = np.asarray(displacement(spec, params, level))
        stop = start + level.size
        np.testing.assert_allclose(u.reshape(-1, d), mapped[start:stop], atol=1e-10)
        inside = np.all((to_index_np(spec.mesh, x) >= 1)
                        & (to_index_np(spec.mesh, x) <= np.asarray(spec.mesh.shape) - 2), axis=-1)
        assert inside.any()
        np.testing.assert_allclose(u[inside], reference[start:stop].reshape(u.shape)[inside],
                                   atol=1e-10)
        start = stop


def test_ffd_outside_support_is_clamped(x64):
    grid = GRIDS[2]
    spec = BSplineFFD(4.0).bind(grid)
    params = random_params(spec, 3, dtype=np.float64)
    upper = np.asarray(spec.mesh.shape) - 2.0
    t = np.array([[-5.0, 2.5], [3.3, 40.0], [-2.0, -7.0], [upper[0] + 0.4, 1.7]])
    pts = spec.mesh.index_to_world_np(t)
    nearest = spec.mesh.index_to_world_np(np.clip(t, 1, upper))
    np.testing.assert_allclose(
        np.asarray(map_points(spec, params, jnp.asarray(pts))) - pts,
        ffd_brute_force(spec.mesh, to_np(params)["coefficients"], nearest), atol=1e-10)


@pytest.mark.parametrize("d", [2, 3])
def test_ffd_constant_coefficients_translate(d):
    grid = GRIDS[d]
    spec = BSplineFFD(5.0).bind(grid)
    shift = np.array([1.5, -2.0, 0.75])[:d]
    params = {"coefficients": jnp.broadcast_to(jnp.asarray(shift, jnp.float32),
                                               spec.mesh.shape + (d,))}
    for level in (grid, grid.downsample(2), grid.downsample(8)):
        np.testing.assert_allclose(displacement(spec, params, level),
                                   np.broadcast_to(shift, level.shape + (d,)), atol=1e-5)
    pts = np.random.default_rng(4).normal(size=(20, d)) * 30  # partly far outside the mesh
    np.testing.assert_allclose(map_points(spec, params, jnp.asarray(pts, jnp.float32)), pts + shift,
                               atol=1e-4)


# ---- dense displacement and SVF ------------------------------------------------------------------
@pytest.mark.parametrize("d", [2, 3])
def test_dense_resampling_matches_numpy(d, x64):
    grid = GRIDS[d]
    spec = DenseDisplacement().bind(grid)
    params = random_params(spec, 5, dtype=np.float64)
    field = to_np(params)["displacement"]
    np.testing.assert_array_equal(displacement(spec, params, grid), field)
    for level in (grid.downsample(2), grid.downsample(4)):
        x = world_np(level)
        expected = tent_interpolate(field, to_index_np(grid, x))
        np.testing.assert_allclose(displacement(spec, params, level), expected, atol=1e-12)
        np.testing.assert_allclose(np.asarray(map_points(spec, params, jnp.asarray(x))) - x,
                                   expected, atol=1e-12)


@pytest.mark.parametrize("d", [2, 3])
def test_svf_constant_velocity_is_translation(d):
    grid = GRIDS[d]
    spec = StationaryVelocity().bind(grid)
    v = np.array([1.2, -0.7, 2.1])[:d]
    params = {"velocity": jnp.broadcast_to(jnp.asarray(v, jnp.float32), grid.shape + (d,))}
    for level in (grid, grid.downsample(2)):
        u = np.asarray(displacement(spec, params, level))
        interior = (slice(2, -2),) * d
        np.testing.assert_allclose(u[interior], np.broadcast_to(v, u.shape)[interior], atol=1e-5)
    pts = grid.index_to_world_np(np.random.default_rng(6).uniform(2, np.asarray(grid.shape) - 3,
                                                                  size=(10, d)))
    np.testing.assert_allclose(map_points(spec, params, jnp.asarray(pts, jnp.float32)), pts + v,
                               atol=1e-4)


def test_svf_matches_ode_solution(x64):
    grid = oblique_grid((28, 24), (1.0, 1.25), rotation_np([-0.2]), (3.0, 1.0))
    spec = StationaryVelocity(8).bind(grid)
    x = world_np(grid)
    i = grid.index_points(np.float64)
    phase = 2 * np.pi * np.asarray(i) / np.asarray(grid.shape)
    velocity = 1.5 * np.stack([np.sin(phase[..., 0]) * np.cos(phase[..., 1]),
                               np.cos(0.5 * phase[..., 0] + 0.3) * np.sin(phase[..., 1])], -1)

    def v_at(p):
        return tent_interpolate(velocity, to_index_np(grid, p))

    y, n = x.copy(), 50  # RK4 of dx/dt = v(x) on t in [0, 1]
    for _ in range(n):
        k1 = v_at(y)
        k2 = v_at(y + 0.5 / n * k1)
        k3 = v_at(y + 0.5 / n * k2)
        k4 = v_at(y + 1.0 / n * k3)
        y = y + (k1 + 2 * k2 + 2 * k3 + k4) / (6 * n)
    u = np.asarray(displacement(spec, {"velocity": jnp.asarray(velocity)}, grid))
    interior = (slice(4, -4),) * 2
    err = np.abs(u - (y - x))[interior]
    assert np.abs(y - x)[interior].max() > 1.0  # a displacement worth the name
    assert err.max() < 0.02, err.max()
    # and map_points reads that displacement at the voxel centres
    np.testing.assert_allclose(np.asarray(map_points(spec, {"velocity": jnp.asarray(velocity)},
                                                          jnp.asarray(x))) - x, u, atol=1e-12)


# ---- group centring (Eq. 37) ---------------------------------------------------------------------
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("name", list(SPECS))
def test_center_projects_onto_zero_group_mean(name, d):
    grid = GRIDS[d]
    spec = SPECS[name].bind(grid)
    group = jax.tree.map(lambda *a: jnp.stack(a), *[random_params(spec, s) for s in range(3)])

    @jax.jit
    def centre(g):
        c = spec.center(g)
        return c, jnp.mean(jax.vmap(lambda p: spec.displacement(p, grid))(c), 0)

    centred, mean_u = jax.tree.map(np.asarray, centre(group))
    for k in group:
        np.testing.assert_allclose(centred[k].mean(0), 0.0, atol=1e-6)
        # a projection: relative parameters unchanged
        np.testing.assert_allclose(centred[k] - centred[k][:1], group[k] - group[k][:1], atol=1e-5)
    if name in ("translation", "affine", "ffd", "dense"):  # exact
        np.testing.assert_allclose(mean_u, 0.0, atol=1e-5)
    elif name == "rigid":  # second order in the angles
        key = "angle" if d == 2 else "angles"
        theta = np.abs(centred[key]).sum(-1).max()
        radius = np.linalg.norm(world_np(grid) - grid.center, axis=-1).max()
        assert np.linalg.norm(mean_u, axis=-1).max() <= theta**2 * radius


# ---- chains --------------------------------------------------------------------------------------
def test_chain_order_translation_and_rigid():
    grid = GRIDS[2]
    c = grid.center
    trans, rigid = Translation().bind(grid), Rigid().bind(grid)
    t1 = np.array([3.0, -1.0])
    r = {"angle": np.array([0.4]), "translation": np.array([0.5, 2.0])}
    pt = {"translation": jnp.asarray(t1, jnp.float32)}
    pr = {k: jnp.asarray(v, jnp.float32) for k, v in r.items()}
    rot = rotation_np(r["angle"])

    def rigid_np(x):
        return (x - c) @ rot.T + c + r["translation"]

    x = world_np(grid)
    pts = jnp.asarray(x, jnp.float32)
    # Translation listed first acts last: phi = T o R.
    np.testing.assert_allclose(compose_points([(trans, pt), (rigid, pr)], pts), rigid_np(x) + t1,
                               atol=1e-4)
    np.testing.assert_allclose(compose_points([(rigid, pr), (trans, pt)], pts), rigid_np(x + t1),
                               atol=1e-4)
    assert np.abs(rigid_np(x) + t1 - rigid_np(x + t1)).max() > 1.0  # the two orders differ
    np.testing.assert_allclose(chain_displacement([(rigid, pr)], trans, pt, grid),
                               rigid_np(x + t1) - x, atol=1e-4)
    np.testing.assert_allclose(chain_displacement([], rigid, pr, grid), rigid_np(x) - x, atol=1e-4)
    np.testing.assert_array_equal(compose_points([], pts), pts)


def test_chain_displacement_of_multilevel_ffd_matches_compose_points():
    grid = GRIDS[2]
    rigid = Rigid().bind(grid)
    coarse, fine = (f.bind(grid) for f in ffd_levels((8.0, 4.0)))
    frozen = [(rigid, random_params(rigid, 7, scale=5.0)), (coarse, random_params(coarse, 8))]
    p = random_params(fine, 9)
    specs = [spec for spec, _ in frozen]
    level = grid.downsample(2)
    x = jnp.asarray(world_np(level), jnp.float32)

    @jax.jit
    def both(frozen_params, q):
        stages = list(zip(specs, frozen_params))
        return (chain_displacement(stages, fine, q, level),
                compose_points(stages + [(fine, q)], x) - x)

    chained, composed = both([fp for _, fp in frozen], p)
    np.testing.assert_allclose(chained, composed, atol=2e-4)


# ---- jit and gradients ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SPECS))
def test_jit_matches_eager(name):
    grid = GRIDS[2]
    spec = SPECS[name].bind(grid)
    p = random_params(spec, 10)
    level = grid.downsample(2)
    jitted = jax.jit(lambda s, q: s.displacement(q, level), static_argnums=0)
    x = jnp.asarray(world_np(level), jnp.float32)
    chex.assert_trees_all_close((jitted(spec, p), jax.jit(spec.map_points)(p, x)),
                                (spec.displacement(p, level), spec.map_points(p, x)), rtol=1e-7, atol=1e-5)


@pytest.mark.parametrize("name", list(SPECS))
def test_gradients_match_finite_differences(name, x64):
    grid = GRIDS[3] if name == "rigid" else GRIDS[2]
    spec = SPECS[name].bind(grid)
    level = grid.downsample(2)
    rng = np.random.default_rng(12)
    p = random_params(spec, 13, dtype=np.float64)
    direction = {k: jnp.asarray(rng.normal(size=v.shape)) for k, v in p.items()}
    w = jnp.asarray(rng.normal(size=level.shape + (grid.ndim,)))
    pts = jnp.asarray(world_np(grid).reshape(-1, grid.ndim)[::3] + rng.normal(size=(1, grid.ndim)))
    w_pts = jnp.asarray(rng.normal(size=pts.shape))
    eps = 1e-6
    loss = jax.jit(lambda q: jnp.sum(w * spec.displacement(q, level))
                   + jnp.sum(w_pts * spec.map_points(q, pts)) + 0.1 * spec.regularizer(q))
    grad = jax.jit(jax.grad(loss))(p)
    analytic = sum(jnp.vdot(grad[k], direction[k]) for k in p)
    numeric = (loss({k: p[k] + eps * direction[k] for k in p})
               - loss({k: p[k] - eps * direction[k] for k in p})) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)
