"""Output files and directories, written atomically: a temporary sibling, then ``os.replace``, so a
failed run leaves nothing half-written. JSON reports (:func:`write_json`, :func:`grid_dict`) and a
group's transforms (:func:`write_transforms`: warped images, displacement fields and
``transforms.json``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
from typing import Iterator, Sequence

import numpy as np

from xjax.grid import Grid
from xjax.io._atomic import _sibling
from xjax.io.nifti import save_image
from xjax.resample import pull_image

__all__ = ["TRANSFORMS_JSON", "atomic_output_dir", "check_output_path", "file_stem", "grid_dict",
           "write_json", "write_transforms"]


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
