"""The outbox against a LocalRelay: order, outages, restarts and projection rebuilds."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from attrs import frozen

from dsproxy.adapters.event_store import AsyncEventStore
from dsproxy.adapters.node_keys import load_secret
from dsproxy.adapters.relay import build_local_relay
from dsproxy.bootstrap import fact_projections, trust_policy
from dsproxy.config import Settings
from dsproxy.services.node import Node
from dsproxy.services.outbox import list_outbox
from dsproxy.services.projector import rebuild
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.event import NostrEvent, public_key_of
from dsproxy.wire.messages import Transaction
from tests.integration.relay_fixtures import (
    USERS,
    Listener,
    balance,
    balances,
    credits,
    eventually,
    fetch_ids,
    free_port,
    local_relay,
    node_key,
    running_node,
    totals,
)
from tests.integration.test_ledger_cli import dsproxy
from tests.integration.test_relay_connection import Script, scripted_relay

__all__ = ["local_relay"]


def publishing_settings(node_settings: Settings, tmp_path: Path, relay: str) -> Settings:
    """A node whose own key is a trusted controller, so its credits move balances."""
    key_file = node_key(tmp_path)
    author = public_key_of(load_secret(key_file))
    return node_settings.replace(
        relays=(relay,),
        nostr_key_file=key_file,
        trusted_controllers=(author,),
        relay_retry_ms_min=50,
        relay_retry_ms_max=500,
    )


async def acknowledged(node: Node) -> int:
    rows = await node.ledger.db.fetch_all(
        "SELECT COUNT(*) FROM outbox WHERE status = 'acknowledged'"
    )
    return int(rows[0][0])


async def test_own_events_are_published_in_store_order(
    local_relay: str, node_settings: Settings, tmp_path: Path, address: Address
) -> None:
    """Appended events reach the relay once each, in the order they were stored."""
    settings = publishing_settings(node_settings, tmp_path, local_relay)
    secret = load_secret(settings.nostr_key_file)
    listener = Listener(local_relay, address)
    await listener.start()
    try:
        async with running_node(settings) as node:
            events = credits(secret, address, 50, per_second=10)
            await node.append(events)

            async def all_acknowledged() -> bool:
                return await acknowledged(node) == 50

            await eventually(all_acknowledged, "50 acknowledgements")
            assert await balances(node) == totals(events)
            assert await list_outbox(node.ledger.db) == []

        async def heard_all() -> bool:
            return len(set(listener.ids) & {e.id for e in events}) == 50

        await eventually(heard_all, "the listener to hear all 50")
    finally:
        await listener.stop()
    assert [i for i in listener.ids if i in {e.id for e in events}] == [e.id for e in events]


async def test_relay_down_while_producing_then_published_in_order(
    node_settings: Settings, tmp_path: Path, address: Address
) -> None:
    """Events made while no relay answers are published when it returns: in order, same ids."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    settings = publishing_settings(node_settings, tmp_path, url)
    secret = load_secret(settings.nostr_key_file)
    async with running_node(settings) as node:
        events = credits(secret, address, 20, per_second=5)
        await node.append(events)

        async def all_pending() -> bool:
            return len(await list_outbox(node.ledger.db)) == 20

        await eventually(all_pending, "20 pending events")
        assert node.outbox is not None and node.outbox.stats.acknowledged == 0
        assert await balances(node) == totals(events)  # our own facts count at once

        relay = build_local_relay(port=port)
        await relay.run()
        listener = Listener(url, address)
        await listener.start()
        try:

            async def all_acknowledged() -> bool:
                return await acknowledged(node) == 20

            await eventually(all_acknowledged, "20 acknowledgements after the outage")
            assert await fetch_ids(url, address) == {e.id for e in events}

            async def heard_all() -> bool:
                return len(listener.ids) >= 20

            await eventually(heard_all, "the listener to hear 20")
            assert listener.ids == [e.id for e in events]
        finally:
            await listener.stop()
            relay.shutdown()


async def test_acknowledgements_survive_restart_and_rebuild(
    local_relay: str, node_settings: Settings, tmp_path: Path, address: Address
) -> None:
    """After a restart, and after the projection is rebuilt, nothing is published again."""
    settings = publishing_settings(node_settings, tmp_path, local_relay)
    secret = load_secret(settings.nostr_key_file)
    events = credits(secret, address, 10)
    async with running_node(settings) as node:
        await node.append(events)

        async def all_acknowledged() -> bool:
            return await acknowledged(node) == 10

        await eventually(all_acknowledged, "10 acknowledgements")

    node = await Node.open(settings)
    try:
        await rebuild(
            node.ledger.store,
            settings.projection_path,
            trust_policy(settings),
            extensions=fact_projections(settings),
        )
    finally:
        await node.aclose()

    async with running_node(settings) as node:
        assert await acknowledged(node) == 10
        assert await list_outbox(node.ledger.db) == []
        more = credits(secret, address, 3, first_tokens=100)
        await node.append(more)

        async def thirteen() -> bool:
            return await acknowledged(node) == 13

        await eventually(thirteen, "13 acknowledgements")
        assert node.outbox is not None and node.outbox.stats.attempts == 3


