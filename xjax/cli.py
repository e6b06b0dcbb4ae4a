"""The ``xjax`` command line: ``register``, ``apply`` and ``demo``.

``xjax register`` reads a group of NIfTI images, resamples them onto one common grid, registers them
with the X-metric and writes, into one output directory (all at once, or nothing on failure):

* ``warped_{j}_{stem}.nii.gz``: input ``j`` sampled once, from its own grid, at ``x + u_j(x)`` for
  every voxel ``x`` of the common grid;
* ``displacement_{j}_{stem}.nii.gz``: ``u_j`` in world mm on the common grid (NIfTI vector image,
  pull convention of :mod:`xjax.grid`);
* ``posterior.nii.gz`` (class probabilities, ``K`` volumes) and ``segmentation.nii.gz`` (argmax);
* ``report.json`` (inputs, settings, loss history, status, timings, versions, device) and
  ``transforms.json`` (which displacement belongs to which input).

``xjax register --groups DIR`` registers every sub-directory of ``DIR`` (one group each) as one
batched job, with the same outputs in ``OUTDIR/<sub-directory>/``. ``xjax apply`` warps further
images (or label maps) with those displacements; ``xjax demo`` runs the whole path on a synthetic
phantom with a known misalignment.

Errors in the input print ``xjax: error: ...`` and exit with status 2; a registration that fails
(``Result.status`` not 0: non-finite values, or an overlap region that ran empty) still writes its
outputs, says why, and exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import sys
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xjax import evaluate, phantoms, presets
from xjax.grid import Grid
from xjax.io import (TRANSFORMS_JSON, atomic_output_dir, check_output_path, load_displacement,
                     load_image, load_labels, pull_image, save_image, to_common_space, write_transforms)
from xjax.io import grid_dict as _grid_dict
from xjax.io import write_json as _write_json
from xjax.nn import bingo_cli, dcc_cli
from xjax.objectives import INITS
from xjax.progress import ProgressBar
from xjax.registration import STATUS, register
from xjax.validate import check_bins, check_images, check_mask, check_num_classes

__all__ = ["main", "build_parser", "register_files", "register_groups", "apply_files", "run_demo"]

#: command-line option -> keyword of the :mod:`xjax.presets` factories it sets.
OVERRIDES = {
    "classes": "num_classes",
    "bins": "bins",
    "iterations": "iterations",
    "levels": "levels",
    "spacing": "spacing",
    "lr": "learning_rate",
    "bending": "bending",
    "sample_rate": "sample_rate",
}
#: command-line option -> field of :class:`xjax.Config` it sets, whatever the preset.
CONFIG_OVERRIDES = {"init_posterior": "init_posterior"}




def _config(preset: str, options: dict):
    """The preset with the options given; an option the preset has no knob for is an error."""
    if preset not in presets.NAMES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(presets.NAMES)}")
    knobs, fields = {}, {}
    for option, value in options.items():
        if value is None:
            continue
        if option in CONFIG_OVERRIDES:
            fields[CONFIG_OVERRIDES[option]] = value
            continue
        try:
            presets.get(preset, **{OVERRIDES[option]: value})
        except TypeError:
            flag = "--" + option.replace("_", "-")
            raise ValueError(f"{flag} does not apply to the preset {preset!r}") from None
        knobs[OVERRIDES[option]] = value
    return dataclasses.replace(presets.get(preset, **knobs), **fields)


def _check_options(options: dict) -> None:
    """Host-side checks of the numeric options, before anything is loaded."""
    if options.get("classes") is not None:
        check_num_classes(options["classes"])
    if options.get("bins") is not None:
        check_bins(options["bins"])
    for name in ("iterations", "levels"):
        if options.get(name) is not None and options[name] < 1:
            raise ValueError(f"--{name} must be >= 1, got {options[name]}")
    for name in ("spacing", "lr"):
        if options.get(name) is not None and not options[name] > 0:
            raise ValueError(f"--{name} must be > 0, got {options[name]}")
    if options.get("bending") is not None and not options["bending"] >= 0:
        raise ValueError(f"--bending must be >= 0, got {options['bending']}")
    if options.get("sample_rate") is not None and not 0 < options["sample_rate"] <= 1:
        raise ValueError(f"--sample-rate must be in (0, 1], got {options['sample_rate']}")


def _zscore(images: np.ndarray) -> np.ndarray:
    """Each image of ``(N, *spatial)`` to zero mean and unit standard deviation."""
    axes = tuple(range(1, images.ndim))
    mean = images.mean(axis=axes, keepdims=True)
    std = images.std(axis=axes, keepdims=True)
    return ((images - mean) / std).astype(np.float32)


class _Group(NamedTuple):
    """A group read from disk and resampled onto its common grid."""

    paths: list  # absolute input paths
    loaded: list  # (array, grid) of every input, as read
    images: np.ndarray  # (N, *common.shape) float32
    common: Grid
    weights: np.ndarray | None  # mask on the common grid


def _load_group(paths: Sequence[str], reference: int | str, mask: str | None) -> _Group:
    """Read, check and resample one group (and its optional mask) onto the common grid."""
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
    posterior = np.asarray(result.posterior, np.float32)
    common = group.common
    entries = write_transforms(tmp, group.paths, group.loaded, common, result.displacements)
    report.update({
        "inputs": [{"path": p, "grid": _grid_dict(g)} for p, (_, g) in zip(group.paths, group.loaded)],
        "common_grid": _grid_dict(common),
        "outputs": entries,
        "status": int(result.status),
        "loss_history": [float(v) for v in np.asarray(result.loss_history)],
        "pi": [float(v) for v in np.asarray(result.pi)],
    })
    save_image(os.path.join(tmp, "posterior.nii.gz"), posterior, common)
    segmentation = np.argmax(posterior, axis=-1)
    save_image(os.path.join(tmp, "segmentation.nii.gz"), segmentation, common,
               dtype=_label_dtype(segmentation))


def _settings(preset: str, options: dict | None, reference, seed: int):
    """The config of the preset with the options, and the report's settings entries."""
    options = dict(options or {})
    known = set(OVERRIDES) | set(CONFIG_OVERRIDES)
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; known: {sorted(known)}")
    _check_options(options)
    config = _config(preset, options)
    return config, {
        "reference": reference, "preset": preset, "seed": seed, "settings": config.to_dict(),
        "versions": {"xjax": importlib.metadata.version("xjax"), "jax": jax.__version__},
        "device": str(jax.devices()[0]),
    }


