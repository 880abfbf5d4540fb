"""The event store: every Nostr event and every local fact, in one order, on eventsourcing.

Nostr events are one-event streams: the originator id is a UUID derived from the Nostr event id,
so the table's unique (originator_id, originator_version) key makes a second append of the same
event a no-op. Local facts are ordinary eventsourcing aggregates saved through the same
application, so both share the notification log (SQLite rowid) that projections follow.

eventsourcing is synchronous; `AsyncEventStore` runs every call on one dedicated thread, which
is also the store's single writer. Writes recorded while an earlier one is being committed are
committed together (group commit): one transaction and one fsync for many chats, each write in a
savepoint of its own so that one write's failure leaves the others whole. Writes keep their order
among themselves, but may be committed before a read or an append submitted ahead of them; each
caller awaits its own call, so none relies on that order.

The store remembers the records it committed last (`RecentRecords`): a projection that follows
close behind the writer reads them from memory, with each Nostr event already parsed, instead of
reading them back from SQLite and parsing them a second time.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import sqlite3
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
from attrs import frozen
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, DomainEventProtocol
from eventsourcing.persistence import (
    JSONTranscoder,
    PersistenceError,
    StoredEvent,
    Transcoding,
)
from eventsourcing.sqlite import SQLiteApplicationRecorder
from eventsourcing.utils import get_topic

from dsproxy.adapters.data_dir_lock import make_data_dir
from dsproxy.errors import DuplicateEvent, StoreError
from dsproxy.wire.event import NostrEvent

__all__ = [
    "NOSTR_TOPIC",
    "AppendOutcome",
    "AsyncEventStore",
    "EventStore",
    "NodeApplication",
    "RecentRecords",
    "StoredRecord",
    "Write",
    "originator_id_for",
]

NOSTR_TOPIC = "dsproxy.nostr:Event"
_SELECT_NEWEST = "SELECT rowid, originator_id FROM {table} WHERE rowid > ? ORDER BY rowid"
_SELECT_TOPIC = (
    "SELECT topic, state, originator_id, originator_version FROM {table} WHERE topic = ? "
    "ORDER BY rowid"
)
EVENTS_PER_INSERT_MAX = 1_000  # 4,000 parameters: well within SQLite's 32,766
_SELECT_AFTER = (
    "SELECT rowid, topic, state, originator_id, originator_version FROM {table} "
    "WHERE rowid > ? ORDER BY rowid LIMIT ?"
)
_SELECT_STORED = "SELECT 1 FROM {table} WHERE originator_id = ? AND originator_version = 1"
WRITES_PER_COMMIT_MAX = 256
RECENT_RECORDS_MAX = 8_192
RECENT_BYTES_MAX = 16 * 1_048_576


@functools.lru_cache(maxsize=64)
def _insert_ignore_rows(table: str, rows: int) -> str:
    return f"INSERT OR IGNORE INTO {table} VALUES " + ",".join(["(?,?,?,?)"] * rows)


def originator_id_for(event_id: str) -> uuid.UUID:
    """The stream id of a Nostr event: the first 128 bits of its id (itself a sha256).

    Stable, so a duplicate collides with the first append; forging another event with the same
    prefix would take a 128-bit second preimage.
    """
    return uuid.UUID(event_id[:32])


@frozen
class StoredRecord:
    """One entry of the notification log: its position, topic and stored state.

    For a local fact, `fact` is the decoded domain event; for a Nostr event it is None and
    `state` is the event's JSON.
    """

    position: int
    topic: str
    state: bytes
    fact: DomainEventProtocol[uuid.UUID] | None = None
    event: NostrEvent | None = None  # the parsed event, when the store still has it in memory

    @property
    def is_nostr(self) -> bool:
        return self.topic == NOSTR_TOPIC


@frozen
class AppendOutcome:
    """Which events were appended (with their positions) and which were already stored."""

    appended: tuple[tuple[int, str], ...]
    duplicates: tuple[str, ...]


@frozen
class Write:
    """Nostr events and the pending facts of aggregates, to be recorded all or none."""

    events: tuple[NostrEvent, ...]
    aggregates: tuple[Aggregate, ...]
    new_only: bool = False


class BytesAsBase64(Transcoding):
    """Facts may carry raw bytes (a signed transaction); JSON carries them as base64."""

    type = bytes
    name = "bytes_b64"

    def encode(self, obj: bytes) -> str:
        return base64.b64encode(obj).decode()

    def decode(self, data: str) -> bytes:
        return base64.b64decode(data)


class NodeApplication(Application[uuid.UUID]):
    """The eventsourcing application whose recorder holds this node's store."""

    name = "dsproxy"

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(BytesAsBase64())


