"""Command-line numbers checked by argparse itself: one out of range is a usage error naming
the option (exit 2), not a traceback from deep inside (SQLite, a socket, a relay filter)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from dsproxy.wire.messages import I64_MAX

__all__ = ["count", "int_between", "port", "unix_time"]


def int_between(low: int, high: int) -> Callable[[str], int]:
    """An argparse `type`: a whole number from `low` to `high`, both included."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # also a digit string too long for int()
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not from {low} to {high}")
        return value

    return parse


count = int_between(0, I64_MAX)  # rows to list: SQLite's LIMIT takes a signed 64-bit integer
unix_time = int_between(0, I64_MAX)  # a Nostr created_at: relays read it as a 64-bit integer
port = int_between(0, 65_535)
