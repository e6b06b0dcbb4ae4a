"""What the benchmark parts share: compiling a registration ahead of time (one group or a vmapped
batch of groups), per-step time as a slope between two run lengths, XLA's memory plan, the bytes a
step saves for its gradient, and the device's streaming bandwidth.

Times are medians of repeated runs after a warm-up call, with compile time measured apart. Memory
is XLA's plan for the compiled program (``memory_analysis``: arguments, outputs and temporaries),
exact for the program and the same on every run; on a GPU the device's own peak is added.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/common.py

import common  # noqa: E402
import xjax  # noqa: E402

RESULTS = common.RESULTS
markdown_table = common.markdown_table


class Compiled(NamedTuple):
    run: Callable  # run(seed) -> the Result (of one group or of the batch)
    compile_s: float
    plan_bytes: int  # arguments + outputs + temporaries


def compile_registration(images, grid, config, batched: bool = False) -> Compiled:
    """``xjax.register`` of ``images`` ``(N, *spatial)`` (or of a batch ``(G, N, *spatial)`` of
    independent groups, vmapped, when ``batched``) compiled ahead of time."""
    images = jnp.asarray(images)

    def one(group, key):
        return xjax.register(group, grid, config, key=key)

    def keys(seed):
        key = jax.random.key(seed)
        return jax.random.split(key, images.shape[0]) if batched else key

    start = time.perf_counter()
    compiled = jax.jit(jax.vmap(one) if batched else one).lower(images, keys(0)).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    plan = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    return Compiled(lambda seed: compiled(images, keys(seed)), seconds, int(plan))


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


class StepTiming(NamedTuple):
    step_s: float  # one step of the loop, the call's fixed cost removed
    compile_s: float  # of the shorter program
    plan_bytes: int  # of the longer program (the same plan: the loop is a scan)


def step_timing(images, grid, config_for: Callable[[int], object], short: int, long: int,
                repeats: int, batched: bool = False, max_bytes: float = np.inf) -> StepTiming:
    """Per-step time of the registration loop as the slope between runs of ``short`` and
    ``long`` steps (so the pyramid, the posterior start and the final warp cancel). Where the
    plan of the longer program exceeds ``max_bytes``, nothing runs and the times are NaN."""
    b = compile_registration(images, grid, config_for(long), batched)
    if b.plan_bytes > max_bytes:
        return StepTiming(np.nan, np.nan, b.plan_bytes)
    a = compile_registration(images, grid, config_for(short), batched)
    ta = median_seconds(lambda: a.run(1), repeats)
    tb = median_seconds(lambda: b.run(1), repeats)
    return StepTiming((tb - ta) / (long - short), a.compile_s, b.plan_bytes)


def residual_bytes(loss, params, *args) -> int:
    """Bytes of the residuals that ``jax.vjp`` of ``loss(params, *args)`` (``has_aux``) keeps
    for the backward pass, not counting arrays that are the function's own inputs or constants
    it closes over (images, grid points): the saved activations of one step."""
    _, vjp, _ = jax.vjp(lambda p: loss(p, *args), params, has_aux=True)
    inputs = {id(a) for a in jax.tree.leaves((params, args, getattr(loss, "args", ())))}
    return int(sum(a.nbytes for a in jax.tree.leaves(vjp) if hasattr(a, "nbytes") and id(a) not in inputs))


def bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    """Streaming bandwidth of the default device in GB/s: ``y = 2 x + 1`` over ``mib`` MiB of
    float32 (each byte read once and written once)."""
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda a: 2.0 * a + 1.0)
    seconds = median_seconds(lambda: f(x), repeats)
    return 2 * x.nbytes / seconds / 1e9


def device_peak_bytes() -> int | None:
    """The device's peak allocated bytes since start (GPU), or None where JAX does not report it."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def device_line() -> str:
    dev = jax.devices()[0]
    return f"{common.machine()}, device {dev.device_kind}, jaxlib {jax.lib.__version__}"


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def add_report_options(parser) -> None:
    """The options of every part's report: ``--note`` (conditions of the run) and ``--out``."""
    parser.add_argument("--note", default="", help="conditions of the run, written into the report")
    parser.add_argument("--out", type=Path, default=RESULTS)


def with_note(text: str, note: str) -> str:
    """``text`` followed by the run's conditions, when there are any."""
    return text + (f" Conditions: {note}" if note else "")


def report(path: Path, title: str, cmd: str, sections: list[str]) -> str:
    """Print and write a benchmark report (title, command, machine, sections)."""
    text = "\n\n".join([f"# {title}", f"Command: `{cmd}`", f"Machine: {device_line()}", *sections]) + "\n"
    print(text)
    return common.write_text(path, text)
