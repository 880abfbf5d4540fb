"""The outbox: publish every stored event of our own key, in store order, until a relay has it.

Whoever makes an event signs it and appends it to the store first; that is all. The outbox
projection (a FactProjection written with the balances, so it survives restarts and rebuilds)
lists our own events and folds the `Publication` facts about them into the `outbox` table. The
outbox takes the oldest pending event, publishes it to every relay and waits: one event at a time,
because the DePHY relay may chain one key's events. An acknowledgement or a permanent rejection
is recorded as a fact; a transient rejection is recorded and retried with backoff; an outage is
only waited out. A crash between the relay's OK and the fact means one more publish, which the
relay answers with OK (or `duplicate:`): the same event, the same id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import orjson
from attrs import define, frozen

from dsproxy.adapters.event_store import AsyncEventStore, StoredRecord
from dsproxy.adapters.projection_db import ProjectionDb
from dsproxy.domain.publication import (
    Acknowledged,
    Decision,
    Failed,
    Outcome,
    Publication,
    RelayAnswer,
    RelayResult,
    Replacement,
    RetryLater,
    Stale,
    decide_publication,
    retry_delay_ms,
)
from dsproxy.errors import DuplicateEvent
from dsproxy.services.projector import Projector
from dsproxy.wire.event import NostrEvent, parse_event

__all__ = [
    "Outbox",
    "OutboxLimits",
    "OutboxProjection",
    "OutboxRow",
    "OutboxStats",
    "Publisher",
    "list_outbox",
]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    event_id TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    event TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    rejections INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    relays TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS outbox_by_status ON outbox (status, position);
"""
_INSERT = "INSERT OR IGNORE INTO outbox (event_id, position, created_at, event) VALUES (?, ?, ?, ?)"
# A fact changes a pending row (a late transient rejection cannot undo an acknowledgement); an
# acknowledgement also a failed one (failed events are offered again).
_RECORD = (
    "UPDATE outbox SET "
    "status = CASE WHEN ? = 'rejected' THEN 'pending' ELSE ? END, "
    "rejections = rejections + (? = 'rejected'), reason = ?, relays = ? "
    "WHERE event_id = ? AND (status = 'pending' OR (status = 'failed' AND ? = 'acknowledged'))"
)
_REPLACE = (
    "UPDATE outbox SET status = 'replaced', reason = ? "
    "WHERE event_id = ? AND status IN ('pending', 'failed')"
)
_COLUMNS = "event_id, position, created_at, event, status, rejections, reason, relays"
RESIGN_SECONDS_MAX = 30  # seconds back from now tried for a replacement's free `created_at`
RESIGN_AGE_MIN_S = 15
"""An event refused for its age that is younger than this by our clock is not signed again:
the clocks disagree (a replacement would be refused too, and signed again, without end)."""


class OutboxProjection:
    """Our own events and the Publication facts about them, folded into `outbox`.

    The schema names the key, so a node that changes its key rebuilds the table.
    """

    def __init__(self, author: str) -> None:
        self.author = author
        self.schema = f"-- the outbox of {author}\n{_SCHEMA}"
        # The store writes events with fixed separators; inside JSON strings quotes are escaped,
        # so this byte string can only be the top-level pubkey.
        self._marker = f'"pubkey":"{author}"'.encode()

    def changes(self, records: Sequence[StoredRecord]) -> list[tuple[str, list[tuple[Any, ...]]]]:
        inserts: list[tuple[Any, ...]] = []
        updates: list[tuple[Any, ...]] = []
        replaced: list[tuple[Any, ...]] = []
        for record in records:
            if record.is_nostr:
                if self._marker in record.state:
                    obj = orjson.loads(record.state)
                    inserts.append(
                        (obj["id"], record.position, obj["created_at"], record.state.decode())
                    )
            elif isinstance(record.fact, Publication.Recorded):
                fact: Any = record.fact
                outcome = fact.outcome
                relays = json.dumps(list(fact.relays))
                updates.append(
                    (outcome, outcome, outcome, fact.reason, relays, fact.event_id, outcome)
                )
            elif isinstance(record.fact, Replacement.Recorded):
                fact = record.fact
                reason = f"replaced by {fact.replacement_id}: {fact.reason}"
                replaced.append((reason, fact.event_id))
        return [(_INSERT, inserts), (_RECORD, updates), (_REPLACE, replaced)]


