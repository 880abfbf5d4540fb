"""The outbox against the real nostr-relay process: outages, order, permanent rejections."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dsproxy.adapters.node_keys import load_secret
from dsproxy.config import Settings
from dsproxy.services.outbox import list_outbox
from dsproxy.wire.envelope import Address
from dsproxy.wire.event import sign_event
from tests.e2e.relay_process import MAX_EVENT_SIZE, RelayProcess
from tests.integration.relay_fixtures import (
    Listener,
    balances,
    credits,
    eventually,
    fetch_ids,
    running_node,
    totals,
)
from tests.integration.test_outbox import acknowledged, publishing_settings

pytestmark = pytest.mark.e2e


async def test_relay_unreachable_while_producing_then_published_in_order(
    node_settings: Settings, tmp_path: Path, address: Address
) -> None:
    """The relay process is down while the node makes 30 events; once it is up they are
    published in store order with their original ids, and the relay holds each once."""
    relay = RelayProcess(tmp_path / "relay")
    settings = publishing_settings(node_settings, tmp_path, relay.url)
    secret = load_secret(settings.nostr_key_file)
    events = credits(secret, address, 30, per_second=10)
    try:
        async with running_node(settings) as node:
            await node.append(events)

            async def all_pending() -> bool:
                return len(await list_outbox(node.ledger.db)) == 30

            await eventually(all_pending, "30 pending events")
            assert await balances(node) == totals(events)

            relay.start()
            listener = Listener(relay.url, address)
            await listener.start()
            try:

                async def all_acknowledged() -> bool:
                    return await acknowledged(node) == 30

                await eventually(all_acknowledged, "30 acknowledgements")

                async def heard_all() -> bool:
                    return len(listener.ids) >= 30

                await eventually(heard_all, "the listener to hear 30")
            finally:
                await listener.stop()
            assert listener.ids == [event.id for event in events]
            assert await fetch_ids(relay.url, address) == {event.id for event in events}
    finally:
        relay.stop()


async def test_permanent_rejection_is_recorded_and_does_not_block(
    node_settings: Settings, tmp_path: Path, address: Address
) -> None:
    """An event the relay refuses (too large) is recorded as failed with a reason; the events
    after it are still published. nostr-relay answers this refusal with an OK whose id is
    empty; one publish at a time per connection ties it to our event, and its `invalid:`
    prefix makes it permanent: no retry."""
    relay = RelayProcess(tmp_path / "relay")
    relay.start()
    try:
        settings = publishing_settings(node_settings, tmp_path, relay.url).replace(
            relay_timeout_s=3, publish_rejections_max=2
        )
        secret = load_secret(settings.nostr_key_file)
        tags = (("s", address.session), ("p", address.machine))
        too_large = sign_event(
            secret, 1573, tags, '{"note": "%s"}' % ("x" * MAX_EVENT_SIZE), int(time.time())
        )
        after = credits(secret, address, 5, first_tokens=10)
        async with running_node(settings) as node:
            await node.append([too_large, *after])

            async def settled() -> bool:
                return await acknowledged(node) == 5

            await eventually(settled, "the 5 events after the rejected one")
            failed = await list_outbox(node.ledger.db, ("failed",))
            assert [row.event_id for row in failed] == [too_large.id]
            assert failed[0].rejections == 0
            assert (
                failed[0].reason
                == f"{relay.url}: invalid: 280 characters should be enough for anybody"
            )
            assert await list_outbox(node.ledger.db, ("pending",)) == []
        assert await fetch_ids(relay.url, address) == {event.id for event in after}
    finally:
        relay.stop()
