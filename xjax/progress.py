"""A small text progress bar for long runs, written to stderr (no dependencies).

A bar is a callable ``bar(done, total, loss)``, the progress callback that :func:`xjax.register`
calls now and then from inside its compiled loop. On a terminal it redraws one line in place; when
stderr is a file or a pipe it prints plain lines, at most about ``max_lines`` per run.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

__all__ = ["ProgressBar", "null"]


def null(done: int, total: int, loss: float) -> None:
    """A progress callback that shows nothing."""


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """``bar(done, total, loss)`` shows ``label [####----]  42%  120/285  loss -1.2345  00:12<00:16``.

    The ETA is measured from the first report on, so one-off compilation before it does not skew
    the rate. Call :meth:`close` (or use it as a context manager) to end the line.

    Args:
      label: text in front of the bar.
      stream: where to write (default ``sys.stderr``).
      width: number of cells of the bar.
      max_lines: when ``stream`` is not a terminal, print a line only every ``100 / max_lines``
        percent (and at the end).
      min_interval: on a terminal, redraw at most once per ``min_interval`` seconds (and at the
        end).
    """

    def __init__(self, label: str = "", *, stream: TextIO | None = None, width: int = 24,
                 max_lines: int = 20, min_interval: float = 0.1):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.max_lines = max_lines
        self.min_interval = min_interval
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.start = time.perf_counter()
        self.first: tuple[float, int] | None = None
        self.last_step = -1
        self.last_draw = -math.inf
        self.drawn = False

    def __call__(self, done, total, loss) -> None:
        done, total, loss = int(done), max(int(total), 1), float(loss)
        now = time.perf_counter()
        if self.first is None or done < self.first[1]:
            self.first = (now, done)
        step = done * self.max_lines // total
        if done < total and (step == self.last_step if not self.tty
                             else now - self.last_draw < self.min_interval):
            return
        self.last_step, self.last_draw = step, now
        line = self._format(done, total, loss, now)
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.drawn = True

    def _format(self, done: int, total: int, loss: float, now: float) -> str:
        frac = min(done / total, 1.0)
        cells = int(round(frac * self.width))
        t0, d0 = self.first
        rate = (done - d0) / (now - t0) if done > d0 and now > t0 else 0.0
        eta = (total - done) / rate if rate > 0 else (0.0 if done >= total else math.inf)
        bar = "#" * cells + "-" * (self.width - cells)
        prefix = f"{self.label} " if self.label else ""
        return (f"{prefix}[{bar}] {100 * frac:3.0f}%  {done}/{total}  loss {loss:.4g}  "
                f"{_clock(now - self.start)}<{_clock(eta)}")

    def close(self) -> None:
        """End the in-place line (terminal only)."""
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
        self.drawn = False

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
