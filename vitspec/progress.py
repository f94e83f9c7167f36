"""Progress a terminal and a scheduler's log can both show.

On a terminal: a tqdm bar. Otherwise (SLURM, nohup, ``2> log``): a plain line about every 10 % of
the images or every 30 s, e.g. ``64/512 images, 6.1 img/s, ETA 1m13s``, through the caller's
``log`` (the CLI prefixes ``vitspec:`` and writes to stderr).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from tqdm import tqdm

MODES = ("bar", "lines")


def choose_mode(progress: bool | str | None) -> str | None:
    """``True``: a bar on a terminal, else lines; ``'bar'`` / ``'lines'`` as given; falsy: none.

    Example:
        >>> choose_mode("lines"), choose_mode(False)
        ('lines', None)
    """
    if not progress:
        return None
    if progress is True:
        return "bar" if sys.stderr.isatty() else "lines"
    if progress not in MODES:
        raise ValueError(f"progress must be True, False, 'bar' or 'lines', got {progress!r}")
    return progress


def duration(seconds: float) -> str:
    """``73.2`` -> ``'1m13s'``; ``3700`` -> ``'1h01m'``.

    Example:
        >>> duration(73.2), duration(3700), duration(5)
        ('1m13s', '1h01m', '5s')
    """
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """Counts images through a run and shows them as a bar or as periodic lines.

    Args:
        total: images expected (None when unknown: lines then carry no ETA).
        mode: ``'bar'``, ``'lines'`` or None (silent); see :func:`choose_mode`.
        log: where lines go (``'lines'`` mode).
        every_s: the longest gap between two lines.

    Example:
        >>> lines = []
        >>> p = Progress(4, "lines", lines.append)
        >>> for _ in range(4):
        ...     p.update(1)
        >>> len(lines), lines[0].startswith("1/4 images")
        (4, True)
    """

    def __init__(
        self,
        total: int | None,
        mode: str | None,
        log: Callable[[str], None] | None = None,
        every_s: float = 30.0,
    ):
        self.total, self.mode, self.log, self.every_s = total, mode, log, every_s
        self.done = 0
        self._lock = threading.Lock()
        self.start = self._last_time = time.perf_counter()
        self._last_count = 0
        self._bar = (
            tqdm(total=total, unit="img", file=sys.stderr, leave=False) if mode == "bar" else None
        )

    def update(self, n: int) -> None:
        """``n`` more images are done (callable from several worker threads)."""
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
            elif self.mode == "lines" and self.log is not None and self._due():
                self.log(self.line())

    def line(self) -> str:
        """``done/total images, rate img/s, ETA ...``."""
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text = f"{self.done}/{self.total if self.total else '?'} images, {rate:.1f} img/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {duration((self.total - self.done) / rate)}"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _due(self) -> bool:
        now = time.perf_counter()
        step = self.total / 10 if self.total else None
        if (step and self.done - self._last_count >= step) or now - self._last_time >= self.every_s:
            self._last_time, self._last_count = now, self.done
            return True
        return False
