import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from xjax import phantoms
from xjax.evaluate import gwi
from xjax.grid import Grid
from xjax.phantoms import (
    MisalignedGroup,
    make_phantom,
    misaligned_group,
    random_ffd,
    random_rigid,
    warp,
)


def _world_points(grid):
    idx = np.moveaxis(np.indices(grid.shape), 0, -1).astype(float)
    return grid.index_to_world_np(idx)


def _np_rotation(angles):
    if len(angles) == 1:
        c, s = np.cos(angles[0]), np.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _np_jacobian_determinant(u, grid):
    d = grid.ndim
    du_di = np.stack(np.gradient(np.asarray(u, np.float64), axis=tuple(range(d))), -1)
    return np.linalg.det(np.eye(d) + du_di @ np.linalg.inv(grid.matrix[:d, :d]))


@pytest.mark.parametrize("shape, n, k", [((32, 40), 3, 4), ((16, 20, 12), 5, 6)])
def test_phantom_shapes_and_dtypes(shape, n, k):
    ph = make_phantom(jax.random.key(0), shape, num_modalities=n, num_classes=k, spacing=1.5)
    chex.assert_shape([ph.images, ph.labels, ph.intensity_table], [(n,) + shape, shape, (n, k)])
    chex.assert_type([ph.images, ph.labels, ph.intensity_table], [jnp.float32, jnp.int32, jnp.float32])
    assert ph.grid.shape == shape
    np.testing.assert_allclose(ph.grid.spacing, 1.5)
    np.testing.assert_allclose(ph.grid.center, 0.0, atol=1e-12)


def test_phantom_is_a_function_of_the_key():
    a = make_phantom(jax.random.key(3), (24, 20))
    b = make_phantom(jax.random.key(3), (24, 20))
    c = make_phantom(jax.random.key(4), (24, 20))
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    np.testing.assert_array_equal(np.asarray(a.labels), np.asarray(b.labels))
    assert not np.array_equal(np.asarray(a.images), np.asarray(c.images))
    assert not np.array_equal(np.asarray(a.labels), np.asarray(c.labels))
    legacy = make_phantom(jax.random.PRNGKey(3), (24, 20))
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(legacy.images))


@pytest.mark.parametrize("shape", [(48, 56), (32, 32, 28)])
@pytest.mark.parametrize("num_classes", [2, 3, 4, 8])
def test_labels_contain_every_class_in_nested_layers(shape, num_classes):
    for seed in range(3):
        labels = np.asarray(make_phantom(jax.random.key(seed), shape, num_classes=num_classes,
                                         num_modalities=1).labels)
        np.testing.assert_array_equal(np.unique(labels), np.arange(num_classes))
        # Layers are nested: the background never touches grey or white matter (or blobs), the
        # border of the field of view is background.
        for axis in range(len(shape)):
            a = np.moveaxis(labels, axis, 0)
            pairs = np.stack([a[:-1], a[1:]])
            assert not np.any((pairs.min(0) == 0) & (pairs.max(0) >= 2))
            assert np.all(a[0] == 0) and np.all(a[-1] == 0)


def _monotone(x, y):
    order = np.argsort(x)
    steps = np.diff(y[order])
    return np.all(steps >= 0) or np.all(steps <= 0)


def test_intensity_tables_are_not_monotone_related():
    ph = make_phantom(jax.random.key(1), (24, 24), num_modalities=5, num_classes=6)
    table = np.asarray(ph.intensity_table)
    for m, m2 in itertools.combinations(range(3), 2):
        assert not _monotone(table[m], table[m2]), (m, m2)
    np.testing.assert_array_equal(table[:, 0], 0.0)
    for row in table[3:]:  # further modalities: distinct levels over the foreground classes
        assert len(np.unique(row[1:])) == 5


def test_appearance_without_bias_noise_blur_is_the_table():
    ph = make_phantom(jax.random.key(2), (30, 26), bias=0.0, noise=0.0, smooth=0.0)
    expected = np.asarray(ph.intensity_table)[:, np.asarray(ph.labels)]
    np.testing.assert_allclose(np.asarray(ph.images), expected, rtol=1e-6)


def test_partial_volume_blur_matches_scipy():
    ph = make_phantom(jax.random.key(2), (30, 26, 20), bias=0.0, noise=0.0, smooth=0.6)
    table = np.asarray(ph.intensity_table, np.float64)
    crisp = table[:, np.asarray(ph.labels)]
    expected = ndimage.gaussian_filter(crisp, sigma=(0, 0.6, 0.6, 0.6), mode="nearest",
                                       truncate=3.0)
    np.testing.assert_allclose(np.asarray(ph.images), expected, atol=1e-6)


