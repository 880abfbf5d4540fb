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
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import orjson
from attrs import frozen

from dsproxy.adapters.event_store import NOSTR_TOPIC, AsyncEventStore, StoredRecord
from dsproxy.adapters.projection_db import ProjectionDb, ProjectionMoved, policy_fingerprint
from dsproxy.domain.publication import Replacement
from dsproxy.domain.transactions import entry_from_parts
from projections import Account, Entry, Ignored, Ledger, TrustPolicy, fold

__all__ = [
    "Batch",
    "Broadcast",
    "CatchUp",
    "FactProjection",
    "FoldListener",
    "Projector",
    "classify",
    "open_projection",
    "rebuild",
]

log = logging.getLogger(__name__)

# Larger pages in a rebuild: fewer account rows rewritten per event; memory stays bounded.
REBUILD_PAGE_SIZE = 20_000


class Broadcast:
    """Wakes every waiter at once, and a cancelled waiter leaves nothing behind.

    Take `next()` before checking a condition, then wait on what it returned: a `fire()`
    between the check and the wait has already set it, so no wake-up is lost.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def next(self) -> asyncio.Event:
        return self._event

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


class FactProjection(Protocol):
    """A projection of local facts (or of Nostr events) into its own tables.

    `changes` is pure: given one page of records in store order, the statements to run and
    their rows. They are written in the same transaction as the balances and the position.
    """

    schema: str

    def changes(
        self, records: Sequence[StoredRecord]
    ) -> list[tuple[str, list[tuple[Any, ...]]]]: ...


class FoldListener(Protocol):
    """Told, on the event loop, right after each commit: in-memory views stay exact."""

    def folded(self, balances: Mapping[str, int], position: int) -> None:
        """The projection is at `position`; `balances` are the users whose balance changed."""

    def moved(self) -> None:
        """Another process wrote the projection: balances read before now may be stale."""


@frozen
class Batch:
    """One page of the store, classified: Transaction entries and events left out."""

    entries: tuple[tuple[int, Entry], ...]
    ignored: tuple[tuple[int, Ignored], ...]
    last_position: int
    records: tuple[StoredRecord, ...] = ()
    replacements: tuple[tuple[str, str], ...] = ()  # (new id, the id it replaces) met here


@frozen
class CatchUp:
    """What one catch-up applied."""

    records: int
    position: int


def classify(
    records: Sequence[StoredRecord],
    content_bytes_max: int = 65_536,
    replaced: Mapping[str, str] | None = None,
) -> Batch:
    """Pure: turn stored records into ledger entries (local facts move no balance).

    An event of ours signed again (a `Replacement`, see `replaced`: new id -> old id) is left
    out: the old one is counted, and its posting takes the new id."""
    entries: list[tuple[int, Entry]] = []
    ignored: list[tuple[int, Ignored]] = []
    known = dict(replaced or {})
    found: list[tuple[str, str]] = []
    for record in records:
        if record.topic != NOSTR_TOPIC:
            if isinstance(record.fact, Replacement.Recorded):
                fact: Any = record.fact
                known[fact.replacement_id] = fact.event_id
                found.append((fact.replacement_id, fact.event_id))
            continue
        event = record.event  # parsed already while the store still has it in memory
        if event is not None:
            fields = (event.id, event.pubkey, event.kind, event.tags, event.content)
            created_at = event.created_at
        else:
            obj = orjson.loads(record.state)  # verified before it was stored
            fields = (obj["id"], obj["pubkey"], obj["kind"], obj["tags"], obj["content"])
            created_at = obj["created_at"]
        if (replaces := known.get(fields[0])) is not None:
            reason = f"signed again for {replaces}, which is counted"
            ignored.append((record.position, Ignored(fields[0], reason)))
            continue
        result = entry_from_parts(*fields, created_at, content_bytes_max)
        if isinstance(result, Entry):
            entries.append((record.position, result))
        else:
            ignored.append((record.position, result))
    last_position = records[-1].position if records else 0
    return Batch(tuple(entries), tuple(ignored), last_position, tuple(records), tuple(found))


def _replacement_changes(
    replacements: Sequence[tuple[str, str]],
) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """An event signed again is remembered, and the old one's posting shows the new id (the
    one relays have)."""
    if not replacements:
        return []
    rows = list(replacements)
    return [
        ("INSERT OR IGNORE INTO replaced_events (replacement_id, event_id) VALUES (?, ?)", rows),
        ("UPDATE postings SET event_id = ? WHERE event_id = ?", rows),
    ]


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
        accounts_cached_max: int = 100_000,
    ) -> None:
        self.store, self.db, self.policy = store, db, policy
        self.extensions = tuple(extensions)
        self.page_size = page_size
        self.content_bytes_max = content_bytes_max
        self.applied = Broadcast()  # fired after every catch-up
        self.listeners: list[FoldListener] = []
        self._one_at_a_time = asyncio.Lock()
        # Committed totals of recently folded users, so a batch rarely reads them back.
        self._accounts: OrderedDict[str, Account] = OrderedDict()
        self._accounts_as_of: int | None = None  # the position the cache is true at
        self._accounts_cached_max = accounts_cached_max
        self._replaced: dict[str, str] = {}  # our events signed again: new id -> old id

    async def _load_accounts(self, users: set[str]) -> dict[str, Account]:
        accounts = {user: self._accounts[user] for user in users if user in self._accounts}
        missing = users.difference(accounts)
        if missing:
            accounts.update(await self.db.load_accounts(missing))
        return accounts

    def _remember(self, accounts: dict[str, Account]) -> None:
        for user, account in accounts.items():
            self._accounts[user] = account
            self._accounts.move_to_end(user)
        while len(self._accounts) > self._accounts_cached_max:
            self._accounts.popitem(last=False)

    async def apply(self, batch: Batch, after: int | None = None) -> None:
        """Fold one batch over the current accounts of its users and write the result."""
        accounts = await self._load_accounts({entry.user for _, entry in batch.entries})
        folded = fold((entry for _, entry in batch.entries), Ledger(self.policy, accounts))
        position_of = {entry.event_id: position for position, entry in batch.entries}
        ignored = list(batch.ignored)
        ignored += [(position_of[item.event_id], item) for item in folded.ignored]
        ignored.sort(key=lambda pair: pair[0])
        touched = {entry.user: folded.ledger.accounts[entry.user] for entry in folded.applied}
        try:
            await self.db.apply(
                accounts=touched,
                postings=[(position_of[entry.event_id], entry) for entry in folded.applied],
                ignored=ignored,
                position=batch.last_position,
                extra=[
                    *_replacement_changes(batch.replacements),
                    *(
                        change
                        for extension in self.extensions
                        for change in extension.changes(batch.records)
                    ),
                ],
                after=after,
            )
        except BaseException:
            # the write may not have happened, yet a reader on the same connection may have
            # seen it: forget what it said, and tell the listeners to read again
            self._moved()
            self._accounts_as_of = None
            raise
        self._remember(touched)
        self._replaced.update(batch.replacements)
        self._accounts_as_of = batch.last_position
        balances = {user: account.balance for user, account in touched.items()}
        for listener in self.listeners:
            listener.folded(balances, batch.last_position)

    def _moved(self) -> None:
        self._accounts.clear()
        for listener in self.listeners:
            listener.moved()

    async def catch_up(self, progress: Callable[[int], None] | None = None) -> CatchUp:
        """Apply everything after the recorded position, one caller at a time.

        Stages run one after another on purpose: sqlite3 releases the GIL for every row it
        steps, so reading on one thread while this one folds makes both wait (a GIL convoy).
        """
        async with self._one_at_a_time:
            position = await self.db.position()
            if position != self._accounts_as_of:  # another process wrote: the cache is stale
                self._moved()
                self._replaced = await self.db.replaced_events()
            total = 0
            while page := await self.store.read(position, self.page_size):
                try:
                    batch = classify(page, self.content_bytes_max, self._replaced)
                    await self.apply(batch, after=position)
                except ProjectionMoved:  # another process applied it: go on from there
                    log.warning("projection moved under us; continuing from its position")
                    position = await self.db.position()
                    self._replaced = await self.db.replaced_events()
                    continue
                total += len(page)
                position = page[-1].position
                if progress is not None:
                    progress(len(page))
            self._accounts_as_of = position
            for listener in self.listeners:
                listener.folded({}, position)
        self.applied.fire()
        return CatchUp(total, position)

    async def run(self, wake: asyncio.Event, idle_s: float = 1.0) -> None:
        """Catch up whenever woken (new events appended), and at least every `idle_s`."""
        while True:
            await self.catch_up()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(idle_s):  # not wait_for: see ControllerLoop
                    await wake.wait()
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
        await db.set_fingerprint(policy_fingerprint(policy, schemas, content_bytes_max))
        projector = Projector(
            store,
            db,
            policy,
            page_size=REBUILD_PAGE_SIZE,
            content_bytes_max=content_bytes_max,
            extensions=extensions,
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
    *,
    exclusive: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
) -> ProjectionDb:
    """Open the projection, rebuilding it first if it was folded under another trust policy.

    The rebuild swaps the file: it runs inside `exclusive()` (the data directory's lock), so
    that it never happens under a running node, which would go on writing to the old file."""
    schemas = [extension.schema for extension in extensions]
    fingerprint = policy_fingerprint(policy, schemas, content_bytes_max)
    db = await ProjectionDb.open(path, schemas=schemas)
    recorded = await db.fingerprint()
    if recorded == fingerprint:
        return db
    if recorded is None and await db.position() == 0:
        await db.set_fingerprint(fingerprint)
        return db
    await db.close()
    with exclusive():
        log.warning("trust policy changed since %s was built: rebuilding it from the store", path)
        await rebuild(
            store, path, policy, content_bytes_max=content_bytes_max, extensions=extensions
        )
    return await ProjectionDb.open(path, schemas=schemas)
