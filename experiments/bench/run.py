"""xjax's benchmark suite: every speed and memory figure, one command.

    python experiments/bench/run.py [--parts kernels groups histogram] [--quick] [--out DIR]

Parts, each also a script of its own in this folder (``--help`` for its options):

* ``kernels`` (``bench_kernels.py``): E-step, X-metric value and gradient, and one registration
  step for 2D 3x192^2 and 10x256^2 and 3D 4x128^3 and 4x240x240x155 groups, with compile time,
  XLA's memory plan, the bytes saved for the gradient per image-voxel and the bandwidth floor;
* ``groups`` (``bench_groups.py``): a step against the group size N = 2 .. 1024 (2D 128^2) for
  X-CoReg and APE, and the throughput of G = 1 .. 256 vmapped independent groups;
* ``histogram`` (``bench_histogram.py``): four formulations of the class x intensity Parzen
  histogram.

Each part prints its table and writes ``bench_<part>.md`` (with the machine and the command) into
``--out`` (default ``experiments/results``). Run it on a machine without other work: the figures
are medians of repeated runs, and other work inflates them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bench_groups
import bench_histogram
import bench_kernels

PARTS = {"kernels": bench_kernels, "groups": bench_groups, "histogram": bench_histogram}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--quick", action="store_true", help="each part's seconds-long quick mode")
    parser.add_argument("--out", type=Path, help="results folder (default experiments/results)")
    args = parser.parse_args(argv)
    for name in args.parts:
        print(f"== {name}", file=sys.stderr)
        code = PARTS[name].main((["--quick"] if args.quick else []) +
                                (["--out", str(args.out)] if args.out else []))
        if code:
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
