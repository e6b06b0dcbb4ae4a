"""What the training loops of DCC (:mod:`xjax.nn.dcc.train`) and BInGo (:mod:`xjax.nn.bingo.train`)
share: the fast-compile XLA options of their jitted steps, and the schedule rule of their logs and
checkpoints.

Both loops run one ``jax.jit`` step over ``nnx.split`` state on the host, ``done = 1 .. total``; a
log line and a checkpoint are written on the steps :func:`due` names.
"""

from __future__ import annotations

__all__ = ["FAST_COMPILE", "compiler_options", "due"]

#: XLA options of ``fast_compile``: no LLVM optimisation of the fused elementwise code (the
#: convolutions are library calls either way). On a CPU a train step compiles about three times
#: faster and runs slower, with the same results up to float rounding: for short runs and tests.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compiler_options(fast_compile: bool) -> dict | None:
    """The ``compiler_options`` of ``jax.jit`` for a step: :data:`FAST_COMPILE` or the defaults."""
    return FAST_COMPILE if fast_compile else None


def due(done: int, total: int, every: int) -> bool:
    """Whether step ``done`` (1-based) of ``total`` writes a log line or a checkpoint: every
    ``every`` steps and at the last one (``every = 0``: only at the last one)."""
    return done == total or (every > 0 and done % every == 0)
