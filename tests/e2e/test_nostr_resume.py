"""A node against the real nostr-relay process: downtime and restarts lose and double nothing."""

from __future__ import annotations

import asyncio

import pytest

from dsproxy.config import Settings
from dsproxy.wire.envelope import Address
from tests.conftest import CONTROLLER_SECRET
from tests.e2e.relay_process import (
    RelayProcess,
    patient_client,
    publish_until_accepted,
    relay_process,
)
from tests.integration.relay_fixtures import (
    balances,
    credits,
    eventually,
    postings_count,
    publish,
    running_node,
    totals,
)

pytestmark = pytest.mark.e2e
__all__ = ["relay_process"]


async def test_node_down_while_1000_events_are_published(
    relay_process: RelayProcess, node_settings: Settings, address: Address
) -> None:
    """The node is down while another client publishes 1,000 credits; after it starts it has
    every one of them, once, and a restart adds nothing."""
    settings = node_settings.replace(relays=(relay_process.url,), history_overlap_s=5)
    events = credits(CONTROLLER_SECRET, address, 1_000, per_second=100)
    await publish(relay_process.url, events)

    async with running_node(settings) as node:

        async def all_there() -> bool:
            return await postings_count(node) == 1_000

        await eventually(all_there, "1,000 postings")
        assert await balances(node) == totals(events)
        assert node.ingest.stats.appended == 1_000

        async def checkpointed() -> bool:
            return await node.checkpoints.get(relay_process.url) == events[-1].created_at

        await eventually(checkpointed, "the checkpoint")

    async with running_node(settings) as node:

        async def caught_up() -> bool:
            return node.ingest.stats.sessions >= 1 and node.ingest.queue.empty()

        await eventually(caught_up, "the second session")
        assert await postings_count(node) == 1_000
        assert await balances(node) == totals(events)
        assert node.ingest.stats.appended == 0


async def test_relay_restarted_in_the_middle_of_a_live_stream(
    relay_process: RelayProcess, node_settings: Settings, address: Address
) -> None:
    """Another client streams 400 credits; the relay restarts (same storage) half-way.
    The node reconnects, reads history from its checkpoint and ends with each credit once."""
    settings = node_settings.replace(
        relays=(relay_process.url,), relay_retry_ms_min=50, relay_retry_ms_max=500
    )
    events = credits(CONTROLLER_SECRET, address, 400, per_second=40)
    async with running_node(settings) as node, patient_client(relay_process.url) as client:

        async def connected() -> bool:
            return node.ingest.stats.sessions >= 1

        await eventually(connected, "the first session")
        await publish_until_accepted(client, relay_process.url, events[:200])

        async def half() -> bool:
            return await postings_count(node) >= 100

        await eventually(half, "part of the stream")
        streaming = asyncio.create_task(
            publish_until_accepted(client, relay_process.url, events[200:])
        )
        await asyncio.to_thread(relay_process.stop)
        await asyncio.to_thread(relay_process.start)
        await streaming

        async def everything() -> bool:
            return await postings_count(node) == 400

        await eventually(everything, "all 400 postings")
        assert await balances(node) == totals(events)
        assert node.ingest.stats.appended == 400
        assert node.ingest.stats.sessions >= 2
