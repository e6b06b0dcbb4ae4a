"""2D slices of 3D space: a one-slice NIfTI image keeps its true in-plane geometry (spacing, angles)
when its plane is oblique, and its outputs overlay it (slice position and thickness kept). The
references are nibabel's zooms and distances computed in 3D with the file's own 4x4 affine."""

import itertools
import json

import nibabel as nib
import numpy as np
import pytest

from conftest import DATA
from xjax.cli import main
from xjax.grid import Grid, bounding_grid
from xjax.io import load_image, save_image


def rotation(axis, angle):
    """Rodrigues' rotation matrix about ``axis`` by ``angle`` radians."""
    k = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = rotation((0.3, -0.8, 0.5), 0.9) @ np.diag([0.73, 0.73, 8.0])
OBLIQUE[:3, 3] = (140.7, 108.0, -94.8)
AXIAL = np.diag([-2.0, 2.0, 3.0, 1.0])
AXIAL[:3, 3] = (90.0, -126.0, -40.0)


def write_slice(path, affine, shape=(20, 16), seed=0):
    data = np.random.default_rng(seed).normal(size=shape + (1,)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


@pytest.mark.parametrize("affine", [OBLIQUE, AXIAL], ids=["oblique", "axial"])
def test_a_slice_keeps_its_true_in_plane_geometry(tmp_path, affine):
    path = write_slice(tmp_path / "slice.nii.gz", affine)
    _, grid = load_image(path)
    np.testing.assert_allclose(grid.spacing, nib.load(path).header.get_zooms()[:2], rtol=1e-6)
    # Distances between voxel centres in the 2D grid's coordinates are the 3D distances.
    idx = np.array(list(itertools.product([0, 7, 19], [0, 5, 15])), np.float64)
    in_2d = grid.index_to_world_np(idx)
    in_3d = np.c_[idx, np.zeros(len(idx)), np.ones(len(idx))] @ affine.T
    d2 = np.linalg.norm(in_2d[:, None] - in_2d[None], axis=-1)
    d3 = np.linalg.norm(in_3d[:, None, :3] - in_3d[None, :, :3], axis=-1)
    np.testing.assert_allclose(d2, d3, atol=1e-9)
    np.testing.assert_allclose(grid.to_nifti_affine(), affine, atol=1e-12)


def test_an_axial_slice_keeps_the_world_x_and_y():
    grid = Grid.from_slice((20, 16), AXIAL)
    np.testing.assert_allclose(grid.matrix, [[-2, 0, 90], [0, 2, -126], [0, 0, 1]])


def test_derived_grids_stay_in_the_slice():
    """A pyramid level and a bounding grid of a slice lie in the same plane of 3D space: each
    voxel centre maps, through the derived slab, where the original slab puts it."""
    grid = Grid.from_slice((20, 16), OBLIQUE)
    coarse = grid.downsample(2)
    idx = np.array([[0.0, 0.0], [3.0, 5.0], [9.0, 7.0]])
    fine_idx = 2 * idx + 0.5
    through = lambda a, i: (np.c_[i, np.zeros(len(i)), np.ones(len(i))] @ a.T)[:, :3]
    np.testing.assert_allclose(through(coarse.to_nifti_affine(), idx), through(OBLIQUE, fine_idx), atol=1e-9)
    bounds = bounding_grid([grid, grid.with_shape((24, 16))])
    corner = bounds.index_to_world_np(np.zeros(2))
    i = np.linalg.solve(grid.matrix, np.r_[corner, 1.0])[:2]  # that point's index in the slice
    np.testing.assert_allclose(through(bounds.to_nifti_affine(), np.zeros((1, 2))), through(OBLIQUE, i[None]),
                               atol=1e-9)


@pytest.mark.parametrize("affine", [OBLIQUE, AXIAL], ids=["oblique", "axial"])
def test_register_outputs_overlay_their_slice(tmp_path, affine):
    """Every image the command line writes for a group of one-slice files carries their 4x4
    affine: slice position and thickness (and the oblique plane) kept."""
    paths = [write_slice(tmp_path / f"s{j}.nii.gz", affine, seed=j) for j in range(2)]
    out = tmp_path / "out"
    assert main(["register", *paths, "-o", str(out), "--preset", "translation", "--levels", "1",
                 "--iterations", "2", "--bins", "16", "--quiet"]) in (0, 1)
    written = [p for p in out.iterdir() if p.name.endswith(".nii.gz")]
    assert len(written) == 6  # 2 warped, 2 displacements, posterior, segmentation
    for p in written:
        np.testing.assert_allclose(nib.load(str(p)).affine, affine, atol=1e-5, err_msg=p.name)
    grid = json.loads((out / "report.json").read_text())["common_grid"]
    np.testing.assert_allclose(np.asarray(grid["affine"])[0, 0] ** 2 + np.asarray(grid["affine"])[1, 0] ** 2,
                               nib.load(paths[0]).header.get_zooms()[0] ** 2, rtol=1e-6)


def test_save_image_of_a_slice_grid_writes_its_slab(tmp_path):
    grid = Grid.from_slice((20, 16), OBLIQUE)
    save_image(tmp_path / "x.nii.gz", np.zeros(grid.shape, np.float32), grid)
    np.testing.assert_allclose(nib.load(str(tmp_path / "x.nii.gz")).affine, OBLIQUE, atol=1e-6)


@pytest.mark.data
def test_a_myops_short_axis_slice_has_its_true_pixel_size(tmp_path):
    source = DATA / "myops2020" / "101_C0.nii.gz"
    if not source.exists():
        pytest.skip(f"{source} is absent (the shared data folder)")
    img = nib.load(str(source))
    one = img.slicer[:, :, 2:3]
    nib.save(one, str(tmp_path / "slice.nii.gz"))
    _, grid = load_image(tmp_path / "slice.nii.gz")
    np.testing.assert_allclose(grid.spacing, img.header.get_zooms()[:2], rtol=1e-5)
    np.testing.assert_allclose(grid.to_nifti_affine(), one.affine, atol=1e-5)