@frozen
class OutboxRow:
    event_id: str
    position: int
    created_at: int
    event: str
    status: str
    rejections: int
    reason: str
    relays: str


async def list_outbox(
    db: ProjectionDb,
    statuses: Sequence[str] = ("pending", "failed"),
    limit: int = 1_000,
    after: int = 0,
) -> list[OutboxRow]:
    """Rows in store order with one of these statuses (after store position `after`)."""
    marks = ",".join("?" * len(statuses))
    rows = await db.fetch_all(
        f"SELECT {_COLUMNS} FROM outbox WHERE status IN ({marks}) AND position > ? "
        "ORDER BY position LIMIT ?",
        (*statuses, after, limit),
    )
    return [OutboxRow(*row) for row in rows]


class Publisher(Protocol):
    """Sends one event to every relay and reports each relay's answer."""

    @property
    def relays_total(self) -> int: ...

    async def publish(self, event: NostrEvent) -> tuple[RelayResult, ...]: ...

    async def holders(self, event_id: str) -> tuple[tuple[str, bool | None], ...]: ...


Resign = Callable[[NostrEvent, int], NostrEvent]
"""Sign an event's kind, tags and content again with another `created_at`."""


@frozen
class OutboxLimits:
    page_max: int = 100
    rejections_max: int = 20
    retry_ms_min: int = 200
    retry_ms_max: int = 30_000
    idle_s: float = 0.25
    failed_retry_s: float = 300.0  # failed events are offered again this often, once each


@define
class OutboxStats:
    acknowledged: int = 0
    failed: int = 0
    rejections: int = 0
    attempts: int = 0
    replaced: int = 0


