"""The ``xjax apply`` command: warp further images (or label maps) into the common space of a
registration, with the displacements that ``xjax register`` (or ``xjax dcc|bingo predict``) wrote.

This module holds :func:`apply_files` and the sub-command's parser and handler. numpy and the core
of xjax are imported when a command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

from xjax.cli.common import label_dtype, parse_indices

__all__ = ["add_parser", "run", "apply_files"]


def _displacement_source(source: str, index: int | None) -> str:
    """The displacement file for ``--index`` in an output directory, or ``source`` itself."""
    from xjax.io import TRANSFORMS_JSON

    if os.path.isdir(source):
        listing = os.path.join(source, TRANSFORMS_JSON)
        if not os.path.isfile(listing):
            raise ValueError(f"{source}: not an xjax output directory (no {TRANSFORMS_JSON})")
        with open(listing) as f:
            entries = json.load(f)["transforms"]
        if index is None:
            raise ValueError(f"{source} is an output directory: give --index J, the input whose "
                             "transform to apply")
        if not 0 <= index < len(entries):
            raise ValueError(f"{source}: --index must be in [0, {len(entries)}), got {index}")
        return os.path.join(source, entries[index]["displacement"])
    if index is not None:
        raise ValueError(f"--index selects a transform of an output directory; {source} is a file")
    return source


def apply_files(source: str, images: Sequence[str], outputs: Sequence[str],
                indices: Sequence[int] | None = None, *, labels: bool = False,
                force: bool = False) -> None:
    """Warp ``images`` into the common space of a registration.

    Output ``k`` is ``images[k]`` (on any grid) sampled at the world points ``x + u_J(x)`` of the
    common grid, ``J = indices[k]`` (one index may serve every image), with linear interpolation,
    or nearest neighbour and integer output for ``labels``. It carries the common-grid affine.

    Args:
      source: a ``register`` output directory, or one displacement NIfTI (then ``indices`` is
        None).
      images, outputs: input and output NIfTI paths, one output per image.
      indices: transform index per image, or a single index for all.

    Every output is checked before anything is read (:func:`xjax.io.check_output_path`: none may
    be, hold or lie inside the source or an image), and the outputs are written all or none.
    """
    from xjax.io import (atomic_output_files, check_output_path, load_displacement, load_image,
                         load_labels, save_image)
    from xjax.resample import pull_image

    if len(outputs) != len(images):
        raise ValueError(f"give one output per image: {len(images)} images, {len(outputs)} outputs")
    if indices is not None and len(indices) not in (1, len(images)):
        raise ValueError(f"give one --index for all images or one per image: {len(images)} images, "
                         f"{len(indices)} indices")
    if indices is None or len(indices) == len(images):
        per_image = list(indices) if indices is not None else [None] * len(images)
    else:
        per_image = list(indices) * len(images)
    absolute = [os.path.abspath(o) for o in outputs]
    twice = [o for o, a in zip(outputs, absolute) if absolute.count(a) > 1]
    if twice:
        raise ValueError(f"{twice[0]} is given twice as an output")
    for out in outputs:
        check_output_path(out, force, kind="file", inputs=[source, *images])
    jobs = []  # everything is read and checked before anything is written
    for j, image_path in zip(per_image, images):
        field_path = _displacement_source(source, j)
        disp, common = load_displacement(field_path)
        values, grid = load_labels(image_path) if labels else load_image(image_path)
        if grid.ndim != common.ndim:
            raise ValueError(f"{image_path}: a {grid.ndim}D image cannot be warped by the "
                             f"{common.ndim}D displacement {field_path}")
        jobs.append((values, grid, disp, common))
    with atomic_output_files(outputs, force) as temporaries:  # all outputs or none
        for (values, grid, disp, common), tmp in zip(jobs, temporaries):
            warped = pull_image(values, grid, common, disp, order=0 if labels else 1)
            save_image(tmp, warped, common, dtype=label_dtype(warped) if labels else None)


def add_parser(commands) -> None:
    """Add the ``apply`` command to the ``xjax`` sub-parsers."""
    app = commands.add_parser(
        "apply", help="warp images or labels with the transforms of a registration",
        description="Warp IMAGEs (any grids) into the common space of a registration: output k is "
                    "IMAGE k sampled at the world points x + u_J(x) of the common grid, and carries "
                    "the common grid's affine.")
    app.add_argument("source", metavar="OUTDIR_OR_DISPLACEMENT",
                     help="an 'xjax register' output directory, or one displacement NIfTI")
    app.add_argument("images", nargs="+", metavar="IMAGE", help="NIfTI images to warp (any grids)")
    app.add_argument("-o", "--output", nargs="+", required=True, metavar="OUT",
                     help="one output NIfTI per IMAGE, in order")
    app.add_argument("--index", type=parse_indices, metavar="J[,J...]",
                     help="transform of input J of OUTDIR: one index for every IMAGE, or a "
                          "comma-separated index per IMAGE (not used with a displacement file)")
    app.add_argument("--labels", action="store_true",
                     help="IMAGEs are label maps: nearest neighbour, integer output")
    app.add_argument("--force", action="store_true", help="replace existing outputs")
    app.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``xjax apply`` command; returns the exit status."""
    apply_files(args.source, args.images, args.output, args.index, labels=args.labels,
                force=args.force)
    return 0