class RecentRecords:
    """The records this store committed last, by position, within a count and a size.

    Only what this store committed is here, so a position it did not write (another process
    wrote it, or it is not written yet) is a miss and the caller reads SQLite: a run served
    from memory ends at the first position missing, never skipping one.
    """

    def __init__(self, records_max: int = RECENT_RECORDS_MAX, bytes_max: int = RECENT_BYTES_MAX):
        self._records_max, self._bytes_max = records_max, bytes_max
        self._by_position: OrderedDict[int, tuple[StoredRecord | StoredEvent, int]] = OrderedDict()
        self._bytes = 0  # the sum of the sizes kept beside the records

    def add(self, position: int, record: StoredRecord | StoredEvent) -> None:
        """Remember a committed record (a fact stays encoded until it is read)."""
        # a parsed event holds its text twice more (fields, tags), with the objects around it
        parsed = isinstance(record, StoredRecord) and record.event is not None
        size = len(record.state) * (3 if parsed else 1)
        if (replaced := self._by_position.pop(position, None)) is not None:
            self._bytes -= replaced[1]
        self._by_position[position] = (record, size)
        self._bytes += size
        while self._by_position and (
            len(self._by_position) > self._records_max or self._bytes > self._bytes_max
        ):
            _, (_, oldest_size) = self._by_position.popitem(last=False)
            self._bytes -= oldest_size

    def run_after(self, after: int, limit: int) -> list[tuple[int, StoredRecord | StoredEvent]]:
        """The remembered records at after+1, after+2, ..., up to `limit` or the first gap."""
        run = []
        position = after + 1
        while len(run) < limit and (kept := self._by_position.get(position)) is not None:
            run.append((position, kept[0]))
            position += 1
        return run

    def clear(self) -> None:
        self._by_position.clear()
        self._bytes = 0