def register_files(paths: Sequence[str], outdir: str, *, preset: str = "rigid+ffd",
                   reference: int | str = 0, options: dict | None = None, mask: str | None = None,
                   seed: int = 0, force: bool = False, quiet: bool = False) -> dict:
    """Register the NIfTI images ``paths`` and write every output into ``outdir``.

    Everything is loaded and checked before any computation and before ``outdir`` is created.

    Args:
      paths: two or more 2D or 3D NIfTI images (any grids).
      outdir: output directory (must not exist unless ``force``).
      preset: a name of :data:`xjax.presets.NAMES`.
      reference: index of the input whose grid is the common grid, or ``"bounds"``.
      options: overrides by command-line name (keys of :data:`OVERRIDES` and
        :data:`CONFIG_OVERRIDES`); None values are ignored.
      mask: optional NIfTI weight mask (any grid; resampled linearly onto the common grid).
      seed: seed of the PRNG key.
      force: replace an existing ``outdir``.
      quiet: no progress bar.

    Returns:
      The report written to ``report.json``.
    """
    check_output_path(outdir, force)
    config, report = _settings(preset, options, reference, seed)
    t0 = time.perf_counter()
    group = _load_group(paths, reference, mask)
    report["mask"] = os.path.abspath(mask) if mask is not None else None
    t1 = time.perf_counter()

    bar = None if quiet else ProgressBar("registering")
    try:
        result = register(_zscore(group.images), group.common, config, key=jax.random.key(seed),
                          mask=group.weights, progress=bar)
        result = jax.block_until_ready(result)
    finally:
        if bar is not None:
            bar.close()
    t2 = time.perf_counter()

    with atomic_output_dir(outdir, force) as tmp:
        report["timings_s"] = {"load": t1 - t0, "compile_and_run": t2 - t1}
        _write_group(tmp, group, result, report)
        report["timings_s"]["write"] = time.perf_counter() - t2
        _write_json(os.path.join(tmp, "report.json"), report)
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
    check_output_path(outdir, force)
    config, settings = _settings(preset, options, reference, seed)
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
    stacked = np.stack([_zscore(g.images) for g in groups])
    keys = jax.vmap(lambda g: jax.random.fold_in(jax.random.key(seed), g))(jnp.arange(len(groups)))
    t1 = time.perf_counter()

    run = jax.vmap(lambda images, key: register(images, first.common, config, key=key))
    size = batch or len(groups)
    bar = None if quiet else ProgressBar(f"registering {len(groups)} groups")
    results = []
    try:
        for start in range(0, len(groups), size):
            chunk = jax.block_until_ready(run(stacked[start:start + size], keys[start:start + size]))
            results += [jax.tree.map(lambda a, b=b: a[b], chunk) for b in range(len(chunk.status))]
            if bar is not None:
                bar(min(start + size, len(groups)), len(groups), float(np.mean(chunk.loss_history[:, -1])))
    finally:
        if bar is not None:
            bar.close()
    t2 = time.perf_counter()

    summary = {**settings, "groups": [], "batch": size,
               "timings_s": {"load": t1 - t0, "compile_and_run": t2 - t1}}
    with atomic_output_dir(outdir, force) as tmp:
        for name, g, result in zip(names, groups, results):
            os.mkdir(os.path.join(tmp, name))
            report = {**settings, "mask": None, "group": name}
            _write_group(os.path.join(tmp, name), g, result, report)
            _write_json(os.path.join(tmp, name, "report.json"), report)
            summary["groups"].append({"name": name, "images": len(g.paths), "status": report["status"],
                                      "final_loss": report["loss_history"][-1]})
        summary["status"] = max(entry["status"] for entry in summary["groups"])
        summary["timings_s"]["write"] = time.perf_counter() - t2
        _write_json(os.path.join(tmp, "report.json"), summary)
    return summary


