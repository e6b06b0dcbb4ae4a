"""NIfTI input and output: reading and writing images, label maps and displacement fields.

Arrays come back indexed ``(x, y[, z])`` exactly as ``nibabel``'s ``get_fdata()`` returns them, with
a :class:`~xjax.grid.Grid` that holds the index -> world (mm) affine. A NIfTI file whose third axis
has one voxel, ``(X, Y)`` or ``(X, Y, 1)``, is a 2D image on a 2D grid in the slice's own plane,
which keeps the file's 4x4 affine (:meth:`Grid.from_slice`: true in-plane spacing for oblique
slices); :meth:`Grid.to_nifti_affine` gives it back, so outputs overlay the inputs.

Vector fields ``(*spatial, D)`` (displacements ``u_j(x)`` in world mm, NIfTI RAS+ frame, pull
convention of :mod:`xjax.grid`) are stored as NIfTI vector images of shape ``(X, Y, Z, 1, D)`` with
intent ``VECTOR`` (``Z = 1`` in 2D). Other channels-last arrays (class posteriors) are stored as 4D
``(X, Y, Z, C)`` images. Every file is written atomically (a temporary sibling, then ``os.replace``).
"""

from __future__ import annotations

import os
import zlib
from typing import Sequence

import nibabel as nib
import numpy as np

from xjax.grid import Grid
from xjax.io._atomic import _atomic_save
from xjax.resample import _corner_gap, same_grid

__all__ = ["load_displacement", "load_image", "load_labels", "save_image"]

_NIFTI_ERRORS = (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error)


def _read(path) -> tuple[np.ndarray, np.ndarray, str]:
    """Read a NIfTI file: ``(data float64, 4x4 affine, intent name)``; ValueError names the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        img = nib.load(path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ValueError(f"a {type(img).__name__}, not a NIfTI image")
        data = np.asarray(img.get_fdata(dtype=np.float64))
        affine = np.asarray(img.affine, dtype=np.float64)
        intent = img.header.get_intent()[0]
    except _NIFTI_ERRORS as e:
        raise ValueError(f"{path}: not a readable NIfTI file ({e})") from e
    if not np.all(np.isfinite(affine)):
        raise ValueError(f"{path}: the NIfTI affine is not finite:\n{affine}")
    return data, affine, intent


def _spatial(data: np.ndarray, affine: np.ndarray, path: str) -> tuple[np.ndarray, Grid]:
    """Drop trailing singleton axes beyond the third; a one-voxel third axis makes a 2D image."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise ValueError(f"{path}: {data.ndim}D data of shape {data.shape} is not supported "
                         "(a 2D or 3D image is expected)")
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    if data.ndim < 2:
        raise ValueError(f"{path}: {data.ndim}D data of shape {data.shape} is not supported "
                         "(a 2D or 3D image is expected)")
    return data, _grid(data.shape, affine, path)


def _grid(shape: Sequence[int], affine: np.ndarray, path: str) -> Grid:
    """The file's grid; a one-slice image is a 2D grid in its slice's plane
    (:meth:`Grid.from_slice`), keeping the 4x4 affine for its outputs."""
    try:
        if len(shape) == 2:
            return Grid.from_slice(shape, affine)
        return Grid(tuple(shape), affine)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _check_finite(data: np.ndarray, path: str) -> None:
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise ValueError(f"{path}: {bad} of {data.size} voxels are NaN or Inf")


def load_image(path) -> tuple[np.ndarray, Grid]:
    """Load a 2D or 3D NIfTI image.

    Returns:
      ``(image, grid)``: ``image`` float32 ``(X, Y)`` or ``(X, Y, Z)`` (scaling applied), indexed
      like the file; ``grid`` its :class:`Grid` (index -> world mm).

    Raises:
      ValueError naming the file: missing, not a NIfTI, corrupt or truncated, not 2D/3D (trailing
      singleton axes are dropped first), or with NaN/Inf voxels.
    """
    path = os.fspath(path)
    data, affine, _ = _read(path)
    data, grid = _spatial(data, affine, path)
    _check_finite(data, path)
    largest, limit = float(np.max(np.abs(data), initial=0.0)), float(np.finfo(np.float32).max)
    if largest > limit:
        raise ValueError(f"{path}: values beyond the float32 range (largest magnitude {largest:.3g}, "
                         f"float32 holds up to {limit:.3g}); rescale the image")
    return data.astype(np.float32), grid


