"""A node: ingest, projector and outbox of one data directory, run together as asyncio tasks.

The backend and the controller open a Node, append their own signed events with `append` (or
straight to `node.ledger.store`, which the projector polls), and run `node.run()` beside their
own work. Stopping closes the relay sessions first, lets the ingest store what it already
received, projects it, and closes the files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from dsproxy.adapters.event_store import AppendOutcome
from dsproxy.adapters.node_keys import load_secret
from dsproxy.adapters.relay import RelayPublisher
from dsproxy.bootstrap import LedgerNode, address, open_ledger, own_pubkey
from dsproxy.config import Settings
from dsproxy.services.ingest import CheckpointDb, Ingest, IngestLimits
from dsproxy.services.outbox import Outbox, OutboxLimits, Resign
from dsproxy.wire.event import NostrEvent, sign_event

__all__ = ["Node", "ingest_limits"]

log = logging.getLogger(__name__)

PROJECTOR_IDLE_S = 0.25  # how often the projector looks for events appended by others
DRAIN_TIMEOUT_S = 30.0  # how long a stop waits for received events to be stored


def ingest_limits(settings: Settings) -> IngestLimits:
    return IngestLimits(
        queue_len_max=settings.ingest_queue_len_max,
        batch_events_max=settings.ingest_batch_events_max,
        events_per_page_max=settings.events_per_page_max,
        content_bytes_max=settings.content_bytes_max,
        history_overlap_s=settings.history_overlap_s,
        history_reread_s=settings.history_reread_s,
        relay_timeout_s=settings.relay_timeout_s,
        retry_ms_min=settings.relay_retry_ms_min,
        retry_ms_max=settings.relay_retry_ms_max,
    )


def _resigner(settings: Settings) -> Resign:
    """Our key's signature over an event's kind, tags and content, at another `created_at`."""
    assert settings.nostr_key_file is not None
    secret = load_secret(settings.nostr_key_file)

    def resign(event: NostrEvent, created_at: int) -> NostrEvent:
        return sign_event(secret, event.kind, event.tags, event.content, created_at)

    return resign


class Node:
    """One data directory's ledger kept in step with the relays; open with `Node.open`."""

    def __init__(
        self,
        settings: Settings,
        ledger: LedgerNode,
        checkpoints: CheckpointDb,
        author: str | None,
        *,
        untrusted_too: bool = False,
    ) -> None:
        self.settings, self.ledger, self.checkpoints, self.author = (
            settings,
            ledger,
            checkpoints,
            author,
        )
        self.wake = asyncio.Event()
        self.ingest = Ingest(
            ledger.store,
            checkpoints,
            address(settings),
            limits=ingest_limits(settings),
            on_appended=self.wake.set,
            own_pubkey=author,
            trusted=(*settings.trusted_controllers, *settings.trusted_backends),
            untrusted_too=untrusted_too,
        )
        self.publisher = (
            RelayPublisher(settings.relays, timeout_s=settings.relay_timeout_s)
            if settings.relays and author is not None
            else None
        )
        resign = _resigner(settings) if author is not None else None
        self.outbox = (
            Outbox(
                ledger.store,
                ledger.projector,
                self.publisher,
                limits=OutboxLimits(
                    rejections_max=settings.publish_rejections_max,
                    failed_retry_s=settings.publish_failed_retry_s,
                    retry_ms_min=settings.relay_retry_ms_min,
                    retry_ms_max=settings.relay_retry_ms_max,
                ),
                resign=resign,
            )
            if self.publisher is not None
            else None
        )

    @classmethod
    async def open(
        cls, settings: Settings, *, untrusted_too: bool = False, rebuild: bool = True
    ) -> Node:
        """Open the store, the projection (every fact projection) and the checkpoints.

        A node receives the events of the keys it trusts; `untrusted_too` also those of anyone
        else (a controller needs users' Requests)."""
        author = own_pubkey(settings)
        ledger = await open_ledger(settings, rebuild=rebuild)
        try:
            checkpoints = await CheckpointDb.open(settings.data_dir / "checkpoints.sqlite")
        except BaseException:  # what is open would keep the process from exiting
            await ledger.aclose()
            raise
        return cls(settings, ledger, checkpoints, author, untrusted_too=untrusted_too)

    async def append(self, events: Sequence[NostrEvent]) -> AppendOutcome:
        """Store our own signed events (the outbox publishes them) and project them now."""
        outcome = await self.ledger.store.append_nostr(events)
        self.wake.set()
        return outcome

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until `stop` is set or the task is cancelled; a crashed part stops the node."""
        # here, not in `open`: a command that only reads the data dir (`dsproxy outbox`, beside
        # a running node) must not change what the running node asked relays for
        if await self.checkpoints.hold_for(self.ingest.authors_asked):
            log.warning("trusted keys were added: reading the relays' history from the start")
        if not self.settings.relays:
            log.warning("DSPROXY_RELAYS is empty: the node neither receives nor publishes")
        elif self.outbox is None:
            log.warning("DSPROXY_NOSTR_KEY_FILE is not set: the node receives but never publishes")
        core = [
            asyncio.create_task(
                self.ledger.projector.run(self.wake, PROJECTOR_IDLE_S), name="projector"
            ),
            asyncio.create_task(self.ingest.run(), name="ingest"),
        ]
        edges = [
            asyncio.create_task(self.ingest.run_session(url), name=f"session {url}")
            for url in self.settings.relays
        ]
        if self.outbox is not None:
            edges.append(asyncio.create_task(self.outbox.run(), name="outbox"))
        stopper = asyncio.create_task((stop or asyncio.Event()).wait(), name="stop")
        try:
            done, _ = await asyncio.wait(
                [stopper, *core, *edges], return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task is not stopper and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            await _cancel([stopper, *edges])
            if not core[1].done():
                try:
                    await asyncio.wait_for(self.ingest.drain(), DRAIN_TIMEOUT_S)
                except TimeoutError:
                    log.error(
                        "stopping with %d received events not stored", self.ingest.queued_events
                    )
            await _cancel(core)
            with contextlib.suppress(Exception):
                await self.ledger.projector.catch_up()

    async def outbox_counts(self) -> tuple[int, int]:
        """Own events stored and not yet acknowledged, and those every relay refused for good
        (a node with no key has no outbox: nothing of its own to publish)."""
        db = self.ledger.db
        if not await db.fetch_all("SELECT 1 FROM sqlite_master WHERE name = 'outbox'"):
            return 0, 0
        rows = await db.fetch_all(  # by the status index: not every event ever published
            "SELECT (SELECT COUNT(*) FROM outbox WHERE status = 'pending'), "
            "(SELECT COUNT(*) FROM outbox WHERE status = 'failed')"
        )
        return int(rows[0][0]), int(rows[0][1])

    async def ingest_lag(self) -> int:
        """Events received but not yet stored, plus stored but not yet projected."""
        stored = await self.ledger.store.max_position()
        projected = await self.ledger.db.position()
        return self.ingest.queued_events + max(0, stored - projected)

    async def aclose(self) -> None:
        if self.publisher is not None:
            await self.publisher.close()
        self.ingest.close()
        await self.checkpoints.close()
        await self.ledger.aclose()


async def _cancel(tasks: Sequence[asyncio.Task[object]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