def relay_with_a_window(
    stored: dict[str, dict[str, Any]],
    window_s: int = 10,
    *,
    clock_ahead_s: int = 0,
    closes_ids_queries: bool = False,
) -> Script:
    """A relay that refuses events older than `window_s` by its clock (`clock_ahead_s` ahead of
    ours), as the DePHY relay does (~30 s), even one it has already; answers `ids` queries (or
    closes them), and any other query with all it has."""

    async def answer(ws: web.WebSocketResponse, message: list[Any]) -> None:
        if message[0] == "REQ" and closes_ids_queries and "ids" in message[2]:
            await ws.send_str(orjson.dumps(["CLOSED", message[1], "restricted: no"]).decode())
            return
        if message[0] == "EVENT":
            event = message[1]
            if event["created_at"] < time.time() + clock_ahead_s - window_s:
                reply = ["OK", event["id"], False, "invalid: created_at too old"]
            else:
                stored[event["id"]] = event
                reply = ["OK", event["id"], True, ""]
            await ws.send_str(orjson.dumps(reply).decode())
        elif message[0] == "REQ":
            wanted = message[2].get("ids")
            for event in list(stored.values()):
                if wanted is None or event["id"] in wanted:
                    await ws.send_str(orjson.dumps(["EVENT", message[1], event]).decode())
            await ws.send_str(orjson.dumps(["EOSE", message[1]]).decode())

    return answer


async def outbox_rows(node: Node) -> dict[str, str]:
    rows = await node.ledger.db.fetch_all("SELECT event_id, status FROM outbox")
    return {str(event_id): str(status) for event_id, status in rows}


async def until_outbox_holds(node: Node, statuses: list[str], what: str) -> None:
    """Wait until the outbox's rows have these statuses (in any order)."""

    async def reached() -> bool:
        return sorted((await outbox_rows(node)).values()) == sorted(statuses)

    await eventually(reached, what)


async def the_first_fails_and_the_next_is_published(
    settings: Settings, failing: NostrEvent, following: NostrEvent
) -> None:
    """A node publishing both: the first fails for good, and does not hold the next one back."""
    async with running_node(settings) as node:
        await node.append([failing, following])
        await until_outbox_holds(node, ["acknowledged", "failed"], "both settled")
        assert await outbox_rows(node) == {failing.id: "failed", following.id: "acknowledged"}


@frozen
class StaleCredit:
    settings: Settings  # a node publishing to the relay below
    event: NostrEvent  # a credit of 700 signed two minutes ago by the node's key
    stored: dict[str, dict[str, Any]]  # what the relay holds, by id


@contextlib.asynccontextmanager
async def a_stale_credit(
    node_settings: Settings, tmp_path: Path, address: Address, **relay: Any
) -> AsyncIterator[StaleCredit]:
    """A relay with a `created_at` window (see `relay_with_a_window`) and a credit past it."""
    stored: dict[str, dict[str, Any]] = {}
    async with scripted_relay(relay_with_a_window(stored, **relay)) as url:
        settings = publishing_settings(node_settings, tmp_path, url)
        secret = load_secret(settings.nostr_key_file)
        old = seal(Transaction(USERS[0], 700), address, secret, int(time.time()) - 120)
        yield StaleCredit(settings, old, stored)


