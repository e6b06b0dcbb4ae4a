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
  * ``spm12``: synthetic T1 / T2 / PD-like brain groups (K = 4: background, CSF, grey matter,
    white matter) made from the spm12 tissue priors (``toolbox/OldSeg``, 2 mm MNI grid). Each axial
    slice of the priors is resampled linearly onto a 64 x 64 grid of 3 mm pixels (192 mm field of
    view, centred on the slice); the background prior is ``1 - (CSF + GM + WM)`` clipped to [0, 1]
    and the labels are the argmax over (background, CSF, GM, WM). Modality ``m`` is the partial
    volume image ``sum_k prior_k * mean_{m,k}`` with the fixed class means of the T1-, T2- and
    PD-like rows of :mod:`xjax.phantoms`, times a smooth bias field ``1 + 0.2 b(x)`` and plus
    Gaussian noise (3% of the row's range), both drawn per group. Training: axial slices 14-35
    and 54-73 (inferior and superior parts of the brain), two appearance draws each (84 groups),
    augmented by a bank of 10 random FFDs per mesh of 24 and 32 px, coefficients up to 0.19 of the
    mesh (of the order of the test misalignment). Test: the middle band, slices 40-49 (at least
    10 mm from every training slice), two draws each (20 groups), each image misaligned by a known random
    FFD (24 px mesh, coefficients up to ``--test-magnitude`` px); the same gWI (pixels and mm),
    Reg DSC (pairwise Dice of the warped labels, mean over the three tissues) and Seg DSC (mean
    over the three tissues) per modality. All four strategies (DCC+BS: T1 labels). No weights are
    written for this data set unless ``--weights`` is given.

For each strategy: training time, Reg DSC before / after (pairwise Dice of the warped labels, mean
over the foreground classes), Seg DSC per modality (posterior segmentation, Eq. 53, against each
warped label), gWI (myops, spm12), and inference time per group; against iterative X-CoReg
(``xjax.register``, FFD preset) on the same test groups. Trained weights go to
``xjax/nn/weights/dcc_<data>_<strategy>.npz`` (mrus and myops; ``--weights`` / ``--no-weights``).

    PYTHONPATH=. python experiments/dcc_table5.py --data mrus [--steps 200] [--quick]
    PYTHONPATH=. python experiments/dcc_table5.py --data myops [--steps 400] [--quick]
    PYTHONPATH=. python experiments/dcc_table5.py --data spm12 [--steps 400] [--quick]

``--quick`` trains a tiny network for a few steps on a few groups and writes nothing but the table
under a ``_quick`` name (for the test suite).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from itertools import permutations
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
from xjax.resample import pull_image
from xjax.intensity import zscore
from xjax.nn import dcc
from xjax.nn.dcc import losses as dcc_losses
from xjax.nn.dcc import train as dcc_train

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "experiments" / "results"
WEIGHTS = ROOT / "xjax" / "nn" / "weights"


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


SPM12_SHAPE, SPM12_PIXEL_MM = (64, 64), 3.0


def spm12_priors(slices):
    """Tissue priors of the axial ``slices`` (indices along the third axis of the 91 x 109 x 91
    MNI grid) on a 64 x 64 grid of 3 mm pixels centred on the slice, linear resampling.

    Returns:
      ``(len(slices), 64, 64, 4)`` float32 probabilities of (background, CSF, grey, white), the
      background ``1 - (CSF + grey + white)`` clipped to [0, 1].
    """
    priors, grid = common.load_spm12_priors(DATA)
    priors = np.moveaxis(priors, 0, -1)
    plane = common.axial_plane(grid)
    m = plane.matrix
    m[:2, :2] *= SPM12_PIXEL_MM / plane.spacing  # same axis directions, 3 mm pixels
    m[:2, 2] = plane.center - m[:2, :2] @ ((np.asarray(SPM12_SHAPE) - 1) / 2)
    target = Grid(SPM12_SHAPE, m)
    tissue = np.stack([np.clip(pull_image(priors[:, :, z], plane, target), 0, 1) for z in slices])
    background = np.clip(1 - tissue.sum(-1, keepdims=True), 0, 1)
    return np.concatenate([background, tissue], -1).astype(np.float32)


def synthesise_spm12(priors, key, draws: int, bias: float = 0.2, noise: float = 0.03):
    """Multimodal groups from tissue priors, ``draws`` appearance draws per slice.

    Class means: :data:`xjax.phantoms.TISSUE_TABLE` (background, CSF, grey, white in T1-, T2- and
    PD-like modalities), fixed per modality and not monotone-related. Image ``m`` of a group is the
    partial volume mixture ``sum_k priors_k * mean_{m,k}``, times ``1 + bias * b_m(x)`` (a smooth
    random field in [-1, 1]), plus Gaussian noise of standard deviation ``noise`` times the row's
    range (:func:`xjax.phantoms.render`); fields and noise are drawn per group from ``key``.

    Args:
      priors: ``(S, X, Y, 4)`` class probabilities (:func:`spm12_priors`).
      key: PRNG key.
      draws: groups per slice.

    Returns:
      ``(images (S * draws, 3, X, Y) float32, labels (S * draws, 3, X, Y) int32)``, groups
      ordered slice-major; the labels (argmax of the priors) are the same for the three images.
    """
    images, labels = [], []
    for s, prior in enumerate(priors):
        for d in range(draws):
            images.append(phantoms.render(jax.random.fold_in(key, s * draws + d), prior, bias=bias, noise=noise))
            labels.append(np.broadcast_to(prior.argmax(-1), images[-1].shape))
    return np.stack(images).astype(np.float32), np.stack(labels).astype(np.int32)


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


#: Per data set: the test misalignment's mesh (px) and default coefficient bound (px).
TEST_FFD = {"myops": (16.0, 5.0), "spm12": (24.0, 8.0)}


def run(data_name: str, steps: int, quick: bool, strategies=None, seed: int = 0, test_magnitude: float | None = None,
        save_weights: bool | None = None):
    """Train each strategy, score it and iterative X-CoReg on the test groups; returns
    ``(rows, modality names, spatial shape)``. ``save_weights`` (default: all but ``spm12``) writes
    the trained networks to :data:`WEIGHTS` (never in quick mode)."""
    save_weights = data_name != "spm12" if save_weights is None else save_weights
    true_disp, foreground = None, None
    if data_name == "mrus":
        train_pairs, test_pairs = (range(0, 2), range(80, 82)) if quick else (range(0, 80), range(80, 108))
        images, labels = common.load_mrus(train_pairs, (20, 22) if quick else range(16, 29, 2))
        test_images, test_labels = common.load_mrus(test_pairs, (22,))
        num_classes, modality, names = 2, [0, 1], ["US", "MR"]
        strategies = strategies or dcc_train.STRATEGIES
    elif data_name == "myops":
        train_subjects = range(101, 103) if quick else range(101, 119)
        test_subjects = range(201, 203) if quick else range(201, 218)
        images, labels = load_myops(train_subjects, False), None
        aligned = load_myops(test_subjects, True)
        test_labels = None
        num_classes, modality, names = 4, [0, 1, 2], ["bSSFP", "LGE", "T2"]
        if strategies and set(strategies) != {"DGR"}:
            raise ValueError(f"myops has no labels: only DGR, got {strategies}")
        strategies = ("DGR",)
    else:
        train_slices = (20, 60) if quick else (*range(14, 36), *range(54, 74))
        test_slices = (44, 45) if quick else range(40, 50)
        draws = 1 if quick else 2
        images, labels = synthesise_spm12(spm12_priors(train_slices), jax.random.key(1), draws)
        aligned, aligned_labels = synthesise_spm12(spm12_priors(test_slices), jax.random.key(2), draws)
        num_classes, modality, names = 4, [0, 1, 2], ["T1", "T2", "PD"]
        strategies = strategies or dcc_train.STRATEGIES
        foreground = aligned_labels[:, 0] > 0
    spatial = images.shape[2:]
    grid = Grid.regular(spatial, 1.0)
    if data_name in TEST_FFD:
        mesh, default_magnitude = TEST_FFD[data_name]
        magnitude = default_magnitude if test_magnitude is None else test_magnitude
        true_disp = np.stack([np.asarray(phantoms.random_ffd(jax.random.key(100 + p), grid, 3, spacing=mesh,
                                                             magnitude=magnitude))
                              for p in range(len(aligned))])
        test_images = np.stack([np.asarray(phantoms.warp(jnp.asarray(a), grid, jnp.asarray(t)))
                                for a, t in zip(aligned, true_disp)])
        if data_name == "spm12":
            test_labels = np.stack([np.asarray(phantoms.warp(jnp.asarray(a), grid, jnp.asarray(t), order=0))
                                    for a, t in zip(aligned_labels, true_disp)])
    if foreground is None and true_disp is not None:
        foreground = np.ones((len(true_disp),) + spatial, bool)
    width, levels = (2, 1) if quick else (8, 4)
    loss_config = dcc_losses.LossConfig(num_classes=num_classes, bins=32, zeta=0.05, bending_weight=100.0)
    truth = (true_disp, foreground)
    rows = []

    norm_test = np.stack([np.asarray(zscore(g)) for g in test_images])
    none = {"method": "None"}
    if test_labels is not None:
        none["reg_class"] = np.stack([np.asarray(evaluate.pairwise_dice_per_class(jnp.asarray(l), num_classes))
                                      for l in test_labels])
        none["reg"] = list(np.nanmean(none["reg_class"], axis=1))
    if true_disp is not None:
        zero = jnp.zeros(true_disp.shape[1:], jnp.float32)
        none["gwi"] = [float(evaluate.gwi(jnp.asarray(t), zero, grid, jnp.asarray(f)))
                       for t, f in zip(true_disp, foreground)]
    rows.append(none)

    for strategy in strategies:
        if quick:
            augmentation = {"ffd_spacings": (12.0,), "ffd_per_spacing": 2, "ffd_ratio": 0.08}
        elif data_name == "spm12":  # of the order of the test misalignment (24 px mesh)
            augmentation = {"ffd_spacings": (24.0, 32.0), "ffd_per_spacing": 10, "ffd_ratio": 0.19}
        else:
            augmentation = {"ffd_spacings": (8.0, 12.0, 16.0, 24.0), "ffd_per_spacing": 5, "ffd_ratio": 0.08}
        config = dcc_train.TrainConfig(strategy=strategy, labelled_modality=0, batch_size=2 if quick else 4,
                                       seed=seed, **augmentation)
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
        # DGR's classes carry no semantics: its segmentation is scored under the best class matching.
        row.update(_scores(preds, test_labels, truth, grid, num_classes, match_class=strategy == "DGR"))
        rows.append(row)
        if save_weights and not quick:
            WEIGHTS.mkdir(parents=True, exist_ok=True)
            dcc_train.save_weights(WEIGHTS / f"dcc_{data_name}_{strategy.replace('+', '_').lower()}.npz", model,
                                   data.prior, {"strategy": strategy, "labelled": labelled.tolist(),
                                                "modalities": names, "loss": {"bins": loss_config.bins,
                                                                              "num_classes": num_classes},
                                                "train_steps": steps, "data": data_name})

    rows.append(_xcoreg(norm_test, test_labels, truth, grid, num_classes, quick))
    return rows, names, spatial


def _warp_labels(labels, displacement, num_classes):
    """``(N, *S)`` int labels pulled through ``(N, *S, D)`` voxel displacements: the one-hot maps
    are interpolated linearly and the argmax taken (background outside the image)."""
    onehot = jax.nn.one_hot(jnp.asarray(labels), num_classes, dtype=jnp.float32)
    warped = jax.vmap(lambda l, u: dcc_losses.warp(l, u)[0])(onehot, jnp.asarray(displacement))
    return np.asarray(jnp.argmax(warped, -1)).astype(np.int32)


def _seg_dice(segmentation, warped, num_classes, match_class):
    """``(N,)`` Dice of ``segmentation`` ``(*S)`` against each warped label map of ``(N, *S)``,
    mean over the foreground classes ``1 .. K-1``. With ``match_class`` the segmentation's classes
    are first renamed by the permutation of ``0 .. K-1`` with the best mean over the group."""
    perms = permutations(range(num_classes)) if match_class else [tuple(range(num_classes))]
    best = None
    for perm in perms:
        renamed = np.asarray(perm)[segmentation]
        dice = [np.nanmean([_dice(renamed == k, w == k) for k in range(1, num_classes)]) for w in warped]
        if best is None or np.nanmean(dice) > np.nanmean(best):
            best = dice
    return best


def _scores(preds, test_labels, truth, grid, num_classes, match_class=False):
    """Reg DSC (``reg`` (P,), ``reg_class`` (P, K-1)), Seg DSC (``seg`` (P, N)) and gWI (``gwi``
    (P,) pixels) of the predictions on the P test groups, those that the data set allows."""
    out = {}
    true_disp, foreground = truth
    if test_labels is not None:
        reg, seg = [], []
        for p, lab in zip(preds, test_labels):
            warped = _warp_labels(lab, p.displacement, num_classes)
            reg.append(np.asarray(evaluate.pairwise_dice_per_class(jnp.asarray(warped), num_classes)))
            seg.append(_seg_dice(np.asarray(p.segmentation), warped, num_classes, match_class))
        out["reg_class"] = np.stack(reg)
        out["reg"] = list(np.nanmean(out["reg_class"], axis=1))
        out["seg"] = np.asarray(seg)
    if true_disp is not None:
        est = np.stack([np.asarray(p.displacement) for p in preds])
        out["gwi"] = [float(evaluate.gwi(jnp.asarray(t), jnp.asarray(e), grid, jnp.asarray(f)))
                      for t, e, f in zip(true_disp, est, foreground)]
    return out


def _xcoreg(norm_test, test_labels, truth, grid, num_classes, quick):
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
    row.update(_scores([P(r) for r in results], test_labels, truth, grid, num_classes, match_class=True))
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
    elif data_name == "myops":
        lines += ["| method | gWI (px) | train (s) | inference (s/group) |", "|---|---|---|---|"]
        for r in rows:
            timing = f"{r['train_s']:.0f} | {r['infer_s']:.3f}" if "infer_s" in r else "— | —"
            lines.append(f"| {r['method']} | {np.mean(r['gwi']):.2f} ± {np.std(r['gwi']):.2f} | {timing} |")
        lines += ["", "gWI: groupwise warping index (Eq. 49-50) of the known synthetic FFD misalignment "
                  f"(coefficients up to {test_magnitude:g} px on a 16 px mesh) after registration, in pixels of "
                  "the 64 x 64 grid (2.19 mm)."]
    else:
        mm = SPM12_PIXEL_MM
        lines += ["| method | gWI (px) | gWI (mm) | Reg DSC (%) | " + " | ".join(f"Seg DSC {n} (%)" for n in names)
                  + " | train (s) | inference (s/group) |",
                  "|---|---|---|---|" + "---|" * len(names) + "---|---|"]
        for r in rows:
            matched = "*" if r["method"] == "DGR" or r["method"].startswith("X-CoReg") else ""
            seg = [_fmt(r["seg"][:, j]) + matched if "seg" in r else "—" for j in range(len(names))]
            timing = [f"{r['train_s']:.0f}", f"{r['infer_s']:.3f}"] if "infer_s" in r else ["—", "—"]
            gwi = np.asarray(r["gwi"])
            lines.append(f"| {r['method']} | {gwi.mean():.2f} ± {gwi.std():.2f} | {mm * gwi.mean():.1f} ± "
                         f"{mm * gwi.std():.1f} | {_fmt(r['reg'])} | " + " | ".join(seg) + " | "
                         + " | ".join(timing) + " |")
        tissues = ["CSF", "GM", "WM"]
        lines += ["", "Reg DSC per tissue (%):", "", "| method | " + " | ".join(tissues) + " |",
                  "|---|" + "---|" * len(tissues)]
        for r in rows:
            lines.append(f"| {r['method']} | " + " | ".join(_fmt(r["reg_class"][:, k]) for k in range(len(tissues)))
                         + " |")
        lines += ["", "gWI: groupwise warping index (Eq. 49-50) over the brain (labels > 0 of the aligned slice) of "
                  f"the known synthetic FFD misalignment (coefficients up to {test_magnitude:g} px on a "
                  f"{TEST_FFD['spm12'][0]:g} px mesh), None: before registration; pixels of the 64 x 64 grid "
                  f"({mm:g} mm). Reg DSC: pairwise Dice of the warped labels, mean over CSF, GM and WM (the "
                  "per-tissue values below). Seg DSC: Dice of the posterior segmentation (Eq. 53) against each "
                  "warped label, mean over the three tissues. *: classes without semantics (DGR, X-CoReg), "
                  "renamed per group by the permutation of the four classes that scores best."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=("mrus", "myops", "spm12"), required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--strategies", nargs="+", choices=dcc_train.STRATEGIES,
                        help="subset of the strategies (default: all that the data set supports)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--test-magnitude", type=float, default=None,
                        help="myops, spm12: coefficient bound (px) of the test misalignments (myops: 16 px mesh, "
                             f"default {TEST_FFD['myops'][1]:g}; spm12: 24 px mesh, default {TEST_FFD['spm12'][1]:g})")
    parser.add_argument("--weights", action=argparse.BooleanOptionalAction, default=None,
                        help="write the trained networks to xjax/nn/weights (default: mrus and myops only)")
    args = parser.parse_args(argv)
    steps = 3 if args.quick else args.steps
    magnitude = args.test_magnitude
    if magnitude is None and args.data in TEST_FFD:
        magnitude = TEST_FFD[args.data][1]
    rows, names, spatial = run(args.data, steps, args.quick, args.strategies, test_magnitude=magnitude,
                               save_weights=args.weights)
    command = "PYTHONPATH=. python experiments/dcc_table5.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(rows, names, args.data, spatial, steps, command, magnitude)
    out = Path(args.out) / f"dcc_{args.data}{'_quick' if args.quick else ''}.md"  # dcc_* names only
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
