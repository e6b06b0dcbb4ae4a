"""Large groups and batches of groups: one registration step against the group size N (X-CoReg
and APE) and the throughput of G independent groups registered by one vmapped program.

* group size: 2D phantoms of ``--size``^2 voxels with N modalities, N = 2 .. 1024; per-step time
  (slope between two run lengths), compile time and XLA's memory plan. X-CoReg keeps one
  class x intensity histogram per image, O(N); APE one joint histogram per pair, O(N^2). A
  configuration whose plan exceeds ``--max-gib`` is compiled but not run.
* batches: G = 1 .. 256 independent groups of ``--batch-group N SIZE`` (``jax.vmap`` over
  ``xjax.register``), throughput in group-iterations per second, the time per group-iteration
  amortised over the batch, and the plan.

Both use one FFD stage (32 mm mesh), K = 4, L = 64, 10% sampling, one pyramid level.

    python experiments/bench/bench_groups.py [--sizes 2 4 ... 1024] [--size 128]
        [--batches 1 2 4 ... 256] [--batch-group 3 64] [--quick]

Prints the tables and writes ``bench_groups.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

import benchtools
from xjax import objectives, phantoms, presets

METHODS = {"X-CoReg": None, "APE": objectives.APE()}


def group(n: int, size: int, seed: int = 0):
    ph = phantoms.make_phantom(jax.random.key(seed), (size, size), num_modalities=n)
    moved = phantoms.misaligned_group(jax.random.key(seed + 1), ph, kind="ffd", spacing=32.0, magnitude=4.0)
    return moved.images, ph.grid


def config_for(objective):
    def config(iterations: int):
        return dataclasses.replace(presets.ffd(spacing=(32.0,), iterations=iterations, levels=1, bins=64,
                                               sample_rate=0.1, num_classes=4), objective=objective)
    return config


def by_group_size(sizes, size: int, short: int, long: int, repeats: int, max_gib: float):
    rows = []
    for n in sizes:
        images, grid = group(n, size)
        for method, objective in METHODS.items():
            row = {"n": n, "method": method, "plan": np.nan, "ms": np.nan, "compile_s": np.nan,
                   "refused": None}
            try:
                t = benchtools.step_timing(images, grid, config_for(objective), short, long, repeats,
                                           max_bytes=max_gib * 2**30)
                row.update(plan=t.plan_bytes, ms=1e3 * t.step_s, compile_s=t.compile_s)
            except ValueError as error:  # a configuration xjax refuses by name
                row["refused"] = str(error)
            rows.append(row)
            print(f"N={n} {method}: {row['ms']:.2f} ms, {benchtools.mib(row['plan'])} MiB", file=sys.stderr)
    return rows


def by_batch(batches, n: int, size: int, short: int, long: int, repeats: int):
    one, grid = group(n, size)
    rows = []
    for g in batches:
        # G different groups: the phantom's images shifted along the batch by whole voxels.
        images = jnp.stack([jnp.roll(one, b % 7, axis=1) for b in range(g)])
        t = benchtools.step_timing(images, grid, config_for(None), short, long, repeats, batched=True)
        rows.append({"g": g, "step_ms": 1e3 * t.step_s, "plan": t.plan_bytes, "compile_s": t.compile_s,
                     "peak": benchtools.device_peak_bytes()})
        print(f"G={g}: {rows[-1]['step_ms']:.2f} ms per batched step", file=sys.stderr)
    return rows


def ms_cell(row: dict, max_gib: float) -> str:
    if row["refused"]:
        return f"refused: {row['refused']}"
    if not np.isfinite(row["ms"]):
        return f"not run (plan over {max_gib:g} GiB)"
    return f"{row['ms']:.2f}"


def slope(rows, method: str, key: str) -> float:
    """Least-squares exponent ``b`` of ``value ~ N^b`` over the method's three largest measured N."""
    pts = sorted((r["n"], r[key]) for r in rows if r["method"] == method and np.isfinite(r["ms"]))[-3:]
    if len(pts) < 2:
        return np.nan
    x, y = np.log(np.array(pts, np.float64)).T
    return float(np.polyfit(x, y, 1)[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2 ** k for k in range(1, 11)])
    parser.add_argument("--size", type=int, default=128, help="image side for the group-size table")
    parser.add_argument("--batches", type=int, nargs="+", default=[2 ** k for k in range(0, 9)])
    parser.add_argument("--batch-group", type=int, nargs=2, default=[3, 64], metavar=("N", "SIZE"))
    parser.add_argument("--short", type=int, default=2)
    parser.add_argument("--long", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-gib", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="N = 2 and G = 1, 2 on 32^2 images, 2 repeats")
    benchtools.add_report_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.size, args.batches, args.batch_group, args.repeats, args.long = [2], 32, [1, 2], [3, 32], 2, 6

    sized = by_group_size(args.sizes, args.size, args.short, args.long, args.repeats, args.max_gib)
    batched = by_batch(args.batches, *args.batch_group, args.short, args.long, args.repeats)

    voxels = args.size ** 2
    size_table = benchtools.markdown_table(
        ["N", "method", "ms / step", "ms / step / image", "planned memory MiB", "planned B / image-voxel",
         "compile s"],
        [[r["n"], r["method"], ms_cell(r, args.max_gib),
          f"{r['ms'] / r['n']:.3f}" if np.isfinite(r["ms"]) else "–",
          benchtools.mib(r["plan"]) if np.isfinite(r["plan"]) else "–",
          f"{r['plan'] / (r['n'] * voxels):.0f}" if np.isfinite(r["plan"]) else "–",
          f"{r['compile_s']:.1f}" if np.isfinite(r["compile_s"]) else "–"] for r in sized])
    exponents = ", ".join(f"{m}: time ~ N^{slope(sized, m, 'ms'):.2f}, memory ~ N^{slope(sized, m, 'plan'):.2f}"
                          for m in METHODS)
    n, side = args.batch_group
    batch_table = benchtools.markdown_table(
        ["G", "ms / batched step", "group-iterations / s", "ms / group-iteration", "planned memory MiB",
         "compile s"],
        [[r["g"], f"{r['step_ms']:.2f}", f"{1e3 * r['g'] / r['step_ms']:.0f}", f"{r['step_ms'] / r['g']:.3f}",
          benchtools.mib(r["plan"]) + (f" (device peak {benchtools.mib(r['peak'])})" if r["peak"] else ""),
          f"{r['compile_s']:.1f}"] for r in batched])
    protocol = ("Protocol: synthetic 2D phantoms under random FFDs, one FFD stage (32 mm mesh), K = 4, L = 64, "
                f"10% sampling, one pyramid level; per-step time = slope between runs of {args.short} and "
                f"{args.long} steps, medians of {args.repeats} runs after a warm-up; memory is XLA's plan "
                "(arguments, outputs, temporaries) of the longer program.")
    cmd = benchtools.common.command("bench/bench_groups.py", argv)
    benchtools.report(args.out / "bench_groups.md", "Large groups and batches of groups", cmd, [
        benchtools.with_note(protocol, args.note),
        f"## One step against the group size N ({args.size} x {args.size} images)",
        size_table,
        f"Growth over the three largest N measured: {exponents}.",
        f"## G independent groups of {n} x {side}^2 in one vmapped program",
        batch_table])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
