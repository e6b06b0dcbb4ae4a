"""BInGo on intersubject MR / ultrasound prostate populations: gland Dice against group size
(a 2D analogue of BInGo's Table 2).

Data (``../shared/data/mrus_prostate``, read by :func:`common.load_mrus`): each MR volume
resampled onto its pair's transrectal-ultrasound grid (1.5 mm), axial slices zero-padded to
48 x 64, intensities to [0, 1] by the 0.5 / 99.5 percentiles of each image. Pairs 0-79 train,
pairs 80-107 test.

Populations: a test group of ``M'`` images takes ``M'`` different patients at random, the first
half contributing their ultrasound and the second half their MR, all at axial slice 22 (the
middle of the ultrasound grid); ``--groups`` groups per size, drawn from one seeded generator.
The images keep their native placement on the ultrasound grid, so the misalignment to undo is the
anatomical variation between patients together with their different probe positions.

BInGo, partial learning (the library's default ELBO weights, Adam at 3e-3): trained on pairs (one ultrasound, one MR) of two different training
patients at the same slice (slices 16-28, every second), the MR partner drawn afresh for each of
``--draws`` pairings; one model is applied to every group size. With two modalities, a training
pair holds one image per modality, so partial and complete learning train on the same groups; the
model never sees a group larger than two.

Iterative baselines on the same groups: X-CoReg (K = 3), APE and CTE, unbiased affine then FFD
(24 mm mesh), 2 pyramid levels, 100 Adam steps per stage and level, half of the voxels sampled,
L = 32. Each is compiled once per group size (the time is given apart) and XLA's planned working
memory of that program is reported; a method whose first group of a size takes longer than
``--budget`` seconds is not run on larger groups (marked "time").

Score: the mean pairwise Dice of the warped gland labels (``xjax.evaluate.pairwise_dice``), each
label pulled through its image's displacement by nearest neighbour; "before" is the native
placement.

    python experiments/bingo_mrus.py [--steps 1000] [--groups 5]
    python experiments/bingo_mrus.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from xjax import evaluate, phantoms, presets  # noqa: E402
from xjax.grid import Grid  # noqa: E402
from xjax.intensity import unit_range  # noqa: E402
from xjax.nn import bingo  # noqa: E402
from xjax.nn.bingo import train as bingo_train  # noqa: E402
from xjax.progress import ProgressBar  # noqa: E402

MODALITIES = ("US", "MR")
TEST_SLICE = 22
MODEL, QUICK_MODEL = common.bingo_models(2)
LEARNING_RATE = 3e-3
ITERATIVE = common.ITERATIVE_OBJECTIVES


def normalised(images):
    """Every image of ``(..., *spatial)`` groups to [0, 1] by its own percentiles."""
    flat = np.asarray(images).reshape((-1,) + images.shape[-2:])
    return unit_range(flat).reshape(images.shape)


def intersubject_pairs(images, slices_per_pair: int, draws: int, seed: int):
    """Training groups ``(P * draws, 2, X, Y)``: each ultrasound with the MR of another patient
    at the same slice. ``images`` is ``(patients * slices_per_pair, 2, X, Y)``, patient-major."""
    patients = images.shape[0] // slices_per_pair
    per_patient = images.reshape((patients, slices_per_pair) + images.shape[1:])
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(draws):
        partner = (np.arange(patients) + rng.integers(1, patients, patients)) % patients  # never itself
        groups.append(np.stack([per_patient[:, :, 0], per_patient[partner, :, 1]], axis=2))
    return np.concatenate(groups).reshape((-1, 2) + images.shape[2:])


def populations(images, labels, size: int, count: int, rng):
    """``count`` groups of ``size`` patients: ``(images (count, size, X, Y), labels, modalities
    (size,))``, ultrasound from the first ``size // 2`` patients of each draw, MR from the rest."""
    if size < 2 or size % 2 or size > images.shape[0]:
        raise ValueError(f"group sizes must be even, in [2, {images.shape[0]}]; got {size}")
    modalities = np.repeat([0, 1], size // 2)
    picks = [rng.choice(images.shape[0], size, replace=False) for _ in range(count)]
    return (np.stack([images[p, modalities] for p in picks]),
            np.stack([labels[p, modalities] for p in picks]), modalities)


def gland_dice(labels, displacements, grid: Grid) -> float:
    """Mean pairwise Dice of ``labels`` ``(N, X, Y)`` pulled through ``displacements`` (mm)."""
    warped = phantoms.warp(jnp.asarray(labels), grid, jnp.asarray(displacements), order=0)
    return float(evaluate.pairwise_dice(warped))


def iterative_config(method: str, quick: bool):
    config = presets.affine_ffd(spacing=24.0, iterations=5 if quick else 100, levels=1 if quick else 2,
                                bins=32, sample_rate=0.5, num_classes=3)
    return dataclasses.replace(config, objective=ITERATIVE[method])


def train_model(data, grid: Grid, steps: int, config, seed: int, log: Path | None, quick: bool):
    model = bingo.create(config, seed)
    train = bingo_train.TrainConfig(steps=steps, learning_rate=LEARNING_RATE, batch_size=4, scheme="partial",
                                    seed=seed, log_every=10, checkpoint_every=0)
    with ProgressBar("train partial") as bar:
        start = time.perf_counter()
        history = bingo_train.train(model, data, grid, train, log_path=log, progress=bar,
                                    fast_compile=quick)
    return model, history, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="BInGo training steps")
    parser.add_argument("--draws", type=int, default=4, help="MR partners per training ultrasound")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--groups", type=int, default=5, help="test groups per size")
    parser.add_argument("--budget", type=float, default=120.0,
                        help="seconds per group beyond which an iterative method stops growing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of a few seconds (X-CoReg the only baseline)")
    parser.add_argument("--out", default=str(common.RESULTS / "bingo_mrus.md"))
    args = parser.parse_args(argv)
    common.need(common.DATA / "mrus_prostate")
    if args.quick:
        args.steps, args.draws, args.sizes, args.groups = 2, 1, [2, 4], 1
        train_pairs, test_pairs, train_slices, config = range(0, 3), range(80, 84), (20, 22), QUICK_MODEL
    else:
        train_pairs, test_pairs, train_slices, config = range(0, 80), range(80, 108), range(16, 29, 2), MODEL
    images, _ = common.load_mrus(train_pairs, train_slices)
    data = intersubject_pairs(normalised(images), len(train_slices), args.draws, args.seed)
    grid = Grid.regular(images.shape[2:], 1.5)
    test_images, test_labels = common.load_mrus(test_pairs, (TEST_SLICE,))
    test_images = normalised(test_images)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = None if args.quick else out.with_name(f"{out.stem}_log.jsonl")
    if log is not None:
        log.unlink(missing_ok=True)
    model, history, train_seconds = train_model(
        bingo_train.GroupData(data, np.ones(data.shape[:2], bool)), grid, args.steps, config, args.seed,
        log, args.quick)

    rng = np.random.default_rng(args.seed + 1)
    tests = {size: populations(test_images, test_labels, size, args.groups, rng) for size in args.sizes}
    iterative = ["X-CoReg"] if args.quick else list(ITERATIVE)
    methods = ["None", "BInGo (partial)", *iterative]
    dice = {m: {} for m in methods}
    seconds = {m: {} for m in methods}
    setup = {m: {} for m in iterative}  # (compile seconds, planned MiB) per size
    stopped = set()
    for size, (groups, labels, modalities) in tests.items():
        zero = np.zeros(groups.shape[1:] + (2,), np.float32)
        dice["None"][size] = [gland_dice(lab, zero, grid) for lab in labels]
        bingo.register_group(model, groups[0], modalities, grid)  # compile
        scores, times = [], []
        for group, lab in zip(groups, labels):
            reg, dt = common.timed(lambda: bingo.register_group(model, group, modalities, grid))
            scores.append(gland_dice(lab, reg.displacement, grid))
            times.append(dt)
        dice["BInGo (partial)"][size], seconds["BInGo (partial)"][size] = scores, times
        for method in iterative:
            if method in stopped:
                continue
            run, compile_s, mib = common.compile_registration(groups[0], grid, iterative_config(method, args.quick))
            setup[method][size] = (compile_s, mib)
            scores, times = [], []
            with ProgressBar(f"{method} M'={size}") as bar:
                for j, (group, lab) in enumerate(zip(groups, labels)):
                    res, dt = common.timed(lambda: run(group, jax.random.key(j)))
                    # A run that did not end with status 0 (non-finite, or an image left the
                    # group's overlap) counts as failed: NaN, left out of the mean.
                    scores.append(gland_dice(lab, res.displacements, grid) if int(res.status) == 0 else np.nan)
                    times.append(dt)
                    bar(j + 1, len(groups), scores[-1])
                    if dt > args.budget:
                        stopped.add(method)
                        break
            dice[method][size], seconds[method][size] = scores, times

    def cell(table, method, size, fmt):
        if size not in table[method]:
            return "time" if method in stopped else "—"
        return fmt(table[method][size])

    def pct(values):
        v = np.asarray(values, np.float64)
        ok = v[np.isfinite(v)]
        text = f"{100 * ok.mean():.1f} ± {100 * ok.std():.1f}" if ok.size else "—"
        return text if ok.size == v.size else f"{text} ({v.size - ok.size} of {v.size} failed)"

    dice_rows = [[m] + [cell(dice, m, s, pct) for s in args.sizes] for m in methods]
    time_rows = [[m] + [cell(seconds, m, s, lambda v: f"{np.median(v):.2f}") for s in args.sizes]
                 for m in methods[1:]]
    setup_rows = [[m] + [f"{setup[m][s][0]:.1f} / {setup[m][s][1]:.1f}" if s in setup[m] else "time"
                         for s in args.sizes] for m in iterative]
    sizes = [f"M' = {s}" for s in args.sizes]
    protocol = (f"{data.shape[0]} training pairs ({len(train_pairs)} patients x {len(train_slices)} slices x "
                f"{args.draws} MR partners), {len(test_pairs)} test patients, {args.groups} groups per size, "
                f"48 x 64 at 1.5 mm; BInGo: {args.steps} Adam steps (lr {LEARNING_RATE:g}, 4 pairs per step) on CPU, "
                f"{train_seconds:.0f} s with compilation, final loss {history[-1]['loss']:.4f}; ELBO weights "
                f"{dataclasses.asdict(bingo_train.TrainConfig().weights)}; model {dataclasses.asdict(config)}. "
                "Paper: 3D volumes, "
                "GPU training to convergence.")
    common.write_report(out, "BInGo on intersubject MR / ultrasound prostate populations",
                        common.command("bingo_mrus.py", argv), protocol, [
        "## Gland Dice (%) against group size (mean ± sd over the groups)\n\n"
        "A failed run ended with a non-zero status (a non-finite loss, or an image that left the "
        "others' field of view) or with empty warped labels; it is left out of the mean.\n\n"
        + common.markdown_table(["method", *sizes], dice_rows),
        "## Registration time per group (s, median; compilation excluded)\n\n"
        + common.markdown_table(["method", *sizes], time_rows),
        "## Iterative methods: compilation (s) / XLA's planned working memory (MiB) per group size\n\n"
        + common.markdown_table(["method", *sizes], setup_rows)])
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
