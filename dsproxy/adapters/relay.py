"""Nostr relays through nostr-sdk: one connection, history pages, live events, publishing.

A `RelayConnection` is one websocket to one relay with nostr-sdk's own reconnect turned off: the
ingest and the outbox decide when to retry, so that every reconnect is followed by a history
fetch from the checkpoint. Relay messages are read raw (`RelayMessage.as_json()`), so a history
page is known to be complete only when its EOSE arrives, and events go to the caller as the
relay sent them; the caller verifies them (id and signature) before anything else.

Paging: relays return the newest `limit` events of a filter, at most `events_per_page_max`
(LocalRelay 500), so history is read newest first by moving `until` down. Relays disagree on
whether `until` is inclusive (NIP-01, LocalRelay) or exclusive (nostr-relay), so the next page
re-asks for the oldest second of the last one and duplicates are dropped by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import nostr_sdk
import orjson
from attrs import frozen

from dsproxy.domain.publication import RelayAnswer, RelayResult, answer_of
from dsproxy.errors import DsproxyError
from dsproxy.wire.envelope import DEPHY_KIND, Address
from dsproxy.wire.event import NostrEvent

__all__ = [
    "EventSink",
    "RelayConnection",
    "RelayPublisher",
    "RelayUnavailable",
    "build_local_relay",
    "fetch_history",
    "next_until",
    "session_filter",
]

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, Any]], Awaitable[None]]
"""Receives (relay url, event object as the relay sent it, not yet verified)."""

_subscription_numbers = itertools.count(1)


class RelayUnavailable(DsproxyError):
    """A relay could not be reached, closed our subscription or stopped answering."""


def session_filter(
    address: Address, since: int | None = None, until: int | None = None, limit: int | None = None
) -> dict[str, Any]:
    """The NIP-01 filter of our session and machine: kind 1573, `#s`, `#p`."""
    query: dict[str, Any] = {
        "kinds": [DEPHY_KIND],
        "#s": [address.session],
        "#p": [address.machine],
    }
    for key, value in (("since", since), ("until", until), ("limit", limit)):
        if value is not None:
            query[key] = value
    return query


def next_until(
    created_ats: Sequence[int], until: int | None, since: int, page_limit: int, fresh: int
) -> int | None:
    """The `until` of the next history page, or None when the history is complete.

    A short page is the last one. Otherwise re-ask from the oldest second of this page (`until`
    may be exclusive). A full page with nothing new means one or two seconds hold a full page:
    step `until` down by at least one second so that paging always ends.
    """
    if len(created_ats) < page_limit:
        return None
    oldest = min(created_ats)
    if fresh:
        return oldest + 1 if until is None else min(oldest + 1, until)
    following = oldest if until is None else min(oldest, until - 1)
    return following if following >= since else None


def _as_event_object(message: Any) -> tuple[str, dict[str, Any]] | None:
    if (
        isinstance(message, list)
        and len(message) >= 3
        and message[0] == "EVENT"
        and isinstance(message[1], str)
        and isinstance(message[2], dict)
    ):
        return message[1], message[2]
    return None


class RelayConnection:
    """One websocket to one relay (no automatic reconnect); open with `await open()`."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 10.0,
        notifications_len_max: int = 65_536,
        on_live: EventSink | None = None,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._notifications_len_max = notifications_len_max
        self._on_live = on_live
        self._client: nostr_sdk.Client | None = None
        self._relay_url: nostr_sdk.RelayUrl | None = None
        self._reader: asyncio.Task[None] | None = None
        self._live_id: str | None = None
        self._pages: dict[str, _Page] = {}
        self._lost: str | None = None
        self._awaiting_ok: tuple[str, asyncio.Future[tuple[bool, str]]] | None = None

    async def open(self) -> None:
        """Connect within `timeout_s`, or raise RelayUnavailable."""
        try:
            self._relay_url = nostr_sdk.RelayUrl.parse(self.url)
        except Exception as exc:  # nostr-sdk raises its own NostrSdkError for a bad URL
            raise RelayUnavailable(f"relay {self.url!r} is not a valid websocket URL") from exc
        client = (
            nostr_sdk.ClientBuilder().notification_channel_size(self._notifications_len_max).build()
        )
        self._client = client
        await client.add_relay(self._relay_url, opts=nostr_sdk.RelayOptions().reconnect(False))
        stream = client.notifications()  # before any REQ, so no message is missed
        output = await client.try_connect(datetime.timedelta(seconds=self.timeout_s))
        if self._relay_url not in output.success:
            reason = next(iter(output.failed.values()), "no answer")
            await self.close()
            raise RelayUnavailable(f"cannot connect to {self.url}: {reason}")
        self._reader = asyncio.create_task(self._read(stream), name=f"relay-reader {self.url}")

    async def _read(self, stream: nostr_sdk.ClientNotificationStream) -> None:
        while (notification := await stream.next()) is not None:
            if not notification.is_message():
                continue
            try:
                message = orjson.loads(notification.message.as_json())
            except orjson.JSONDecodeError:
                continue
            await self._route(message)

    async def _route(self, message: Any) -> None:
        event = _as_event_object(message)
        if event is not None:
            subscription, obj = event
            if subscription == self._live_id and self._on_live is not None:
                await self._on_live(self.url, obj)
            elif subscription in self._pages:
                self._pages[subscription].events.append(obj)
            return
        if not isinstance(message, list) or len(message) < 2:
            return
        kind, subscription = message[0], message[1]
        if kind == "OK" and len(message) >= 3:
            self._on_ok(
                str(subscription), bool(message[2]), str(message[3]) if len(message) > 3 else ""
            )
        elif kind == "EOSE" and subscription in self._pages:
            self._pages[subscription].done.set()
        elif kind == "CLOSED":
            reason = str(message[2]) if len(message) > 2 else ""
            if subscription in self._pages:
                self._pages[subscription].closed = reason or "closed"
                self._pages[subscription].done.set()
            elif subscription == self._live_id:
                self._lost = f"relay closed the live subscription: {reason}"
                log.warning("%s: %s", self.url, self._lost)
        elif kind == "NOTICE":
            log.info("%s: NOTICE %s", self.url, subscription)

    def _on_ok(self, event_id: str, accepted: bool, reason: str) -> None:
        if self._awaiting_ok is None:
            return
        awaited, answer = self._awaiting_ok
        if event_id in (awaited, "") and not answer.done():
            if not event_id:
                log.info("%s answered OK without the event id: %s", self.url, reason)
            answer.set_result((accepted, reason))

    def _require(self) -> tuple[nostr_sdk.Client, nostr_sdk.RelayUrl]:
        assert self._client is not None and self._relay_url is not None, "open() first"
        return self._client, self._relay_url

    async def is_connected(self) -> bool:
        if self._client is None or self._relay_url is None or self._lost is not None:
            return False
        relay = await self._client.relay(self._relay_url)
        return relay is not None and relay.status() == nostr_sdk.RelayStatus.CONNECTED

    async def subscribe_live(self, query: dict[str, Any]) -> None:
        """Open the long-lived subscription whose events go to `on_live`."""
        client, relay_url = self._require()
        self._live_id = f"live-{next(_subscription_numbers)}"
        target = nostr_sdk.ReqTarget.single(
            relay_url, [nostr_sdk.Filter.from_json(orjson.dumps(query).decode())]
        )
        output = await client.subscribe(target, id=self._live_id)
        if relay_url not in output.success:
            raise RelayUnavailable(f"{self.url} refused the subscription: {output.failed}")

    async def fetch_page(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        """Every stored event of one filter, complete only when the relay sent EOSE."""
        client, relay_url = self._require()
        subscription = f"page-{next(_subscription_numbers)}"
        page = self._pages[subscription] = _Page()
        try:
            close_on = nostr_sdk.SubscribeAutoCloseOptions().exit_policy(
                nostr_sdk.ReqExitPolicy.EXIT_ON_EOSE()
            )
            target = nostr_sdk.ReqTarget.single(
                relay_url, [nostr_sdk.Filter.from_json(orjson.dumps(query).decode())]
            )
            output = await client.subscribe(target, id=subscription, close_on=close_on)
            if relay_url not in output.success:
                raise RelayUnavailable(f"{self.url} refused a history query: {output.failed}")
            try:
                await asyncio.wait_for(page.done.wait(), timeout=self.timeout_s)
            except TimeoutError:
                raise RelayUnavailable(
                    f"{self.url} sent no EOSE within {self.timeout_s} s for {query}"
                ) from None
            if page.closed is not None:
                raise RelayUnavailable(f"{self.url} closed a history query: {page.closed}")
            return page.events
        finally:
            del self._pages[subscription]

    async def publish(self, event: NostrEvent) -> RelayResult:
        """Send one event and wait for the relay's OK; never raises for a refusal.

        The OK is read from the raw messages, not matched by nostr-sdk: nostr-relay answers a
        refused event with an empty id (`["OK", "", false, "invalid: ..."]`), which nostr-sdk
        cannot match and reports as a timeout. One event at a time per connection makes an
        OK without an id unambiguous.
        """
        if not await self.is_connected():
            return RelayResult(self.url, RelayAnswer.UNREACHABLE, self._lost or "not connected")
        client, relay_url = self._require()
        assert self._awaiting_ok is None, "one publish at a time per connection"
        answer: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()
        self._awaiting_ok = (event.id, answer)
        try:
            output = await client.send_event(
                nostr_sdk.Event.from_json(event.to_json()),
                target=nostr_sdk.SendEventTarget.to([relay_url]),
                ack_policy=nostr_sdk.AckPolicy.none(),
            )
            if relay_url not in output.success:
                reason = str(output.failed.get(relay_url, "not sent"))
                return RelayResult(self.url, RelayAnswer.UNREACHABLE, reason)
            try:
                accepted, reason = await asyncio.wait_for(answer, self.timeout_s)
            except TimeoutError:
                return await self._after_silence(event)
            return answer_of(self.url, accepted, reason)
        finally:
            self._awaiting_ok = None

    async def _after_silence(self, event: NostrEvent) -> RelayResult:
        """No OK came: ask whether the relay has the event. A relay that answers queries but
        neither stores the event nor says why is refusing it (a transient rejection, so the
        outbox's budget bounds it); one that does not answer at all is unreachable."""
        try:
            present = await self.fetch_page({"ids": [event.id]})
        except RelayUnavailable as exc:
            return RelayResult(self.url, RelayAnswer.UNREACHABLE, f"no OK, then {exc}")
        if any(obj.get("id") == event.id for obj in present):
            return RelayResult(self.url, RelayAnswer.ACCEPTED, "stored (its OK was lost)")
        # nostr-relay also throttles a connection harder after each refusal: start afresh.
        self._lost = "the relay went silent on an event"
        return RelayResult(
            self.url,
            RelayAnswer.REJECTED,
            f"silent: no OK within {self.timeout_s} s and the relay does not have the event",
        )

    async def wait_lost(self, poll_s: float = 0.25) -> str:
        """Return (with why) once the connection is gone; polls the status every `poll_s`."""
        # nostr-sdk has no awaitable for status changes: poll
        while await self.is_connected():  # noqa: ASYNC110
            await asyncio.sleep(poll_s)
        return self._lost or "disconnected"

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # shutting down a dead socket may complain
                await client.shutdown()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


class _Page:
    """Events of one history query, until its EOSE (or CLOSED)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.done = asyncio.Event()
        self.closed: str | None = None


@frozen
class HistoryPage:
    """One page of history: the events (unverified objects) not seen on earlier pages."""

    events: tuple[dict[str, Any], ...]
    overflowed: bool = False


async def fetch_history(
    connection: RelayConnection, address: Address, since: int, page_max: int
) -> AsyncIterator[HistoryPage]:
    """Every stored event of the session from `since` on, newest page first, once each."""
    seen: set[str] = set()
    until: int | None = None
    while True:
        events = await connection.fetch_page(session_filter(address, since, until, page_max))
        fresh = []
        created_ats = []
        for obj in events:
            created_at, event_id = obj.get("created_at"), obj.get("id")
            if type(created_at) is int:
                created_ats.append(created_at)
            if isinstance(event_id, str) and event_id not in seen:
                seen.add(event_id)
                fresh.append(obj)
        following = next_until(created_ats, until, since, page_max, len(fresh))
        overflowed = following is not None and not fresh
        if overflowed:
            log.warning(
                "%s returned a full page of %d events at second %s alone: events of that second "
                "beyond the relay's page limit may be missed",
                connection.url,
                len(events),
                min(created_ats),
            )
        yield HistoryPage(tuple(fresh), overflowed)
        if following is None:
            return
        until = following


class RelayPublisher:
    """Publishes to every configured relay, (re)connecting to each when needed."""

    def __init__(self, urls: Sequence[str], *, timeout_s: float = 10.0) -> None:
        assert urls, "at least one relay"
        self.urls = tuple(urls)
        self.timeout_s = timeout_s
        self._connections: dict[str, RelayConnection] = {}
        self._locks = {url: asyncio.Lock() for url in self.urls}

    @property
    def relays_total(self) -> int:
        return len(self.urls)

    async def _connection(self, url: str) -> RelayConnection:
        connection = self._connections.get(url)
        if connection is not None and await connection.is_connected():
            return connection
        if connection is not None:
            await connection.close()
        connection = RelayConnection(url, timeout_s=self.timeout_s)
        await connection.open()
        self._connections[url] = connection
        return connection

    async def _publish_to(self, url: str, event: NostrEvent) -> RelayResult:
        async with self._locks[url]:
            try:
                connection = await self._connection(url)
            except RelayUnavailable as exc:
                return RelayResult(url, RelayAnswer.UNREACHABLE, str(exc))
            return await connection.publish(event)

    async def publish(self, event: NostrEvent) -> tuple[RelayResult, ...]:
        """Send to all relays at once; each answer (or why there was none) per relay."""
        return tuple(await asyncio.gather(*(self._publish_to(url, event) for url in self.urls)))

    async def close(self) -> None:
        for connection in self._connections.values():
            await connection.close()
        self._connections.clear()


def build_local_relay(
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    notes_per_minute_max: int = 1_000_000,
    requests_max: int = 1_000,
    filter_limit_max: int = 500,
) -> nostr_sdk.LocalRelay:
    """nostr-sdk's in-process relay with its rate limit raised (default 60 events a minute)."""
    builder = (
        nostr_sdk.LocalRelayBuilder()
        .addr(host)
        .rate_limit(
            nostr_sdk.RateLimit(max_reqs=requests_max, notes_per_minute=notes_per_minute_max)
        )
        .max_filter_limit(filter_limit_max)
    )
    if port is not None:
        builder = builder.port(port)
    return builder.build()
