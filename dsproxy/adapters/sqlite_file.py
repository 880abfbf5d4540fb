"""Opening one of our SQLite files for asyncio: WAL, autocommit, schema, our errors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import aiosqlite

from dsproxy.adapters.data_dir_lock import make_data_dir
from dsproxy.errors import StoreError

__all__ = ["open_sqlite"]


async def open_sqlite(
    path: Path, schemas: Sequence[str], *, what: str, durable: bool = True
) -> aiosqlite.Connection:
    """Create the directory and the tables; `durable=False` (a rebuild's scratch file) turns the
    journal and fsync off, since a crash discards that file anyway."""
    make_data_dir(path.parent)
    connection: aiosqlite.Connection | None = None
    try:
        connection = await aiosqlite.connect(path, isolation_level=None)
        if durable:
            await connection.execute("PRAGMA journal_mode=WAL")
            await connection.execute("PRAGMA synchronous=NORMAL")
        else:
            await connection.execute("PRAGMA journal_mode=OFF")
            await connection.execute("PRAGMA synchronous=OFF")
        for schema in schemas:
            await connection.executescript(schema)
    except (aiosqlite.Error, OSError) as exc:
        if connection is not None:  # its worker thread would keep the process from exiting
            await connection.close()
        raise StoreError(f"cannot open {what} {str(path)!r}: {exc}") from exc
    return connection
