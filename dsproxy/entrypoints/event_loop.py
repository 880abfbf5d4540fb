"""The event loop of a long-running process (`dsproxy node`, `controller`, `dsproxy-serve`)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run_service"]

T = TypeVar("T")


def run_service(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop (a dependency everywhere it builds): its loop, transports and
    timers in C cost a service a tenth of its CPU less than asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # where it does not build (Windows, PyPy): asyncio's own loop
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)