class Outbox:
    """Publishes pending rows one at a time, oldest first; `run()` forever."""

    def __init__(
        self,
        store: AsyncEventStore,
        projector: Projector,
        publisher: Publisher,
        *,
        limits: OutboxLimits = OutboxLimits(),
        resign: Resign | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.projector, self.publisher = store, projector, publisher
        self.limits = limits
        self.resign, self.clock = resign, clock
        self.stats = OutboxStats()
        self._failed_offered_to = 0  # the store position the last offer of failed events reached

    async def pending(self) -> list[OutboxRow]:
        return await list_outbox(self.projector.db, ("pending",), self.limits.page_max)

    async def run(self) -> None:
        offered_failed_s = self.clock()
        while True:
            seen = await self.projector.db.position()
            rows = await self.pending()
            for row in rows:
                await self.settle(row)
            if self.clock() - offered_failed_s >= self.limits.failed_retry_s:
                offered_failed_s = self.clock()
                await self.offer_failed()
            elif not rows:
                await self._wait_for_change(seen)

    async def offer_failed(self) -> int:
        """Offer failed events once more, up to `page_max` a time, going round them all over
        successive calls (a relay that refused for a while may take one now, or the relays were
        changed); one acknowledged is published after all. One every relay now refuses for its
        age (it failed for other reasons, and the first offer comes minutes later) goes the way
        of a pending one: published if a relay has it, else signed again. Nothing is recorded
        for a refusal; a round ends where no relay answers (an outage). How many were
        published or signed again."""
        db, page = self.projector.db, self.limits.page_max
        rows = await list_outbox(db, ("failed",), page, after=self._failed_offered_to)
        if not rows and self._failed_offered_to:  # round the end: start again from the oldest
            rows = await list_outbox(db, ("failed",), page)
        published = 0
        for row in rows:
            event = parse_event(row.event)
            results = await self.publisher.publish(event)
            self.stats.attempts += 1
            if all(result.answer is RelayAnswer.UNREACHABLE for result in results):
                break  # an outage: the next round starts with this event
            self._failed_offered_to = row.position
            decision: Decision | None = decide_publication(results, self.publisher.relays_total)
            if isinstance(decision, Stale):
                decision = await self._stale(event, decision, self.limits.rejections_max)
                if decision is None:  # signed again: the replacement is a pending row now
                    published += 1
                    continue
            if isinstance(decision, Acknowledged):
                await self.store.save(
                    Publication.record(event.id, Outcome.ACKNOWLEDGED, decision.relays, "")
                )
                self.stats.acknowledged += 1
                published += 1
                log.warning("event %s, failed before, is published now", event.id)
        if published:
            await self.projector.catch_up()
        return published

    async def _wait_for_change(self, seen: int) -> None:
        """Until the projection moves past `seen` (the wake-up is taken before the check, so a
        catch-up that ends just before we wait is not missed), or `idle_s`."""
        fired = self.projector.applied.next()
        if await self.projector.db.position() != seen:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.limits.idle_s):  # wait_for can eat a cancel on 3.11
                await fired.wait()

    async def settle(self, row: OutboxRow) -> None:
        """Publish one event until it is acknowledged or fails for good; record the outcome."""
        event = parse_event(row.event)
        rejections, attempt = row.rejections, 0
        while True:
            results = await self.publisher.publish(event)
            self.stats.attempts += 1
            decision = decide_publication(
                results, self.publisher.relays_total, rejections, self.limits.rejections_max
            )
            if isinstance(decision, Acknowledged):
                fact = Publication.record(event.id, Outcome.ACKNOWLEDGED, decision.relays, "")
                self.stats.acknowledged += 1
                break
            if isinstance(decision, Stale):
                decision = await self._stale(event, decision, rejections)
                if isinstance(decision, Acknowledged):
                    fact = Publication.record(event.id, Outcome.ACKNOWLEDGED, decision.relays, "")
                    self.stats.acknowledged += 1
                    break
                if decision is None:  # signed again: the replacement is the next pending row
                    await self.projector.catch_up()
                    return
            if isinstance(decision, Failed):
                fact = Publication.record(event.id, Outcome.FAILED, [], decision.reason)
                self.stats.failed += 1
                log.error("event %s will not be published: %s", event.id, decision.reason)
                break
            assert isinstance(decision, RetryLater), decision
            if decision.rejection is not None:
                rejections += 1
                self.stats.rejections += 1
                await self.store.save(
                    Publication.record(event.id, Outcome.REJECTED, [], decision.rejection)
                )
            log.warning("event %s not published yet (%s); retrying", event.id, decision.reason)
            delay_ms = retry_delay_ms(
                attempt, self.limits.retry_ms_min, self.limits.retry_ms_max, random.uniform(0.5, 1)
            )
            attempt += 1
            await asyncio.sleep(delay_ms / 1000)
        await self.store.save(fact)
        await self.projector.catch_up()  # the row leaves `pending` before the next query

    async def _stale(self, event: NostrEvent, stale: Stale, rejections: int) -> Decision | None:
        """Sign an event refused for its age again (None), or what to do instead: it is
        published if a relay has it (an attempt whose OK was lost landed); it fails if our
        clock, not its age, is the trouble; asking a relay that cannot answer counts as a
        rejection (one that never answers would hold every later event back)."""
        age_s = self.clock() - event.created_at
        if self.resign is None or age_s < RESIGN_AGE_MIN_S:
            return Failed(f"{stale.reason} (it is {age_s:.0f} s old here: is our clock right?)")
        held = await self.publisher.holders(event.id)
        holding = tuple(url for url, has in held if has)
        if holding:
            return Acknowledged(holding)
        unknown = [url for url, has in held if has is None]
        if unknown:
            asked = f"could not ask {', '.join(unknown)} whether it has the event"
            if rejections + 1 >= self.limits.rejections_max:
                return Failed(f"gave up after {self.limits.rejections_max} rejections: {asked}")
            return RetryLater(f"{stale.reason}; {asked}", asked)
        try:
            await self._replace(event, stale.reason)
        except DuplicateEvent as exc:
            return Failed(f"{stale.reason}; {exc}")
        return None

    async def _replace(self, event: NostrEvent, reason: str) -> None:
        """Sign the event again, as of now, and record it with the fact that it replaces the
        old one, in one write (a `created_at` whose event is stored already is skipped)."""
        assert self.resign is not None
        now = int(self.clock())
        for created_at in range(now, now - RESIGN_SECONDS_MAX, -1):
            replacement = self.resign(event, created_at)
            fact = Replacement(event.id, replacement.id, reason)
            try:
                await self.store.record([replacement], fact, new_only=True)
            except DuplicateEvent:
                continue
            self.stats.replaced += 1
            log.warning(
                "event %s was refused for its age (%s): signed again as %s",
                event.id,
                reason,
                replacement.id,
            )
            return
        raise DuplicateEvent(f"no free created_at to sign {event.id} again")
