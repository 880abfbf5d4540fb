"""Repeated log lines said once: an upstream outage fails every chat with the same words, and a
line per request buries everything else in the log.

A line is written the first time; the same line (same logger, level and text) again within
`window_s` is counted instead, and the next one written after the window says how many there
were.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["RepeatedLines"]

LINES_REMEMBERED_MAX = 1_000


class RepeatedLines(logging.Filter):
    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.window_s, self._clock = window_s, clock
        self._seen: OrderedDict[tuple[str, int, str], tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()  # threads log too (the store's writer, verifiers)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:  # a traceback is always worth its lines
            return True
        key = (record.name, record.levelno, record.getMessage())
        with self._lock:
            return self._counted(key, record)

    def _counted(self, key: tuple[str, int, str], record: logging.LogRecord) -> bool:
        now = self._clock()
        written_s, repeats = self._seen.get(key, (float("-inf"), 0))
        if now - written_s < self.window_s:
            self._seen[key] = (written_s, repeats + 1)
            return False
        if repeats:
            record.msg = f"{record.getMessage()} (and {repeats} more like it before this)"
            record.args = None
        self._seen[key] = (now, 0)
        self._seen.move_to_end(key)
        if len(self._seen) > LINES_REMEMBERED_MAX:
            self._seen.popitem(last=False)
        return True
