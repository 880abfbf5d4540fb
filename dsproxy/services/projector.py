"""The projector: folds the event store, in order, into the balance projection.

It resumes from the position the projection recorded, applies one page at a time (the fold in
`projections`, the writes in one transaction), and can rebuild the whole projection into a fresh
file that replaces the old one only when complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from attrs import frozen

from dsproxy.adapters.event_store import AsyncEventStore, StoredRecord
from dsproxy.adapters.projection_db import ProjectionDb, policy_fingerprint
from dsproxy.domain.transactions import entry_from_event
from dsproxy.errors import InvalidEvent
from dsproxy.wire.event import parse_event
from projections import Entry, Ignored, Ledger, TrustPolicy, fold

__all__ = [
    "Batch",
    "CatchUp",
    "FactProjection",
    "Projector",
    "classify",
    "open_projection",
    "rebuild",
]

log = logging.getLogger(__name__)


class FactProjection(Protocol):
    """A projection of local facts (or of Nostr events) into its own tables.

    `changes` is pure: given one page of records in store order, the statements to run and
    their rows. They are written in the same transaction as the balances and the position.
    """

    schema: str

    def changes(
        self, records: Sequence[StoredRecord]
    ) -> list[tuple[str, list[tuple[Any, ...]]]]: ...


@frozen
class Batch:
    """One page of the store, classified: Transaction entries and events left out."""

    entries: tuple[tuple[int, Entry], ...]
    ignored: tuple[tuple[int, Ignored], ...]
    last_position: int
    records: tuple[StoredRecord, ...] = ()


@frozen
class CatchUp:
    """What one catch-up applied."""

    records: int
    position: int


def classify(records: Sequence[StoredRecord], content_bytes_max: int = 65_536) -> Batch:
    """Pure: turn stored records into ledger entries (local facts move no balance)."""
    entries: list[tuple[int, Entry]] = []
    ignored: list[tuple[int, Ignored]] = []
    for record in records:
        if not record.is_nostr:
            continue
        try:
            event = parse_event(record.state)
        except InvalidEvent as exc:  # the store verified it; a bad row is our bug, not input
            raise AssertionError(f"store position {record.position}: {exc}") from exc
        result = entry_from_event(event, content_bytes_max)
        if isinstance(result, Entry):
            entries.append((record.position, result))
        else:
            ignored.append((record.position, result))
    last_position = records[-1].position if records else 0
    return Batch(tuple(entries), tuple(ignored), last_position, tuple(records))


class Projector:
    """Keeps one ProjectionDb up to date with one event store."""

    def __init__(
        self,
        store: AsyncEventStore,
        db: ProjectionDb,
        policy: TrustPolicy,
        *,
        page_size: int = 5_000,
        content_bytes_max: int = 65_536,
        extensions: Sequence[FactProjection] = (),
    ) -> None:
        self.store, self.db, self.policy = store, db, policy
        self.extensions = tuple(extensions)
        self.page_size = page_size
        self.content_bytes_max = content_bytes_max
        self.applied = asyncio.Condition()

    async def apply(self, batch: Batch) -> None:
        """Fold one batch over the current accounts of its users and write the result."""
        users = {entry.user for _, entry in batch.entries}
        accounts = await self.db.load_accounts(users)
        folded = fold((entry for _, entry in batch.entries), Ledger(self.policy, accounts))
        position_of = {entry.event_id: position for position, entry in batch.entries}
        ignored = list(batch.ignored)
        ignored += [(position_of[item.event_id], item) for item in folded.ignored]
        ignored.sort(key=lambda pair: pair[0])
        touched = {entry.user for entry in folded.applied}
        await self.db.apply(
            accounts={user: folded.ledger.accounts[user] for user in touched},
            postings=[(position_of[entry.event_id], entry) for entry in folded.applied],
            ignored=ignored,
            position=batch.last_position,
            extra=[
                change
                for extension in self.extensions
                for change in extension.changes(batch.records)
            ],
        )

    async def catch_up(self, progress: Callable[[int], None] | None = None) -> CatchUp:
        """Apply everything after the recorded position; reads the next page while writing."""
        position = await self.db.position()
        total = 0
        page = await self.store.read(position, self.page_size)
        while page:
            next_page = asyncio.ensure_future(self.store.read(page[-1].position, self.page_size))
            try:
                await self.apply(classify(page, self.content_bytes_max))
            except BaseException:
                next_page.cancel()
                raise
            total += len(page)
            position = page[-1].position
            if progress is not None:
                progress(len(page))
            page = await next_page
        async with self.applied:
            self.applied.notify_all()
        return CatchUp(total, position)

    async def run(self, wake: asyncio.Event, idle_s: float = 1.0) -> None:
        """Catch up whenever woken (new events appended), and at least every `idle_s`."""
        while True:
            await self.catch_up()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=idle_s)
            wake.clear()


async def rebuild(
    store: AsyncEventStore,
    path: Path,
    policy: TrustPolicy,
    *,
    progress: Callable[[int], None] | None = None,
    content_bytes_max: int = 65_536,
    extensions: Sequence[FactProjection] = (),
) -> CatchUp:
    """Replay the whole store into a fresh file, then swap it in; the old file stays until then."""
    fresh = path.with_name(path.name + ".rebuild")
    for leftover in (fresh, Path(f"{fresh}-wal"), Path(f"{fresh}-shm")):
        leftover.unlink(missing_ok=True)
    schemas = [extension.schema for extension in extensions]
    db = await ProjectionDb.open(fresh, bulk=True, schemas=schemas)
    try:
        await db.set_fingerprint(policy_fingerprint(policy, schemas))
        projector = Projector(
            store, db, policy, content_bytes_max=content_bytes_max, extensions=extensions
        )
        result = await projector.catch_up(progress)
        await db.finish_bulk()
    finally:
        await db.close()
    for stale in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        stale.unlink(missing_ok=True)
    os.replace(fresh, path)
    return result


async def open_projection(
    store: AsyncEventStore,
    path: Path,
    policy: TrustPolicy,
    content_bytes_max: int = 65_536,
    extensions: Sequence[FactProjection] = (),
) -> ProjectionDb:
    """Open the projection, rebuilding it first if it was folded under another trust policy."""
    schemas = [extension.schema for extension in extensions]
    fingerprint = policy_fingerprint(policy, schemas)
    db = await ProjectionDb.open(path, schemas=schemas)
    recorded = await db.fingerprint()
    if recorded == fingerprint:
        return db
    if recorded is None and await db.position() == 0:
        await db.set_fingerprint(fingerprint)
        return db
    log.warning("trust policy changed since %s was built: rebuilding it from the store", path)
    await db.close()
    await rebuild(store, path, policy, content_bytes_max=content_bytes_max, extensions=extensions)
    return await ProjectionDb.open(path, schemas=schemas)