def load_labels(path, like: Grid | None = None, *, like_name: str | None = None
                ) -> tuple[np.ndarray, Grid]:
    """Load an integer label map.

    Args:
      path: NIfTI file of integer values (any stored dtype).
      like: if given, the grid the label map must lie on (same shape, voxel-edge corners within
        1e-3 mm).
      like_name: the file ``like`` came from, named in the error message.

    Returns:
      ``(labels int32 (*spatial), grid)``.
    """
    path = os.fspath(path)
    data, affine, _ = _read(path)
    data, grid = _spatial(data, affine, path)
    _check_finite(data, path)
    if not np.array_equal(data, np.round(data)):
        bad = int(np.count_nonzero(data != np.round(data)))
        raise ValueError(f"{path}: a label map must hold integers; {bad} voxels do not")
    if np.abs(data).max(initial=0) > np.iinfo(np.int32).max:
        raise ValueError(f"{path}: label values exceed the int32 range")
    if like is not None and not same_grid(grid, like):
        other = like_name if like_name is not None else "the reference"
        gap = (f"voxel corners up to {_corner_gap(grid, like):.3g} mm apart"
               if grid.shape == like.shape else f"shapes {grid.shape} and {like.shape}")
        raise ValueError(f"{path}: its grid {grid} does not match the grid {like} of {other} ({gap})")
    return data.astype(np.int32), grid


def load_displacement(path) -> tuple[np.ndarray, Grid]:
    """Load a vector field written by :func:`save_image`.

    Accepts ``(X, Y, Z, 1, D)`` (NIfTI vector layout) or ``(X, Y, Z, D)``, with ``D = 2`` when
    ``Z = 1`` (2D) and ``D = 3`` otherwise.

    Returns:
      ``(field float32 (*spatial, D), grid)``, in world mm on ``grid``.
    """
    path = os.fspath(path)
    data, affine, _ = _read(path)
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim != 4:
        raise ValueError(f"{path}: a vector field of shape (X, Y, Z, 1, D) is expected, "
                         f"got shape {data.shape}")
    d = 2 if data.shape[2] == 1 else 3
    if data.shape[3] != d:
        raise ValueError(f"{path}: a {d}D grid of shape {data.shape[:3]} needs {d} vector "
                         f"components, got {data.shape[3]}")
    if d == 2:
        data = data[:, :, 0, :]
    _check_finite(data, path)
    return data.astype(np.float32), _grid(data.shape[:d], affine, path)


def save_image(path, array, grid: Grid, *, dtype=None, intent: str | None = None) -> None:
    """Write ``array`` on ``grid`` to a NIfTI file, atomically.

    Args:
      path: output file (``.nii`` or ``.nii.gz``).
      array: ``grid.shape`` (one scalar image) or ``(*grid.shape, C)`` (channels-last).
      grid: the array's grid; its affine is written to both sform and (where it is a rotation
        times scaling) qform.
      dtype: stored dtype (default float32).
      intent: NIfTI intent name. ``"vector"`` stores a channels-last array as ``(X, Y, Z, 1, C)``
        (how displacement fields in mm are stored); otherwise channels go to a 4th axis.
    """
    path = os.fspath(path)
    a = np.asarray(array)
    if a.shape == grid.shape:
        channels = None
    elif a.shape[:-1] == grid.shape:
        channels = a.shape[-1]
    else:
        raise ValueError(f"{path}: array of shape {a.shape} does not lie on {grid}")
    if grid.ndim == 2:
        a = a.reshape(grid.shape + (1,) + a.shape[2:])
    if channels is not None and intent == "vector":
        a = a.reshape(a.shape[:3] + (1, channels))
    affine = grid.to_nifti_affine()
    img = nib.Nifti1Image(a.astype(dtype if dtype is not None else np.float32), affine)
    img.header.set_xyzt_units("mm")
    cols = affine[:3, :3]
    gram = cols.T @ cols
    if np.allclose(gram, np.diag(np.diag(gram)), atol=1e-6 * np.max(np.abs(gram))):
        img.set_qform(affine, code="aligned")
    img.set_sform(affine, code="aligned")
    if intent is not None:
        img.header.set_intent(intent)
    _atomic_save(img, path)