def _displacement_source(source: str, index: int | None) -> str:
    """The displacement file for ``--index`` in an output directory, or ``source`` itself."""
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


def _label_dtype(labels: np.ndarray):
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    return np.result_type(np.min_scalar_type(lo), np.min_scalar_type(hi))


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
    """
    if len(outputs) != len(images):
        raise ValueError(f"give one output per image: {len(images)} images, {len(outputs)} outputs")
    if indices is not None and len(indices) not in (1, len(images)):
        raise ValueError(f"give one --index for all images or one per image: {len(images)} images, "
                         f"{len(indices)} indices")
    if indices is None or len(indices) == len(images):
        per_image = list(indices) if indices is not None else [None] * len(images)
    else:
        per_image = list(indices) * len(images)
    for out in outputs:
        check_output_path(out, force)
    jobs = []  # everything is read and checked before anything is written
    for j, image_path, out in zip(per_image, images, outputs):
        field_path = _displacement_source(source, j)
        disp, common = load_displacement(field_path)
        values, grid = load_labels(image_path) if labels else load_image(image_path)
        if grid.ndim != common.ndim:
            raise ValueError(f"{image_path}: a {grid.ndim}D image cannot be warped by the "
                             f"{common.ndim}D displacement {field_path}")
        jobs.append((values, grid, disp, common, out))
    for values, grid, disp, common, out in jobs:
        warped = pull_image(values, grid, common, disp, order=0 if labels else 1)
        save_image(out, warped, common, dtype=_label_dtype(warped) if labels else None)


# ---- demo ----------------------------------------------------------------------------------------

def _unit(image: np.ndarray) -> np.ndarray:
    """Intensities to [0, 1] between the 1st and 99th percentiles (for display)."""
    lo, hi = np.percentile(image, [1, 99])
    return np.clip((image - lo) / max(hi - lo, 1e-12), 0, 1)


def _checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """``a`` on the white squares and ``b`` on the black squares of a board of ``tiles`` squares
    along each axis."""
    squares = [np.arange(s) * tiles // s for s in a.shape]
    white = (squares[0][:, None] + squares[1][None, :]) % 2 == 0
    return np.where(white, _unit(a), _unit(b))


def _figure(path: str, before: np.ndarray, after: np.ndarray, segmentation: np.ndarray,
            losses: np.ndarray) -> None:
    """Rows: inputs before; warped after; checkerboards of modalities 0 and 1 before and after,
    the segmentation (posterior argmax) and the loss curve. Written atomically."""
    from matplotlib.figure import Figure  # only the demo draws: keep it out of every start-up

    n = before.shape[0]
    cols = max(n, 4)
    fig = Figure(figsize=(2.6 * cols, 8.0), layout="constrained")
    axes = fig.subplots(3, cols, squeeze=False)

    def show(ax, image, title, **kw):  # x to the right, y up
        ax.imshow(image.T, origin="lower", **kw)
        ax.set_title(title, fontsize=9)

    for j in range(n):
        show(axes[0, j], _unit(before[j]), f"input {j} (before)", cmap="gray")
        show(axes[1, j], _unit(after[j]), f"warped {j} (after)", cmap="gray")
    show(axes[2, 0], _checkerboard(before[0], before[1]), "0 vs 1 before", cmap="gray")
    show(axes[2, 1], _checkerboard(after[0], after[1]), "0 vs 1 after", cmap="gray")
    show(axes[2, 2], segmentation, "posterior argmax", cmap="viridis", interpolation="nearest")
    axes[2, 3].plot(losses)
    axes[2, 3].set_title("loss (-X + bending)", fontsize=9)
    axes[2, 3].set_xlabel("step")
    for ax in axes.flat:
        if ax is not axes[2, 3]:
            ax.set_axis_off()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=72)
    os.replace(tmp, path)


def _mean_class_dice(labels, num_classes: int) -> float:
    return float(np.nanmean(np.asarray(evaluate.pairwise_dice_per_class(jnp.asarray(labels),
                                                                         num_classes))))


def run_demo(outdir: str, *, size: int = 128, modalities: int = 3, iterations: int = 100,
             seed: int = 0, force: bool = False, quiet: bool = False) -> dict:
    """Register a synthetic 2D phantom group misaligned by a known random FFD.

    The phantom has ``size x size`` voxels of 1 mm; each modality is misaligned by a random cubic
    B-spline FFD with control points ``size / 4`` mm apart and coefficients up to ``size / 16`` mm
    (diffeomorphic, see :func:`xjax.phantoms.random_ffd`), and registered with the ``"ffd"`` preset
    at that control spacing (two pyramid levels of ``iterations`` steps).

    Writes ``outdir/inputs`` (misaligned images and labels), runs :func:`register_files` into
    ``outdir/registration``, warps the labels like ``xjax apply --labels`` into
    ``outdir/warped_labels_{j}.nii.gz``, and writes ``outdir/before_after.png`` and
    ``outdir/demo.json`` (mean pairwise class Dice and gWI in mm, before and after).

    Returns:
      The metrics written to ``demo.json``.
    """
    if modalities < 2:
        raise ValueError(f"--modalities must be >= 2 for a group, got {modalities}")
    _check_options({"iterations": iterations})
    check_output_path(outdir, force)
    k_phantom, k_misalign = jax.random.split(jax.random.key(seed))
    phantom = phantoms.make_phantom(k_phantom, (size, size), num_modalities=modalities)
    spacing = size / 4.0
    group = phantoms.misaligned_group(k_misalign, phantom, kind="ffd", spacing=spacing,
                                      magnitude=size / 16.0)
    num_classes = int(phantom.intensity_table.shape[1])
    with atomic_output_dir(outdir, force) as tmp:
        os.mkdir(os.path.join(tmp, "inputs"))
        for j in range(modalities):
            save_image(os.path.join(tmp, "inputs", f"image_{j}.nii.gz"), group.images[j], phantom.grid)
            save_image(os.path.join(tmp, "inputs", f"labels_{j}.nii.gz"), group.labels[j],
                       phantom.grid, dtype=np.uint8)
    image_paths = [os.path.join(outdir, "inputs", f"image_{j}.nii.gz") for j in range(modalities)]
    label_paths = [os.path.join(outdir, "inputs", f"labels_{j}.nii.gz") for j in range(modalities)]
    registration = os.path.join(outdir, "registration")
    options = {"iterations": iterations, "levels": 2, "spacing": spacing, "classes": num_classes}
    report = register_files(image_paths, registration, preset="ffd", options=options, seed=seed,
                            quiet=quiet)
    warped_labels = [os.path.join(outdir, f"warped_labels_{j}.nii.gz") for j in range(modalities)]
    apply_files(registration, label_paths, warped_labels, list(range(modalities)), labels=True)

    entries = report["outputs"]
    estimated = np.stack([load_displacement(os.path.join(registration, e["displacement"]))[0]
                          for e in entries])
    after_labels = np.stack([load_labels(p, phantom.grid)[0] for p in warped_labels])
    foreground = phantom.labels > 0
    metrics = {
        "mean_class_dice": {"before": _mean_class_dice(group.labels, num_classes),
                            "after": _mean_class_dice(after_labels, num_classes)},
        "gwi_mm": {"before": float(evaluate.gwi(group.displacements, jnp.zeros_like(estimated),
                                                phantom.grid, foreground)),
                   "after": float(evaluate.gwi(group.displacements, jnp.asarray(estimated),
                                               phantom.grid, foreground))},
        "status": report["status"],
    }
    after = np.stack([load_image(os.path.join(registration, e["warped"]))[0] for e in entries])
    segmentation = load_labels(os.path.join(registration, "segmentation.nii.gz"))[0]
    _figure(os.path.join(outdir, "before_after.png"), np.asarray(group.images), after, segmentation,
            np.asarray(report["loss_history"]))
    _write_json(os.path.join(outdir, "demo.json"), metrics)
    return metrics


# ---- command line --------------------------------------------------------------------------------

def _reference(text: str) -> int | str:
    if text == "bounds":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an image index or 'bounds', got {text!r}") from None


def _indices(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected J or J1,J2,..., got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xjax", description="Multimodal groupwise image registration by the X-metric.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    reg.add_argument("--preset", default="rigid+ffd", choices=presets.NAMES)
    reg.add_argument("--reference", type=_reference, default=0, metavar="J|bounds",
                     help="common grid: the grid of image J (default 0), or 'bounds' (a grid "
                          "holding every image, at the finest spacing)")
    reg.add_argument("--classes", type=int, metavar="K", help="classes of the common anatomy")
    reg.add_argument("--bins", type=int, metavar="L", help="Parzen intensity bins")
    reg.add_argument("--iterations", type=int, metavar="N", help="steps per stage and level")
    reg.add_argument("--levels", type=int, metavar="N", help="pyramid levels")
    reg.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                     help="FFD control-point spacing in mm, one value per FFD level, coarse first")
    reg.add_argument("--lr", type=float, metavar="LR", help="Adam step size of the non-linear stages")
    reg.add_argument("--bending", type=float, metavar="LAMBDA", help="bending energy weight")
    reg.add_argument("--sample-rate", type=float, metavar="F",
                     help="fraction of the voxels drawn per step (presets: 0.1); raise it for small "
                          "images, where a few hundred voxels make noisy steps")
    reg.add_argument("--init-posterior", choices=INITS,
                     help="start of the common anatomy: k-means classes of the images (default) or "
                          "the paper's random posterior (Eq. 22)")
    reg.add_argument("--mask", metavar="MASK", help="NIfTI weight mask (any grid)")
    reg.add_argument("--seed", type=int, default=0)
    reg.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    reg.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    reg.set_defaults(run=_cmd_register)

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
    app.add_argument("--index", type=_indices, metavar="J[,J...]",
                     help="transform of input J of OUTDIR: one index for every IMAGE, or a "
                          "comma-separated index per IMAGE (not used with a displacement file)")
    app.add_argument("--labels", action="store_true",
                     help="IMAGEs are label maps: nearest neighbour, integer output")
    app.add_argument("--force", action="store_true", help="replace existing outputs")
    app.set_defaults(run=_cmd_apply)

    demo = commands.add_parser(
        "demo", help="register a synthetic phantom with a known misalignment",
        description="Make a 2D multimodal phantom, misalign it by a random FFD, register it with the "
                    "same code as 'xjax register' (preset 'ffd'), and report Dice and gWI before "
                    "and after.")
    demo.add_argument("-o", "--output", default="xjax-demo", metavar="OUTDIR")
    demo.add_argument("--size", type=int, default=128, help="phantom size in voxels (1 mm)")
    demo.add_argument("--modalities", type=int, default=3)
    demo.add_argument("--iterations", type=int, default=100, help="steps per stage and level")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_cmd_demo)
    dcc_cli.add_parser(commands)
    bingo_cli.add_parser(commands)
    return parser


def _cmd_register(args) -> int:
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
        if not args.quiet:
            t = summary["timings_s"]
            print(f"registered {len(summary['groups'])} groups into {args.output} (load {t['load']:.1f} s, "
                  f"compile and run {t['compile_and_run']:.1f} s, write {t['write']:.1f} s)")
        return 0 if summary["status"] == 0 else 1
    if args.batch is not None:
        raise ValueError("--batch applies to --groups only")
    report = register_files(args.images, args.output, preset=args.preset, reference=args.reference,
                            options=options, mask=args.mask, seed=args.seed, force=args.force,
                            quiet=args.quiet)
    return _finished(report, args.output, args.quiet)


def _finished(report: dict, outdir: str, quiet: bool) -> int:
    if report["status"] != 0:
        status = report["status"]
        print(f"xjax: warning: the registration failed (status {status}: "
              f"{STATUS.get(status, 'see the report')}); outputs written to {outdir}", file=sys.stderr)
        return 1
    if not quiet:
        t = report["timings_s"]
        print(f"registered {len(report['inputs'])} images into {outdir} (load {t['load']:.1f} s, "
              f"compile and run {t['compile_and_run']:.1f} s, write {t['write']:.1f} s)")
    return 0


def _cmd_apply(args) -> int:
    apply_files(args.source, args.images, args.output, args.index, labels=args.labels,
                force=args.force)
    return 0


def _cmd_demo(args) -> int:
    metrics = run_demo(args.output, size=args.size, modalities=args.modalities,
                       iterations=args.iterations, seed=args.seed,
                       force=args.force, quiet=args.quiet)
    dice, gwi = metrics["mean_class_dice"], metrics["gwi_mm"]
    print(f"mean pairwise class Dice  before {dice['before']:.3f}  after {dice['after']:.3f}")
    print(f"gWI (mm)                  before {gwi['before']:.3f}  after {gwi['after']:.3f}")
    print(f"figure: {os.path.join(args.output, 'before_after.png')}")
    return 0 if metrics["status"] == 0 else 1


def _enable_compilation_cache() -> None:
    """Keep compiled registration programs between runs, so that repeated commands with the same
    shapes and settings skip compilation: in ``$XJAX_CACHE_DIR`` if set (empty: no cache), else
    in ``$XDG_CACHE_HOME/xjax`` or ``~/.cache/xjax``. Only ``--quiet`` runs profit: JAX does not
    store programs that report progress through host callbacks."""
    path = os.environ.get("XJAX_CACHE_DIR")
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "xjax")
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad input, with no traceback)."""
    _enable_compilation_cache()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage and the error
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.run(args)
    except (ValueError, OSError) as e:
        print(f"xjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xjax: interrupted", file=sys.stderr)
        return 130
