"""A ten-modality 256 x 256 group through the command line, timed end to end.

A synthetic phantom with ten modalities (non-monotone class intensities, bias field, noise) is
misaligned by a random cubic B-spline FFD per image and written as NIfTI; then

    xjax register image_*.nii.gz -o reg --preset ffd ...
    xjax apply reg --index J labels_J.nii.gz -o warped_labels_J.nii.gz --labels

run as separate processes (interpreter start, imports, compile, run and writing included). The
mean pairwise foreground Dice of the warped label maps is reported before and after, with the wall
time of each command, and written to experiments/results/bench_cli_group.md.

    python experiments/bench_cli_group.py [--size 256] [--modalities 10] [--repeats 3] [-- register options]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import xjax
from common import write_text
from xjax import evaluate, io, phantoms


def spread(seconds) -> str:
    """``median (min-max)`` of wall times in seconds."""
    return f"{np.median(seconds):.1f} ({min(seconds):.1f}-{max(seconds):.1f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--modalities", type=int, default=10)
    parser.add_argument("--spacing", type=float, default=64.0, help="misalignment FFD spacing, mm")
    parser.add_argument("--magnitude", type=float, default=10.0, help="misalignment FFD bound, mm")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_cli_group.md")
    parser.add_argument("register_options", nargs="*", default=["--preset", "ffd"],
                        help="options passed to 'xjax register' (after --)")
    args = parser.parse_args(argv)

    ph = phantoms.make_phantom(jax.random.key(0), (args.size, args.size), num_modalities=args.modalities)
    group = phantoms.misaligned_group(jax.random.key(1), ph, kind="ffd", spacing=args.spacing,
                                      magnitude=args.magnitude)
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = [], []
        for j in range(args.modalities):
            images.append(os.path.join(tmp, f"image_{j}.nii.gz"))
            labels.append(os.path.join(tmp, f"labels_{j}.nii.gz"))
            io.save_image(images[j], group.images[j], ph.grid)
            io.save_image(labels[j], group.labels[j], ph.grid, dtype=np.uint8)
        reg = os.path.join(tmp, "reg")
        register_cmd = [sys.executable, "-m", "xjax", "register", *images, "-o", reg, "--quiet", "--force",
                        *args.register_options]
        def timed_register(cache):
            start = time.perf_counter()
            subprocess.run(register_cmd, check=True, env={**os.environ, "XJAX_CACHE_DIR": cache})
            return time.perf_counter() - start

        # first runs (each with an empty compilation cache), then runs with the cache filled
        cold = [timed_register(os.path.join(tmp, f"cache_{r}")) for r in range(args.repeats)]
        warm = [timed_register(os.path.join(tmp, "cache_0")) for _ in range(args.repeats)]
        warped = [os.path.join(tmp, f"warped_labels_{j}.nii.gz") for j in range(args.modalities)]
        apply_cmd = [sys.executable, "-m", "xjax", "apply", reg, "--index",
                     ",".join(map(str, range(args.modalities))), *labels, "-o", *warped, "--labels", "--force"]
        t_apply = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run(apply_cmd, check=True)
            t_apply.append(time.perf_counter() - start)
        after = np.stack([io.load_labels(p)[0] for p in warped])
    before_dice = float(evaluate.pairwise_dice(group.labels))
    after_dice = float(evaluate.pairwise_dice(after))
    dev = jax.devices()[0]
    text = "\n".join([
        f"# {args.modalities} modalities of {args.size} x {args.size} through the command line",
        "",
        f"Machine: {dev.platform} ({dev.device_kind}), {os.cpu_count()} logical CPUs, jax {jax.__version__}, "
        f"xjax {xjax.__version__}, Python {platform.python_version()}",
        f"Misalignment: random cubic B-spline FFD per image, spacing {args.spacing} mm, coefficients up to "
        f"{args.magnitude} mm. Register options: `{' '.join(args.register_options)}`",
        "",
        "| mean pairwise foreground Dice before | after | `xjax register` wall s, first run | "
        "same, compiled programs cached | `xjax apply --labels` wall s |",
        "|---|---|---|---|---|",
        f"| {before_dice:.4f} | {after_dice:.4f} | {spread(cold)} | {spread(warm)} | {spread(t_apply)} |",
        "",
        f"Wall seconds as median (min-max) of {args.repeats} runs of each command, in one session. They "
        "include interpreter start, imports, JAX compilation (first run), the run and writing the "
        "outputs. The command line keeps compiled programs in a cache directory (`$XJAX_CACHE_DIR`): "
        "each first run starts from an empty one, and the cached runs reuse the programs it stored.",
    ]) + "\n"
    print(text)
    write_text(args.out, text)


if __name__ == "__main__":
    main()