def test_bias_field_and_noise_levels():
    shape = (96, 96)
    ph = make_phantom(jax.random.key(5), shape, bias=0.3, noise=0.0, smooth=0.0)
    labels = np.asarray(ph.labels)
    crisp = np.asarray(ph.intensity_table)[:, labels]
    ratio = np.asarray(ph.images)[:, labels > 0] / crisp[:, labels > 0]
    assert np.all(ratio >= 0.7 - 1e-6) and np.all(ratio <= 1.3 + 1e-6)
    assert np.all(ratio.max(1) - ratio.min(1) > 0.05)  # a real, non-constant field per modality
    noisy = make_phantom(jax.random.key(5), shape, bias=0.0, noise=0.05, smooth=0.0)
    residual = np.asarray(noisy.images) - crisp
    table = np.asarray(noisy.intensity_table)
    np.testing.assert_allclose(residual.std(axis=(1, 2)), 0.05 * np.ptp(table, axis=1), rtol=0.05)
    assert abs(np.corrcoef(residual[0].ravel(), residual[1].ravel())[0, 1]) < 0.05


def test_render_mixes_class_probabilities_through_the_table():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=(20, 18))  # (20, 18, 4)
    table = np.array([[0.0, 0.3, 0.6, 0.9], [0.0, 0.9, 0.5, 0.2]])
    clean = phantoms.render(jax.random.key(1), probs, table, bias=0.0, noise=0.0)
    expected = np.einsum("xyk,nk->nxy", probs, table)  # partial-volume mixture, per modality
    np.testing.assert_allclose(clean, expected, atol=1e-6)
    biased = phantoms.render(jax.random.key(1), probs, table, bias=0.3, noise=0.0)
    ratio = biased[:, expected[0] > 0.2] / expected[:, expected[0] > 0.2]
    assert np.all(np.abs(ratio - 1) <= 0.3 + 1e-6) and np.all(np.ptp(ratio, axis=1) > 0.05)
    np.testing.assert_array_equal(biased, phantoms.render(jax.random.key(1), probs, table, bias=0.3,
                                                          noise=0.0))  # a function of the key
    default = phantoms.render(jax.random.key(1), probs, noise=0.0, bias=0.0)
    np.testing.assert_allclose(default, np.einsum("xyk,nk->nxy", probs, phantoms.TISSUE_TABLE),
                               atol=1e-6)
    with pytest.raises(ValueError, match="table"):
        phantoms.render(jax.random.key(1), probs, table[:, :3])
    with pytest.raises(ValueError, match="bias"):
        phantoms.render(jax.random.key(1), probs, table, bias=1.5)


@pytest.mark.parametrize("bad", [dict(shape=(32,)), dict(shape=(4, 32)), dict(num_classes=13),
                                 dict(num_classes=1), dict(bias=1.0), dict(noise=-0.1),
                                 dict(num_modalities=0), dict(smooth=-1.0)])
def test_make_phantom_rejects_bad_input(bad):
    args = dict(shape=(32, 32)) | bad
    shape = args.pop("shape")
    with pytest.raises(ValueError, match=next(iter(bad))):
        make_phantom(jax.random.key(0), shape, **args)


@pytest.mark.parametrize("ndim", [2, 3])
def test_random_rigid_matches_rotation_formula(ndim):
    shape = (12, 10, 8)[:ndim]
    grid = Grid.regular(shape, spacing=(1.5, 2.0, 0.8)[:ndim], origin=(5.0, -3.0, 2.0)[:ndim])
    angles, shifts, disp = random_rigid(jax.random.key(7), grid, 4, max_angle_deg=10.0,
                                        max_shift_mm=5.0)
    angles, shifts = np.asarray(angles, np.float64), np.asarray(shifts, np.float64)
    chex.assert_shape([angles, shifts, disp],
                      [(4, 1 if ndim == 2 else 3), (4, ndim), (4,) + shape + (ndim,)])
    assert np.all(np.abs(angles) <= np.deg2rad(10.0)) and np.all(np.abs(shifts) <= 5.0)
    assert np.ptp(angles) > 0 and np.ptp(shifts) > 0
    x = _world_points(grid)
    c = (x.reshape(-1, ndim).min(0) + x.reshape(-1, ndim).max(0)) / 2
    for j in range(4):
        r = _np_rotation(angles[j])
        expected = (x - c) @ r.T + c + shifts[j] - x
        np.testing.assert_allclose(np.asarray(disp[j]), expected, atol=1e-4)


@pytest.mark.parametrize("shape, spacing, magnitude", [
    ((40, 36), 16.0, 4.0),
    ((40, 36), 10.0, 3.8),
    ((24, 20, 16), (24.0, 8.0), (4.5, 1.5)),
])
def test_random_ffd_is_bounded_and_diffeomorphic(shape, spacing, magnitude):
    grid = Grid.regular(shape, spacing=1.0)
    fields = np.asarray(random_ffd(jax.random.key(11), grid, 4, spacing=spacing,
                                   magnitude=magnitude))
    chex.assert_shape(fields, (4,) + shape + (len(shape),))
    chex.assert_type(fields, np.float32)
    # A B-spline field is a convex combination of its coefficients, and the coefficients are large.
    assert np.abs(fields).max() <= np.sum(magnitude) + 1e-5
    assert np.abs(fields).max(axis=tuple(range(1, fields.ndim))).min() > 0.25 * np.max(magnitude)
    assert not np.allclose(fields[0], fields[1])
    for u in fields:
        assert _np_jacobian_determinant(u, grid).min() > 0
    again = random_ffd(jax.random.key(11), grid, 4, spacing=spacing, magnitude=magnitude)
    np.testing.assert_array_equal(np.asarray(again), fields)