async def test_an_event_kept_past_the_relays_window_is_signed_again_and_counted_once(
    node_settings: Settings, node_env: dict[str, str], tmp_path: Path, address: Address
) -> None:
    """A credit kept through an outage longer than the relay's `created_at` window was refused
    as `invalid:` and failed for good: the user paid, and no one else ever saw the credit."""
    async with a_stale_credit(node_settings, tmp_path, address) as stale:
        settings, old, stored = stale.settings, stale.event, stale.stored
        async with running_node(settings) as node:
            await node.append([old])
            await until_outbox_holds(node, ["acknowledged", "replaced"], "the credit signed again")
            (new,) = stored.values()
            assert (new["content"], new["tags"]) == (old.content, [list(t) for t in old.tags])
            assert new["id"] != old.id
            assert (await outbox_rows(node))[old.id] == "replaced"
            await node.ledger.projector.catch_up()
            assert await balance(node, USERS[0]) == 700  # the old one, not both
            assert [p.event_id for p in await node.ledger.db.postings(USERS[0])] == [new["id"]]
            assert node.outbox is not None and node.outbox.stats.replaced == 1
        policy = trust_policy(settings)
        projection = settings.data_dir / "projection.sqlite"
        store = AsyncEventStore.open(settings.data_dir / "events.sqlite")
        try:
            await rebuild(store, projection, policy, extensions=fact_projections(settings))
        finally:
            await store.close()
        async with running_node(settings.replace(relays=())) as node:
            assert await balance(node, USERS[0]) == 700
            assert [p.event_id for p in await node.ledger.db.postings(USERS[0])] == [new["id"]]
    # an export has what relays have: imported elsewhere (no fact says which replaced which),
    # the old one and its replacement were both counted
    exported = tmp_path / "exported.jsonl"
    env = {"DSPROXY_DATA_DIR": str(settings.data_dir)}
    assert dsproxy({**node_env, **env}, "export", str(exported)).returncode == 0
    assert [json.loads(line)["id"] for line in exported.read_text().splitlines()] == [new["id"]]


async def test_an_event_a_relay_has_though_it_refuses_its_age_is_published(
    node_settings: Settings, tmp_path: Path, address: Address
) -> None:
    """An attempt whose OK was lost may have landed: signing again would count it twice."""
    async with a_stale_credit(node_settings, tmp_path, address) as stale:
        settings, old, stored = stale.settings, stale.event, stale.stored
        stored[old.id] = old.to_obj()
        async with running_node(settings) as node:
            await node.append([old])

            async def published() -> bool:
                return await outbox_rows(node) == {old.id: "acknowledged"}

            await eventually(published, "the credit counted as published")
            assert list(stored) == [old.id]


async def test_an_event_refused_for_age_however_fresh_fails_and_the_node_goes_on(
    node_settings: Settings, tmp_path: Path, address: Address
) -> None:
    """A relay whose clock is ahead of ours by more than its window refuses every replacement
    too: each was signed again at once, until no second was free and the node stopped."""
    async with a_stale_credit(node_settings, tmp_path, address, clock_ahead_s=60) as stale:
        settings, old, stored = stale.settings, stale.event, stale.stored
        async with running_node(settings) as node:
            await node.append([old])
            await until_outbox_holds(node, ["failed", "replaced"], "the replacement failed")
            assert node.outbox is not None and node.outbox.stats.replaced == 1
            assert await balance(node, USERS[0]) == 700
        assert stored == {}


async def test_a_relay_that_will_not_say_whether_it_has_the_event_holds_nothing_back(
    node_settings: Settings, tmp_path: Path, address: Address
) -> None:
    """Asking relays whether they have a stale event must not wait forever on one that will
    not answer: every later event of ours waited behind it."""
    async with a_stale_credit(node_settings, tmp_path, address, closes_ids_queries=True) as stale:
        settings, old, stored = (
            stale.settings.replace(publish_rejections_max=3),
            stale.event,
            stale.stored,
        )
        later = seal(Transaction(USERS[1], 5), address, load_secret(settings.nostr_key_file))
        await the_first_fails_and_the_next_is_published(settings, old, later)
        assert list(stored) == [later.id]


async def test_an_event_failed_after_passing_refusals_is_published_once_a_relay_takes_it(
    node_settings: Settings, tmp_path: Path, address: Address
) -> None:
    """A relay that says `error:` for a while (its database locked, say) used up an event's
    rejection budget, and the event was failed for good: a credit the controller had counted
    never reached the network. Failed events are offered again; once one is taken it is
    published (and never signed again)."""
    refusing = {"on": True}
    stored: dict[str, dict[str, Any]] = {}

    async def moody(ws: web.WebSocketResponse, message: list[Any]) -> None:
        if message[0] == "EVENT":
            event = message[1]
            if refusing["on"]:
                reply = ["OK", event["id"], False, "error: database is locked"]
            else:
                stored[event["id"]] = event
                reply = ["OK", event["id"], True, ""]
            await ws.send_str(orjson.dumps(reply).decode())
        elif message[0] == "REQ":
            await ws.send_str(orjson.dumps(["EOSE", message[1]]).decode())

    async with scripted_relay(moody) as url:
        settings = publishing_settings(node_settings, tmp_path, url).replace(
            publish_rejections_max=2, publish_failed_retry_s=1
        )
        credit = seal(Transaction(USERS[0], 42), address, load_secret(settings.nostr_key_file))
        async with running_node(settings) as node:
            await node.append([credit])
            await until_outbox_holds(node, ["failed"], "the credit failed after two refusals")
            refusing["on"] = False
            await until_outbox_holds(node, ["acknowledged"], "the failed credit published")
            assert node.outbox is not None and node.outbox.stats.replaced == 0
        assert list(stored) == [credit.id]


