"""Compare formulations of the class x intensity Parzen histogram, the crux of every step.

Each sample lands 4 kernel taps in ``L + 4`` bins, weighted by its ``K`` posterior values, and the
group's ``N`` histograms are ``(N, L + 4, K)``. Four formulations of the same histogram, each
timed with its gradient with respect to the intensities (what a registration step needs):

* ``scatter``: one scatter-add of all ``4 N S`` taps into a flat ``(N (L + 4), K)`` table (xjax's
  :func:`xjax.density.group_joint_histograms`);
* ``onehot``: for each of the 4 taps, a one-hot ``(S, L + 4)`` matrix times the ``(S, K)``
  weights, image by image (``lax.map``), in chunks of samples so that no more than ``chunk x (L + 4)``
  values exist at once;
* ``segment``: the taps sorted by bin, then ``jax.ops.segment_sum`` with sorted indices;
* ``dense``: the kernel evaluated at every bin for every sample, ``(S, L + 4)`` per image, times the
  weights: the samples x bins table that xjax otherwise never forms (for reference only).

All four are checked against each other before timing. Medians of repeated runs after a warm-up;
compile time apart.

    python experiments/bench/bench_histogram.py [--images 10] [--samples 6554] [--bins 64] [--classes 4]

Prints a markdown table and writes ``bench_histogram.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import benchtools
from xjax.density import PADDING, bin_positions, bspline3, group_joint_histograms, parzen_taps


def scatter(u, w, lo, hi, bins):
    return group_joint_histograms(u, w, lo, hi, bins)


def _taps(u, lo, hi, bins):
    pos = jax.vmap(bin_positions, in_axes=(0, 0, 0, None))(u, lo, hi, bins)
    return parzen_taps(pos)  # (N, S), (N, S, 4)


def onehot(u, w, lo, hi, bins, chunk: int = 2048):
    size = bins + 2 * PADDING
    first, taps = _taps(u, lo, hi, bins)
    s = u.shape[1]
    pad = (-s) % chunk
    first = jnp.pad(first, ((0, 0), (0, pad)), constant_values=-size)  # padded taps hit no bin
    taps = jnp.pad(taps, ((0, 0), (0, pad), (0, 0)))
    wp = jnp.pad(w, ((0, pad), (0, 0)))
    blocks = (s + pad) // chunk

    def one_image(args):
        f, t = args
        f, t = f.reshape(blocks, chunk), t.reshape(blocks, chunk, 4)

        def block(hist, b):
            fb, tb, wb = f[b], t[b], jax.lax.dynamic_slice_in_dim(wp, b * chunk, chunk)
            for k in range(4):
                hot = jax.nn.one_hot(fb + k, size, dtype=u.dtype) * tb[:, k:k + 1]
                hist = hist + hot.T @ wb
            return hist, None

        return jax.lax.scan(block, jnp.zeros((size, w.shape[1]), u.dtype), jnp.arange(blocks))[0]

    return jax.lax.map(one_image, (first, taps))


def segment(u, w, lo, hi, bins):
    size = bins + 2 * PADDING
    n = u.shape[0]
    first, taps = _taps(u, lo, hi, bins)
    index = first[..., None] + jnp.arange(4)
    ok = (index >= 0) & (index < size)
    index = jnp.where(ok, index + (jnp.arange(n) * size)[:, None, None], n * size).reshape(-1)
    updates = (taps[..., None] * w[None, :, None, :]).reshape(-1, w.shape[1])
    order = jnp.argsort(index)
    return jax.ops.segment_sum(updates[order], index[order], num_segments=n * size + 1,
                               indices_are_sorted=True)[:-1].reshape(n, size, -1)


def dense(u, w, lo, hi, bins):
    size = bins + 2 * PADDING
    pos = jax.vmap(bin_positions, in_axes=(0, 0, 0, None))(u, lo, hi, bins)
    kernel = bspline3(pos[..., None] - jnp.arange(size, dtype=u.dtype))  # (N, S, L + 4)
    return jnp.einsum("nsb,sk->nbk", kernel, w)


FORMULATIONS = {"scatter": scatter, "onehot": onehot, "segment": segment, "dense": dense}



def bench(name, fn, args, bins, repeats):
    def loss(u, w, lo, hi):
        h = fn(u, w, lo, hi, bins)
        return jnp.sum(h * jnp.log1p(h))  # any smooth function of every bin

    step = jax.jit(jax.value_and_grad(loss))
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - start
    ms = 1e3 * benchtools.median_seconds(lambda: compiled(*args), repeats)
    return {"name": name, "compile_s": compile_s, "ms": ms}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--samples", type=int, default=6554, help="per image (10%% of 256 x 256)")
    parser.add_argument("--bins", type=int, default=64)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="3 images x 512 samples, 3 repeats")
    benchtools.add_report_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.samples, args.repeats = 3, 512, 3

    key = jax.random.key(0)
    u = jax.random.normal(key, (args.images, args.samples))
    w = jax.nn.softmax(jax.random.normal(jax.random.fold_in(key, 1), (args.samples, args.classes)), axis=-1)
    lo, hi = u.min(axis=1), u.max(axis=1)
    reference = np.asarray(scatter(u, w, lo, hi, args.bins))
    rows = []
    for name, fn in FORMULATIONS.items():
        np.testing.assert_allclose(np.asarray(fn(u, w, lo, hi, args.bins)), reference, rtol=1e-4, atol=1e-3)
        rows.append(bench(name, fn, (u, w, lo, hi), args.bins, args.repeats))
    best = min(r["ms"] for r in rows)
    table = benchtools.markdown_table(
        ["formulation", "median ms", "x fastest", "compile s"],
        [[r["name"], f"{r['ms']:.2f}", f"{r['ms'] / best:.1f}", f"{r['compile_s']:.2f}"] for r in rows])
    cmd = benchtools.common.command("bench/bench_histogram.py", argv)
    benchtools.report(
        args.out / "bench_histogram.md",
        f"Parzen class x intensity histograms: {args.images} images x {args.samples} samples, "
        f"L = {args.bins}, K = {args.classes}, value and gradient", cmd,
        [table, benchtools.with_note("Medians of repeated calls after a warm-up. All formulations agree with "
                                     "the scatter-add to float32 round-off before they are timed.", args.note)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
