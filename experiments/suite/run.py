"""Registration-quality suite: xjax presets beside elastix (itk-elastix default parameter maps) on
real data from the shared data folder, one markdown table.

    python experiments/suite/run.py [--quick] [--cases NAME ...] [--methods NAME ...] --out DIR

Cases (``CASES``):
  spm12_3d_aligned  spm12 T1/T2/PD 3D volumes, already aligned (movement only; downsampled).
  spm12_2d_ffd      spm12 T1/T2/PD axial slice 45 under random FFDs (gWI over the tissue
                    foreground, as experiments/exp_brainweb.py).
Per case and method: gWI (mm) where there is a truth, movement |u| mean / p99 inside the
foreground (mm), Jacobian determinant minimum and folded fraction inside the foreground, pairwise
foreground-label Dice after warping, wall time (compile included).

elastix is pairwise to image 0 (image 0's field = 0), its dense field from
``itk.transformix_deformation_field``. The ITK images are built with identity direction, zero
origin and the grid's voxel sizes, so the ITK physical frame is the index frame scaled by
``|spacing|``: a field ``v`` (ITK components x, y[, z]) is ``sign(spacing) * v`` in xjax's world mm
(for these axis-aligned grids; no LPS/RAS flip arises because no NIfTI header goes through ITK).
``check_elastix_convention`` verifies it by warping image j with the converted field in xjax and
comparing with elastix's own result image.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import xjax  # noqa: E402
from xjax import evaluate, intensity, phantoms  # noqa: E402

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CASES = ("spm12_3d_aligned", "spm12_2d_ffd")
XJAX_METHODS = ("xjax:rigid", "xjax:ffd", "xjax:rigid+ffd")
ELASTIX_METHODS = ("elastix:rigid", "elastix:bspline", "elastix:rigid+bspline")
HEADER = ["case", "method", "gWI mm (before)", "gWI mm", "movement mean mm", "movement p99 mm",
          "det J min", "folded fraction", "Dice (before)", "Dice", "wall s", "status"]

try:
    import itk  # noqa: F401
    HAVE_ITK = True
except ImportError:  # elastix is optional
    HAVE_ITK = False


def _spacing(grid):
    m = grid.matrix[:-1, :-1]
    if not np.allclose(m, np.diag(np.diag(m))):
        raise ValueError(f"the suite's elastix bridge needs an axis-aligned grid, got\n{m}")
    return np.diag(m)


def _to_itk(image, grid):
    import itk
    img = itk.image_from_array(np.ascontiguousarray(np.asarray(image, np.float32).T))
    img.SetSpacing([float(abs(s)) for s in _spacing(grid)])
    return img


def _elastix_maps(name, quick):
    import itk
    po = itk.ParameterObject.New()
    for stage in {"rigid": ["rigid"], "bspline": ["bspline"], "rigid+bspline": ["rigid", "bspline"]}[name]:
        pm = po.GetDefaultParameterMap(stage)
        if quick:
            pm["MaximumNumberOfIterations"] = ["20"]
            pm["NumberOfResolutions"] = ["2"]
        po.AddParameterMap(pm)
    return po


def elastix_pair(fixed, moving, grid, name, quick):
    """Register ``moving`` to ``fixed`` with elastix's default map(s) ``name``: ``(u (*shape, D) mm
    in xjax world, elastix result image (*shape))``."""
    import itk
    f, m = _to_itk(fixed, grid), _to_itk(moving, grid)
    result, params = itk.elastix_registration_method(f, m, parameter_object=_elastix_maps(name, quick),
                                                      log_to_console=False)
    with tempfile.TemporaryDirectory() as scratch:  # transformix writes its field file there
        field = itk.transformix_deformation_field(m, params, output_directory=scratch)
    v = np.asarray(itk.array_from_image(field), np.float32)  # (z, y, x, D) in the ITK frame
    v = np.transpose(v, tuple(range(grid.ndim - 1, -1, -1)) + (grid.ndim,))
    u = v * np.sign(_spacing(grid)).astype(np.float32)
    return u, np.asarray(itk.array_from_image(result)).T


def check_elastix_convention(images, grid, quick=True):
    """Relative RMS between elastix's result image and xjax's warp of the same image through the
    converted field (small when the conversion is right; a flipped axis gives a large value)."""
    u, res = elastix_pair(images[0], images[1], grid, "rigid+bspline", quick)
    w = np.asarray(phantoms.warp(jnp.asarray(images[1:2]), grid, jnp.asarray(u[None])))[0]
    wrong = np.asarray(phantoms.warp(jnp.asarray(images[1:2]), grid, jnp.asarray(-u[None])))[0]
    inner = (slice(4, -4),) * grid.ndim
    rms = lambda a: float(np.sqrt(np.mean((a[inner] - res[inner]) ** 2)) / np.std(res[inner]))
    return rms(w), rms(wrong)


def run_method(method, images, grid, quick, key=0):
    """``(displacements (N, *shape, D), status str, seconds)``."""
    t0 = time.perf_counter()
    family, name = method.split(":", 1)
    if family == "xjax":
        cfg = xjax.presets.get(name)
        if quick:
            import dataclasses
            cfg = dataclasses.replace(cfg, stages=tuple(
                dataclasses.replace(s, iterations=min(s.iterations, 10), levels=1) for s in cfg.stages))
        res = xjax.register(intensity.zscore(jnp.asarray(images)), grid, cfg, key=jax.random.key(key))
        disp = np.asarray(jax.block_until_ready(res.displacements))
        status = str(int(res.status))
    else:
        fields = [np.zeros(images.shape[1:] + (grid.ndim,), np.float32)]
        for j in range(1, len(images)):
            fields.append(elastix_pair(images[0], images[j], grid, name, quick)[0])
        disp, status = np.stack(fields), "0"
    return disp, status, time.perf_counter() - t0


def metrics(disp, grid, foreground, labels, truth=None):
    """The table's numeric cells for displacements ``disp`` (N, *shape, D)."""
    d = jnp.asarray(disp)
    fg = jnp.asarray(foreground)
    length = np.asarray(jnp.linalg.norm(d, axis=-1))[:, np.asarray(foreground)]
    jac = evaluate.jacobian_stats(d, grid, fg)
    out = {"movement mean mm": float(length.mean()), "movement p99 mm": float(np.percentile(length, 99)),
           "det J min": float(jac["min"]), "folded fraction": float(jac["folding"])}
    out["gWI mm"] = float(evaluate.gwi(jnp.asarray(truth), d, grid, fg)) if truth is not None else None
    warped_labels = phantoms.warp(jnp.asarray(labels, jnp.float32), grid, d, order=0).astype(jnp.int32)
    out["Dice"] = float(evaluate.pairwise_dice(warped_labels))
    return out


