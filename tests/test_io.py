"""NIfTI I/O: round trips keep data and affines, every bad file is named, outputs are atomic, and
resampling into the common space matches numpy references."""

import gzip
import os
import re

import chex
import nibabel as nib
import numpy as np
import pytest

from xjax.grid import Grid, bounding_grid
from xjax.io import (atomic_output_dir, check_output_path, load_displacement, load_image,
                     load_labels, save_image)
from xjax.resample import pull_image, same_grid, to_common_space


def rotation3(a, b, c):
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_grid(shape, spacing, origin, angles):
    """A grid with a rotated, anisotropic affine (rotation times diag(spacing), then origin)."""
    d = len(shape)
    rot = rotation3(*angles) if d == 3 else rotation3(0, 0, angles[0])[:2, :2]
    a = np.eye(d + 1)
    a[:d, :d] = rot @ np.diag(spacing)
    a[:d, d] = origin
    return Grid(shape, a)


GRID3 = oblique_grid((7, 6, 5), (0.8, 1.3, 2.1), (-12.5, 30.25, 4.0), (0.3, -0.2, 0.7))
GRID2 = oblique_grid((9, 8), (0.7, 1.9), (5.5, -3.0), (0.4,))


def write_raw(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return str(path)


@pytest.mark.parametrize("grid", [GRID3, GRID2], ids=["3d", "2d"])
def test_image_round_trip_keeps_data_and_affine(tmp_path, grid):
    rng = np.random.default_rng(0)
    image = rng.normal(size=grid.shape).astype(np.float32)
    path = tmp_path / "img.nii.gz"
    save_image(path, image, grid)
    raw = nib.load(str(path))
    assert raw.shape == (grid.shape if grid.ndim == 3 else grid.shape + (1,))
    np.testing.assert_allclose(raw.affine, grid.to_nifti_affine(), atol=1e-5)
    loaded, loaded_grid = load_image(path)
    chex.assert_type(loaded, np.float32)
    np.testing.assert_array_equal(loaded, image)
    assert loaded_grid.shape == grid.shape
    np.testing.assert_allclose(loaded_grid.matrix, grid.matrix, atol=1e-5)
    assert same_grid(loaded_grid, grid)
    assert sorted(os.listdir(tmp_path)) == ["img.nii.gz"]  # no temporary files left behind


def test_2d_image_written_with_two_axes_loads_as_2d(tmp_path):
    data = np.arange(12.0).reshape(4, 3)
    affine = np.diag([2.0, 3.0, 5.0, 1.0])
    affine[:3, 3] = [1.0, 2.0, 7.0]
    image, grid = load_image(write_raw(tmp_path / "a.nii", data, affine))
    np.testing.assert_array_equal(image, data)
    np.testing.assert_array_equal(grid.matrix, [[2, 0, 1], [0, 3, 2], [0, 0, 1]])


def test_trailing_singleton_axes_are_dropped(tmp_path):
    data = np.arange(24.0).reshape(2, 3, 4, 1, 1)
    image, grid = load_image(write_raw(tmp_path / "a.nii.gz", data))
    chex.assert_shape(image, (2, 3, 4))
    assert grid.ndim == 3
    np.testing.assert_array_equal(image, data[..., 0, 0])


@pytest.mark.parametrize("grid", [GRID3, GRID2], ids=["3d", "2d"])
def test_vector_field_round_trip(tmp_path, grid):
    field = np.random.default_rng(1).normal(size=grid.shape + (grid.ndim,)).astype(np.float32)
    path = tmp_path / "u.nii.gz"
    save_image(path, field, grid, intent="vector")
    raw = nib.load(str(path))
    assert raw.shape == (grid.shape + (1,) * (4 - grid.ndim) + (grid.ndim,))
    assert raw.header.get_intent()[0] == "vector"
    loaded, loaded_grid = load_displacement(path)
    np.testing.assert_array_equal(loaded, field)
    np.testing.assert_allclose(loaded_grid.matrix, grid.matrix, atol=1e-5)


def test_channels_without_vector_intent_go_to_the_fourth_axis(tmp_path):
    post = np.random.default_rng(2).random(GRID2.shape + (4,))
    save_image(tmp_path / "p.nii.gz", post, GRID2)
    raw = nib.load(str(tmp_path / "p.nii.gz"))
    assert raw.shape == GRID2.shape + (1, 4)
    np.testing.assert_allclose(raw.get_fdata()[:, :, 0, :], post, rtol=1e-6)


def test_save_rejects_an_array_off_the_grid(tmp_path):
    with pytest.raises(ValueError, match="does not lie on"):
        save_image(tmp_path / "x.nii.gz", np.zeros((3, 3)), GRID2)


def _corrupt_files(tmp_path):
    good = write_raw(tmp_path / "good.nii.gz", np.random.default_rng(0).random((20, 20, 20)))
    blob = open(good, "rb").read()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(blob[: len(blob) // 2])
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image\n" * 40)
    plain_text = tmp_path / "notes.txt"
    plain_text.write_text("not an image\n" * 40)
    junk_gzip = tmp_path / "junk.nii.gz"
    junk_gzip.write_bytes(gzip.compress(b"x" * 2000))
    four_d = write_raw(tmp_path / "four_d.nii.gz", np.ones((4, 4, 4, 3)))
    one_d = write_raw(tmp_path / "one_d.nii.gz", np.ones((5,)))
    nan = np.ones((4, 4, 4))
    nan[0, 0, 0], nan[1, 2, 3], nan[3, 3, 3] = np.nan, np.inf, -np.inf
    nan_file = write_raw(tmp_path / "nan.nii.gz", nan)
    return {
        "missing": (tmp_path / "missing.nii.gz", "no such file"),
        "truncated": (truncated, "not a readable NIfTI"),
        "text": (text, "not a readable NIfTI"),
        "plain_text": (plain_text, "not a readable NIfTI"),
        "junk_gzip": (junk_gzip, "not a readable NIfTI"),
        "4d": (four_d, "4D data"),
        "1d": (one_d, "1D data"),
        "nan": (nan_file, "3 of 64 voxels are NaN or Inf"),
    }


@pytest.mark.parametrize("case", ["missing", "truncated", "text", "plain_text", "junk_gzip", "4d",
                                  "1d", "nan"])
def test_bad_files_raise_value_error_naming_the_file(tmp_path, case):
    path, message = _corrupt_files(tmp_path)[case]
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        load_image(path)


def test_labels_load_as_int32_and_must_be_integers(tmp_path):
    labels = np.random.default_rng(3).integers(0, 5, size=GRID3.shape)
    save_image(tmp_path / "l.nii.gz", labels, GRID3, dtype=np.int16)
    loaded, grid = load_labels(tmp_path / "l.nii.gz", GRID3)
    chex.assert_type(loaded, np.int32)
    np.testing.assert_array_equal(loaded, labels)
    fractional = labels + 0.25 * (labels == 2)
    save_image(tmp_path / "f.nii.gz", fractional, GRID3)
    n = int(np.sum(labels == 2))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "f.nii.gz")) + f".*{n} voxels"):
        load_labels(tmp_path / "f.nii.gz")


