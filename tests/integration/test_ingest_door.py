"""Forged and off-session events are refused at the door (or ignored by the ledger)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import attrs
import pytest

from dsproxy.bootstrap import LedgerNode, open_ledger
from dsproxy.config import Settings
from dsproxy.services.ingest import CheckpointDb, Incoming, Ingest, IngestLimits, Refusal, admit
from dsproxy.services.node import Node
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.event import NostrEvent, public_key_of, sign_event
from dsproxy.wire.messages import Transaction
from tests.conftest import CONTROLLER_SECRET, STRANGER_SECRET
from tests.integration.relay_fixtures import (
    USERS,
    balances,
    credits,
    eventually,
    local_relay,
    publish,
    totals,
)

__all__ = ["local_relay"]

CONTENT_BYTES_MAX = 512


@contextlib.asynccontextmanager
async def ingest_into_ledger(
    settings: Settings, address: Address, limits: IngestLimits | None = None
) -> AsyncIterator[tuple[LedgerNode, Ingest]]:
    """An ingest over a fresh ledger and checkpoint file, all closed afterwards."""
    ledger = await open_ledger(settings)
    checkpoints = await CheckpointDb.open(settings.data_dir / "checkpoints.sqlite")
    ingest = Ingest(ledger.store, checkpoints, address, limits=limits or IngestLimits())
    try:
        yield ledger, ingest
    finally:
        ingest.close()
        await checkpoints.close()
        await ledger.aclose()


def forged_and_strange(address: Address) -> dict[str, NostrEvent]:
    """One event of each kind the door must refuse, plus one from an untrusted author."""
    now = int(time.time())
    user = USERS[0]
    good = seal(Transaction(user, 10), address, CONTROLLER_SECRET, now)
    other = seal(Transaction(user, 11), address, CONTROLLER_SECRET, now)
    padded = json.dumps(
        {"Transaction": {"user": user, "tokens": 5}, "pad": "x" * CONTENT_BYTES_MAX}
    )
    tags = (("s", address.session), ("p", address.machine))
    return {
        "bad_signature": attrs.evolve(good, sig=other.sig),
        "tampered_content": attrs.evolve(good, content=good.content.replace("10", "1000000")),
        "wrong_session": seal(
            Transaction(user, 12), Address("other", address.machine), CONTROLLER_SECRET, now
        ),
        "wrong_machine": seal(
            Transaction(user, 13),
            Address(address.session, public_key_of("77" * 32)),
            CONTROLLER_SECRET,
            now,
        ),
        "oversized": sign_event(CONTROLLER_SECRET, 1573, tags, padded, now),
        "invalid_json": sign_event(CONTROLLER_SECRET, 1573, tags, '{"Transaction": ', now),
        "untrusted_author": seal(Transaction(user, 14), address, STRANGER_SECRET, now),
    }


REFUSED_AS = {
    "bad_signature": "invalid_event",
    "tampered_content": "invalid_event",
    "wrong_session": "off_session",
    "wrong_machine": "off_session",
    "oversized": "oversized",
    "invalid_json": "invalid_json",
}


@pytest.mark.parametrize("name", sorted(REFUSED_AS))
def test_door_refuses_with_a_reason(name: str, address: Address) -> None:
    """Each forged or off-session event gets the refusal it deserves, naming the event."""
    verdict = admit(forged_and_strange(address)[name].to_obj(), address, CONTENT_BYTES_MAX)
    assert isinstance(verdict, Refusal)
    assert verdict.kind == REFUSED_AS[name]


async def test_refused_events_change_nothing_and_untrusted_are_stored_only(
    node_settings: Settings, address: Address, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the ingest worker: refusals are counted and logged, no balance moves; the
    untrusted author's credit is stored for audit and ignored by the ledger."""
    settings = node_settings.replace(content_bytes_max=CONTENT_BYTES_MAX)
    limits = IngestLimits(content_bytes_max=CONTENT_BYTES_MAX)
    async with ingest_into_ledger(settings, address, limits) as (ledger, ingest):
        events = forged_and_strange(address)
        await ingest.process(
            [Incoming("ws://evil.example", (e.to_obj(),)) for e in events.values()]
        )
        await ledger.projector.catch_up()

        assert dict(ingest.stats.refused) == {
            "invalid_event": 2,
            "off_session": 2,
            "oversized": 1,
            "invalid_json": 1,
        }
        assert ingest.stats.appended == 1
        assert ledger.store.sync.contains(events["untrusted_author"].id)
        assert [await ledger.db.account(user) for user in USERS] == [None] * len(USERS)
        ignored = await ledger.db.ignored()
        assert [event_id for _, event_id, _ in ignored] == [events["untrusted_author"].id]
        assert sum("refused an event from ws://evil.example" in m for m in caplog.messages) == 6
        # the same junk again (every session reads it again: it is never stored) is counted,
        # not logged again: anyone may publish junk with our tags to flood the log
        await ingest.process(
            [Incoming("ws://evil.example", (e.to_obj(),)) for e in events.values()]
        )
        assert sum(ingest.stats.refused.values()) == 12
        assert sum("refused an event from ws://evil.example" in m for m in caplog.messages) == 6


