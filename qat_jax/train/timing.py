"""Where a run's wall time goes, by named phase, through a context manager (big_vision's
``chrono`` style)::

    timer = Timer()
    with timer.phase("transitions"):
        ...
        with timer.phase("qat_start"):  # nested: these seconds count for qat_start only
            ...

Every second inside a phase is billed to exactly one key, the innermost open phase (a nested
phase pauses the one around it). :attr:`Timer.seconds` lists the keys in the order their first
phase ended; the trainer writes it as ``timing_seconds`` of ``summary.json``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

__all__ = ["Timer"]


class Timer:
    """Accumulates wall seconds by phase; :meth:`elapsed` is the run's wall time so far.

    Attributes:
      seconds: ``{phase: seconds}`` of this process (this session of the run).
      elapsed_before: wall seconds of the run's earlier sessions (a resumed run sets it from its
        checkpoint); :meth:`elapsed` adds this session's.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.seconds: dict[str, float] = {}
        self.elapsed_before = 0.0
        self._clock = clock
        self._start = clock()
        self._open: list[list] = []  # [name, seconds banked while a nested phase was not open]
        self._since = self._start  # when the innermost open phase last (re)started counting

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Bill the wall time of the ``with`` block to ``name`` (minus nested phases)."""
        now = self._clock()
        if self._open:
            self._open[-1][1] += now - self._since
        self._open.append([name, 0.0])
        self._since = now
        try:
            yield
        finally:
            now = self._clock()
            _, banked = self._open.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + banked + (now - self._since)
            self._since = now

    def elapsed(self) -> float:
        """Wall seconds of the run: its earlier sessions' and this one's since the timer began."""
        return self.elapsed_before + (self._clock() - self._start)
