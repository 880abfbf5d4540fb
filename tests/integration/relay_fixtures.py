"""Relay fixtures: nostr-sdk's in-process LocalRelay, a plain publishing client, a running Node.

Import the fixtures into a test module with `from tests.integration.relay_fixtures import *`-free
explicit names; helpers are plain functions so e2e tests can share them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import nostr_sdk
import orjson
import pytest
from solders.keypair import Keypair

from dsproxy.adapters.node_keys import create_key_file
from dsproxy.adapters.relay import build_local_relay
from dsproxy.config import Settings
from dsproxy.services.node import Node
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.event import NostrEvent
from dsproxy.wire.messages import Transaction, parse_message

USERS = tuple(str(Keypair.from_seed(bytes([60 + index]) * 32).pubkey()) for index in range(4))
WAIT_S_MAX = 60.0  # bounded polling: a generous ceiling, never a timing assertion


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = WAIT_S_MAX
) -> None:
    """Poll `check` until it is true; fail (naming `what`) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def credits(
    secret: str, address: Address, count: int, *, per_second: int = 100, first_tokens: int = 1
) -> list[NostrEvent]:
    """`count` distinct credits (tokens first_tokens, first_tokens + 1, ...) over the users,
    `per_second` of them sharing each second, the newest now."""
    now = int(time.time())
    return [
        seal(
            Transaction(USERS[index % len(USERS)], first_tokens + index),
            address,
            secret,
            created_at=now - (count - 1 - index) // per_second,
        )
        for index in range(count)
    ]


def totals(events: Sequence[NostrEvent]) -> list[int]:
    """The balance of each of USERS that these credits (and debits) add up to."""
    sums = dict.fromkeys(USERS, 0)
    for event in events:
        message = parse_message(event.content)
        assert isinstance(message, Transaction)
        sums[message.user] += message.tokens
    return [sums[user] for user in USERS]


async def balances(node: Node) -> list[int]:
    return [await balance(node, user) for user in USERS]


async def publish(url: str, events: Sequence[NostrEvent]) -> None:
    """Another client: publish each event and require the relay's OK."""
    client = nostr_sdk.Client()
    relay_url = nostr_sdk.RelayUrl.parse(url)
    await client.add_relay(relay_url)
    await client.try_connect(datetime.timedelta(seconds=10))
    try:
        for event in events:
            output = await client.send_event(nostr_sdk.Event.from_json(event.to_json()))
            assert relay_url in output.success, output.failed
    finally:
        await client.shutdown()


async def fetch_ids(url: str, address: Address) -> set[str]:
    """Ids of every session event the relay holds (paged by the adapter under test)."""
    from dsproxy.adapters.relay import RelayConnection, fetch_history

    connection = RelayConnection(url)
    await connection.open()
    try:
        return {
            str(obj["id"])
            async for page in fetch_history(connection, address, 0, 500)
            for obj in page.events
        }
    finally:
        await connection.close()


@pytest.fixture
async def local_relay() -> AsyncIterator[str]:
    """A LocalRelay on a free port, rate limit raised, 500 events per query at most."""
    relay = build_local_relay(port=free_port())
    await relay.run()
    url = str(await relay.url())
    yield url
    relay.shutdown()


def node_key(directory: Path) -> Path:
    path = directory / "node.key"
    if not path.exists():
        create_key_file(path)
    return path


@contextlib.asynccontextmanager
async def running_node(settings: Settings) -> AsyncIterator[Node]:
    """A Node running as a task; stopped cleanly (and its files closed) on exit."""
    node = await Node.open(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(node.run(stop))
    try:
        yield node
    finally:
        stop.set()
        try:
            await task
        finally:
            await node.aclose()


async def balance(node: Node, user: str) -> int:
    account = await node.ledger.db.account(user)
    return 0 if account is None else account.balance


async def postings_count(node: Node) -> int:
    return (await node.ledger.db.counts())["postings"]


class Listener:
    """Another client subscribed to the session: the ids it receives, in arrival order."""

    def __init__(self, url: str, address: Address) -> None:
        self.url, self.address = url, address
        self.ids: list[str] = []
        self._client: nostr_sdk.Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from dsproxy.adapters.relay import session_filter

        client = self._client = nostr_sdk.Client()
        relay_url = nostr_sdk.RelayUrl.parse(self.url)
        await client.add_relay(relay_url)
        stream = client.notifications()
        await client.try_connect(datetime.timedelta(seconds=10))
        query = orjson.dumps(session_filter(self.address, limit=1)).decode()
        await client.subscribe(nostr_sdk.ReqTarget.auto([nostr_sdk.Filter.from_json(query)]))
        self._task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: nostr_sdk.ClientNotificationStream) -> None:
        while (notification := await stream.next()) is not None:
            if notification.is_new_event():
                self.ids.append(notification.event.id().to_hex())

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.shutdown()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