async def test_strange_events_through_a_relay_move_no_balance(
    local_relay: str, node_settings: Settings, address: Address
) -> None:
    """What a relay accepts (oversized, invalid JSON, untrusted, other sessions) moves nothing;
    a trusted credit sent after them does."""
    settings = node_settings.replace(relays=(local_relay,), content_bytes_max=CONTENT_BYTES_MAX)
    events = forged_and_strange(address)
    relayed = [
        events[name]
        for name in (
            "oversized",
            "invalid_json",
            "untrusted_author",
            "wrong_session",
            "wrong_machine",
        )
    ]
    sentinel = seal(Transaction(USERS[1], 99), address, CONTROLLER_SECRET, int(time.time()))
    await publish(local_relay, relayed)
    await publish(local_relay, [sentinel])
    for untrusted_too in (False, True):  # a backend, then a controller (users' Requests)
        directory = settings.data_dir / f"untrusted-{untrusted_too}"
        node = await Node.open(settings.replace(data_dir=directory), untrusted_too=untrusted_too)
        stop = asyncio.Event()
        task = asyncio.create_task(node.run(stop))
        try:

            async def settled(node: Node = node, appended: int = 1 + untrusted_too) -> bool:
                refused = set(node.ingest.stats.refused)
                return (
                    await balances(node) == [0, 99, 0, 0]
                    and refused == {"oversized", "invalid_json"}
                    and node.ingest.stats.appended == appended
                )

            await eventually(settled, "the sentinel credit, two refusals (and the stranger's)")
            # Other sessions and machines never arrive: the subscription filters them out, and
            # a backend does not ask for untrusted authors at all; a controller stores theirs
            # for audit and its ledger ignores them.
            # (a delivery is counted each time: the live subscription may repeat the newest one)
            assert set(node.ingest.stats.refused) == {"oversized", "invalid_json"}
            assert node.ingest.stats.appended == 1 + untrusted_too
            stored = node.ledger.store.sync.contains(events["untrusted_author"].id)
            assert stored == untrusted_too
        finally:
            stop.set()
            await task
            await node.aclose()


async def test_a_large_batch_is_verified_in_slices_and_each_verdict_meets_its_event(
    node_settings: Settings, address: Address
) -> None:
    """Forgeries scattered through a batch verified on several threads are refused, each
    good event is stored, and the balance is exactly the good events' sum."""
    async with ingest_into_ledger(node_settings, address) as (ledger, ingest):
        good = credits(CONTROLLER_SECRET, address, 400)
        forged = {index for index in range(0, 400, 37)}
        objs = [
            attrs.evolve(event, sig=good[index - 1].sig).to_obj()
            if index in forged
            else event.to_obj()
            for index, event in enumerate(good)
        ]
        await ingest.process([Incoming("ws://relay.example", tuple(objs))])
        await ledger.projector.catch_up()
        kept = [event for index, event in enumerate(good) if index not in forged]
        assert dict(ingest.stats.refused) == {"invalid_event": len(forged)}
        assert ingest.stats.appended == len(kept)
        accounts = [await ledger.db.account(user) for user in USERS]
        assert [0 if account is None else account.balance for account in accounts] == totals(kept)


