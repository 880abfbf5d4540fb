"""Ingest against a LocalRelay: history while the node was down, checkpoints, live events."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import orjson
from aiohttp import web

from dsproxy.adapters.event_store import AsyncEventStore
from dsproxy.config import Settings
from dsproxy.services.ingest import fetch_into_store
from dsproxy.services.node import Node
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.event import public_key_of, sign_event
from dsproxy.wire.messages import Transaction
from tests.conftest import CONTROLLER_SECRET, STRANGER_SECRET
from tests.integration.relay_fixtures import (
    USERS,
    balance,
    balances,
    credits,
    eventually,
    local_relay,
    postings_count,
    publish,
    running_node,
    totals,
)
from tests.integration.test_relay_connection import scripted_relay

__all__ = ["local_relay"]


async def test_node_down_during_1000_events_ends_with_each_once(
    local_relay: str, node_settings: Settings, address: Address
) -> None:
    """1,000 credits published while the node is down: after a start it has each exactly once."""
    settings = node_settings.replace(relays=(local_relay,), history_overlap_s=2)
    first = credits(CONTROLLER_SECRET, address, 1_000, per_second=100)
    await publish(local_relay, first)

    async with running_node(settings) as node:

        async def all_first() -> bool:
            return await postings_count(node) == 1_000

        await eventually(all_first, "1,000 postings")
        assert node.ingest.stats.appended == 1_000
        assert await balances(node) == totals(first)

        async def checkpointed_first() -> bool:  # stored, then checkpointed: not at once
            return await node.checkpoints.get(local_relay) == first[-1].created_at

        await eventually(checkpointed_first, "the checkpoint of the first 1,000")

    second = credits(CONTROLLER_SECRET, address, 200, per_second=100, first_tokens=5_000)
    await publish(local_relay, second)

    async with running_node(settings) as node:

        async def all_second() -> bool:
            return await postings_count(node) == 1_200

        await eventually(all_second, "1,200 postings")
        # From the checkpoint minus the overlap, not from the start of history.
        assert node.ingest.stats.appended == 200
        assert node.ingest.stats.received < 1_200
        assert await balances(node) == totals(first + second)

        newest = max(event.created_at for event in first + second)

        async def checkpointed() -> bool:
            return await node.checkpoints.get(local_relay) == newest

        await eventually(checkpointed, "the checkpoint at the newest event")


async def test_live_events_reach_the_balance(
    local_relay: str, node_settings: Settings, address: Address
) -> None:
    """An event published while the node runs is stored and projected once."""
    settings = node_settings.replace(relays=(local_relay,))
    async with running_node(settings) as node:

        async def caught_up() -> bool:
            return node.ingest.stats.sessions >= 1 and node.ingest.queue.empty()

        await eventually(caught_up, "a session")
        events = credits(CONTROLLER_SECRET, address, 10)
        await publish(local_relay, events)

        async def credited() -> bool:
            return await balances(node) == totals(events)

        await eventually(credited, "the live credits")
        assert await postings_count(node) == 10


async def test_a_flood_in_the_second_of_a_credit_does_not_hide_it_from_history(
    local_relay: str, node_settings: Settings, address: Address, tmp_path
) -> None:
    """Anyone may publish with our tags: 600 junk events in a credit's second, with ids that
    sort before it, filled the relay's 500-event answers and the credit was never fetched
    (by a backend, a controller or `replay --from-relay`), while the checkpoint moved on."""
    second = int(time.time()) - 5
    for tokens in itertools.count(1_000):  # an id in the upper half: junk before it is quick
        credit = seal(Transaction(USERS[0], tokens), address, CONTROLLER_SECRET, second)
        if credit.id >= "8":
            break
    tags = (("s", address.session), ("p", address.machine))
    junk = (sign_event(STRANGER_SECRET, 1573, tags, f'{{"n":{n}}}', second) for n in range(5_000))
    flood = list(itertools.islice((event for event in junk if event.id < credit.id), 600))
    assert len(flood) == 600
    await publish(local_relay, [credit, *flood])
    settings = node_settings.replace(relays=(local_relay,))
    assert public_key_of(CONTROLLER_SECRET) in settings.trusted_controllers

    for untrusted_too in (False, True):  # a backend, then a controller
        data_dir = tmp_path / f"untrusted-{untrusted_too}"
        node = await Node.open(settings.replace(data_dir=data_dir), untrusted_too=untrusted_too)
        stop = asyncio.Event()
        task = asyncio.create_task(node.run(stop))
        try:

            async def credited(node: Node = node) -> bool:
                return await balance(node, USERS[0]) == tokens

            await eventually(credited, "the credit folded")
        finally:
            stop.set()
            await task
            await node.aclose()

    store = AsyncEventStore.open(tmp_path / "replayed.sqlite")
    try:
        trusted = (public_key_of(CONTROLLER_SECRET),)
        await fetch_into_store(local_relay, store, address, trusted=trusted)
        assert await store.contains(credit.id)
    finally:
        await store.close()


async def test_a_key_trusted_later_has_its_earlier_events_fetched(
    local_relay: str, node_settings: Settings, address: Address
) -> None:
    """A backend asks relays only for its trusted keys' events: once a key was added to them,
    its earlier credits lay below the checkpoint, never asked for, and were never counted."""
    first = seal(Transaction(USERS[0], 11), address, CONTROLLER_SECRET)
    # an hour before: well below the checkpoint minus the overlap the next session reads from
    other = seal(Transaction(USERS[0], 22), address, STRANGER_SECRET, int(time.time()) - 3_600)
    await publish(local_relay, [first, other])
    settings = node_settings.replace(relays=(local_relay,))
    async with running_node(settings) as node:

        async def first_counted() -> bool:
            return await balance(node, USERS[0]) == 11 and bool(
                await node.checkpoints.get(local_relay)
            )

        await eventually(first_counted, "the trusted credit and a checkpoint")
    widened = settings.replace(
        trusted_controllers=(*settings.trusted_controllers, public_key_of(STRANGER_SECRET))
    )
    async with running_node(widened) as node:

        async def both_counted() -> bool:
            return await balance(node, USERS[0]) == 33

        await eventually(both_counted, "the newly trusted key's earlier credit")


async def test_a_relay_whose_live_subscription_went_quiet_is_read_again(
    node_settings: Settings, address: Address
) -> None:
    """A relay that drops the live subscription with only a NOTICE (or forgets it) keeps the
    socket up: the node waited for live events forever, its balances going stale."""
    stored: list[dict[str, Any]] = [
        seal(Transaction(USERS[0], 5), address, CONTROLLER_SECRET).to_obj()
    ]

    async def history_only(ws: web.WebSocketResponse, message: list[Any]) -> None:
        if message[0] == "REQ":  # every query gets what is stored; nothing is pushed live
            for event in list(stored):
                await ws.send_str(orjson.dumps(["EVENT", message[1], event]).decode())
            await ws.send_str(orjson.dumps(["EOSE", message[1]]).decode())

    async with scripted_relay(history_only) as url:
        settings = node_settings.replace(relays=(url,), history_reread_s=1)
        async with running_node(settings) as node:

            async def first() -> bool:
                return await balance(node, USERS[0]) == 5

            await eventually(first, "the first credit")
            stored.append(seal(Transaction(USERS[0], 7), address, CONTROLLER_SECRET).to_obj())

            async def second() -> bool:
                return await balance(node, USERS[0]) == 12

            await eventually(second, "the credit the relay never pushed live", timeout_s=20)
            rereads, received = node.ingest.stats.rereads, node.ingest.stats.received

            async def read_twice_more() -> bool:
                return node.ingest.stats.rereads >= rereads + 2

            await eventually(read_twice_more, "two more reads of the history")
            # what the store has is left out of a re-read before its signature is checked
            assert node.ingest.stats.received == received


async def test_a_command_that_only_reads_the_data_dir_leaves_what_was_asked_for(
    local_relay: str, node_settings: Settings, address: Address
) -> None:
    """`dsproxy outbox` (which may run beside a node) opened a node with the settings just
    edited: it recorded a newly trusted key as asked for, the running node wrote its
    checkpoint back, and the next start never fetched that key's earlier events."""
    # in the past: a checkpoint is never ahead of the clock
    first = seal(Transaction(USERS[0], 11), address, CONTROLLER_SECRET, int(time.time()) - 10)
    other = seal(Transaction(USERS[0], 22), address, STRANGER_SECRET, int(time.time()) - 3_600)
    await publish(local_relay, [first, other])
    settings = node_settings.replace(relays=(local_relay,))
    widened = settings.replace(
        trusted_controllers=(*settings.trusted_controllers, public_key_of(STRANGER_SECRET))
    )

    later = seal(Transaction(USERS[0], 1), address, CONTROLLER_SECRET, first.created_at + 5)
    async with running_node(settings) as node:

        async def checkpointed(at: int) -> bool:
            return await node.checkpoints.get(local_relay) == at

        await eventually(lambda: checkpointed(first.created_at), "a checkpoint")
        reader = await Node.open(widened)  # as `dsproxy outbox` does, and never runs it
        await reader.aclose()
        await publish(local_relay, [later])  # the running node moves its checkpoint again
        await eventually(lambda: checkpointed(later.created_at), "the checkpoint moved")
    async with running_node(widened) as node:

        async def all_counted() -> bool:
            return await balance(node, USERS[0]) == 34

        await eventually(all_counted, "the newly trusted key's earlier credit")
