"""Ingest: relay -> door (verify, address, size, JSON) -> event store, resuming from a checkpoint.

One session task per relay connects, subscribes to live events, then reads history from its
checkpoint minus `history_overlap_s` (relays accept skewed `created_at`; many events share a
second) and reports `CaughtUp`. A lost connection ends the session; the next one, after a
backoff, starts again from the checkpoint. Sessions feed one bounded queue; one worker verifies
a batch, appends it (the store drops duplicates by id), wakes the projector and only then moves
the checkpoint. The checkpoint of a relay (the newest `created_at` stored from it, never ahead of
the clock) moves only once its session has caught up, because history arrives newest first: a
crash half-way through history must re-read all of it. So no event is skipped, and none is
applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiosqlite
import orjson
from attrs import define, field, frozen

from dsproxy.adapters.event_store import AsyncEventStore
from dsproxy.adapters.relay import (
    RelayConnection,
    RelayUnavailable,
    fetch_history,
    history_passes,
    session_filter,
)
from dsproxy.adapters.sqlite_file import open_sqlite
from dsproxy.domain.publication import Outcome, Publication, retry_delay_ms
from dsproxy.errors import InvalidEvent, StoreError
from dsproxy.wire.envelope import Address
from dsproxy.wire.event import NostrEvent, verify_event

__all__ = [
    "CaughtUp",
    "CheckpointDb",
    "FetchReport",
    "Incoming",
    "Ingest",
    "IngestLimits",
    "IngestStats",
    "Refusal",
    "SessionStarted",
    "admit",
    "fetch_into_store",
]

log = logging.getLogger(__name__)


@frozen
class Refusal:
    """Why an event was refused at the door; `kind` is the counter it goes to."""

    kind: str
    reason: str


def admit(
    obj: dict[str, Any] | str | bytes, address: Address, content_bytes_max: int
) -> NostrEvent | Refusal:
    """Pure door: a fully verified event of our session, or why not."""
    try:
        event = verify_event(obj)
    except InvalidEvent as exc:
        return Refusal("invalid_event", str(exc))
    if not address.matches(event):
        return Refusal(
            "off_session",
            f"event {event.id} is not kind 1573 for this session and machine: "
            f"kind {event.kind}, s={_shown(event.tag('s'))}, p={_shown(event.tag('p'))}",
        )
    size = len(event.content.encode())
    if size > content_bytes_max:
        return Refusal(
            "oversized", f"event {event.id}: content is {size} bytes, over {content_bytes_max}"
        )
    try:
        orjson.loads(event.content)
    except orjson.JSONDecodeError:
        return Refusal("invalid_json", f"event {event.id}: content is not JSON")
    return event


def _shown(value: str | None, chars_max: int = 80) -> str:
    """A tag value as a log line shows it: whoever wrote the event chose its length."""
    if value is None or len(value) <= chars_max:
        return repr(value)
    return repr(value[:chars_max]) + f"... ({len(value)} characters)"


def _admit_all(
    objs: Sequence[dict[str, Any]], address: Address, content_bytes_max: int
) -> list[NostrEvent | Refusal]:
    return [admit(obj, address, content_bytes_max) for obj in objs]


VERIFIER_THREADS_MAX = 4
VERIFY_SLICE_MIN = 64  # below this many events a slice is not worth a thread hop of its own
REFUSALS_REMEMBERED = 100_000
"""Refusals logged once each (remembered by a 16-byte digest of the reason): every new session
reads the same junk again (it is not stored, so the checkpoint stays before it), and anyone may
publish junk with our tags."""
STABLE_SESSION_S = 60.0
"""A session that lasted this long resets the reconnect backoff; a relay that drops us right
after each catch-up is retried ever more slowly."""


@frozen
class Incoming:
    """Events (unverified objects) as one relay sent them: a live event or a history chunk."""

    relay: str
    objs: tuple[dict[str, Any], ...]


@frozen
class SessionStarted:
    relay: str


@frozen
class CaughtUp:
    relay: str


QueueItem = Incoming | SessionStarted | CaughtUp


def _events_in(item: QueueItem) -> int:
    return len(item.objs) if isinstance(item, Incoming) else 0


@frozen
class IngestLimits:
    """Every bound of the ingest, in one place (see Settings for the defaults)."""

    queue_len_max: int = 10_000
    batch_events_max: int = 2_000
    events_per_page_max: int = 5_000
    content_bytes_max: int = 65_536
    history_overlap_s: int = 300
    history_reread_s: float = 300.0
    relay_timeout_s: float = 10.0
    retry_ms_min: int = 200
    retry_ms_max: int = 30_000


@define
class IngestStats:
    """Counters since start, for logs, tests and `dsproxy node` output."""

    received: int = 0
    appended: int = 0
    duplicates: int = 0
    refused: Counter[str] = field(factory=Counter)
    sessions: int = 0
    overflowed_pages: int = 0
    rereads: int = 0  # history read again while connected


class CheckpointDb:
    """The newest `created_at` stored from each relay, in a small SQLite file."""

    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._db = connection

    @classmethod
    async def open(cls, path: Path) -> CheckpointDb:
        schema = (
            "CREATE TABLE IF NOT EXISTS checkpoints "
            "(relay TEXT PRIMARY KEY, created_at INTEGER NOT NULL) WITHOUT ROWID;"
            "CREATE TABLE IF NOT EXISTS asked (key TEXT PRIMARY KEY, authors TEXT) WITHOUT ROWID"
        )
        return cls(await open_sqlite(path, [schema], what="checkpoints"))

    async def hold_for(self, authors: Sequence[str] | None) -> bool:
        """Keep the checkpoints only if they were reached asking relays for every event of
        `authors` (None: anyone's); otherwise forget them, so that history is read again from
        the start (a key trusted now had events never asked for). True if forgotten."""
        async with self._db.execute("SELECT authors FROM asked WHERE key = 'history'") as rows:
            row = await rows.fetchone()
        asked = None if row is None or row[0] is None else set(orjson.loads(row[0]))
        wanted = None if authors is None else sorted(set(authors))
        covered = row is None or asked is None or (wanted is not None and set(wanted) <= asked)
        # before this was recorded every node asked for everyone's events (row is None)
        if not covered:
            await self._db.execute("DELETE FROM checkpoints")
        await self._db.execute(
            "INSERT OR REPLACE INTO asked (key, authors) VALUES ('history', ?)",
            (None if wanted is None else orjson.dumps(wanted).decode(),),
        )
        return not covered

    async def get(self, relay: str) -> int | None:
        async with self._db.execute(
            "SELECT created_at FROM checkpoints WHERE relay = ?", (relay,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else int(row[0])

    async def all(self) -> dict[str, int]:
        async with self._db.execute("SELECT relay, created_at FROM checkpoints") as cursor:
            return {str(relay): int(at) async for relay, at in cursor}

    async def put(self, relay: str, created_at: int) -> None:
        """Move forward only: a checkpoint never goes back."""
        try:
            await self._db.execute(
                "INSERT INTO checkpoints (relay, created_at) VALUES (?, ?) ON CONFLICT (relay) "
                "DO UPDATE SET created_at = max(created_at, excluded.created_at)",
                (relay, created_at),
            )
        except aiosqlite.Error as exc:
            raise StoreError(f"could not save the checkpoint of {relay}: {exc}") from exc

    async def close(self) -> None:
        await self._db.close()


@define
class _RelayState:
    caught_up: bool = False
    newest: int = 0
    dirty: bool = False


class Ingest:
    """Relay sessions feeding one worker that verifies, stores and checkpoints."""

    def __init__(
        self,
        store: AsyncEventStore,
        checkpoints: CheckpointDb,
        address: Address,
        *,
        limits: IngestLimits = IngestLimits(),
        on_appended: Callable[[], None] = lambda: None,
        own_pubkey: str | None = None,
        trusted: Sequence[str] = (),
        untrusted_too: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`trusted`: the keys whose events this node folds (with its own); `untrusted_too`:
        it also needs events by anyone else (a controller, for users' Requests)."""
        self.store, self.checkpoints, self.address = store, checkpoints, address
        self.limits = limits
        trusted = tuple(trusted) + ((own_pubkey,) if own_pubkey and trusted else ())
        self._history_passes = history_passes(trusted, untrusted_too)
        # whose events relays are asked for, live and in history (None: anyone's)
        self.authors_asked = None if untrusted_too else self._history_passes[0].authors
        self.on_appended = on_appended
        self.own_pubkey = own_pubkey
        self.clock = clock
        self.stats = IngestStats()
        self.queue: asyncio.Queue[QueueItem] = asyncio.Queue()
        # the bound is on events (an entry is one live event or a history chunk), so readers
        # wait in `_enqueue` while `queue_len_max` events wait to be stored
        self.queued_events = 0
        self._room = asyncio.Condition()
        self._relays: dict[str, _RelayState] = {}
        self._refusals_logged: OrderedDict[bytes, None] = OrderedDict()
        self.connected: set[str] = set()  # relays with a session open now
        self._verifiers = max(1, min(VERIFIER_THREADS_MAX, os.cpu_count() or 1))
        self._verifier = ThreadPoolExecutor(self._verifiers, thread_name_prefix="ingest-verify")

    async def _on_live(self, relay: str, obj: dict[str, Any]) -> None:
        await self._enqueue(Incoming(relay, (obj,)))

    async def run_session(self, url: str) -> None:
        """Keep one relay connected forever: connect, subscribe, read history, wait, repeat."""
        attempt = 0
        while True:
            connection = RelayConnection(
                url, timeout_s=self.limits.relay_timeout_s, on_live=self._on_live
            )
            opened_s: float | None = None
            try:
                await connection.open()
                opened_s = time.monotonic()
                self.connected.add(url)
                self.stats.sessions += 1
                await self._enqueue(SessionStarted(url))
                # Live first, then history: nothing can fall between the two.
                await connection.subscribe_live(
                    session_filter(self.address, limit=1, authors=self.authors_asked)
                )
                await self._read_history(connection, url)
                # The live subscription can go quiet with the socket up (a relay that drops it
                # with only a NOTICE, or forgets it): history is read again now and then.
                while (reason := await connection.wait_lost(self.limits.history_reread_s)) is None:
                    await self._read_history(connection, url, again=True)
                    self.stats.rereads += 1
                log.warning("%s: connection lost (%s); reconnecting", url, reason)
            except RelayUnavailable as exc:
                log.warning("%s: %s", url, exc)
            finally:
                self.connected.discard(url)
                await connection.close()
                if opened_s is not None and time.monotonic() - opened_s >= STABLE_SESSION_S:
                    attempt = 0  # a relay that drops us after each catch-up waits ever longer
            delay_ms = retry_delay_ms(
                attempt, self.limits.retry_ms_min, self.limits.retry_ms_max, random.uniform(0.5, 1)
            )
            attempt += 1
            await asyncio.sleep(delay_ms / 1000)

    async def _read_history(
        self, connection: RelayConnection, url: str, *, again: bool = False
    ) -> None:
        """Every event from the relay's checkpoint minus the overlap on, then CaughtUp; `again`
        (a re-read, which meets mostly what live delivery stored): what the store has already
        is left out before it costs a signature check."""
        checkpoint = await self.checkpoints.get(url)
        since = 0 if checkpoint is None else max(0, checkpoint - self.limits.history_overlap_s)
        for fetch in self._history_passes:
            history = fetch_history(
                connection,
                self.address,
                since,
                self.limits.events_per_page_max,
                fetch.authors,
                fetch.skipped,
            )
            async with contextlib.aclosing(history):
                async for page in history:
                    self.stats.overflowed_pages += page.overflowed
                    events = page.events
                    if again and events:
                        stored = await self.store.stored_ids([obj.get("id") for obj in events])
                        events = tuple(obj for obj in events if obj.get("id") not in stored)
                    if events:
                        await self._enqueue(Incoming(url, events))
        await self._enqueue(CaughtUp(url))
        log.info("%s: caught up from %s", url, since)

    async def run(self) -> None:
        """The worker: take what is queued (up to a batch) and verify it while the batch before
        is stored. Batches are stored, and checkpoints moved, one at a time in arrival order."""
        storing: asyncio.Task[None] | None = None  # started, not yet awaited
        try:
            while True:
                if storing is not None and self.queue.empty():
                    pending, storing = storing, None
                    await pending  # nothing to overlap with: a failure surfaces now
                batch = [await self.queue.get()]
                events = _events_in(batch[0])
                while events < self.limits.batch_events_max and not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    events += _events_in(batch[-1])
                try:
                    verdicts = await self.verify(batch)
                    if storing is not None:
                        pending, storing = storing, None
                        await pending
                except BaseException:
                    await self._release(batch, events)
                    raise
                storing = asyncio.create_task(self._store_then_release(batch, verdicts, events))
        except asyncio.CancelledError:
            if storing is not None:
                storing.cancel()  # stopping: what it stored is fetched again next time
            raise
        finally:
            if storing is not None:  # leaving on an error of its own: let the store end
                try:
                    await storing
                except asyncio.CancelledError:
                    pass
                except Exception:
                    log.exception("storing a batch failed as the ingest worker stopped")

    async def _store_then_release(
        self, batch: Sequence[QueueItem], verdicts: Sequence[NostrEvent | Refusal], events: int
    ) -> None:
        try:
            await self.store_verified(batch, verdicts)
        finally:
            await self._release(batch, events)

    async def _release(self, batch: Sequence[QueueItem], events: int) -> None:
        """Give the batch's room back, once, even if the caller is being cancelled."""

        async def release() -> None:
            async with self._room:
                self.queued_events -= events
                self._room.notify_all()
            for _ in batch:
                self.queue.task_done()

        await asyncio.shield(release())

    async def _enqueue(self, item: QueueItem) -> None:
        """Queue an item, first waiting for room (an item larger than the bound goes alone)."""
        size = _events_in(item)
        if size:
            async with self._room:
                await self._room.wait_for(
                    lambda: (
                        not self.queued_events
                        or self.queued_events + size <= self.limits.queue_len_max
                    )
                )
                self.queued_events += size
        self.queue.put_nowait(item)

    async def process(self, batch: Sequence[QueueItem]) -> None:
        """Verify, append, wake the projector, then move checkpoints (in that order)."""
        await self.store_verified(batch, await self.verify(batch))

    async def verify(self, batch: Sequence[QueueItem]) -> list[NostrEvent | Refusal]:
        """The door's verdict on every event of the batch, in order."""
        incoming = [item for item in batch if isinstance(item, Incoming)]
        verdicts = await self._admit_in_parallel([obj for item in incoming for obj in item.objs])
        self.stats.received += len(verdicts)
        return verdicts

    async def store_verified(
        self, batch: Sequence[QueueItem], verdicts: Sequence[NostrEvent | Refusal]
    ) -> None:
        """Append what the door admitted, wake the projector, then move checkpoints."""
        incoming = [item for item in batch if isinstance(item, Incoming)]
        admitted: list[NostrEvent] = []
        source: dict[str, str] = {}
        relays = (item.relay for item in incoming for _ in item.objs)
        for relay, verdict in zip(relays, verdicts, strict=True):
            if isinstance(verdict, Refusal):
                self.stats.refused[verdict.kind] += 1
                digest = hashlib.blake2b(verdict.reason.encode(), digest_size=16).digest()
                if digest not in self._refusals_logged:
                    log.warning("refused an event from %s: %s", relay, verdict.reason)
                self._refusals_logged[digest] = None
                self._refusals_logged.move_to_end(digest)
                if len(self._refusals_logged) > REFUSALS_REMEMBERED:
                    self._refusals_logged.popitem(last=False)
            else:
                admitted.append(verdict)
                source.setdefault(verdict.id, relay)
        if admitted:
            outcome = await self.store.append_nostr(admitted)
            self.stats.appended += len(outcome.appended)
            self.stats.duplicates += len(outcome.duplicates)
            await self._acknowledge_own(
                admitted, {event_id for _, event_id in outcome.appended}, source
            )
            if outcome.appended:
                self.on_appended()
        await self._advance(batch, verdicts)

    async def _admit_in_parallel(
        self, objs: Sequence[dict[str, Any]]
    ) -> list[NostrEvent | Refusal]:
        """libsecp256k1 releases the GIL while it checks a signature (most of a verify), so
        slices of a batch are verified on several cores at once."""
        loop = asyncio.get_running_loop()
        step = max(VERIFY_SLICE_MIN, -(-len(objs) // self._verifiers))
        parts = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self._verifier,
                    _admit_all,
                    objs[start : start + step],
                    self.address,
                    self.limits.content_bytes_max,
                )
                for start in range(0, len(objs), step)
            )
        )
        return [verdict for part in parts for verdict in part]

    async def _acknowledge_own(
        self, admitted: Sequence[NostrEvent], appended: set[str], source: dict[str, str]
    ) -> None:
        facts = published_own(admitted, appended, self.own_pubkey, source.__getitem__)
        if facts:
            await self.store.save(*facts)

    async def _advance(
        self, batch: Sequence[QueueItem], verdicts: Sequence[NostrEvent | Refusal]
    ) -> None:
        verdict_of = iter(verdicts)
        for item in batch:
            if isinstance(item, SessionStarted):
                self._relays[item.relay] = _RelayState()
                continue
            state = self._relays.setdefault(item.relay, _RelayState())
            if isinstance(item, CaughtUp):
                state.caught_up = state.dirty = True
                continue
            for verdict in itertools.islice(verdict_of, len(item.objs)):
                if isinstance(verdict, NostrEvent) and verdict.created_at > state.newest:
                    state.newest, state.dirty = verdict.created_at, True
        now = int(self.clock())
        for relay, state in self._relays.items():
            if state.caught_up and state.dirty and state.newest:
                await self.checkpoints.put(relay, min(state.newest, now))
                state.dirty = False

    async def drain(self) -> None:
        """Wait until everything queued so far is stored."""
        await self.queue.join()

    def close(self) -> None:
        self._verifier.shutdown(wait=True)


