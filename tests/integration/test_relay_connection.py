"""The relay connection against relays that misbehave: a scripted NIP-01 server on 127.0.0.1
(aiohttp) that goes silent, closes queries, drops the socket or answers OK without an id."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import WSMsgType, web

from dsproxy.adapters.relay import RelayConnection, RelayUnavailable
from dsproxy.domain.publication import RelayAnswer
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.messages import Transaction
from tests.conftest import CONTROLLER_SECRET
from tests.integration.relay_fixtures import USERS, free_port

Script = Callable[[web.WebSocketResponse, list[Any]], Awaitable[None]]
"""How the scripted relay answers one client message (a parsed NIP-01 array)."""


@contextlib.asynccontextmanager
async def scripted_relay(answer: Script, *, handshake_s: float = 0.0) -> AsyncIterator[str]:
    async def socket(request: web.Request) -> web.WebSocketResponse:
        await asyncio.sleep(handshake_s)  # a relay far away, or busy, is slow to connect
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await answer(ws, orjson.loads(message.data))
        return ws

    app = web.Application()
    app.router.add_get("/", socket)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"ws://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def connected(url: str, timeout_s: float = 5) -> AsyncIterator[RelayConnection]:
    connection = RelayConnection(url, timeout_s=timeout_s)
    await connection.open()
    try:
        yield connection
    finally:
        await connection.close()


def credit(address: Address, tokens: int) -> dict[str, Any]:
    return seal(Transaction(USERS[0], tokens), address, CONTROLLER_SECRET).to_obj()


async def test_a_silent_relay_fails_the_page_after_the_timeout() -> None:
    async def silent(ws: web.WebSocketResponse, message: list[Any]) -> None:
        return None

    async with scripted_relay(silent) as url, connected(url, 1) as connection:
        with pytest.raises(RelayUnavailable, match="neither events nor EOSE for 1 s"):
            await connection.fetch_page({"kinds": [1573]})


async def test_a_relay_that_sends_slowly_is_read_to_its_eose(address: Address) -> None:
    """A page was failed when `timeout_s` passed without a full chunk, throwing away what had
    come: a relay sending a few events a second was never read, session after session."""
    events = [credit(address, tokens) for tokens in range(1, 7)]

    async def drips(ws: web.WebSocketResponse, message: list[Any]) -> None:
        if message[0] == "REQ":
            for event in events:
                await ws.send_str(orjson.dumps(["EVENT", message[1], event]).decode())
                await asyncio.sleep(0.3)
            await ws.send_str(orjson.dumps(["EOSE", message[1]]).decode())

    async with scripted_relay(drips) as url, connected(url, 1) as connection:
        assert await connection.fetch_page({"kinds": [1573]}) == events


async def test_a_closed_query_fails_with_the_relays_reason(address: Address) -> None:
    async def closes(ws: web.WebSocketResponse, message: list[Any]) -> None:
        if message[0] == "REQ":
            await ws.send_str(orjson.dumps(["EVENT", message[1], credit(address, 1)]).decode())
            await ws.send_str(orjson.dumps(["CLOSED", message[1], "error: too busy"]).decode())

    async with scripted_relay(closes) as url, connected(url) as connection:
        with pytest.raises(RelayUnavailable, match="closed: error: too busy"):
            await connection.fetch_page({"kinds": [1573]})


async def test_a_dropped_socket_fails_the_page_and_is_reported_lost(address: Address) -> None:
    """Events before the drop are not a page: the caller must not take them as complete."""

    async def drops(ws: web.WebSocketResponse, message: list[Any]) -> None:
        if message[0] == "REQ":
            await ws.send_str(orjson.dumps(["EVENT", message[1], credit(address, 1)]).decode())
            await ws.close()

    async with scripted_relay(drops) as url, connected(url) as connection:
        with pytest.raises(RelayUnavailable, match="connection closed"):
            await connection.fetch_page({"kinds": [1573]})
        async with asyncio.timeout(5):
            assert "connection closed" in await connection.wait_lost()
        assert not connection.is_connected()


async def test_a_page_streams_in_chunks_before_its_eose(address: Address) -> None:
    """The relay holds back the second half of a page until the reader has the first: the
    reader gets events before the EOSE exists, then the rest, in order, once each."""
    events = [credit(address, tokens) for tokens in range(1, 601)]
    first_chunk_read = asyncio.Event()

    async def pages(ws: web.WebSocketResponse, message: list[Any]) -> None:
        if message[0] == "REQ":
            for index, obj in enumerate(events):
                if index == 300:
                    await first_chunk_read.wait()
                await ws.send_str(orjson.dumps(["EVENT", message[1], obj]).decode())
            await ws.send_str(orjson.dumps(["EOSE", message[1]]).decode())

    async with scripted_relay(pages) as url:
        connection = RelayConnection(url, timeout_s=5)
        await connection.open()
        chunks = []
        try:
            async for chunk in connection.read_page({"kinds": [1573]}, 256):
                chunks.append(chunk)
                first_chunk_read.set()
        finally:
            await connection.close()
    assert 256 <= len(chunks[0]) <= 300
    assert [obj for chunk in chunks for obj in chunk] == events


async def test_nonsense_from_a_relay_is_ignored(address: Address) -> None:
    """Messages that are not NIP-01 (a subscription id that is not text, no array at all)
    neither end the page nor the connection."""
    events = [credit(address, tokens) for tokens in (1, 2)]

    async def babbles(ws: web.WebSocketResponse, message: list[Any]) -> None:
        if message[0] == "REQ":
            for junk in (["EOSE", ["x"]], ["EVENT", 5, events[0]], {"EOSE": 1}, ["CLOSED", None]):
                await ws.send_str(orjson.dumps(junk).decode())
            for obj in events:
                await ws.send_str(orjson.dumps(["EVENT", message[1], obj]).decode())
            await ws.send_str(orjson.dumps(["EOSE", message[1]]).decode())

    async with scripted_relay(babbles) as url, connected(url) as connection:
        assert await connection.fetch_page({"kinds": [1573]}) == events
        assert connection.is_connected()


async def test_a_closed_after_the_eose_does_not_undo_the_page(address: Address) -> None:
    events = [credit(address, tokens) for tokens in (1, 2)]

    async def closes_late(ws: web.WebSocketResponse, message: list[Any]) -> None:
        if message[0] == "REQ":
            for obj in events:
                await ws.send_str(orjson.dumps(["EVENT", message[1], obj]).decode())
            await ws.send_str(orjson.dumps(["EOSE", message[1]]).decode())
            await ws.send_str(orjson.dumps(["CLOSED", message[1], "done"]).decode())
            await ws.close()

    async with scripted_relay(closes_late) as url, connected(url) as connection:
        chunks = connection.read_page({"kinds": [1573]})
        await asyncio.sleep(0.2)  # the EOSE, the CLOSED and the drop all arrive first
        assert [obj async for chunk in chunks for obj in chunk] == events


async def test_an_ok_without_an_id_answers_the_event_in_flight(address: Address) -> None:
    """nostr-relay refuses an event with `["OK", "", false, reason]`: it is that event's
    answer (one publish at a time), and an `invalid:` reason is permanent."""

    async def refuses(ws: web.WebSocketResponse, message: list[Any]) -> None:
        if message[0] == "EVENT":
            await ws.send_str(orjson.dumps(["OK", "", False, "invalid: too large"]).decode())

    event = seal(Transaction(USERS[0], 5), address, CONTROLLER_SECRET)
    async with scripted_relay(refuses) as url, connected(url) as connection:
        result = await connection.publish(event)
    assert result.answer is RelayAnswer.REJECTED
    assert result.reason == "invalid: too large"


async def test_an_unreachable_relay_is_reported_not_raised(address: Address) -> None:
    connection = RelayConnection(f"ws://127.0.0.1:{free_port()}", timeout_s=2)
    with pytest.raises(RelayUnavailable, match="cannot connect"):
        await connection.open()
    with pytest.raises(RelayUnavailable, match="not a valid websocket URL"):
        await RelayConnection("http://127.0.0.1:1", timeout_s=2).open()


async def test_an_ok_whose_flag_is_not_true_is_a_refusal(address: Address) -> None:
    async def says_false_as_text(ws: web.WebSocketResponse, message: list[Any]) -> None:
        if message[0] == "EVENT":
            reply = ["OK", message[1]["id"], "false", "error: could not save"]
            await ws.send_str(orjson.dumps(reply).decode())

    event = seal(Transaction(USERS[0], 6), address, CONTROLLER_SECRET)
    async with scripted_relay(says_false_as_text) as url, connected(url) as connection:
        result = await connection.publish(event)
    assert result.answer is RelayAnswer.REJECTED
    assert result.reason == "error: could not save"


async def test_one_acknowledgement_is_enough_and_a_silent_relay_holds_nothing_back(
    address: Address,
) -> None:
    """A relay that takes events and never answers must not hold each publication for its
    whole timeout once another relay has acknowledged it: it gets ACK_GRACE_S."""
    from dsproxy.adapters.relay import RelayPublisher

    async def accepts(ws: web.WebSocketResponse, message: list[Any]) -> None:
        if message[0] == "EVENT":
            await ws.send_str(orjson.dumps(["OK", message[1]["id"], True, ""]).decode())

    async def never_answers(ws: web.WebSocketResponse, message: list[Any]) -> None:
        return None

    timeout_s = 30.0
    async with scripted_relay(accepts) as good, scripted_relay(never_answers) as silent:
        publisher = RelayPublisher([silent, good], timeout_s=timeout_s)
        try:
            for tokens in (7, 8, 9):
                event = seal(Transaction(USERS[0], tokens), address, CONTROLLER_SECRET)
                async with asyncio.timeout(timeout_s / 2):  # never the silent relay's timeout
                    results = await publisher.publish(event)
                assert [r.answer for r in results] == [
                    RelayAnswer.UNREACHABLE,
                    RelayAnswer.ACCEPTED,
                ], results
                assert results[0].relay == silent
                # the first is left to finish in the background; the relay is busy with it
                assert "another relay acknowledged" in results[0].reason or (
                    "still busy with an earlier event" in results[0].reason
                )
        finally:
            await publisher.close()


async def test_a_relay_that_trickles_events_without_eose_is_not_waited_for_forever(
    address: Address,
) -> None:
    """After a missing OK the relay is asked whether it has the event; one that answers with
    an endless trickle and no EOSE is unreachable after twice the timeout, not waited on."""

    async def trickles(ws: web.WebSocketResponse, message: list[Any]) -> None:
        if message[0] == "REQ":
            for tokens in range(10_000):
                obj = credit(address, 1_000 + tokens)
                await ws.send_str(orjson.dumps(["EVENT", message[1], obj]).decode())
                await asyncio.sleep(0.05)

    event = seal(Transaction(USERS[0], 10), address, CONTROLLER_SECRET)
    async with scripted_relay(trickles) as url, connected(url, timeout_s=0.5) as connection:
        async with asyncio.timeout(20):
            result = await connection.publish(event)
    assert result.answer is RelayAnswer.UNREACHABLE
    assert "no answer to a query" in result.reason


async def test_a_relay_slow_to_connect_still_gets_the_events_after_it_connected(
    address: Address,
) -> None:
    """The others were cancelled 0.5 s after one relay's OK, mid-connect: a relay whose
    handshake takes a second never got a single event, and each attempt reset a connection."""
    from dsproxy.adapters.relay import RelayPublisher

    stored: dict[str, list[str]] = {"fast": [], "slow": []}

    def accepting(name: str) -> Script:
        async def accepts(ws: web.WebSocketResponse, message: list[Any]) -> None:
            if message[0] == "EVENT":
                stored[name].append(message[1]["id"])
                await ws.send_str(orjson.dumps(["OK", message[1]["id"], True, ""]).decode())

        return accepts

    async with (
        scripted_relay(accepting("fast")) as fast,
        scripted_relay(accepting("slow"), handshake_s=1.0) as slow,
    ):
        publisher = RelayPublisher([fast, slow], timeout_s=10)
        try:
            events = [seal(Transaction(USERS[0], t), address, CONTROLLER_SECRET) for t in (1, 2, 3)]
            first = await publisher.publish(events[0])  # the slow one is still connecting
            assert first[0].answer is RelayAnswer.ACCEPTED
            await asyncio.sleep(1.5)  # it has connected, and taken the first event
            for event in events[1:]:
                results = await publisher.publish(event)
                assert [r.answer for r in results] == [RelayAnswer.ACCEPTED] * 2, results
        finally:
            await publisher.close()
    assert stored["slow"] == [event.id for event in events]
