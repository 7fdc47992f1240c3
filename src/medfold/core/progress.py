"""Plain progress lines for long work, readable in a terminal and in a Slurm log file alike:

    index: 20,480/112,120 images (18.3 %), 1,204 images/s, 1m16s left

one line every ``MEDFOLD_PROGRESS_SECONDS`` (default 30) while the work lasts, none for work
shorter than that, and a last line with the total time when it lasted at least one interval.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("medfold.core.progress")


def interval() -> float:
    try:
        return float(os.environ.get("MEDFOLD_PROGRESS_SECONDS", "30"))
    except ValueError:
        return 30.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """``update(n)`` as work is done (from any thread); ``close()`` when it ends."""

    def __init__(self, what: str, total: int, unit: str = "images", every: float | None = None):
        self.what, self.total, self.unit = what, int(total), unit
        self.every = interval() if every is None else every
        self.done = 0
        self.start = self.last = time.monotonic()
        self.spoke = False
        self._lock = threading.Lock()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self.last >= self.every and self.done < self.total:
                self.last = now
                self.spoke = True
                log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        share = 100 * self.done / max(self.total, 1)
        return (
            f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({share:.1f} %), {rate:,.1f} {self.unit}/s, "
            f"{_duration(left) if left != float('inf') else '?'} left"
        )

    def close(self) -> None:
        if self.spoke:
            log.info(
                "%s: %s %s in %s", self.what, f"{self.done:,}", self.unit, _duration(time.monotonic() - self.start)
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tracked(items, progress: Progress):
    """Yield ``items``, counting each one done."""
    for item in items:
        yield item
        progress.update()
