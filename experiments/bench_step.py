"""Time one X-CoReg registration step on the CPU (or whatever JAX's default device is).

The setting of the authors' measurement (REFERENCE.md): 3 images of 192 x 192, cubic B-spline FFD,
K = 4 classes, L = 64 bins, 10% of the voxels sampled per step, and the E-step over the whole grid.
A step is warp + E-step + X-metric + gradient + Adam update. Per-step time is the slope between
runs of two lengths (so the fixed cost of a call cancels), median over repeats; compile time is
reported apart.

    python experiments/bench_step.py [--repeats 5] [--sizes 64 192]

Prints a markdown table and writes it to experiments/results/bench_step.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

import xjax
from common import machine, write_text
from xjax import phantoms

ORIGINAL_S_PER_STEP = {64: 0.41, 192: 1.07}  # the authors' PyTorch code, 2-core CPU (REFERENCE.md)


def timed(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def bench(size: int, repeats: int, short: int, long: int, modalities: int = 3):
    ph = phantoms.make_phantom(jax.random.key(0), (size, size), num_modalities=modalities)
    group = phantoms.misaligned_group(jax.random.key(1), ph, kind="ffd", spacing=32.0, magnitude=5.0)

    def config(iterations):
        return xjax.presets.ffd(spacing=(32.0,), iterations=iterations, levels=1, bins=64,
                                sample_rate=0.1, num_classes=4)

    def run(iterations, seed):
        return xjax.register(group.images, ph.grid, config(iterations), key=jax.random.key(seed))

    first = timed(lambda: run(short, 0))
    warm = [timed(lambda: run(short, r)) for r in range(repeats)]
    timed(lambda: run(long, 0))
    warm_long = [timed(lambda: run(long, r)) for r in range(repeats)]
    per_step = (np.median(warm_long) - np.median(warm)) / (long - short)
    return {"size": size, "modalities": modalities, "compile_s": first - np.median(warm), "step_ms": 1e3 * per_step,
            "call_ms": 1e3 * np.median(warm)}



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modalities", type=int, default=3)
    parser.add_argument("--short", type=int, default=20)
    parser.add_argument("--long", type=int, default=120)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_step.md")
    args = parser.parse_args(argv)
    rows = [bench(s, args.repeats, args.short, args.long, args.modalities) for s in args.sizes]
    lines = [
        f"# One X-CoReg step: {args.modalities} images, FFD, K = 4, L = 64, 10% sampling, "
        "E-step over the whole grid",
        "",
        f"Machine: {machine()}",
        f"Command: `python experiments/bench_step.py --sizes {' '.join(map(str, args.sizes))} "
        f"--repeats {args.repeats} --modalities {args.modalities} --short {args.short} --long {args.long}`",
        "",
        "| image size | xjax ms / step (median) | original s / step | speed-up | compile s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        orig = ORIGINAL_S_PER_STEP.get(r["size"]) if r["modalities"] == 3 else None
        ratio = f"{1e3 * orig / r['step_ms']:.0f}x" if orig else "n/a"
        lines.append(f"| {r['modalities']} x {r['size']}^2 | {r['step_ms']:.2f} | {orig if orig else 'n/a'} | {ratio} | "
                     f"{r['compile_s']:.1f} |")
    lines += ["", "The original's figures were measured on a 2-core CPU of the same class (REFERENCE.md);",
              "xjax's on the machine above, in the same session, medians of the repeats."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(args.out, text)


if __name__ == "__main__":
    main()