def translated(grid, mm):
    """``grid`` moved by ``mm`` along every world axis."""
    a = grid.matrix
    a[:-1, -1] += mm
    return Grid(grid.shape, a)


def test_labels_on_another_grid_name_both_files(tmp_path):
    labels = np.zeros(GRID3.shape, np.int16)
    save_image(tmp_path / "l.nii.gz", labels, translated(GRID3, 0.01), dtype=np.int16)
    gap = f"{0.01 * np.sqrt(3):.3g}"  # 0.01 mm along each world axis
    with pytest.raises(ValueError, match=r"l\.nii\.gz: its grid .* does not match .* of "
                                         rf"t1\.nii\.gz \(voxel corners up to {gap} mm apart\)"):
        load_labels(tmp_path / "l.nii.gz", GRID3, like_name="t1.nii.gz")
    # within the 1e-3 mm tolerance the grids are the same
    save_image(tmp_path / "c.nii.gz", labels, translated(GRID3, 2e-4), dtype=np.int16)
    load_labels(tmp_path / "c.nii.gz", GRID3, like_name="t1.nii.gz")


def test_atomic_output_dir_writes_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out, force=False) as tmp:
        assert not out.exists()
        (open(os.path.join(tmp, "a.txt"), "w")).write("first")
    assert sorted(os.listdir(out)) == ["a.txt"]
    with pytest.raises(ValueError, match=re.escape(str(out)) + ".*already exists"):
        with atomic_output_dir(out, force=False):
            pytest.fail("the body must not run when the directory exists")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, force=True) as tmp:
            open(os.path.join(tmp, "b.txt"), "w").write("second")
            raise RuntimeError("failure half way")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the failed attempt left nothing
    assert sorted(os.listdir(out)) == ["a.txt"]  # and the old output is untouched
    with atomic_output_dir(out, force=True) as tmp:
        open(os.path.join(tmp, "b.txt"), "w").write("second")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert sorted(os.listdir(out)) == ["b.txt"]


