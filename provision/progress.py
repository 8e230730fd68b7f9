"""A quiet progress bar on stderr: drawn only when stderr is a terminal."""

from __future__ import annotations

import sys
import threading
import time


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """Thread-safe byte counter with a one-line bar: `label  12.3 MiB / 40.0 MiB  31%`."""

    def __init__(self, label: str, total: int | None = None, *, enabled: bool | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._lock = threading.Lock()
        self._last = 0.0

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.enabled and now - self._last > 0.1:
                self._last = now
                self._draw()

    def _draw(self) -> None:
        if self.total:
            pct = min(100, self.done * 100 // max(self.total, 1))
            text = f"{self.label}  {human(self.done)} / {human(self.total)}  {pct:3d}%"
        else:
            text = f"{self.label}  {human(self.done)}"
        sys.stderr.write("\r" + text[:120].ljust(60))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw()
            sys.stderr.write("\n")
            sys.stderr.flush()
