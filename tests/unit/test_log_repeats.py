"""A line repeated within the window is counted, not written; the next one written says so."""

from __future__ import annotations

import logging

from dsproxy.entrypoints.log_repeats import RepeatedLines


def _record(message: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("dsproxy.test", level, __file__, 1, message, args, None)


def test_a_repeated_line_is_written_once_a_window_with_the_count() -> None:
    now = [0.0]
    lines = RepeatedLines(window_s=10, clock=lambda: now[0])
    assert lines.filter(_record("upstream answered %s", 500))
    for _ in range(41):
        now[0] += 0.1
        assert not lines.filter(_record("upstream answered %s", 500))
    assert lines.filter(_record("upstream answered %s", 429))  # other words: written
    assert lines.filter(_record("upstream answered %s", 500, level=logging.WARNING))
    now[0] = 10.5
    again = _record("upstream answered %s", 500)
    assert lines.filter(again)
    assert again.getMessage() == "upstream answered 500 (and 41 more like it before this)"
    now[0] = 30.0
    quiet = _record("upstream answered %s", 500)
    assert lines.filter(quiet) and quiet.getMessage() == "upstream answered 500"


def test_a_traceback_is_always_written() -> None:
    lines = RepeatedLines(window_s=10, clock=lambda: 0.0)
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = _record("unhandled error")
        record.exc_info = sys.exc_info()
    assert lines.filter(record) and lines.filter(record)