class EventStore:
    """Synchronous store; call it from one thread (see AsyncEventStore)."""

    def __init__(self, path: Path, lock_timeout_s: int = 30) -> None:
        make_data_dir(path.parent)
        try:
            self.application = NodeApplication(
                env={
                    "PERSISTENCE_MODULE": "eventsourcing.sqlite",
                    "SQLITE_DBNAME": str(path),
                    "SQLITE_LOCK_TIMEOUT": str(lock_timeout_s),
                }
            )
        except (sqlite3.Error, PersistenceError, OSError) as exc:  # not a database, read-only
            raise StoreError(f"cannot open the event store {str(path)!r}: {exc}") from exc
        recorder = self.application.recorder
        assert isinstance(recorder, SQLiteApplicationRecorder), type(recorder)
        self._recorder = recorder
        table = recorder.events_table_name
        self._table = table
        self._select_newest = _SELECT_NEWEST.format(table=table)
        self._select_topic = _SELECT_TOPIC.format(table=table)
        self._select_after = _SELECT_AFTER.format(table=table)
        self._select_stored = _SELECT_STORED.format(table=table)
        self.recent = RecentRecords()

    def append_nostr(self, events: Sequence[NostrEvent]) -> AppendOutcome:
        """Append verified events in one transaction; an event already stored is a no-op."""
        return self.record(events)

    def record(
        self, events: Sequence[NostrEvent], *aggregates: Aggregate, new_only: bool = False
    ) -> AppendOutcome:
        """Append Nostr events and the pending facts of aggregates in one transaction.

        Both or neither: a handler that signs an event and records why (a payment credited, a
        hold settled) can never keep one without the other. A fact that conflicts with one
        already stored (the same aggregate version: a concurrent change) aborts the whole write
        (StoreError), and so does, with `new_only`, an event already stored (DuplicateEvent).
        The facts take the earlier positions.
        """
        (outcome,) = self.record_all([Write(tuple(events), aggregates, new_only)])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def record_all(self, writes: Sequence[Write]) -> list[AppendOutcome | StoreError]:
        """Several writes in one transaction, in order, each all or none on its own."""
        outcomes: list[AppendOutcome | StoreError | None] = [None] * len(writes)
        prepared: list[tuple[int, Write, list[StoredEvent]]] = []
        for index, write in enumerate(writes):
            try:
                facts = [
                    self.application.mapper.to_stored_event(fact)
                    for aggregate in write.aggregates
                    for fact in aggregate.collect_events()
                ]
            except Exception as exc:  # a fact that cannot be encoded fails its own write only
                outcomes[index] = _write_error(write, exc)
            else:
                prepared.append((index, write, facts))
        written: list[tuple[int, StoredRecord | StoredEvent]] = []
        try:
            with self._recorder.datastore.transaction(commit=True) as cursor:
                for index, write, facts in prepared:
                    cursor.execute("SAVEPOINT write")
                    rows: list[tuple[int, StoredRecord | StoredEvent]] = []
                    try:
                        outcomes[index] = self._write(cursor, write, facts, rows)
                    except DuplicateEvent as exc:
                        cursor.execute("ROLLBACK TO write")
                        outcomes[index] = exc
                    except sqlite3.IntegrityError as exc:  # a fact of a concurrent change
                        cursor.execute("ROLLBACK TO write")
                        outcomes[index] = self._conflict(cursor, write, exc, len(facts))
                    else:
                        written += rows
                    cursor.execute("RELEASE write")
        except PersistenceError as exc:  # the commit itself failed: none of them is recorded
            for index, write, facts in prepared:
                outcomes[index] = _write_error(write, exc, len(facts))
        else:
            for position, record in written:
                self.recent.add(position, record)
        return [outcome for outcome in outcomes if outcome is not None]

    def _write(
        self,
        cursor: Any,
        write: Write,
        facts: list[StoredEvent],
        rows: list[tuple[int, StoredRecord | StoredEvent]],
    ) -> AppendOutcome:
        """Insert one write's facts and events; `rows` gets what was inserted, by position."""
        appended: list[tuple[int, str]] = []
        duplicates: list[str] = []
        if facts:
            # first, so a projection paging through the log meets the facts that explain an
            # event (a debit's DebitIssued) no later than the event; the recorder's own insert,
            # inside our transaction (as its process recorder does with tracking records)
            positions = self._recorder._insert_events(cursor, facts) or ()
            rows += zip(positions, facts, strict=True)
        for start in range(0, len(write.events), EVENTS_PER_INSERT_MAX):
            events = write.events[start : start + EVENTS_PER_INSERT_MAX]
            states = [orjson.dumps(event.to_obj()) for event in events]
            # event.id[:32] is originator_id_for(event.id).hex, without the object
            params = [
                value
                for event, state in zip(events, states, strict=True)
                for value in (event.id[:32], 1, NOSTR_TOPIC, state)
            ]
            # one statement for many rows: sqlite3 lets the GIL go once for it, not once a row
            # (busy verifier threads made each row wait for it: 10 us an event became 27)
            cursor.execute(_insert_ignore_rows(self._table, len(events)), params)
            inserted = cursor.sqlite_cursor.rowcount
            if inserted == len(events):  # one statement's new rows have consecutive rowids
                first = int(cursor.lastrowid) - inserted + 1
                positions: list[int | None] = list(range(first, first + inserted))
            else:
                positions = self._positions_inserted(cursor, events, inserted)
            for event, state, position in zip(events, states, positions, strict=True):
                if position is not None:
                    appended.append((position, event.id))
                    record = StoredRecord(position, NOSTR_TOPIC, state, event=event)
                    rows.append((position, record))
                elif write.new_only:
                    raise DuplicateEvent(f"event {event.id} is already stored")
                else:
                    duplicates.append(event.id)
        return AppendOutcome(tuple(appended), tuple(duplicates))

    def _positions_inserted(
        self, cursor: Any, events: Sequence[NostrEvent], inserted: int
    ) -> list[int | None]:
        """Where each event went (None: it was stored already, or earlier in `events`)."""
        by_originator: dict[str, int] = {}
        if inserted:
            cursor.execute(self._select_newest, (int(cursor.lastrowid) - inserted,))
            rows = cursor.fetchall()
            by_originator = {originator: int(position) for position, originator in rows}
        return [by_originator.pop(event.id[:32], None) for event in events]

    def _conflict(
        self, cursor: Any, write: Write, cause: sqlite3.IntegrityError, facts: int
    ) -> StoreError:
        """A fact collided. With `new_only`, a fact whose id derives from its event's (a debit's
        DebitIssued) collides before the event does: if an event is stored already, that is
        the DuplicateEvent the caller asked to hear about, not a failure."""
        if write.new_only:
            for event in write.events:
                cursor.execute(self._select_stored, (event.id[:32],))
                if cursor.fetchone() is not None:
                    return DuplicateEvent(f"event {event.id} is already stored")
        return _write_error(write, cause, facts)

    def save(self, *aggregates: Aggregate) -> list[int]:
        """Save local facts (aggregate events); returns their positions in the log."""
        try:
            recordings = self.application.save(*aggregates)
        except PersistenceError as exc:
            raise StoreError(f"could not save facts: {exc}") from exc
        for recording in recordings:  # a Notification is the StoredEvent with its position
            self.recent.add(recording.notification.id, recording.notification)
        return [recording.notification.id for recording in recordings]

    def read(self, after: int, limit: int) -> list[StoredRecord]:
        """Up to `limit` records after position `after`, in store order, facts decoded: what
        this store still remembers from memory, the rest from SQLite."""
        decode = self.application.mapper.to_domain_event
        records = [
            record
            if isinstance(record, StoredRecord)
            else StoredRecord(position, record.topic, record.state, decode(record))
            for position, record in self.recent.run_after(after, limit)
        ]
        if len(records) < limit:
            records += self._select(
                records[-1].position if records else after, limit - len(records)
            )
        return records

    def _select(self, after: int, limit: int) -> list[StoredRecord]:
        try:
            with self._recorder.datastore.transaction(commit=False) as cursor:
                cursor.sqlite_cursor.row_factory = None  # plain tuples: 3x cheaper than Row
                cursor.execute(self._select_after, (after, limit))
                rows = cursor.fetchall()
        except PersistenceError as exc:
            raise StoreError(f"could not read the store after {after}: {exc}") from exc
        return [
            StoredRecord(row[0], row[1], row[2])
            if row[1] == NOSTR_TOPIC
            else StoredRecord(row[0], row[1], row[2], self._decode(*row[1:]))
            for row in rows
        ]

    def _decode(
        self, topic: str, state: bytes, originator_id: str, version: int
    ) -> DomainEventProtocol[uuid.UUID]:
        stored = StoredEvent(uuid.UUID(originator_id), version, topic, state)
        return self.application.mapper.to_domain_event(stored)

    def facts_of(self, kind: type) -> list[DomainEventProtocol[uuid.UUID]]:
        """Every stored fact of one kind, in store order (the table has no index on topics:
        for the rare kinds)."""
        with self._recorder.datastore.transaction(commit=False) as cursor:
            cursor.sqlite_cursor.row_factory = None
            cursor.execute(self._select_topic, (get_topic(kind),))
            rows = cursor.fetchall()
        return [self._decode(*row) for row in rows]

    def scan(self, after: int = 0, page_size: int = 10_000) -> Iterator[StoredRecord]:
        """Every record after `after`, page by page, so memory stays flat."""
        while page := self.read(after, page_size):
            yield from page
            after = page[-1].position

    def max_position(self) -> int:
        return self._recorder.max_notification_id() or 0

    def count_nostr(self) -> int:
        with self._recorder.datastore.transaction(commit=False) as cursor:
            cursor.execute(
                f"SELECT COUNT(*) FROM {self._recorder.events_table_name} WHERE topic = ?",
                (NOSTR_TOPIC,),
            )
            return int(cursor.fetchone()[0])

    def stored_ids(self, event_ids: Sequence[Any]) -> set[str]:
        """Which of these event ids the store has (anything that is not an id has none)."""
        wanted = {i[:32]: i for i in event_ids if isinstance(i, str) and len(i) == 64}
        found: set[str] = set()
        keys = list(wanted)
        with self._recorder.datastore.transaction(commit=False) as cursor:
            cursor.sqlite_cursor.row_factory = None
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                cursor.execute(
                    f"SELECT originator_id FROM {self._table} WHERE originator_version = 1 "
                    f"AND originator_id IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
                found.update(wanted[str(row[0])] for row in cursor.fetchall())
        return found

    def contains(self, event_id: str) -> bool:
        return event_id in self.stored_ids([event_id])

    def close(self) -> None:
        self.application.close()


def _write_error(write: Write, cause: Exception, facts: int | None = None) -> StoreError:
    facts_text = "its facts" if facts is None else f"{facts} facts"
    error = StoreError(f"could not record {len(write.events)} events and {facts_text}: {cause}")
    error.__cause__ = cause
    return error


def _settle_futures(
    settled: Sequence[tuple[asyncio.Future[AppendOutcome], AppendOutcome | Exception]],
) -> None:
    for done, outcome in settled:
        if done.cancelled():  # the caller stopped waiting; the write is recorded all the same
            continue
        if isinstance(outcome, Exception):
            done.set_exception(outcome)
        else:
            done.set_result(outcome)


class AsyncEventStore:
    """The store for asyncio code: every call runs on one dedicated thread, the single writer."""

    def __init__(self, store: EventStore) -> None:
        self.sync = store
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="event-store")
        self._writes: deque[tuple[Write, asyncio.Future[AppendOutcome]]] = deque()
        self._commit_scheduled = False  # a `_commit_queued` is submitted and has not started

    @classmethod
    def open(cls, path: Path, lock_timeout_s: int = 30) -> AsyncEventStore:
        return cls(EventStore(path, lock_timeout_s))

    async def _run(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    async def append_nostr(self, events: Sequence[NostrEvent]) -> AppendOutcome:
        result: AppendOutcome = await self._run(self.sync.append_nostr, events)
        return result

    async def record(
        self, events: Sequence[NostrEvent], *aggregates: Aggregate, new_only: bool = False
    ) -> AppendOutcome:
        """As `EventStore.record`, committed (fsynced) with the writes queued beside it."""
        done: asyncio.Future[AppendOutcome] = asyncio.get_running_loop().create_future()
        self._writes.append((Write(tuple(events), aggregates, new_only), done))
        if not self._commit_scheduled:  # one already submitted will take this write too
            self._commit_scheduled = True
            self._thread.submit(self._commit_queued)
        return await done

    def _commit_queued(self) -> None:
        """On the store thread: commit the writes queued so far, one batch per call (reads
        submitted meanwhile go between batches), and wake their callers once per loop.

        The flag is cleared before the queue is read: a write queued after that either is in
        this batch or finds the flag down and submits another call."""
        self._commit_scheduled = False
        batch = []
        while self._writes and len(batch) < WRITES_PER_COMMIT_MAX:
            batch.append(self._writes.popleft())
        if self._writes and not self._commit_scheduled:  # more than a batch was queued
            self._commit_scheduled = True
            self._thread.submit(self._commit_queued)
        if not batch:
            return
        outcomes: list[AppendOutcome | StoreError]
        try:
            outcomes = self.sync.record_all([write for write, _ in batch])
        except Exception as exc:  # a bug, not a refusal: every waiting caller must hear of it
            outcomes = [_write_error(write, exc) for write, _ in batch]
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for (_, done), outcome in zip(batch, outcomes, strict=True):
            by_loop.setdefault(done.get_loop(), []).append((done, outcome))
        for loop, settled in by_loop.items():
            loop.call_soon_threadsafe(_settle_futures, settled)

    async def aggregate(self, aggregate_id: uuid.UUID) -> Aggregate:
        """Load an aggregate (a local fact's lifecycle) by its id."""
        result: Aggregate = await self._run(self.sync.application.repository.get, aggregate_id)
        return result

    async def save(self, *aggregates: Aggregate) -> list[int]:
        result: list[int] = await self._run(lambda: self.sync.save(*aggregates))
        return result

    async def read(self, after: int, limit: int) -> list[StoredRecord]:
        result: list[StoredRecord] = await self._run(self.sync.read, after, limit)
        return result

    async def contains(self, event_id: str) -> bool:
        result: bool = await self._run(self.sync.contains, event_id)
        return result

    async def stored_ids(self, event_ids: Sequence[Any]) -> set[str]:
        result: set[str] = await self._run(self.sync.stored_ids, event_ids)
        return result

    async def max_position(self) -> int:
        result: int = await self._run(self.sync.max_position)
        return result

    async def close(self) -> None:
        await self._run(self._commit_all)
        await self._run(self.sync.close)
        self._thread.shutdown(wait=True)

    def _commit_all(self) -> None:
        """Every write queued before the close (a batch resubmits the next one behind it)."""
        while self._writes:
            self._commit_queued()
