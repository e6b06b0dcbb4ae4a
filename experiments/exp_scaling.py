"""Experiment 5: time and memory of one registration step against the group size N (2D).

X-CoReg's cost grows as O(N) (one class-intensity histogram per image), APE's as O(N^2) (one joint
histogram per pair of images). For each N, a synthetic 2D multimodal phantom of N modalities
(:func:`xjax.phantoms.make_phantom`) misaligned by random FFDs is registered by one FFD stage
(K = 4, L = 64, 10% of the voxels sampled per step, E-step over the whole grid for X-CoReg).

* time per step: the whole registration of ``--steps`` steps is compiled once (ahead of time) and
  run ``--repeats`` times; the median wall time divided by the step count (the fixed cost of a
  call, i.e. the pyramid and the final warp, is included, which overstates a step by about one
  step's worth over ``--steps``);
* memory: XLA's planned working memory of that compiled program (temporaries plus outputs,
  ``memory_analysis``), which is the peak of one step plus the stored outputs; a configuration whose
  plan exceeds ``--max-gib`` is compiled but not run.

    python experiments/exp_scaling.py [--sizes 2 4 8 ... 256] [--size 64] [--quick]

Writes ``exp_scaling.md`` and ``exp_scaling.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import numpy as np

import common
from xjax import objectives, phantoms, presets

METHODS = {"X-CoReg": None, "APE": objectives.APE()}


def measure(n: int, size: int, method: str, steps: int, repeats: int, max_gib: float) -> dict:
    """Compile and time one method's registration of an ``n``-image ``size x size`` group."""
    ph = phantoms.make_phantom(jax.random.key(0), (size, size), num_modalities=n)
    group = phantoms.misaligned_group(jax.random.key(1), ph, kind="ffd", spacing=32.0, magnitude=4.0)
    config = dataclasses.replace(
        presets.ffd(spacing=(32.0,), iterations=steps, levels=1, bins=64, sample_rate=0.1),
        objective=METHODS[method])

    run, compile_s, mib = common.compile_registration(group.images, ph.grid, config)
    row = {"n": n, "method": method, "compile_s": compile_s, "mib": mib, "ms": np.nan}
    if mib > 1024 * max_gib:
        return row
    common.timed(lambda: run(group.images, jax.random.key(0)))
    times = [common.timed(lambda: run(group.images, jax.random.key(r)))[1] for r in range(repeats)]
    row["ms"] = 1e3 * float(np.median(times)) / steps
    return row


def slope(rows, method: str, what: str) -> float:
    """Least-squares exponent ``b`` of ``value ~ N^b`` over the method's three largest measured N."""
    pts = sorted((r["n"], r[what]) for r in rows if r["method"] == method and np.isfinite(r[what]))[-3:]
    if len(pts) < 2:
        return np.nan
    n, v = np.log(np.array(pts)).T
    return float(np.polyfit(n, v, 1)[0])


def plot(path: Path, rows) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        n = [r["n"] for r in mine]
        axes[0].loglog(n, [r["ms"] for r in mine], "o-", label=method)
        axes[1].loglog(n, [r["mib"] for r in mine], "o-", label=method)
    for ax, label in zip(axes, ("ms per step", "planned memory (MiB)")):
        ax.set_xlabel("group size N")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128, 256],
                        help="group sizes N")
    parser.add_argument("--size", type=int, default=64, help="image side in voxels (2D, 1 mm)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=20, help="steps of each timed registration")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-gib", type=float, default=6.0,
                        help="do not run a configuration whose planned memory exceeds this")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--quick", action="store_true", help="seconds: N = 2 on 32 x 32, 3 steps")
    args = parser.parse_args(argv)
    cmd = common.command("exp_scaling.py", argv)
    if args.quick:
        args.sizes, args.size, args.steps, args.repeats = [2], 32, 3, 1

    rows = []
    for n in args.sizes:
        for method in args.methods:
            rows.append(measure(n, args.size, method, args.steps, args.repeats, args.max_gib))
            r = rows[-1]
            print(f"N = {n} {method}: {r['ms']:.2f} ms/step, {r['mib']:.1f} MiB, compile {r['compile_s']:.1f} s",
                  flush=True)

    table = [[r["n"], r["method"], "not run (over --max-gib)" if not np.isfinite(r["ms"]) else f"{r['ms']:.2f}",
              f"{r['mib']:.1f}", f"{r['compile_s']:.1f}"] for r in rows]
    ratios = []
    for n in args.sizes:
        by = {r["method"]: r for r in rows if r["n"] == n}
        if len(by) == 2:
            timed = np.isfinite(by["APE"]["ms"]) and np.isfinite(by["X-CoReg"]["ms"])
            ratios.append([n, f"{by['APE']['ms'] / by['X-CoReg']['ms']:.2f}" if timed else "not run",
                           f"{by['APE']['mib'] / by['X-CoReg']['mib']:.2f}"])
    exponents = [[m, f"{slope(rows, m, 'ms'):.2f}", f"{slope(rows, m, 'mib'):.2f}"] for m in args.methods]
    plot(args.out / "exp_scaling.png", rows)
    protocol = (
        f"2D phantoms of {args.size} x {args.size} voxels (1 mm), N modalities, one FFD stage (32 mm mesh), "
        f"1 pyramid level, K = 4, L = 64, sample rate 0.1; {args.steps} steps per timed run, median of "
        f"{args.repeats} runs, on the CPU. Configurations whose planned memory exceeds "
        f"{args.max_gib:g} GiB are reported as not run. Times come from one run on the machine above (a "
        "shared machine adds its noise; the ratios between methods at one N are the robust figures); "
        "memory is XLA's plan and exact.")
    sections = [
        "## Per step, against N",
        common.markdown_table(["N", "method", "ms / step", "planned memory (MiB)", "compile (s)"], table),
        "## APE relative to X-CoReg (time and memory ratios)",
        common.markdown_table(["N", "time ratio", "memory ratio"], ratios) if ratios else "(one method only)",
        "## Growth exponent b of cost ~ N^b (fit over the three largest measured N)",
        common.markdown_table(["method", "time exponent", "memory exponent"], exponents),
        "Figure: `exp_scaling.png` (log-log).",
    ]
    print(common.write_report(args.out / "exp_scaling.md", "Experiment 5: cost of a step against the "
                              "group size", cmd, protocol, sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
