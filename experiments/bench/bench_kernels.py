"""The kernels of one X-CoReg step, timed and sized for the benchmark sizes.

For each group (a synthetic multimodal phantom of N images under random FFDs, cubic B-spline FFD
with a 32 mm mesh, K = 4, L = 64, 10% of the voxels sampled per step, one pyramid level):

* E-step: the appearance models from the sample and the posterior over the whole grid (Eq. 12-14,
  20), ``XMetric.update``;
* X-metric value and gradient with respect to the sampled intensities (Eq. 17);
* step: warp + E-step + X-metric + gradient + Adam update, the per-step slope of the whole
  registration loop between two run lengths (what ``xjax.register`` runs);
* memory: XLA's plan for the registration program; the bytes a step saves for its gradient per
  image-voxel (``jax.vjp`` residuals of ``xjax.registration.step_problem``'s loss, inputs excluded);
* floor: the bytes a step must move at least, ``(4 N + 8 K) V`` (each image read once by the
  E-step, the posterior written and read back once), divided by the measured streaming bandwidth.

    python experiments/bench/bench_kernels.py [--cases 2d-3x192 2d-10x256 3d-4x128 3d-4x240x240x155]
                                              [--repeats 5] [--quick]

Prints a markdown table and writes ``bench_kernels.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp

import benchtools
import xjax
from xjax import phantoms, registration

K, BINS, SAMPLE_RATE = 4, 64, 0.1
ORIGINAL_S_PER_STEP = {"2d-3x192": 1.07}  # the authors' PyTorch code, 2-core CPU (REFERENCE.md)


class Case(NamedTuple):
    n: int
    shape: tuple[int, ...]
    short: int  # run lengths whose time difference gives a step
    long: int


CASES = {
    "2d-3x192": Case(3, (192, 192), 10, 60),
    "2d-10x256": Case(10, (256, 256), 5, 30),
    "3d-4x128": Case(4, (128, 128, 128), 2, 8),
    "3d-4x240x240x155": Case(4, (240, 240, 155), 2, 6),
    "2d-3x32": Case(3, (32, 32), 2, 6),  # --quick
}
QUICK = ("2d-3x32",)

#: (platform, case) -> (what is measured, at most this many ms): the stated targets.
TARGETS = {("cpu", "2d-3x192"): ("step", 10.0), ("gpu", "2d-10x256"): ("step", 0.3),
           ("gpu", "3d-4x128"): ("step", 3.0)}


def config_for(iterations: int) -> xjax.Config:
    return xjax.presets.ffd(spacing=(32.0,), iterations=iterations, levels=1, bins=BINS,
                            sample_rate=SAMPLE_RATE, num_classes=K)


def make_group(case: Case):
    ph = phantoms.make_phantom(jax.random.key(0), case.shape, num_modalities=case.n)
    group = phantoms.misaligned_group(jax.random.key(1), ph, kind="ffd", spacing=32.0, magnitude=4.0)
    return group.images, ph.grid


def measure(name: str, case: Case, repeats: int, bandwidth: float) -> dict:
    images, grid = make_group(case)
    n, v = case.n, grid.size
    config = config_for(case.long)
    problem = registration.step_problem(images, grid, config, key=jax.random.key(2))
    objective, state, idx = config.metric, problem.state, problem.drawn.index
    flat = images.reshape(n, v)
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    weights = jnp.ones((v,), images.dtype)

    estep = jax.jit(lambda st, u: objective.update(st, u, weights, lo, hi, BINS, idx))
    metric = jax.jit(jax.value_and_grad(
        lambda values: objective.similarity(state, values, weights[idx], idx, lo, hi, BINS)))
    values = flat[:, idx]
    row = {"case": name, "n": n, "voxels": v,
           "estep_ms": 1e3 * benchtools.median_seconds(lambda: estep(state, flat), repeats),
           "metric_ms": 1e3 * benchtools.median_seconds(lambda: metric(values), repeats)}

    saved = benchtools.residual_bytes(problem.loss, problem.params, state, problem.drawn)
    grad = jax.jit(jax.value_and_grad(problem.loss, has_aux=True)).lower(
        problem.params, state, problem.drawn).compile()
    row["saved_b"] = saved / (n * v)
    row["step_temp_b"] = grad.memory_analysis().temp_size_in_bytes / (n * v)

    timing = benchtools.step_timing(images, grid, config_for, case.short, case.long, repeats)
    row.update(step_ms=1e3 * timing.step_s, compile_s=timing.compile_s, plan=timing.plan_bytes,
               peak=benchtools.device_peak_bytes())
    floor_bytes = (4 * n + 8 * K) * v
    row["floor_ms"] = 1e3 * floor_bytes / (bandwidth * 1e9)
    return row


def target_cell(platform: str, row: dict) -> str:
    target = TARGETS.get((platform, row["case"]))
    if target is None:
        return "–"
    what, ms = target
    return f"{what} <= {ms:g} ms: {'met' if row[what + '_ms'] <= ms else 'not met'}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=[c for c in CASES if c not in QUICK], choices=CASES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help=f"cases {' '.join(QUICK)}, 2 repeats")
    benchtools.add_report_options(parser)
    args = parser.parse_args(argv)
    cases, repeats = (QUICK, 2) if args.quick else (args.cases, args.repeats)
    platform = jax.devices()[0].platform

    bandwidth = benchtools.bandwidth_gbs(64 if args.quick else 512)
    rows = []
    for name in cases:
        rows.append(measure(name, CASES[name], repeats, bandwidth))
        print(f"{name}: step {rows[-1]['step_ms']:.2f} ms", file=sys.stderr)

    table = benchtools.markdown_table(
        ["group", "E-step ms", "X-metric value+grad ms", "step ms", "compile s",
         "planned memory MiB", "saved B / image-voxel", "step temporaries B / image-voxel",
         "floor ms", "step / floor", "target"],
        [[r["case"], f"{r['estep_ms']:.2f}", f"{r['metric_ms']:.3f}", f"{r['step_ms']:.2f}",
          f"{r['compile_s']:.1f}",
          benchtools.mib(r["plan"]) + (f" (device peak {benchtools.mib(r['peak'])})" if r["peak"] else ""),
          f"{r['saved_b']:.1f}", f"{r['step_temp_b']:.1f}", f"{r['floor_ms']:.3f}",
          f"{r['step_ms'] / r['floor_ms']:.0f}x", target_cell(platform, r)] for r in rows])
    compared = [f"{r['case']}: the authors' PyTorch code takes {ORIGINAL_S_PER_STEP[r['case']]} s per step "
                f"on a 2-core CPU (REFERENCE.md), {1e3 * ORIGINAL_S_PER_STEP[r['case']] / r['step_ms']:.0f}x "
                "this step" for r in rows if r["case"] in ORIGINAL_S_PER_STEP and platform == "cpu"]
    protocol = (f"Protocol: synthetic phantom groups under random FFDs; cubic B-spline FFD (32 mm mesh), "
                f"K = {K}, L = {BINS}, {SAMPLE_RATE:.0%} of the voxels sampled per step, E-step over the "
                f"whole grid; medians of {repeats} runs after a warm-up. Streaming bandwidth measured "
                f"here: {bandwidth:.1f} GB/s; the floor is (4 N + 8 K) V bytes at that bandwidth.")
    cmd = benchtools.common.command("bench/bench_kernels.py", argv)
    benchtools.report(args.out / "bench_kernels.md", "One X-CoReg step and its kernels", cmd,
                      [benchtools.with_note(protocol, args.note), table, *compared])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
