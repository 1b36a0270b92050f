"""Progress that works everywhere: a bar on a terminal, plain lines in a log.

On a terminal (stderr is a TTY) :func:`progress` is a tqdm bar. Anywhere else (a CI log,
``nohup``, ``> train.log 2>&1``, a notebook's subprocess) a bar would vanish or write carriage
returns, so it prints one plain line at most every 10% or 30 s: done / total, rate and ETA.
"""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class LogLines:
    """Plain progress lines to ``stream``: at most one per ``step`` of the total or ``every`` s;
    none at all during the first ``delay`` s (a job done by then prints nothing)."""

    def __init__(
        self, total: int, desc: str, unit: str, stream=None, step=0.1, every=30.0, delay=0.0
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.step, self.every = max(1, int(total * step)), every
        self.done, self.t0 = 0, time.monotonic()
        self._last_n, self._last_t = 0, self.t0
        self._quiet_until = self.t0 + delay

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now < self._quiet_until:
            return
        if self.done - self._last_n >= self.step or now - self._last_t >= self.every:
            self._line(now)

    def _line(self, now: float) -> None:
        self._last_n, self._last_t = self.done, now
        secs = now - self.t0
        rate = self.done / secs if secs > 0 else 0.0
        pct = 100 * self.done / self.total if self.total else 100.0
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "?"
        print(
            f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({pct:.0f}%), "
            f"{rate:.1f} {self.unit}/s, ETA {eta}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        now = time.monotonic()
        if self.done != self._last_n and now >= self._quiet_until:
            self._line(now)


def progress(total: int, desc: str, unit: str = "img", enabled: bool = True, delay: float = 0.0):
    """A progress reporter with ``update(n)`` and ``close()``: a bar, log lines, or nothing.

    ``delay``: show nothing unless the job is still running after that many seconds (for steps
    that are usually instant, such as hashing a few files, but can take minutes)."""
    if not enabled or total <= 0:
        return _Silent()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(
            total=total, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1, delay=delay
        )
    return LogLines(total, desc, unit, delay=delay)


def say(text: str, enabled: bool = True) -> None:
    """One status line on stderr (beside the progress), when progress is on."""
    if enabled:
        print(text, file=sys.stderr, flush=True)
