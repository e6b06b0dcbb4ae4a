"""The ``xjax`` command line: :func:`main` and :func:`build_parser`, assembled from one module per
sub-command.

* :mod:`xjax.cli.register`: ``xjax register`` (one group of NIfTI images, or ``--groups DIR``);
* :mod:`xjax.cli.apply`: ``xjax apply`` (warp further images or labels with those transforms);
* :mod:`xjax.cli.demo`: ``xjax demo`` (the whole path on a synthetic phantom, with a figure);
* :mod:`xjax.cli.dcc`, :mod:`xjax.cli.bingo`: ``xjax dcc|bingo train|predict`` (the networks);
* :mod:`xjax.cli.common`: what they share (option checks, report entries, argument types).

Each sub-command module has ``add_parser(commands)`` and a handler ``run(args)``. Building the
parser imports no JAX, so that ``xjax --help`` answers at once; JAX and the core of xjax are
imported when a command runs. :func:`register_files`, :func:`register_groups`,
:func:`apply_files` and :func:`run_demo` are re-exported here.

Errors in the input print ``xjax: error: ...`` and exit with status 2; a registration that fails
(``Result.status`` not 0: non-finite values, or an overlap region that ran empty) still writes its
outputs, says why, and exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from xjax.cli import apply, bingo, dcc, demo, register
from xjax.cli.apply import apply_files
from xjax.cli.common import enable_compilation_cache
from xjax.cli.demo import run_demo
from xjax.cli.register import register_files, register_groups

__all__ = ["main", "build_parser", "register_files", "register_groups", "apply_files", "run_demo"]


def build_parser() -> argparse.ArgumentParser:
    """The ``xjax`` argument parser; each sub-command sets ``run``, its handler."""
    parser = argparse.ArgumentParser(
        prog="xjax", description="Multimodal groupwise image registration by the X-metric.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (register, apply, demo, dcc, bingo):
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad input, with no traceback)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage and the error
        return e.code if isinstance(e.code, int) else 2
    enable_compilation_cache()
    try:
        return args.run(args)
    except (ValueError, OSError) as e:
        print(f"xjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xjax: interrupted", file=sys.stderr)
        return 130
