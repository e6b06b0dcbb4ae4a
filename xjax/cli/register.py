"""The ``xjax register`` command: one group of NIfTI images, or every group of a directory at once.

``xjax register IMAGE... -o OUTDIR`` reads a group of NIfTI images, resamples them onto one common
grid, registers them with the X-metric and writes, into one output directory (all at once, or
nothing on failure):

* ``warped_{j}_{stem}.nii.gz``: input ``j`` sampled once, from its own grid, at ``x + u_j(x)`` for
  every voxel ``x`` of the common grid;
* ``displacement_{j}_{stem}.nii.gz``: ``u_j`` in world mm on the common grid (NIfTI vector image,
  pull convention of :mod:`xjax.grid`);
* ``posterior.nii.gz`` (class probabilities, ``K`` volumes) and ``segmentation.nii.gz`` (argmax);
* ``report.json`` (inputs, settings, loss history, status, timings, versions, device) and
  ``transforms.json`` (which displacement belongs to which input).

``xjax register --groups DIR`` registers every sub-directory of ``DIR`` (one group each) as one
batched job, with the same outputs in ``OUTDIR/<sub-directory>/``.

This module holds :func:`register_files`, :func:`register_groups`, the reading and writing of a
group, and the sub-command's parser and handler. JAX, numpy and the core of xjax are imported when
a command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import TYPE_CHECKING, NamedTuple, Sequence

from xjax.cli.common import (INITS, PRESETS, finished, label_dtype, parse_reference, quality_report,
                             settings)

if TYPE_CHECKING:
    import numpy as np

    from xjax.grid import Grid

__all__ = ["add_parser", "run", "register_files", "register_groups"]


class _Group(NamedTuple):
    """A group read from disk and resampled onto its common grid."""

    paths: list  # absolute input paths
    loaded: list  # (array, grid) of every input, as read
    images: np.ndarray  # (N, *common.shape) float32
    common: Grid
    weights: np.ndarray | None  # mask on the common grid


def _load_group(paths: Sequence[str], reference: int | str, mask: str | None) -> _Group:
    """Read, check and resample one group (and its optional mask) onto the common grid."""
    from xjax.io import load_image
    from xjax.resample import pull_image, to_common_space
    from xjax.validate import check_images, check_mask

    paths = [os.path.abspath(p) for p in paths]
    if len(paths) < 2:
        raise ValueError(f"groupwise registration needs at least 2 images, got {len(paths)}")
    loaded = [load_image(p) for p in paths]
    group, common = to_common_space([a for a, _ in loaded], [g for _, g in loaded], reference,
                                    names=paths)
    check_images(group, names=paths)
    weights = None
    if mask is not None:
        m, mgrid = load_image(mask)
        weights = pull_image(m, mgrid, common)
        try:
            check_mask(weights, common.shape)
        except ValueError as e:
            raise ValueError(f"{mask}: {e}") from e
    return _Group(paths, loaded, group, common, weights)


def _write_group(tmp: str, group: _Group, result, report: dict) -> None:
    """Write one group's outputs into the directory ``tmp``: warped inputs, displacements,
    posterior and segmentation, and ``transforms.json``; ``report`` is completed with the inputs,
    outputs, status, loss history and ``pi`` (the caller writes it)."""
    import numpy as np

    from xjax.io import grid_dict, save_image, write_transforms

    posterior = np.asarray(result.posterior, np.float32)
    common = group.common
    entries = write_transforms(tmp, group.paths, group.loaded, common, result.displacements)
    report.update({
        "inputs": [{"path": p, "grid": grid_dict(g)} for p, (_, g) in zip(group.paths, group.loaded)],
        "common_grid": grid_dict(common),
        "outputs": entries,
        "status": int(result.status),
        "quality": quality_report(group.paths, result.quality),
        "loss_history": [float(v) for v in np.asarray(result.loss_history)],
        "pi": [float(v) for v in np.asarray(result.pi)],
    })
    save_image(os.path.join(tmp, "posterior.nii.gz"), posterior, common)
    segmentation = np.argmax(posterior, axis=-1)
    save_image(os.path.join(tmp, "segmentation.nii.gz"), segmentation, common,
               dtype=label_dtype(segmentation))


def register_files(paths: Sequence[str], outdir: str, *, preset: str = "rigid+ffd",
                   reference: int | str = 0, options: dict | None = None, mask: str | None = None,
                   seed: int = 0, force: bool = False, quiet: bool = False) -> dict:
    """Register the NIfTI images ``paths`` and write every output into ``outdir``.

    Everything is loaded and checked before any computation and before ``outdir`` is created.
    Each image enters the registration z-scored (:func:`xjax.intensity.zscore`).

    Args:
      paths: two or more 2D or 3D NIfTI images (any grids).
      outdir: output directory (must not exist unless ``force``).
      preset: a name of :data:`xjax.presets.NAMES`.
      reference: index of the input whose grid is the common grid, or ``"bounds"``.
      options: overrides by command-line name (keys of :data:`xjax.cli.common.OVERRIDES` and
        :data:`xjax.cli.common.CONFIG_OVERRIDES`); None values are ignored.
      mask: optional NIfTI weight mask (any grid; resampled linearly onto the common grid).
      seed: seed of the PRNG key.
      force: replace an existing ``outdir``.
      quiet: no progress bar.

    Returns:
      The report written to ``report.json``.
    """
    import jax
    import numpy as np

    from xjax.intensity import zscore
    from xjax.io import atomic_output_dir, check_output_path, write_json
    from xjax.progress import ProgressBar
    from xjax.registration import register

    check_output_path(outdir, force, kind="directory", inputs=[*paths, mask])
    config, report = settings(preset, options, reference, seed)
    t0 = time.perf_counter()
    group = _load_group(paths, reference, mask)
    report["mask"] = os.path.abspath(mask) if mask is not None else None
    t1 = time.perf_counter()

    bar = None if quiet else ProgressBar("registering")
    try:
        result = register(np.asarray(zscore(group.images)), group.common, config,
                          key=jax.random.key(seed), mask=group.weights, progress=bar)
        result = jax.block_until_ready(result)
    finally:
        if bar is not None:
            bar.close()
    t2 = time.perf_counter()

    with atomic_output_dir(outdir, force) as tmp:
        report["timings_s"] = {"load": t1 - t0, "compile_and_run": t2 - t1}
        _write_group(tmp, group, result, report)
        report["timings_s"]["write"] = time.perf_counter() - t2
        write_json(os.path.join(tmp, "report.json"), report)
    return report


def _group_dirs(root: str) -> list[tuple[str, list[str]]]:
    """``[(name, sorted NIfTI paths)]`` of the sub-directories of ``root`` that hold images."""
    if not os.path.isdir(root):
        raise ValueError(f"--groups {root}: not a directory")
    groups = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if os.path.isdir(folder):
            files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                           if f.endswith((".nii", ".nii.gz")))
            if files:
                groups.append((name, files))
    if not groups:
        raise ValueError(f"--groups {root}: no sub-directory holds NIfTI images")
    return groups


def register_groups(root: str, outdir: str, *, preset: str = "rigid+ffd", reference: int | str = 0,
                    options: dict | None = None, seed: int = 0, batch: int | None = None,
                    force: bool = False, quiet: bool = False) -> dict:
    """Register every group of a directory as one batched job (``jax.vmap`` over the groups).

    Each sub-directory of ``root`` holding NIfTI files is a group (its files in name order). The
    groups must agree in size ``N``, in the shape of their common grids and in voxel spacing and
    orientation; their origins may differ, since the registration does not depend on where a grid
    sits in the world (the transforms act about each grid's centre). Group ``g`` is registered with
    the key ``fold_in(key(seed), g)``, and its outputs are those of :func:`register_files`, written
    to ``outdir/<group name>/``; ``outdir/report.json`` summarises the batch. Everything is read and
    checked before any computation; ``outdir`` appears all at once.

    Args:
      batch: groups per vmapped call (default: all at once); smaller batches bound the memory.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xjax.intensity import zscore
    from xjax.io import atomic_output_dir, check_output_path, write_json
    from xjax.progress import ProgressBar
    from xjax.registration import register

    check_output_path(outdir, force, kind="directory", inputs=[root])
    config, common_settings = settings(preset, options, reference, seed)
    if batch is not None and batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    t0 = time.perf_counter()
    names, groups = [], []
    for name, files in _group_dirs(root):
        names.append(name)
        groups.append(_load_group(files, reference, None))
    first = groups[0]
    for name, g in zip(names, groups):
        if g.images.shape != first.images.shape or not np.allclose(
                g.common.matrix[:-1, :-1], first.common.matrix[:-1, :-1], atol=1e-5):
            raise ValueError(
                f"--groups: group {name!r} ({len(g.paths)} images on {g.common}) differs from group "
                f"{names[0]!r} ({len(first.paths)} images on {first.common}); a batch needs groups of "
                "one size on grids of one shape, spacing and orientation")
    stacked = np.stack([np.asarray(zscore(g.images)) for g in groups])
    keys = jax.vmap(lambda g: jax.random.fold_in(jax.random.key(seed), g))(jnp.arange(len(groups)))
    t1 = time.perf_counter()

    run_batch = jax.vmap(lambda images, key: register(images, first.common, config, key=key))
    size = batch or len(groups)
    bar = None if quiet else ProgressBar(f"registering {len(groups)} groups")
    results = []
    try:
        for start in range(0, len(groups), size):
            chunk = jax.block_until_ready(run_batch(stacked[start:start + size], keys[start:start + size]))
            results += [jax.tree.map(lambda a, b=b: a[b], chunk) for b in range(len(chunk.status))]
            if bar is not None:
                bar(min(start + size, len(groups)), len(groups), float(np.mean(chunk.loss_history[:, -1])))
    finally:
        if bar is not None:
            bar.close()
    t2 = time.perf_counter()

    summary = {**common_settings, "groups": [], "batch": size,
               "timings_s": {"load": t1 - t0, "compile_and_run": t2 - t1}}
    with atomic_output_dir(outdir, force) as tmp:
        for name, g, result in zip(names, groups, results):
            os.mkdir(os.path.join(tmp, name))
            report = {**common_settings, "mask": None, "group": name}
            _write_group(os.path.join(tmp, name), g, result, report)
            write_json(os.path.join(tmp, name, "report.json"), report)
            summary["groups"].append({"name": name, "images": len(g.paths), "status": report["status"],
                                      "final_loss": report["loss_history"][-1],
                                      "quality": report["quality"]})
        summary["status"] = max(entry["status"] for entry in summary["groups"])
        summary["timings_s"]["write"] = time.perf_counter() - t2
        write_json(os.path.join(tmp, "report.json"), summary)
    return summary


def add_parser(commands) -> None:
    """Add the ``register`` command to the ``xjax`` sub-parsers."""
    reg = commands.add_parser(
        "register", help="register a group of NIfTI images",
        description="Register two or more 2D or 3D NIfTI images (any grids) into one common space. "
                    "Options left out take the preset's values.")
    reg.add_argument("images", nargs="*", metavar="IMAGE", help="input NIfTI images")
    reg.add_argument("--groups", metavar="DIR",
                     help="instead of IMAGEs: register every sub-directory of DIR (a group of NIfTI "
                          "images each; groups of one size and grid shape) as one batched job, "
                          "outputs in OUTDIR/<sub-directory>/")
    reg.add_argument("--batch", type=int, metavar="G",
                     help="with --groups: groups per batched call (default: all)")
    reg.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory")
    reg.add_argument("--preset", default="rigid+ffd", choices=PRESETS,
                     help="the registration's stages (default: rigid+ffd, translation then rigid "
                          "then a 24 mm B-spline FFD); see xjax.presets")
    reg.add_argument("--reference", type=parse_reference, default=0, metavar="J|bounds",
                     help="common grid: the grid of image J (default 0), or 'bounds' (a grid "
                          "holding every image, at the finest spacing)")
    reg.add_argument("--classes", type=int, metavar="K", help="classes of the common anatomy (default 4)")
    reg.add_argument("--bins", type=int, metavar="L",
                     help="Parzen intensity bins (presets: 64; 32 for the translation stage)")
    reg.add_argument("--iterations", type=int, metavar="N",
                     help="steps per stage and level (presets: 100; translation stages half)")
    reg.add_argument("--levels", type=int, metavar="N", help="pyramid levels (presets: 2; svf 3)")
    reg.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                     help="FFD control-point spacing in mm, one value per FFD level, coarse first "
                          "(presets: 24)")
    reg.add_argument("--lr", type=float, metavar="LR",
                     help="Adam step size of the non-linear stages, mm per step (presets: FFD 0.3, "
                          "svf 0.1)")
    reg.add_argument("--bending", type=float, metavar="LAMBDA",
                     help="bending energy weight, dimensionless: the FFD's bending in units of its "
                          "mesh spacing (presets: 1.0; svf 1.0 on its dense field)")
    reg.add_argument("--sample-rate", type=float, metavar="F",
                     help="fraction of the voxels drawn per step (presets: 0.1); raise it for small "
                          "images, where a few hundred voxels make noisy steps")
    reg.add_argument("--init-posterior", choices=INITS,
                     help="start of the common anatomy: k-means classes of the images (default) or "
                          "the paper's random posterior (Eq. 22)")
    reg.add_argument("--mask", metavar="MASK", help="NIfTI weight mask (any grid)")
    reg.add_argument("--seed", type=int, default=0,
                     help="seed of the random voxel samples and the k-means start (default 0)")
    reg.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    reg.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    reg.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``xjax register`` command; returns the exit status."""
    spacing = args.spacing
    if spacing is not None:
        spacing = spacing[0] if len(spacing) == 1 else tuple(spacing)
    options = {"classes": args.classes, "bins": args.bins, "iterations": args.iterations,
               "levels": args.levels, "spacing": spacing, "lr": args.lr, "bending": args.bending,
               "sample_rate": args.sample_rate, "init_posterior": args.init_posterior}
    if args.groups is not None:
        if args.images or args.mask is not None:
            raise ValueError("--groups DIR replaces the IMAGEs (and takes no --mask)")
        summary = register_groups(args.groups, args.output, preset=args.preset,
                                  reference=args.reference, options=options, seed=args.seed,
                                  batch=args.batch, force=args.force, quiet=args.quiet)
        failed = [finished(entry, os.path.join(args.output, entry["name"]), True)
                  for entry in summary["groups"]]
        if not args.quiet:
            t = summary["timings_s"]
            print(f"registered {len(summary['groups'])} groups into {args.output} (load {t['load']:.1f} s, "
                  f"compile and run {t['compile_and_run']:.1f} s, write {t['write']:.1f} s)")
        return 1 if any(failed) else 0
    if args.batch is not None:
        raise ValueError("--batch applies to --groups only")
    report = register_files(args.images, args.output, preset=args.preset, reference=args.reference,
                            options=options, mask=args.mask, seed=args.seed, force=args.force,
                            quiet=args.quiet)
    return finished(report, args.output, args.quiet)
