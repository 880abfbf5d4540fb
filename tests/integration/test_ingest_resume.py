"""Ingest against a LocalRelay: history while the node was down, checkpoints, live events."""

from __future__ import annotations

from dsproxy.config import Settings
from dsproxy.wire.envelope import Address
from tests.conftest import CONTROLLER_SECRET
from tests.integration.relay_fixtures import (
    balances,
    credits,
    eventually,
    local_relay,
    postings_count,
    publish,
    running_node,
    totals,
)

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