async def test_back_pressure_counts_events_not_entries(
    node_settings: Settings, address: Address
) -> None:
    """With room for 10 events, live events (one entry each) and a history chunk (one entry
    of many) wait alike until the worker has stored enough; then all are stored."""
    events = credits(CONTROLLER_SECRET, address, 40)
    async with ingest_into_ledger(node_settings, address, IngestLimits(queue_len_max=10)) as (
        _,
        ingest,
    ):
        live = asyncio.gather(*(ingest._on_live("ws://a", e.to_obj()) for e in events[:20]))
        await asyncio.sleep(0.1)
        assert ingest.queued_events == 10 and not live.done()
        worker = asyncio.create_task(ingest.run())
        await live
        await ingest._enqueue(Incoming("ws://a", tuple(e.to_obj() for e in events[20:])))
        await ingest.drain()
        worker.cancel()
        assert ingest.stats.appended == 40 and ingest.queued_events == 0


async def test_batches_verified_while_the_one_before_is_stored_land_in_arrival_order(
    node_settings: Settings, address: Address
) -> None:
    """The worker verifies a batch while the previous one is being stored: the store still
    gets every event once, in the order the relay sent them."""
    events = credits(CONTROLLER_SECRET, address, 1_000)
    limits = IngestLimits(batch_events_max=100)
    async with ingest_into_ledger(node_settings, address, limits) as (ledger, ingest):
        worker = asyncio.create_task(ingest.run())
        for start in range(0, len(events), 100):
            chunk = tuple(event.to_obj() for event in events[start : start + 100])
            await ingest._enqueue(Incoming("ws://a", chunk))
        await ingest.drain()
        stored = [json.loads(record.state)["id"] for record in await ledger.store.read(0, 2_000)]
        assert stored == [event.id for event in events]
        assert ingest.queued_events == 0 and not worker.done()
        worker.cancel()


async def test_a_store_failure_stops_the_worker_with_its_error(
    node_settings: Settings, address: Address
) -> None:
    """A batch that cannot be stored ends the worker (the node then stops) instead of being
    dropped, and the room it took in the queue is given back."""
    ledger = await open_ledger(node_settings)
    checkpoints = await CheckpointDb.open(node_settings.data_dir / "checkpoints.sqlite")
    ingest = Ingest(ledger.store, checkpoints, address)
    events = credits(CONTROLLER_SECRET, address, 10)
    try:
        await ledger.store.close()
        worker = asyncio.create_task(ingest.run())
        await ingest._enqueue(Incoming("ws://a", tuple(event.to_obj() for event in events)))
        with pytest.raises(RuntimeError, match="shutdown"):
            await asyncio.wait_for(worker, 10)
        assert ingest.queued_events == 0 and ingest.stats.appended == 0
    finally:
        ingest.close()
        await checkpoints.close()
        await ledger.db.close()


async def test_a_worker_stopped_mid_stream_keeps_the_queue_account_exact(
    node_settings: Settings, address: Address
) -> None:
    """Cancelled while one batch is stored and the next verified, the worker gives back the
    room of every batch it took, and only those: what is still queued is still counted."""
    events = credits(CONTROLLER_SECRET, address, 2_000)
    limits = IngestLimits(batch_events_max=100)
    async with ingest_into_ledger(node_settings, address, limits) as (_, ingest):
        for start in range(0, len(events), 100):
            chunk = tuple(event.to_obj() for event in events[start : start + 100])
            await ingest._enqueue(Incoming("ws://a", chunk))
        three_stored = asyncio.Event()
        ingest.on_appended = lambda: ingest.stats.appended >= 300 and three_stored.set()
        worker = asyncio.create_task(ingest.run())
        await asyncio.wait_for(three_stored.wait(), 30)
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker
        await asyncio.sleep(0.05)  # a shielded release may finish after the worker
        still_queued = 0
        while not ingest.queue.empty():
            still_queued += len(ingest.queue.get_nowait().objs)
        assert 0 < still_queued < 2_000 - 300
        assert ingest.queued_events == still_queued


def test_a_refusal_shows_tag_values_shortened(address: Address) -> None:
    """Its reason is logged and remembered: the event's author chose how long a tag is."""
    tags = (("s", "x" * 100_000), ("s", address.session), ("p", address.machine))
    event = sign_event(CONTROLLER_SECRET, 1573, tags, '{"a": 1}', 1_700_000_000)
    verdict = admit(event.to_obj(), address, CONTENT_BYTES_MAX)
    assert isinstance(verdict, Refusal) and verdict.kind == "off_session"
    assert len(verdict.reason) < 400 and "(100000 characters)" in verdict.reason
