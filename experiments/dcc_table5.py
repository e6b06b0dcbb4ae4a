"""Deep combined computing on real 2D data: a Table-5-like comparison (paper Sec. 4.4).

Data sets (read from ../shared/data, never copied):
  * ``mrus``: MR / transrectal-ultrasound prostate pairs with gland labels (K = 2). The MR is
    resampled onto the ultrasound grid (1.5 mm); 2D groups are axial slices (padded to 48 x 64).
    Pairs 0-79 train (slices 16-28), pairs 80-107 test (slice 22), with their native misalignment.
    Strategies DGR, DCC+AT, DCC+BS (ultrasound labels), DCC+All.
  * ``myops``: MyoPS 2020 bSSFP / LGE / T2 groups, no labels (DGR only). The middle slice of each
    subject, centre crop of 192 x 192 pixels averaged 3 x 3 down to 64 x 64 (2.19 mm). Subjects
    101-118 train (all slices), 201-217 test (middle slice), each test image misaligned by a known random FFD; the
    residual is the groupwise warping index gWI (Eq. 49-50, pixels).

For each strategy: training time, Reg DSC before / after (pairwise foreground Dice of the warped
labels), Seg DSC per modality (posterior segmentation, Eq. 53, against each warped label), gWI
(myops), and inference time per group; against iterative X-CoReg (``xjax.register``, FFD preset) on
the same test groups. Trained weights go to ``xjax/nn/weights/dcc_<data>_<strategy>.npz``.

    PYTHONPATH=. python experiments/dcc_table5.py --data mrus [--steps 200] [--quick]
    PYTHONPATH=. python experiments/dcc_table5.py --data myops [--steps 400] [--quick]

``--quick`` trains a tiny network for a few steps on a few groups and writes nothing but the table
under a ``_quick`` name (for the test suite).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
from flax import nnx

import xjax
from xjax import evaluate, phantoms
from xjax.progress import ProgressBar
from xjax.grid import Grid
from xjax.io import load_image, pull_image
from xjax.nn import dcc, dcc_losses, dcc_train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "experiments" / "results"
WEIGHTS = ROOT / "xjax" / "nn" / "weights"


def _pad(a, shape):
    out = np.zeros(a.shape[:-2] + shape, a.dtype)
    out[..., :a.shape[-2], :a.shape[-1]] = a
    return out


def load_mrus(pairs, slices):
    """``(images (P, 2, 48, 64), labels (P, 2, 48, 64))``: [ultrasound, MR] per group."""
    folder = DATA / "mrus_prostate"
    images, labels = [], []
    for i in pairs:
        us, grid = load_image(folder / "fixed_images" / f"obs{i:03d}.nii.gz")
        mr, mr_grid = load_image(folder / "moving_images" / f"obs{i:03d}.nii.gz")
        lu = nib.load(folder / "fixed_labels" / f"obs{i:03d}.nii.gz").get_fdata()[..., 0] > 0.5
        lm = nib.load(folder / "moving_labels" / f"obs{i:03d}.nii.gz").get_fdata()[..., 0]
        mr = pull_image(mr, mr_grid, grid)
        lm = pull_image(lm, mr_grid, grid, order=0) > 0.5
        for z in slices:
            images.append(_pad(np.stack([us[:, :, z], mr[:, :, z]]), (48, 64)))
            labels.append(_pad(np.stack([lu[:, :, z], lm[:, :, z]]).astype(np.int32), (48, 64)))
    return np.stack(images).astype(np.float32), np.stack(labels)


def load_myops(subjects, middle_only):
    """``(P, 3, 64, 64)``: [bSSFP, LGE, T2] per group; every slice, or the middle one."""
    groups = []
    for s in subjects:
        seqs = [nib.load(DATA / "myops2020" / f"{s}_{m}.nii.gz").get_fdata() for m in ("C0", "DE", "T2")]
        nz = seqs[0].shape[2]
        for z in ([nz // 2] if middle_only else range(nz)):
            crops = []
            for v in seqs:
                cx, cy = v.shape[0] // 2, v.shape[1] // 2
                c = v[cx - 96:cx + 96, cy - 96:cy + 96, z]
                crops.append(c.reshape(64, 3, 64, 3).mean(axis=(1, 3)))
            groups.append(np.stack(crops))
    return np.stack(groups).astype(np.float32)


def _dice(a, b):
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else float("nan")


def _machine() -> str:
    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        model = names[0] if names else model
    return (f"{jax.devices()[0].platform}, {os.cpu_count()} logical CPUs ({model}), jax {jax.__version__}, "
            "shared with other jobs while it ran")


def run(data_name: str, steps: int, quick: bool, strategies=None, seed: int = 0, test_magnitude: float = 5.0):
    if data_name == "mrus":
        train_pairs, test_pairs = (range(0, 2), range(80, 82)) if quick else (range(0, 80), range(80, 108))
        images, labels = load_mrus(train_pairs, (20, 22) if quick else range(16, 29, 2))
        test_images, test_labels = load_mrus(test_pairs, (22,))
        num_classes, modality, names = 2, [0, 1], ["US", "MR"]
        strategies = strategies or dcc_train.STRATEGIES
        true_disp = None
    else:
        train_subjects = range(101, 103) if quick else range(101, 119)
        test_subjects = range(201, 203) if quick else range(201, 218)
        images, labels = load_myops(train_subjects, False), None
        aligned = load_myops(test_subjects, True)
        grid = Grid.regular((64, 64), 1.0)
        true_disp = np.stack([np.asarray(phantoms.random_ffd(jax.random.key(100 + p), grid, 3, spacing=16.0,
                                                             magnitude=test_magnitude))
                              for p in range(len(aligned))])
        test_images = np.stack([np.asarray(phantoms.warp(jnp.asarray(a), grid, jnp.asarray(t)))
                                for a, t in zip(aligned, true_disp)])
        test_labels = None
        num_classes, modality, names = 4, [0, 1, 2], ["bSSFP", "LGE", "T2"]
        if strategies and set(strategies) != {"DGR"}:
            raise ValueError(f"myops has no labels: only DGR, got {strategies}")
        strategies = ("DGR",)
    spatial = images.shape[2:]
    grid = Grid.regular(spatial, 1.0)
    width, levels = (2, 1) if quick else (8, 4)
    loss_config = dcc_losses.LossConfig(num_classes=num_classes, bins=32, zeta=0.05, bending_weight=100.0)
    rows = []

    norm_test = np.stack([np.asarray(dcc.normalise(g)) for g in test_images])
    if test_labels is not None:
        rows.append({"method": "None", "reg": [float(evaluate.pairwise_dice(jnp.asarray(l))) for l in test_labels]})
    else:
        zero = jnp.zeros(true_disp.shape[1:], jnp.float32)
        rows.append({"method": "None", "gwi": [float(evaluate.gwi(jnp.asarray(t), zero, grid, jnp.ones(grid.shape)))
                                               for t in true_disp]})

    for strategy in strategies:
        config = dcc_train.TrainConfig(strategy=strategy, labelled_modality=0, batch_size=2 if quick else 4,
                                       ffd_spacings=(12.0,) if quick else (8.0, 12.0, 16.0, 24.0),
                                       ffd_per_spacing=2 if quick else 5,
                                       ffd_ratio=0.08, seed=seed)
        data = dcc_train.make_dataset(images, labels, modality, num_classes, config)
        model = dcc.create(dcc.DCCConfig(ndim=2, num_classes=num_classes, num_modalities=len(modality),
                                         width=width, levels=levels, flow_scales=min(4, levels)), seed=seed)
        t0 = time.perf_counter()
        with ProgressBar(f"{data_name} {strategy}") as bar:
            log = None if quick else RESULTS / f"dcc_{data_name}_{strategy.replace('+', '_').lower()}_log.jsonl"
            if log is not None and log.exists():
                log.unlink()
            model, _ = dcc_train.train(model, data, loss_config, config, steps, progress=bar, log_every=10,
                                       log_path=log, fast_compile=quick)
        train_s = time.perf_counter() - t0
        labelled = config.labelled(len(modality))
        graphdef, state = nnx.split(model)
        predictor = dcc_train.make_predictor(graphdef, num_classes=num_classes, bins=loss_config.bins, zeta=0.01,
                                             fast_compile=quick)

        def predict(g):
            return jax.block_until_ready(predictor(state, jnp.asarray(g), jnp.asarray(modality),
                                                   jnp.asarray(labelled), data.prior))

        predict(norm_test[0])  # compile
        t0 = time.perf_counter()
        preds = [predict(g) for g in norm_test]
        infer_s = (time.perf_counter() - t0) / len(preds)
        row = {"method": strategy, "train_s": train_s, "infer_s": infer_s}
        row.update(_scores(preds, test_labels, true_disp, grid, num_classes))
        rows.append(row)
        if not quick:
            WEIGHTS.mkdir(parents=True, exist_ok=True)
            dcc_train.save_weights(WEIGHTS / f"dcc_{data_name}_{strategy.replace('+', '_').lower()}.npz", model,
                                   data.prior, {"strategy": strategy, "labelled": labelled.tolist(),
                                                "modalities": names, "loss": {"bins": loss_config.bins,
                                                                              "num_classes": num_classes},
                                                "train_steps": steps, "data": data_name})

    rows.append(_xcoreg(norm_test, test_labels, true_disp, grid, num_classes, quick))
    return rows, names, spatial


def _scores(preds, test_labels, true_disp, grid, num_classes, match_class=False):
    out = {}
    if test_labels is not None:
        reg, seg = [], []
        for p, lab in zip(preds, test_labels):
            warped = np.stack([np.asarray(dcc_losses.warp(jnp.asarray(l, jnp.float32), u)[0]) for l, u in
                               zip(lab, p.displacement)]) > 0.5
            reg.append(float(evaluate.pairwise_dice(jnp.asarray(warped.astype(np.int32)))))
            classes = range(num_classes) if match_class else (1,)
            seg.append(max(([_dice(np.asarray(p.segmentation) == k, w) for w in warped] for k in classes),
                           key=np.nanmean))
        out["reg"], out["seg"] = reg, np.asarray(seg)
    if true_disp is not None:
        est = np.stack([np.asarray(p.displacement) for p in preds])
        out["gwi"] = [float(evaluate.gwi(jnp.asarray(t), jnp.asarray(e), grid, jnp.ones(grid.shape)))
                      for t, e in zip(true_disp, est)]
    return out


def _xcoreg(norm_test, test_labels, true_disp, grid, num_classes, quick):
    config = xjax.presets.ffd(spacing=16.0, iterations=5 if quick else 150, levels=1 if quick else 2, bins=32,
                              num_classes=num_classes)
    results, times = [], []
    for j, g in enumerate(norm_test):
        t0 = time.perf_counter()
        results.append(jax.block_until_ready(xjax.register(jnp.asarray(g), grid, config, key=jax.random.key(j))))
        times.append(time.perf_counter() - t0)

    class P:  # the fields the scores read
        def __init__(self, r):
            self.displacement = r.displacements
            self.segmentation = jnp.argmax(r.posterior, -1)

    row = {"method": "X-CoReg (iterative FFD)", "train_s": 0.0,
           "infer_s": float(np.median(times[1:] if len(times) > 1 else times))}
    row.update(_scores([P(r) for r in results], test_labels, true_disp, grid, num_classes, match_class=True))
    return row


def _fmt(values):
    v = np.asarray(values, np.float64)
    return f"{100 * np.nanmean(v):.1f} ± {100 * np.nanstd(v):.1f}"


def table(rows, names, data_name, spatial, steps, command, test_magnitude):
    lines = [f"# DCC on {data_name} (2D, {spatial[0]} x {spatial[1]})", "",
             f"Command: `{command}`  ", f"Machine: {_machine()}  ", f"Training steps per strategy: {steps}", ""]
    if data_name == "mrus":
        lines += ["| method | Reg DSC (%) | " + " | ".join(f"Seg DSC {n} (%)" for n in names)
                  + " | train (s) | inference (s/group) |",
                  "|---|---|" + "---|" * len(names) + "---|---|"]
        for r in rows:
            seg = [(_fmt(r["seg"][:, j]) if "seg" in r and r["method"] != "DGR" else "—") for j in range(len(names))]
            timing = ([f"{r['train_s']:.0f}", f"{r['infer_s']:.3f}"] if "infer_s" in r else ["—", "—"])
            lines.append(f"| {r['method']} | {_fmt(r['reg'])} | " + " | ".join(seg) + " | " + " | ".join(timing) + " |")
        lines += ["", "Reg DSC: pairwise foreground Dice of the warped gland labels (None: native misalignment). "
                  "Seg DSC: Dice of the posterior segmentation (Eq. 53) against each warped label "
                  "(not evaluated for DGR, whose classes carry no semantics; X-CoReg's classes have no "
                  "semantics either, so each of its groups is scored with the class that best matches the gland)."]
    else:
        lines += ["| method | gWI (px) | train (s) | inference (s/group) |", "|---|---|---|---|"]
        for r in rows:
            timing = f"{r['train_s']:.0f} | {r['infer_s']:.3f}" if "infer_s" in r else "— | —"
            lines.append(f"| {r['method']} | {np.mean(r['gwi']):.2f} ± {np.std(r['gwi']):.2f} | {timing} |")
        lines += ["", "gWI: groupwise warping index (Eq. 49-50) of the known synthetic FFD misalignment "
                  f"(coefficients up to {test_magnitude:g} px on a 16 px mesh) after registration, in pixels of "
                  "the 64 x 64 grid (2.19 mm)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=("mrus", "myops"), required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--strategies", nargs="+", choices=dcc_train.STRATEGIES,
                        help="subset of the strategies (default: all that the data set supports)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--test-magnitude", type=float, default=5.0,
                        help="myops: coefficient bound (px) of the test misalignments (16 px mesh)")
    args = parser.parse_args(argv)
    steps = 3 if args.quick else args.steps
    rows, names, spatial = run(args.data, steps, args.quick, args.strategies, test_magnitude=args.test_magnitude)
    command = "PYTHONPATH=. python experiments/dcc_table5.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(rows, names, args.data, spatial, steps, command, args.test_magnitude)
    out = Path(args.out) / f"dcc_{args.data}{'_quick' if args.quick else ''}.md"  # dcc_* names only
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
