"""Output files and directories, written atomically: a temporary sibling, then ``os.replace``, so a
failed run leaves nothing half-written; several files all or nothing (:func:`atomic_output_files`).
:func:`check_output_path` refuses, before any work, an output that would replace or remove an
input, replace a file by a directory (or the converse), or cannot be written. JSON reports
(:func:`write_json`, :func:`grid_dict`) and a group's transforms (:func:`write_transforms`: warped
images, displacement fields and ``transforms.json``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np

from xjax.grid import Grid
from xjax.io._atomic import _sibling, _suffix
from xjax.io.nifti import save_image
from xjax.resample import pull_image

__all__ = ["TRANSFORMS_JSON", "atomic_output_dir", "atomic_output_files", "check_output_path",
           "file_stem", "grid_dict", "write_json", "write_transforms"]


def _overlap(output: str, source: str) -> str | None:
    """How the output path lies against the input path ``source``: ``"is"``, ``"holds"`` (an
    input inside the output), ``"lies inside"`` (the output inside an input directory) or None.
    Compared both as written and with symbolic links resolved."""
    for resolve in (os.path.abspath, os.path.realpath):
        out, src = resolve(output), resolve(source)
        if out == src:
            return "is"
        common = os.path.commonpath([out, src])
        if common == out:
            return "holds"
        if common == src:
            return "lies inside"
    return None


def _writable_location(path: str) -> None:
    """Raise ValueError unless ``path`` can be created: its nearest existing ancestor must be a
    directory the user may write into (missing directories below it are created on writing)."""
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(ancestor) and os.path.dirname(ancestor) != ancestor:
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"cannot write {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: {ancestor} is not writable")


def check_output_path(path, force: bool, *, kind: Literal["file", "directory"],
                      inputs: Iterable = ()) -> None:
    """Check, before anything is loaded or computed, that the output ``path`` may be written.

    Raises ValueError naming ``path`` when it is one of ``inputs`` (files or directories; None
    entries are skipped), holds one or lies inside one (even with ``force``: replacing it would
    delete the inputs); when it exists and ``force`` is False; when it exists as something other
    than ``kind`` (``--force`` replaces a directory by a directory and a file by a file only); or
    when its location cannot be written (the nearest existing ancestor is not a writable
    directory).
    """
    if kind not in ("file", "directory"):
        raise ValueError(f"kind must be 'file' or 'directory', got {kind!r}")
    path = os.fspath(path)
    for source in inputs:
        if source is None:
            continue
        relation = _overlap(path, os.fspath(source))
        if relation is not None:
            raise ValueError(f"{path} {relation} the input {os.fspath(source)}; writing there would "
                             "replace or remove inputs: choose another output")
    if os.path.lexists(path):
        if not force:
            raise ValueError(f"{path} already exists; pass --force to replace it")
        if kind == "directory" and (os.path.islink(path) or not os.path.isdir(path)):
            what = "a symbolic link" if os.path.islink(path) else "a file"
            raise ValueError(f"{path} is {what}, not a directory; --force replaces an existing "
                             "output directory only")
        if kind == "file" and (os.path.isdir(path) and not os.path.islink(path)):
            raise ValueError(f"{path} is a directory, not a file; --force replaces an existing "
                             "output file only")
    _writable_location(path)


@contextlib.contextmanager
def atomic_output_dir(path, force: bool) -> Iterator[str]:
    """Write an output directory all at once.

    Yields a fresh temporary sibling directory; on success it is renamed to ``path`` (replacing an
    existing ``path`` only when ``force``); on failure it is removed, so nothing half-written
    remains. :func:`check_output_path` runs on entry (callers also run it, with their inputs,
    before any computation).
    """
    path = os.path.abspath(os.fspath(path))
    check_output_path(path, force, kind="directory")
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


@contextlib.contextmanager
def atomic_output_files(paths: Sequence, force: bool) -> Iterator[list[str]]:
    """Write several output files all or nothing.

    Yields one fresh temporary sibling name per path (same extension, so ``.nii.gz`` stays
    compressed) for the body to write. When the body succeeds, every temporary is renamed onto
    its path; should a rename fail, the paths already renamed get their old files back (or are
    removed if they were new). When the body fails, the temporaries are removed. Either way the
    paths hold all new files or all their old contents. :func:`check_output_path` runs on entry.
    """
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    twice = [p for p in paths if paths.count(p) > 1]
    if twice:
        raise ValueError(f"{twice[0]} is given twice as an output")
    for path in paths:
        check_output_path(path, force, kind="file")
    for path in paths:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    temporaries = [_sibling(p, "tmp", _suffix(p)) for p in paths]
    done = []  # (path, where its old file waits, or None)
    try:
        yield temporaries
        for path, tmp in zip(paths, temporaries):
            old = None
            if os.path.lexists(path):
                old = _sibling(path, "old", _suffix(path))
                os.replace(path, old)
            done.append((path, old))
            os.replace(tmp, path)
    except BaseException:
        for path, old in reversed(done):
            if old is None:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            else:
                os.replace(old, path)
        for tmp in temporaries:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        raise
    for _, old in done:
        if old is not None:
            os.remove(old)


def file_stem(path: str) -> str:
    """The file name without its directory and its ``.nii.gz`` / ``.nii`` (or other) extension."""
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def grid_dict(grid: Grid) -> dict:
    """A grid for JSON reports: shape, its affine (3 x 3 in 2D, in the slice's plane), the 4 x 4
    NIfTI affine of its file and spacing in mm."""
    return {"shape": list(grid.shape), "affine": [list(r) for r in grid.affine],
            "nifti_affine": [[float(v) for v in r] for r in grid.to_nifti_affine()],
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