def test_check_output_path(tmp_path):
    check_output_path(tmp_path / "new.nii.gz", force=False, kind="file")
    (tmp_path / "old.nii.gz").write_text("x")
    check_output_path(tmp_path / "old.nii.gz", force=True, kind="file")
    with pytest.raises(ValueError, match="old.nii.gz already exists"):
        check_output_path(tmp_path / "old.nii.gz", force=False, kind="file")


def shifted_grid(grid, offset):
    """``grid`` with voxel ``i`` moved to where voxel ``i + offset`` of ``grid`` lies."""
    t = np.eye(grid.ndim + 1)
    t[:-1, -1] = offset
    return Grid(grid.shape, grid.matrix @ t)


def place(image, offset, shape):
    """numpy reference: out[m] = image[m - offset] where that index exists, else 0."""
    out = np.zeros(shape, np.float64)
    dst = tuple(slice(max(o, 0), min(s, o + n)) for o, s, n in zip(offset, shape, image.shape))
    src = tuple(slice(max(-o, 0), max(-o, 0) + (d.stop - d.start)) for o, d in zip(offset, dst))
    out[dst] = image[src]
    return out


@pytest.mark.parametrize("grid,offset", [(GRID3, (2, -1, 1)), (GRID2, (-3, 2))], ids=["3d", "2d"])
def test_integer_shift_resamples_to_the_shifted_array(grid, offset):
    rng = np.random.default_rng(4)
    ref = rng.random(grid.shape).astype(np.float32)
    moving = rng.random(grid.shape).astype(np.float32)
    # voxel i of the moving grid lies on reference voxel i + offset
    mgrid = shifted_grid(grid, np.asarray(offset, float))
    group, common = to_common_space([ref, moving], [grid, mgrid], 0)
    assert common == grid
    np.testing.assert_array_equal(group[0], ref)  # identity pass-through: an exact copy
    np.testing.assert_allclose(group[1], place(moving, offset, grid.shape), atol=1e-6)


def test_bounding_reference_holds_every_image():
    rng = np.random.default_rng(5)
    a = rng.random(GRID2.shape).astype(np.float32) + 1
    b = rng.random(GRID2.shape).astype(np.float32) + 1
    offset = np.array([3, -2])
    group, common = to_common_space([a, b], [GRID2, shifted_grid(GRID2, offset)], "bounds")
    assert common == bounding_grid([GRID2, shifted_grid(GRID2, offset)])
    assert common.shape == tuple(np.asarray(GRID2.shape) + np.abs(offset))
    # voxel 0 of the common grid is GRID2's voxel (0, -2): a sits at (0, 2), b at (3, 0)
    np.testing.assert_allclose(group[0], place(a, (0, 2), common.shape), atol=1e-6)
    np.testing.assert_allclose(group[1], place(b, (3, 0), common.shape), atol=1e-6)


def test_pull_image_with_a_half_voxel_displacement_interpolates_linearly():
    image = np.random.default_rng(6).random(GRID2.shape)
    # half a voxel along index axis 0, expressed in world mm through the grid's rotation
    step = GRID2.matrix[:2, 0] * 0.5
    disp = np.broadcast_to(step, GRID2.shape + (2,))
    out = pull_image(image, GRID2, GRID2, disp)
    expected = 0.5 * (image[:-1] + image[1:])
    np.testing.assert_allclose(out[:-1], expected, atol=1e-5)
    np.testing.assert_array_equal(out[-1], 0.0)  # beyond the last voxel centre: fill


def test_pull_image_nearest_keeps_integer_labels():
    labels = np.random.default_rng(7).integers(0, 9, size=GRID2.shape).astype(np.int16)
    disp = np.broadcast_to(GRID2.matrix[:2, 1] * 1.2, GRID2.shape + (2,))  # 1.2 voxels along y
    out = pull_image(labels, GRID2, GRID2, disp, order=0)
    assert np.issubdtype(out.dtype, np.integer)
    np.testing.assert_array_equal(out[:, :-2], labels[:, 1:-1])


def test_mixed_2d_and_3d_inputs_name_the_files():
    with pytest.raises(ValueError, match=r"a\.nii \(3D\).*b\.nii \(2D\)"):
        to_common_space([np.ones(GRID3.shape), np.ones(GRID2.shape)], [GRID3, GRID2],
                        names=["a.nii", "b.nii"])


def test_bad_reference_is_rejected():
    with pytest.raises(ValueError, match="reference index"):
        to_common_space([np.ones(GRID2.shape)] * 2, [GRID2] * 2, 2)
    with pytest.raises(ValueError, match="'middle'"):
        to_common_space([np.ones(GRID2.shape)] * 2, [GRID2] * 2, "middle")