def load_case(name, quick):
    """``(images (N, *shape), grid, foreground, labels (N, *shape) int, truth or None, protocol)``."""
    if name == "spm12_3d_aligned":
        images, labels, grid = common.load_spm12(DATA, ("T1", "T2", "PD"))
        step = 4 if quick else 2
        images, g2 = common.block_average(np.moveaxis(np.asarray(images), 0, -1), grid, step)
        images = np.ascontiguousarray(np.moveaxis(images, -1, 0))
        lab = common.block_average((labels > 0).astype(np.float32), grid, step)[0] > 0.5
        labs = np.repeat(lab[None].astype(np.int32), 3, 0)
        return (images, g2, lab, labs, None,
                f"spm12 T1/T2/PD templates, already aligned, block-averaged by {step} "
                f"({g2.shape}, {2 * step} mm voxels); movement only; foreground = tissue priors > 0.5")
    if name == "spm12_2d_ffd":
        images, labels, grid = common.load_spm12(DATA, ("T1", "T2", "PD"), axial_slice=45)
        fg = labels > 0
        images = np.asarray(images) * fg
        truth = phantoms.random_ffd(jax.random.key(1), grid, 3, spacing=(48.0, 24.0), magnitude=(9.0, 4.5))
        moved = np.asarray(phantoms.warp(jnp.asarray(images), grid, truth))
        moved_labels = np.asarray(phantoms.warp(jnp.asarray(np.repeat(labels[None], 3, 0), jnp.float32),
                                                grid, truth, order=0)).astype(np.int32)
        return (moved, grid, fg, moved_labels, np.asarray(truth),
                "spm12 T1/T2/PD axial slice 45 (91 x 109, 2 mm) masked to the tissue foreground, each "
                "image pulled through random_ffd(key(1), spacing (48, 24) mm, magnitude (9, 4.5) mm); "
                "gWI over the aligned tissue foreground; Dice of the warped tissue labels")
    raise ValueError(f"unknown case {name!r}; choose from {CASES}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny iterations, 2D case only by default")
    ap.add_argument("--cases", nargs="+", default=None, choices=CASES)
    ap.add_argument("--methods", nargs="+", default=None, choices=XJAX_METHODS + ELASTIX_METHODS)
    ap.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = ap.parse_args(argv)
    load_start = os.getloadavg()
    cases = args.cases or (("spm12_2d_ffd",) if args.quick else CASES)
    methods = args.methods or (XJAX_METHODS + (ELASTIX_METHODS if HAVE_ITK else ()))
    if not HAVE_ITK:
        methods = tuple(m for m in methods if not m.startswith("elastix"))
    rows, protocols, notes = [], [], []
    for case in cases:
        images, grid, fg, labels, truth, protocol = load_case(case, args.quick)
        protocols.append(f"- **{case}**: {protocol}")
        before = metrics(np.zeros(images.shape + (grid.ndim,), np.float32), grid, fg, labels, truth)
        if HAVE_ITK and case == "spm12_2d_ffd" and any(m.startswith("elastix") for m in methods):
            right, wrong = check_elastix_convention(images, grid, quick=True)
            notes.append(f"elastix field convention check ({case}): relative RMS between elastix's result "
                         f"image and xjax's warp through the converted field {right:.3f} "
                         f"(through the negated field {wrong:.3f})")
        for method in methods:
            disp, status, sec = run_method(method, images, grid, args.quick)
            m = metrics(disp, grid, fg, labels, truth)
            f = lambda v, k=3: "–" if v is None else f"{v:.{k}f}"
            rows.append([case, method, f(before["gWI mm"]), f(m["gWI mm"]), f(m["movement mean mm"]),
                         f(m["movement p99 mm"]), f(m["det J min"]), f(m["folded fraction"], 4),
                         f(before["Dice"]), f(m["Dice"]), f(sec, 1), status])
            print(" | ".join(rows[-1]), flush=True)
    load_end = os.getloadavg()
    shared = " (timings from a shared machine)" if load_start[0] > 1 else ""
    sections = [
        "\n".join(protocols),
        f"Load average (1, 5, 15 min) at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, "
        f"at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}{shared}.",
        "elastix: " + ("itk-elastix default parameter maps, pairwise to image 0" + (
            " (quick: 20 iterations, 2 resolutions)" if args.quick else "") if HAVE_ITK
            else "not installed (`import itk` failed): xjax only"),
        "xjax: `xjax.register(zscore(images), grid, presets.get(name), key=key(0))`" + (
            " (quick: every stage 10 iterations, 1 level)" if args.quick else "")
        + "; movement is |u| of the group's fields (unbiased mode: relative to the group's average space;"
          " elastix: image 0's field = 0). Wall time includes compilation.",
        *notes,
        common.markdown_table(HEADER, rows),
    ]
    path = args.out / ("suite_quick.md" if args.quick else "suite.md")
    common.write_report(path, "Registration-quality suite: xjax beside elastix",
                        common.command("suite/run.py", argv), "see the cases below", sections)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