def published_own(
    events: Sequence[NostrEvent],
    appended: set[str],
    own_pubkey: str | None,
    relay_of: Callable[[str], str],
) -> list[Publication]:
    """Our own events newly stored from a relay are published (the relay has them): the facts
    that tell the outbox so, or it would publish them again (and sign again those a relay
    refuses for their age, which nodes that have the first would count twice)."""
    if own_pubkey is None:
        return []
    return [
        Publication.record(
            event.id, Outcome.ACKNOWLEDGED, [relay_of(event.id)], "received from relay"
        )
        for event in events
        if event.pubkey == own_pubkey and event.id in appended
    ]


@frozen
class FetchReport:
    """What a one-off history fetch stored."""

    received: int
    appended: int
    duplicates: int
    refused: tuple[tuple[str, int], ...]


async def fetch_into_store(
    url: str,
    store: AsyncEventStore,
    address: Address,
    *,
    since: int = 0,
    limits: IngestLimits = IngestLimits(),
    progress: Callable[[int], None] | None = None,
    trusted: Sequence[str] = (),
    own_pubkey: str | None = None,
) -> FetchReport:
    """Page the whole history of the session from one relay into the store (for `replay`):
    the `trusted` keys' events first, then everyone's. Our own (`own_pubkey`'s) are recorded
    as published: a restored node must not publish its whole history again."""
    connection = RelayConnection(url, timeout_s=limits.relay_timeout_s)
    await connection.open()
    received = appended = duplicates = 0
    refused: Counter[str] = Counter()
    try:
        for fetch in history_passes(trusted, untrusted_too=True):
            history = fetch_history(
                connection, address, since, limits.events_per_page_max, fetch.authors, fetch.skipped
            )
            async with contextlib.aclosing(history):
                async for page in history:
                    verdicts = await asyncio.to_thread(
                        _admit_all, list(page.events), address, limits.content_bytes_max
                    )
                    good = [verdict for verdict in verdicts if isinstance(verdict, NostrEvent)]
                    for verdict in verdicts:
                        if isinstance(verdict, Refusal):
                            refused[verdict.kind] += 1
                            log.warning("refused an event from %s: %s", url, verdict.reason)
                    outcome = await store.append_nostr(good)
                    new = {event_id for _, event_id in outcome.appended}
                    facts = published_own(good, new, own_pubkey, lambda _: url)
                    if facts:
                        await store.save(*facts)
                    received += len(verdicts)
                    appended += len(outcome.appended)
                    duplicates += len(outcome.duplicates)
                    if progress is not None:
                        progress(len(verdicts))
    finally:
        await connection.close()
    return FetchReport(received, appended, duplicates, tuple(sorted(refused.items())))
