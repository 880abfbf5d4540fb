"""The balance projection on real SQLite files: equals the pure fold, resumes, rebuilds."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import orjson
import pytest

from dsproxy.adapters.event_store import AsyncEventStore
from dsproxy.bootstrap import open_ledger, trust_policy
from dsproxy.config import Settings
from dsproxy.domain.transactions import entry_from_event
from dsproxy.services.projector import rebuild
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.event import NostrEvent, sign_event
from dsproxy.wire.messages import Transaction
from projections import Entry, Ledger, fold
from tests.builders import credit, debit
from tests.conftest import CONTROLLER_SECRET, STRANGER_SECRET

ALICE = "Dp5nyDG2fjpVy99TtJrKCTsXoeFieTJNeYr2wz6TFT3h"
BOB = "7U84W13X2v7Uj99sDc9gRjyoDp5xHnSchdc8HqHwJ3Qb"


def mixed_history(address: Address) -> list[NostrEvent]:
    """Trusted credits and debits, with untrusted, swapped, off-topic and malformed events."""
    return [
        credit(address, ALICE, 1_000),
        credit(address, BOB, 500),
        debit(address, ALICE, 120),
        credit(address, ALICE, 9_999, secret=STRANGER_SECRET),  # anyone can mint: not here
        debit(address, BOB, 10, secret=CONTROLLER_SECRET),  # a controller may not debit
        seal(Transaction(BOB, 5), Address("other-session", address.machine), CONTROLLER_SECRET),
        sign_event(
            CONTROLLER_SECRET,
            1573,
            [["s", address.session], ["p", address.machine]],
            '{"Transaction":{"user":"nope","tokens":5}}',
            1_767_225_700,
        ),
        debit(address, BOB, 50),
        credit(address, ALICE, 1),
    ]


def tables(path: Path) -> dict[str, list[tuple]]:
    connection = sqlite3.connect(path)
    try:
        return {
            table: connection.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("accounts", "postings", "ignored")
        }
    finally:
        connection.close()


async def test_projection_equals_the_pure_fold(node_settings: Settings, address: Address) -> None:
    history = mixed_history(address)
    node = await open_ledger(node_settings)
    await node.store.append_nostr(history)
    await node.projector.catch_up()
    entries = [e for e in map(entry_from_event, history) if isinstance(e, Entry)]
    expected = fold(entries, Ledger(trust_policy(node_settings))).ledger
    rows = {row.user: row for row in await node.db.accounts()}
    assert {u: r.balance for u, r in rows.items()} == {ALICE: 881, BOB: 450}
    for user, account in expected.accounts.items():
        assert (rows[user].credited, rows[user].debited) == (account.credited, account.debited)
    ignored = await node.db.ignored()
    assert len(ignored) == 4
    assert all(reason for _, _, reason in ignored)
    postings = await node.db.postings(ALICE)
    assert [p.tokens for p in postings] == [1_000, -120, 1]
    assert [p.event_id for p in postings] == [history[0].id, history[2].id, history[8].id]
    await node.aclose()


async def test_restart_resumes_exactly_where_it_stopped(
    node_settings: Settings, address: Address
) -> None:
    history = mixed_history(address)
    node = await open_ledger(node_settings)
    await node.store.append_nostr(history[:4])
    await node.projector.catch_up()
    await node.aclose()

    node = await open_ledger(node_settings)
    assert await node.db.position() == 4
    await node.store.append_nostr(history)  # the first four again: duplicates, no-ops
    result = await node.projector.catch_up()
    assert result.records == 5
    balances = {row.user: row.balance for row in await node.db.accounts()}
    assert balances == {ALICE: 881, BOB: 450}
    await node.aclose()


async def test_rebuild_gives_identical_tables(node_settings: Settings, address: Address) -> None:
    node = await open_ledger(node_settings)
    await node.store.append_nostr(mixed_history(address))
    await node.projector.catch_up()
    await node.aclose()
    before = tables(node_settings.projection_path)

    store = AsyncEventStore.open(node_settings.events_path)
    result = await rebuild(store, node_settings.projection_path, trust_policy(node_settings))
    await store.close()
    assert result.records == 9
    assert tables(node_settings.projection_path) == before


async def test_a_new_trust_policy_rebuilds_the_projection(
    node_settings: Settings, address: Address
) -> None:
    node = await open_ledger(node_settings)
    await node.store.append_nostr(mixed_history(address))
    await node.projector.catch_up()
    await node.aclose()

    from dsproxy.wire.event import public_key_of

    trusting_stranger = node_settings.replace(
        trusted_controllers=(*node_settings.trusted_controllers, public_key_of(STRANGER_SECRET))
    )
    node = await open_ledger(trusting_stranger)
    assert (await node.db.account(ALICE)).balance == 881 + 9_999
    await node.aclose()


async def test_concurrent_catch_ups_apply_each_event_once(
    node_settings: Settings, address: Address
) -> None:
    node = await open_ledger(node_settings)
    await node.store.append_nostr([credit(address, ALICE, 1) for _ in range(50)])
    await asyncio.gather(*(node.projector.catch_up() for _ in range(5)))
    row = await node.db.account(ALICE)
    assert (row.balance, row.entries) == (50, 50)
    await node.aclose()


async def test_two_processes_projecting_one_directory_count_each_event_once(
    node_settings: Settings, address: Address
) -> None:
    """A CLI command and a running node may both catch up the same projection file."""
    first = await open_ledger(node_settings)
    second = await open_ledger(node_settings)  # its own connections, as another process has
    await first.store.append_nostr([credit(address, ALICE, 1) for _ in range(30)])
    await second.projector.catch_up()  # warms its account cache, then falls behind
    await first.store.append_nostr([credit(address, ALICE, 1) for _ in range(30)])
    await first.projector.catch_up()
    await second.store.append_nostr([credit(address, ALICE, 1) for _ in range(30)])
    await asyncio.gather(first.projector.catch_up(), second.projector.catch_up())
    for node in (first, second):
        row = await node.db.account(ALICE)
        assert (row.balance, row.entries) == (90, 90)
    await first.aclose()
    await second.aclose()


async def test_content_nested_too_deep_to_write_back_is_ignored_and_folding_goes_on(
    node_settings: Settings, address: Address
) -> None:
    """orjson reads it (the door lets it in) but cannot write it back: it once stopped the
    projector at that position for good, freezing every balance."""
    tags = [["s", address.session], ["p", address.machine]]
    poison = sign_event(STRANGER_SECRET, 1573, tags, "[" * 300 + "]" * 300, 1_767_225_700)
    node = await open_ledger(node_settings)
    try:
        await node.store.append_nostr([poison, credit(address, ALICE, 40)])
        await node.projector.catch_up()
        assert [row.balance for row in await node.db.accounts()] == [40]
        ignored = await node.db.ignored()
        assert [(event_id, "malformed" in reason) for _, event_id, reason in ignored] == [
            (poison.id, True)
        ]
    finally:
        await node.aclose()


_LONG_NONCE_REQUEST = orjson.dumps(
    {
        "Request": {
            "to_status": "Working",
            "reason": "UserRequest",
            "initial_request": "0" * 64,
            "payload": '{"nonce":' + "1" * 5_000 + "}",
        }
    }
).decode()


@pytest.mark.parametrize(
    ("content", "created_at"),
    [
        # the door now refuses such dates; a store written before that may still hold one
        ('{"Request":{}}', 2**63),
        # anyone could sign it: the projector raised on it at every start, stopping every node
        (_LONG_NONCE_REQUEST, 1_767_225_700),
    ],
    ids=["date past sqlite integers", "integer too long to read"],
)
async def test_a_request_no_fold_can_read_does_not_stop_the_fold(
    node_settings: Settings, address: Address, content: str, created_at: int
) -> None:
    tags = [["s", address.session], ["p", address.machine]]
    poison = sign_event(STRANGER_SECRET, 1573, tags, content, created_at)
    node = await open_ledger(node_settings)
    try:
        await node.store.append_nostr([poison, credit(address, ALICE, 40)])
        await node.projector.catch_up()
        assert [row.balance for row in await node.db.accounts()] == [40]
    finally:
        await node.aclose()
