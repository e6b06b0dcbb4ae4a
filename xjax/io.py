"""NIfTI input and output: the only module of xjax that touches files of images.

Arrays come back indexed ``(x, y[, z])`` exactly as ``nibabel``'s ``get_fdata()`` returns them, with
a :class:`~xjax.grid.Grid` that holds the index -> world (mm) affine. A NIfTI file whose third axis
has one voxel, ``(X, Y)`` or ``(X, Y, 1)``, is a 2D image on a 2D grid (the in-plane 3x3 part of the
4x4 affine); :meth:`Grid.to_nifti_affine` converts back.

Vector fields ``(*spatial, D)`` (displacements ``u_j(x)`` in world mm, NIfTI RAS+ frame, pull
convention of :mod:`xjax.grid`) are stored as NIfTI vector images of shape ``(X, Y, Z, 1, D)`` with
intent ``VECTOR`` (``Z = 1`` in 2D). Other channels-last arrays (class posteriors) are stored as 4D
``(X, Y, Z, C)`` images.

Every file is written atomically (a temporary file in the same directory, then ``os.replace``), and
whole output directories through :func:`atomic_output_dir`, so a failed run leaves nothing
half-written.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import secrets
import shutil
import zlib
from typing import Iterator, Sequence

import jax
import nibabel as nib
import numpy as np

from xjax.grid import Grid, bounding_grid
from xjax.interpolate import sample

__all__ = [
    "atomic_output_dir",
    "check_output_path",
    "file_stem",
    "grid_dict",
    "load_displacement",
    "load_image",
    "load_labels",
    "pull_image",
    "same_grid",
    "save_image",
    "to_common_space",
    "write_json",
    "write_transforms",
]

_NIFTI_ERRORS = (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error)
_GRID_TOL_MM = 1e-3
_SNAP_VOXELS = 1e-4


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
    if len(shape) == 2:
        a = np.eye(3)
        a[:2, :2] = affine[:2, :2]
        a[:2, 2] = affine[:2, 3]
    else:
        a = affine
    try:
        return Grid(tuple(shape), a)
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


def _sibling(path: str, tag: str, suffix: str = "") -> str:
    """A fresh hidden name next to ``path`` (created by the caller, so the umask applies)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _atomic_save(img, path: str) -> None:
    suffix = ".nii.gz" if path.endswith(".nii.gz") else os.path.splitext(path)[1]
    tmp = _sibling(path, "tmp", suffix)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _edge_corners(grid: Grid) -> np.ndarray:
    """World positions (mm) of the grid's voxel-edge corners (sensitive to spacing on every axis,
    singleton axes included), ``(2**D, D)``."""
    idx = np.stack(np.meshgrid(*[[-0.5, s - 0.5] for s in grid.shape], indexing="ij"), -1)
    return grid.index_to_world_np(idx.reshape(-1, grid.ndim))


def _corner_gap(a: Grid, b: Grid) -> float:
    """Largest distance (mm) between corresponding voxel-edge corners of two grids."""
    return float(np.max(np.linalg.norm(_edge_corners(a) - _edge_corners(b), axis=-1)))


def same_grid(a: Grid, b: Grid, tol_mm: float = _GRID_TOL_MM) -> bool:
    """True if both grids have the same shape and their voxel-edge corners agree within
    ``tol_mm``."""
    return a.shape == b.shape and _corner_gap(a, b) <= tol_mm


_sample_jit = jax.jit(sample, static_argnames=("order",))


def pull_image(image, grid: Grid, target: Grid, displacement=None, *, order: int = 1) -> np.ndarray:
    """Sample ``image`` (on ``grid``) at the world points ``x + u(x)`` of ``target``'s voxels (pull).

    Points are composed in float64 on the host, ``index = grid^-1 (target(i) + u)``, then sampled
    with the one sampler of :mod:`xjax.interpolate`; composing the affines in float64 keeps world
    coordinates far from the origin exact. Points outside ``image`` take 0.

    Args:
      image: ``(*grid.shape)`` or ``(*grid.shape, C)``.
      grid, target: source and target grids (same dimensionality ``D``).
      displacement: ``(*target.shape, D)`` in mm, or None for the identity.
      order: 1 linear, 0 nearest neighbour (labels).

    Returns:
      ``(*target.shape[, C])`` numpy array, dtype of ``image`` for ``order=0`` else float32.
    """
    if grid.ndim != target.ndim:
        raise ValueError(f"cannot sample a {grid.ndim}D image on a {target.ndim}D grid")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    index = np.stack(np.meshgrid(*[np.arange(s) for s in target.shape], indexing="ij"), -1)
    world = target.index_to_world_np(index)
    if displacement is not None:
        u = np.asarray(displacement, np.float64)
        if u.shape != target.shape + (target.ndim,):
            raise ValueError(f"displacement of shape {u.shape} does not lie on {target}")
        world = world + u
    inv = np.linalg.inv(grid.matrix)
    index = world @ inv[:-1, :-1].T + inv[:-1, -1]
    # Voxel centres that coincide up to round-off land exactly on them (so a border voxel at
    # index -1e-16 stays inside, and an identical grid copies the image).
    nearest = np.round(index)
    index = np.where(np.abs(index - nearest) < _SNAP_VOXELS, nearest, index).astype(np.float32)
    image = np.asarray(image)
    integer = order == 0 and np.issubdtype(image.dtype, np.integer)
    image = image.astype(np.int32 if integer else np.float32)
    return np.asarray(_sample_jit(image, index, order=order))


