"""One long-running process per data directory: an exclusive lock on `DATA_DIR/.lock`.

A backend keeps each user's holds in memory, and every node runs its own outbox: two backends
on one directory each reserved against their own book (a user overspent), and a second start
issued the first one's unissued charges again. The lock is an `flock`, so the kernel lets it go
when the process ends, however it ends; the file names the holder for the error message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from dsproxy.errors import ConfigError, StoreError

__all__ = ["DATA_DIR_MODE", "exclusive_data_dir", "make_data_dir", "while_no_other_process_runs"]

DATA_DIR_MODE = 0o700
"""A data directory holds conversations, session tokens and keys' events: its owner's only."""

_held_here: set[Path] = set()  # data directories this process holds


def make_data_dir(path: Path) -> None:
    """Create the data directory (and parents) if missing, readable by its owner only."""
    try:
        path.mkdir(mode=DATA_DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, a read-only disk
        raise StoreError(f"cannot create the data directory {str(path)!r}: {exc}") from None


@contextlib.contextmanager
def exclusive_data_dir(data_dir: Path, holder: str, *, create: bool = True) -> Iterator[None]:
    """Hold the data directory for this process, or raise ConfigError naming who holds it.
    Without `create`, a directory that does not exist yet is not created (nor locked)."""
    if not data_dir.is_dir():
        if not create:
            yield
            return
        make_data_dir(data_dir)
    try:
        handle = (data_dir / ".lock").open("a+", encoding="utf-8")
    except OSError as exc:
        raise StoreError(f"cannot lock the data directory {str(data_dir)!r}: {exc}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            other = handle.read().strip() or "another process"
            raise ConfigError(
                f"{data_dir} is in use by {other}: run one serve, node or controller per data "
                "directory (stop it first, or give this one a directory of its own)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{holder} (pid {os.getpid()})\n")
        handle.flush()
        held = data_dir.resolve()
        _held_here.add(held)
        try:
            yield  # closing the file lets the lock go
        finally:
            _held_here.discard(held)


@contextlib.contextmanager
def while_no_other_process_runs(data_dir: Path, what: str) -> Iterator[None]:
    """For work that must not happen under a running node (a rebuild swaps the projection's
    file): the lock is held by this process already, or taken for the while, or ConfigError."""
    if data_dir.resolve() in _held_here:
        yield
        return
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive_data_dir(data_dir, what, create=False))
        except ConfigError as exc:
            raise ConfigError(f"{what} cannot wait: {exc}") from None
        yield