def test_random_ffd_rejects_mismatched_levels():
    grid = Grid.regular((16, 16))
    with pytest.raises(ValueError, match="magnitude"):
        random_ffd(jax.random.key(0), grid, 2, spacing=(16.0, 8.0), magnitude=(2.0, 1.0, 0.5))


def test_warp_identity_and_integer_translation():
    shape = (14, 12, 10)
    grid = Grid.regular(shape, spacing=2.0, origin=(-7.0, 3.0, 1.0))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2,) + shape), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, size=(2,) + shape), jnp.int32)
    zero = jnp.zeros((2,) + shape + (3,), jnp.float32)
    np.testing.assert_allclose(np.asarray(warp(images, grid, zero)), np.asarray(images), atol=1e-6)
    warped_labels = warp(labels, grid, zero, order=0)
    chex.assert_type(warped_labels, jnp.int32)
    np.testing.assert_array_equal(np.asarray(warped_labels), np.asarray(labels))
    steps = np.array([[2, -1, 1], [-3, 0, 2]])  # voxels; out_j[i] = images_j[i + steps_j]
    shift = jnp.broadcast_to(jnp.asarray(2.0 * steps, jnp.float32)[:, None, None, None],
                             zero.shape)
    out = np.asarray(warp(images, grid, shift))
    out_labels = np.asarray(warp(labels, grid, shift, order=0))
    for j, s in enumerate(steps):
        dst = tuple(slice(max(0, -k), n - max(0, k)) for k, n in zip(s, shape))
        src = tuple(slice(max(0, k), n - max(0, -k)) for k, n in zip(s, shape))
        np.testing.assert_allclose(out[j][dst], np.asarray(images[j])[src], atol=1e-5)
        np.testing.assert_array_equal(out_labels[j][dst], np.asarray(labels[j])[src])
        outside = np.ones(shape, bool)
        outside[dst] = False
        np.testing.assert_array_equal(out[j][outside], 0.0)
    with pytest.raises(ValueError, match="displacements"):
        warp(images, grid, zero[..., :2])


def test_misaligned_group_ffd_is_the_warped_phantom():
    ph = make_phantom(jax.random.key(0), (32, 28))
    group = misaligned_group(jax.random.key(1), ph, "ffd", spacing=16.0, magnitude=3.0)
    assert isinstance(group, MisalignedGroup)
    expected_disp = random_ffd(jax.random.key(1), ph.grid, 3, spacing=16.0, magnitude=3.0)
    np.testing.assert_array_equal(np.asarray(group.displacements), np.asarray(expected_disp))
    x = _world_points(ph.grid)
    idx = np.rint(x + np.asarray(group.displacements, np.float64) - x[0, 0]).astype(int)
    for j in range(3):  # nearest-neighbour pull of the labels, by hand (unit spacing)
        inside = np.all((idx[j] >= 0) & (idx[j] < np.array(ph.grid.shape)), axis=-1)
        clipped = np.clip(idx[j], 0, np.array(ph.grid.shape) - 1)
        expected = np.where(inside, np.asarray(ph.labels)[clipped[..., 0], clipped[..., 1]], 0)
        np.testing.assert_array_equal(np.asarray(group.labels[j]), expected)
    np.testing.assert_allclose(np.asarray(group.images),
                               np.asarray(warp(ph.images, ph.grid, group.displacements)))
    with pytest.raises(ValueError, match="kind"):
        misaligned_group(jax.random.key(1), ph, "affine")


def test_translation_misalignment_is_undone_by_its_inverse():
    ph = make_phantom(jax.random.key(0), (40, 36), spacing=2.0)
    group = misaligned_group(jax.random.key(2), ph, "rigid", max_angle_deg=0.0, max_shift_mm=6.0)
    psi = group.displacements
    shifts = np.asarray(psi[:, 0, 0])
    np.testing.assert_allclose(np.asarray(psi), np.broadcast_to(shifts[:, None, None], psi.shape),
                               atol=1e-5)
    foreground = ph.labels > 0
    assert float(gwi(psi, -psi, ph.grid, foreground)) == pytest.approx(0.0, abs=1e-6)
    assert float(gwi(psi, jnp.zeros_like(psi), ph.grid, foreground)) > 1.0
    # Pulling the misaligned labels through -psi restores the aligned labels away from the border.
    restored = np.asarray(warp(group.labels, ph.grid, -psi, order=0))
    interior = (slice(5, -5), slice(5, -5))
    for j in range(3):
        np.testing.assert_array_equal(restored[j][interior], np.asarray(ph.labels)[interior])