async def test_a_node_restored_from_a_relay_does_not_publish_its_history_again(
    local_relay: str, node_settings: Settings, tmp_path: Path, address: Address
) -> None:
    """`replay --from-relay` into a new data directory stored the node's own events with no
    word of their publication: the outbox published the whole history again, and signed
    again those a relay refused for their age (which nodes holding the first count twice)."""
    from dsproxy.bootstrap import own_pubkey
    from dsproxy.services.ingest import fetch_into_store

    settings = publishing_settings(node_settings, tmp_path, local_relay)
    events = credits(load_secret(settings.nostr_key_file), address, 5, per_second=5)
    async with running_node(settings) as node:
        await node.append(events)

        async def published() -> bool:
            return await acknowledged(node) == 5

        await eventually(published, "5 acknowledgements")

    restored = settings.replace(data_dir=tmp_path / "restored")
    store = AsyncEventStore.open(restored.events_path)
    try:
        report = await fetch_into_store(
            local_relay, store, address, own_pubkey=own_pubkey(restored)
        )
    finally:
        await store.close()
    assert report.appended == 5
    async with running_node(restored) as node:
        await until_outbox_holds(node, ["acknowledged"] * 5, "the restored history folded")
        assert await balances(node) == totals(events)
        assert node.outbox is not None and node.outbox.stats.attempts == 0


async def test_an_event_a_relay_drops_the_connection_on_does_not_hold_back_the_next(
    node_settings: Settings, tmp_path: Path, address: Address
) -> None:
    """A relay that closes the socket whenever it is sent one particular event: that was an
    outage, never counted, and every later event waited behind it for good."""
    stored: dict[str, dict[str, Any]] = {}
    poison: dict[str, str] = {}

    async def drops_on_one(ws: web.WebSocketResponse, message: list[Any]) -> None:
        if message[0] == "EVENT":
            event = message[1]
            if event["id"] == poison.get("id"):
                await ws.close()
                return
            stored[event["id"]] = event
            await ws.send_str(orjson.dumps(["OK", event["id"], True, ""]).decode())
        elif message[0] == "REQ":
            await ws.send_str(orjson.dumps(["EOSE", message[1]]).decode())

    async with scripted_relay(drops_on_one) as url:
        settings = publishing_settings(node_settings, tmp_path, url).replace(
            publish_rejections_max=2
        )
        secret = load_secret(settings.nostr_key_file)
        bad, good = (seal(Transaction(USERS[0], t), address, secret) for t in (13, 14))
        poison["id"] = bad.id
        await the_first_fails_and_the_next_is_published(settings, bad, good)
        assert list(stored) == [good.id]


async def test_a_failed_event_refused_for_its_age_when_offered_again_is_signed_again(
    node_settings: Settings, tmp_path: Path, address: Address
) -> None:
    """A failed event is offered again minutes later, by which time a relay with a
    `created_at` window refuses it for its age: that answer was ignored, and the event stayed
    failed for good. It now goes the way of a pending one: signed again, counted once."""
    refusing = {"on": True}
    stored: dict[str, dict[str, Any]] = {}
    windowed = relay_with_a_window(stored, window_s=3)

    async def moody_then_windowed(ws: web.WebSocketResponse, message: list[Any]) -> None:
        if message[0] == "EVENT" and refusing["on"]:
            reply = ["OK", message[1]["id"], False, "error: database is locked"]
            await ws.send_str(orjson.dumps(reply).decode())
        else:
            await windowed(ws, message)

    async with scripted_relay(moody_then_windowed) as url:
        settings = publishing_settings(node_settings, tmp_path, url).replace(
            publish_rejections_max=2, publish_failed_retry_s=1
        )
        secret = load_secret(settings.nostr_key_file)
        old = seal(Transaction(USERS[0], 700), address, secret, int(time.time()) - 60)
        async with running_node(settings) as node:
            await node.append([old])
            await until_outbox_holds(node, ["failed"], "the credit failed after two refusals")
            refusing["on"] = False
            await until_outbox_holds(node, ["replaced", "acknowledged"], "signed again")
            assert await balance(node, USERS[0]) == 700
        assert list(stored) != [old.id] and len(stored) == 1