def to_common_space(images: Sequence[np.ndarray], grids: Sequence[Grid], reference: int | str = 0,
                    *, order: int = 1, names: Sequence[str] | None = None
                    ) -> tuple[np.ndarray, Grid]:
    """Resample a group of images onto one common grid.

    Args:
      images: ``N`` arrays, image ``j`` of shape ``grids[j].shape``.
      grids: their grids (all 2D or all 3D).
      reference: index of the image whose grid is the common grid, or ``"bounds"`` for a grid that
        bounds the whole group (:func:`xjax.grid.bounding_grid`, finest spacing of the group).
      order: 1 linear, 0 nearest neighbour.
      names: names of the inputs (file paths) for error messages.

    Returns:
      ``(group (N, *common.shape) float32, common)``. Each image is pulled from the common grid's
      world points; an image already on the common grid is copied exactly.
    """
    n = len(images)
    names = list(names) if names is not None else [f"image {j}" for j in range(n)]
    if len(grids) != n or len(names) != n:
        raise ValueError(f"got {n} images, {len(grids)} grids and {len(names)} names")
    if n == 0:
        raise ValueError("to_common_space needs at least one image")
    dims = {g.ndim for g in grids}
    if len(dims) > 1:
        listing = ", ".join(f"{nm} ({g.ndim}D)" for nm, g in zip(names, grids))
        raise ValueError(f"cannot register 2D and 3D images together: {listing}")
    for img, g, nm in zip(images, grids, names):
        if np.shape(img) != g.shape:
            raise ValueError(f"{nm}: array of shape {np.shape(img)} does not match its grid {g}")
    if isinstance(reference, str):
        if reference != "bounds":
            raise ValueError(f"reference must be an image index or 'bounds', got {reference!r}")
        common = bounding_grid(list(grids))
    else:
        if not (isinstance(reference, (int, np.integer)) and 0 <= reference < n):
            raise ValueError(f"reference index must be in [0, {n}), got {reference!r}")
        common = grids[int(reference)]
    out = [np.array(img, np.float32) if same_grid(g, common) else pull_image(img, g, common, order=order)
           for img, g in zip(images, grids)]
    return np.stack(out), common


def check_output_path(path, force: bool) -> None:
    """Raise ValueError if ``path`` exists and ``force`` is False (call before any computation)."""
    path = os.fspath(path)
    if os.path.lexists(path) and not force:
        raise ValueError(f"{path} already exists; pass --force to replace it")


@contextlib.contextmanager
def atomic_output_dir(path, force: bool) -> Iterator[str]:
    """Write an output directory all at once.

    Yields a fresh temporary sibling directory; on success it is renamed to ``path`` (replacing an
    existing ``path`` only when ``force``); on failure it is removed, so nothing half-written
    remains. An existing ``path`` without ``force`` raises ValueError on entry.
    """
    path = os.path.abspath(os.fspath(path))
    check_output_path(path, force)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _sibling(path, "tmp")
    os.mkdir(tmp)
    try:
        yield tmp
        if os.path.lexists(path):
            old = _sibling(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            if os.path.isdir(old):
                shutil.rmtree(old)
            else:
                os.remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_stem(path: str) -> str:
    """The file name without its directory and its ``.nii.gz`` / ``.nii`` (or other) extension."""
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def grid_dict(grid: Grid) -> dict:
    """A grid for JSON reports: shape, 4 x 4 NIfTI affine and spacing in mm."""
    return {"shape": list(grid.shape), "affine": [list(r) for r in grid.affine],
            "spacing_mm": [float(s) for s in grid.spacing]}


def write_json(path: str, obj) -> None:
    """Write ``obj`` as indented JSON, atomically (a temporary file, then a rename)."""
    import json

    tmp = _sibling(os.path.abspath(path), "tmp", ".json")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


#: the file listing an output directory's transforms (read by ``xjax apply``)
TRANSFORMS_JSON = "transforms.json"


def write_transforms(outdir: str, paths: Sequence[str], loaded: Sequence[tuple[np.ndarray, Grid]],
                     common: Grid, displacements) -> list[dict]:
    """Write a group's transforms into the directory ``outdir``: for input ``j`` (path
    ``paths[j]``, array and grid ``loaded[j]``), ``warped_{j}_{stem}.nii.gz`` (the input sampled once,
    from its own grid, at ``x + u_j(x)`` on ``common``) and ``displacement_{j}_{stem}.nii.gz``
    (``u_j`` ``(*common.shape, D)`` in world mm, a NIfTI vector image), and ``transforms.json``
    listing them.

    Returns:
      The entries of ``transforms.json``: ``{"index", "input", "displacement", "warped"}`` per input.
    """
    disp = np.asarray(displacements, np.float32)
    entries = [{"index": j, "input": os.path.abspath(p), "displacement": f"displacement_{j}_{file_stem(p)}.nii.gz",
                "warped": f"warped_{j}_{file_stem(p)}.nii.gz"} for j, p in enumerate(paths)]

    def write(j):
        (image, grid), e = loaded[j], entries[j]
        save_image(os.path.join(outdir, e["warped"]), pull_image(image, grid, common, disp[j]), common)
        save_image(os.path.join(outdir, e["displacement"]), disp[j], common, intent="vector")

    # one thread per core: gzip compression, the bulk of the time, releases the GIL
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(write, range(len(entries))))
    write_json(os.path.join(outdir, TRANSFORMS_JSON), {
        "convention": "pull: warped_j(x) = input_j(x + u_j(x)); x and u_j in world mm (NIfTI RAS+) on "
                      "the common grid",
        "common_grid": grid_dict(common),
        "transforms": entries,
    })
    return entries
