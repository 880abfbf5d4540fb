"""Nostr relays (NIP-01) over aiohttp websockets: one connection, history pages, live events,
publishing.

A `RelayConnection` is one websocket to one relay and never reconnects by itself: the ingest
and the outbox decide when to retry, so that every reconnect is followed by a history fetch from
the checkpoint. Messages are NIP-01 JSON arrays read as the relay sent them; events go to the
caller unverified, and the caller verifies them (id and signature) before anything else.

Why not nostr-sdk's client: its Python binding delivers each relay message through an async FFI
call and string copies, about 100 µs a message (measured by scripts/bench_ingest.py), more than
the relay takes to send it. aiohttp reads a message in about 11 µs. nostr-sdk stays for keys and
for the in-process test relay.

Paging: relays return the newest `limit` events of a filter, at most `events_per_page_max`
(LocalRelay 500), so history is read newest first by moving `until` down. Relays disagree on
whether `until` is inclusive (NIP-01, LocalRelay) or exclusive (nostr-relay), so the next page
re-asks for the oldest second of the last one and duplicates are dropped by id. A page reaches
the caller in chunks while it streams in; it is complete only when its EOSE arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import nostr_sdk
import orjson
from attrs import define, field, frozen
from yarl import URL

from dsproxy.domain.publication import RelayAnswer, RelayResult, answer_of
from dsproxy.errors import DsproxyError
from dsproxy.wire.envelope import DEPHY_KIND, Address
from dsproxy.wire.event import NostrEvent

__all__ = [
    "EventSink",
    "HistoryPage",
    "HistoryPager",
    "HistoryPass",
    "RelayConnection",
    "RelayPublisher",
    "RelayUnavailable",
    "build_local_relay",
    "fetch_history",
    "history_passes",
    "session_filter",
]

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, Any]], Awaitable[None]]
"""Receives (relay url, event object as the relay sent it, not yet verified)."""

CHUNK_EVENTS = 256
"""A history page goes to the caller in chunks of this many events (the last may be shorter)."""

MESSAGE_BYTES_MAX = 4 * 1024 * 1024
FRESH_ANSWERS_AT_ONE_UNTIL_MAX = 3  # an honest relay repeats a query's second at most once
ACK_GRACE_S = 0.5
"""Once one relay has acknowledged an event, how long publishing waits for the others: a relay
that never answers must not hold every publication back for its whole timeout. A relay still
busy then finishes in the background, and is left out of the events published meanwhile."""
HEARTBEAT_S = 30.0
"""aiohttp pings this often and drops a connection whose pong does not come back."""

_subscription_numbers = itertools.count(1)


class RelayUnavailable(DsproxyError):
    """A relay could not be reached, closed our subscription or stopped answering."""


def session_filter(
    address: Address,
    since: int | None = None,
    until: int | None = None,
    limit: int | None = None,
    *,
    authors: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The NIP-01 filter of our session and machine: kind 1573, `#s`, `#p` (and `authors`)."""
    query: dict[str, Any] = {
        "kinds": [DEPHY_KIND],
        "#s": [address.session],
        "#p": [address.machine],
    }
    if authors is not None:
        query["authors"] = list(authors)
    for key, value in (("since", since), ("until", until), ("limit", limit)):
        if value is not None:
            query[key] = value
    return query


@define
class HistoryPager:
    """The pure state of one history fetch: what to ask next, and which events are new.

    Relays cap an answer at a limit they rarely publish, and differ on whether `until` is
    inclusive, so an answer shorter than asked proves nothing. Paging ends on an empty answer,
    or on one with nothing new that is shorter than the longest answer so far (the relay could
    have sent more and did not). An answer with anything new is always followed by another
    query, from its oldest second (`until` may be exclusive); one with nothing new that is as
    long as the longest steps `until` down a second (one or two seconds fill an answer: what
    they hold beyond it cannot be paged, see `overflowed`). Events outside the asked window (a
    relay that ignores `until`) are skipped, and only the ids a later answer may serve again are
    remembered, so memory stays at about one answer.
    """

    since: int
    page_max: int
    until: int | None = None
    authors: tuple[str, ...] | None = field(default=None, kw_only=True)
    most_returned: int = 0
    overflowed: bool = False  # the last answer ended at a second fuller than one answer
    last_returned: int = 0  # events in the asked window in the last answer
    _seen: dict[str, int] = field(factory=dict)  # id -> created_at (0 if malformed)
    _oldest: int | None = None  # the oldest well-formed `created_at` in the answer
    _returned: int = 0
    _fresh: int = 0
    _fresh_at_until: int = 0  # answers in a row with new events that left `until` where it was

    def query(self, address: Address) -> dict[str, Any]:
        return session_filter(address, self.since, self.until, self.page_max, authors=self.authors)

    def take(self, chunk: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The events of this part of the answer that are new and inside the asked window."""
        fresh = []
        for obj in chunk:
            created_at, event_id = obj.get("created_at"), obj.get("id")
            if type(created_at) is int:
                if self.until is not None and created_at > self.until:
                    continue
                if self._oldest is None or created_at < self._oldest:
                    self._oldest = created_at
            else:
                created_at = 0  # refused at the door; remembered till the end
            self._returned += 1
            if isinstance(event_id, str) and event_id not in self._seen:
                self._seen[event_id] = created_at
                fresh.append(obj)
        self._fresh += len(fresh)
        return fresh

    def answered(self) -> bool:
        """The answer is complete: move to the next query; False when the history is."""
        returned, fresh, oldest = self._returned, self._fresh, self._oldest
        self._returned = self._fresh = 0
        self._oldest = None
        self.last_returned = returned
        self.most_returned = max(self.most_returned, returned)
        self.overflowed = False
        if oldest is None:
            return False
        if fresh:
            following = oldest + 1 if self.until is None else min(oldest + 1, self.until)
            stuck = following == self.until
            self._fresh_at_until = self._fresh_at_until + 1 if stuck else 0
            if self.until is not None and self._fresh_at_until >= FRESH_ANSWERS_AT_ONE_UNTIL_MAX:
                # a relay serving new events at one second answer after answer (a flood, or a
                # relay that makes them up) would keep this query, and its ids, forever
                self._fresh_at_until = 0
                self.overflowed = True
                following = self.until - 1
                if following < self.since:
                    return False
        elif returned < self.most_returned:
            return False
        else:
            following = oldest if self.until is None else min(oldest, self.until - 1)
            self.overflowed = returned >= self.page_max
            if following < self.since:
                return False
        self.until = following
        self._seen = {event_id: at for event_id, at in self._seen.items() if at <= following}
        return True


@frozen
class HistoryPass:
    """One history fetch after a (re)connect: by these `authors` only (None: anyone's), less
    those by the `skipped` ones (a pass before fetched them)."""

    authors: tuple[str, ...] | None
    skipped: frozenset[str] = frozenset()


def history_passes(trusted: Sequence[str], untrusted_too: bool) -> list[HistoryPass]:
    """The history fetches after a (re)connect.

    Anyone may publish with our `#s` and `#p`: a few hundred events in the second of a credit
    fill a relay's capped answer, and paging cannot reach past a full second. Events by the
    keys we trust are therefore fetched on their own first; a node that also needs other
    authors' events (a controller: users' Requests) then pages through everyone's.
    """
    if not trusted:
        return [HistoryPass(None)]
    authors = tuple(sorted(set(trusted)))
    passes = [HistoryPass(authors)]
    if untrusted_too:
        passes.append(HistoryPass(None, frozenset(authors)))
    return passes


def _websocket_url(url: str) -> URL:
    try:
        parsed = URL(url)
    except (TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.scheme not in ("ws", "wss") or not parsed.host:
        raise RelayUnavailable(f"relay {url!r} is not a valid websocket URL")
    return parsed


class _Page:
    """Events of one history query as they stream in, until its EOSE (or CLOSED, or loss)."""

    def __init__(self, chunk_len: int) -> None:
        self.chunk_len = chunk_len
        self.events: list[dict[str, Any]] = []
        self.ready = asyncio.Event()
        self.complete = False
        self.failed: str | None = None

    def add(self, obj: dict[str, Any]) -> None:
        if self.complete:
            # a live event on the still-open query (the CLOSE is not sent yet): the live
            # subscription has it too, and counting it would make the answer look longer than
            # the relay's cap, so that the next full answer would end paging too early
            return
        self.events.append(obj)
        if len(self.events) >= self.chunk_len:
            self.ready.set()

    def end(self, failure: str | None = None) -> None:
        if self.complete:  # a CLOSED or a drop after the EOSE does not undo a whole page
            return
        self.complete, self.failed = True, failure
        self.ready.set()

    def take(self) -> list[dict[str, Any]]:
        taken, self.events = self.events, []
        self.ready.clear()
        return taken


class RelayConnection:
    """One websocket to one relay (no automatic reconnect); open with `await open()`."""

    def __init__(
        self, url: str, *, timeout_s: float = 10.0, on_live: EventSink | None = None
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._on_live = on_live
        self._session: aiohttp.ClientSession | None = None
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._live_id: str | None = None
        self._pages: dict[str, _Page] = {}
        self._lost: str | None = None
        self._gone = asyncio.Event()
        self._awaiting_ok: tuple[str, asyncio.Future[tuple[bool, str]]] | None = None

    async def open(self) -> None:
        """Connect within `timeout_s`, or raise RelayUnavailable."""
        target = _websocket_url(self.url)
        # No permessage-deflate: on loopback and LANs it costs more CPU than it saves.
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        try:
            async with asyncio.timeout(self.timeout_s):
                self._socket = await self._session.ws_connect(
                    target,
                    compress=0,
                    heartbeat=HEARTBEAT_S,
                    max_msg_size=MESSAGE_BYTES_MAX,
                    autoping=True,
                )
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            await self.close()
            raise RelayUnavailable(f"cannot connect to {self.url}: {exc or 'no answer'}") from exc
        except BaseException:  # cancelled (a stop): leave no session open
            await self.close()
            raise
        self._reader = asyncio.create_task(self._read(self._socket), name=f"relay {self.url}")

    async def _read(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        try:
            await self._read_messages(socket)
        except Exception as exc:  # a relay's nonsense ends this connection, never the caller
            log.warning("%s: dropping the connection after %r", self.url, exc)
            self._lost = self._lost or f"connection dropped after {exc!r}"
        finally:
            self._lost = self._lost or f"connection closed (code {socket.close_code})"
            self._gone.set()
            for page in self._pages.values():
                page.end(self._lost)
            if self._awaiting_ok is not None and not self._awaiting_ok[1].done():
                self._awaiting_ok[1].set_exception(RelayUnavailable(self._lost))
            with contextlib.suppress(Exception):  # closing a dead socket may complain
                await socket.close()

    async def _read_messages(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        async for message in socket:
            if message.type is aiohttp.WSMsgType.TEXT:
                try:
                    parsed = orjson.loads(message.data)
                except orjson.JSONDecodeError:
                    log.info("%s sent a message that is not JSON", self.url)
                    continue
                await self._route(parsed)
                if self._lost is not None:
                    return
            elif message.type is aiohttp.WSMsgType.ERROR:
                self._lost = f"connection error: {socket.exception()}"
                return

    async def _route(self, message: Any) -> None:
        if not isinstance(message, list) or len(message) < 2 or not isinstance(message[1], str):
            return  # not a NIP-01 message we answer to (NOTICE's text is a string too)
        kind, subscription = message[0], message[1]
        if kind == "EVENT":
            obj = message[2] if len(message) >= 3 else None
            if not isinstance(obj, dict):
                return
            if subscription == self._live_id and self._on_live is not None:
                await self._on_live(self.url, obj)
            elif subscription in self._pages:
                self._pages[subscription].add(obj)
        elif kind == "OK" and len(message) >= 3:
            # only `true` accepts: `"false"` is a truthy string, not an acknowledgement
            self._on_ok(
                str(subscription), message[2] is True, str(message[3]) if len(message) > 3 else ""
            )
        elif kind == "EOSE" and subscription in self._pages:
            self._pages[subscription].end()
        elif kind == "CLOSED":
            reason = str(message[2]) if len(message) > 2 else ""
            if subscription in self._pages:
                self._pages[subscription].end(f"closed: {reason or 'no reason'}")
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

    async def _send(self, message: list[Any]) -> None:
        socket = self._socket
        if socket is None or not self.is_connected():
            raise RelayUnavailable(f"{self.url}: {self._lost or 'not connected'}")
        try:
            await socket.send_str(orjson.dumps(message).decode())
        except (aiohttp.ClientError, OSError) as exc:
            raise RelayUnavailable(f"{self.url}: cannot send: {exc}") from exc

    def is_connected(self) -> bool:
        return self._socket is not None and not self._socket.closed and self._lost is None

    async def subscribe_live(self, query: dict[str, Any]) -> None:
        """Open the long-lived subscription whose events go to `on_live`."""
        self._live_id = f"live-{next(_subscription_numbers)}"
        await self._send(["REQ", self._live_id, query])

    async def read_page(
        self, query: dict[str, Any], chunk_len: int = CHUNK_EVENTS
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Every stored event of one filter, in chunks as they arrive; ends at the EOSE.

        Raises RelayUnavailable if the relay closes the query, the connection drops, or
        `timeout_s` passes with no event and no EOSE (a relay that sends slowly has what it
        sent handed on every `timeout_s`, and is waited for).
        """
        subscription = f"page-{next(_subscription_numbers)}"
        page = self._pages[subscription] = _Page(chunk_len)
        try:
            await self._send(["REQ", subscription, query])
            while True:
                try:
                    async with asyncio.timeout(self.timeout_s):
                        await page.ready.wait()
                except TimeoutError:
                    if not page.events:  # a part of a chunk is progress: hand it on below
                        raise RelayUnavailable(
                            f"{self.url} sent neither events nor EOSE for {self.timeout_s} s "
                            f"on {query}"
                        ) from None
                complete, chunk = page.complete, page.take()  # complete may change at yield
                if page.failed is not None:
                    raise RelayUnavailable(f"{self.url}: history query failed: {page.failed}")
                if chunk:
                    yield chunk
                if complete:
                    return
        finally:
            del self._pages[subscription]
            if self.is_connected():  # after EOSE a subscription stays open until CLOSE
                with contextlib.suppress(RelayUnavailable):
                    await self._send(["CLOSE", subscription])

    async def fetch_page(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        """Every stored event of one filter, once its EOSE came."""
        events: list[dict[str, Any]] = []
        async with contextlib.aclosing(self.read_page(query)) as chunks:
            async for chunk in chunks:
                events.extend(chunk)
        return events

    async def publish(self, event: NostrEvent) -> RelayResult:
        """Send one event and wait for the relay's OK; never raises for a refusal.

        nostr-relay answers a refused event with an empty id (`["OK", "", false, "invalid:
        ..."]`); one event at a time per connection makes such an OK unambiguous.
        """
        if not self.is_connected():
            return RelayResult(self.url, RelayAnswer.UNREACHABLE, self._lost or "not connected")
        assert self._awaiting_ok is None, "one publish at a time per connection"
        answer: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()
        self._awaiting_ok = (event.id, answer)
        try:
            try:
                await self._send(["EVENT", event.to_obj()])
            except RelayUnavailable as exc:
                return RelayResult(self.url, RelayAnswer.UNREACHABLE, str(exc))
            try:
                async with asyncio.timeout(self.timeout_s):
                    accepted, reason = await answer
            except RelayUnavailable as exc:
                # lost with this event in flight: a refusal (counted), so a relay that drops
                # the connection on this one event cannot hold every later event back for good
                lost = f"dropped: the connection was lost waiting for its OK ({exc})"
                return RelayResult(self.url, RelayAnswer.REJECTED, lost)
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
            async with asyncio.timeout(2 * self.timeout_s):  # a trickle without EOSE never ends
                present = await self.fetch_page({"ids": [event.id], "limit": 1})
        except RelayUnavailable as exc:
            return RelayResult(self.url, RelayAnswer.UNREACHABLE, f"no OK, then {exc}")
        except TimeoutError:
            return RelayResult(self.url, RelayAnswer.UNREACHABLE, "no OK, and no answer to a query")
        if any(obj.get("id") == event.id for obj in present):
            return RelayResult(self.url, RelayAnswer.ACCEPTED, "stored (its OK was lost)")
        # nostr-relay also throttles a connection harder after each refusal: start afresh.
        self._lost = "the relay went silent on an event"
        if self._socket is not None:
            await self._socket.close()  # the reader ends, and with it every wait on us
        return RelayResult(
            self.url,
            RelayAnswer.REJECTED,
            f"silent: no OK within {self.timeout_s} s and the relay does not have the event",
        )

    async def wait_lost(self, timeout_s: float | None = None) -> str | None:
        """Return (with why) once the connection is gone; None if `timeout_s` passed first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._gone.wait()
        except TimeoutError:
            return None
        return self._lost or "disconnected"

    async def close(self) -> None:
        socket, self._socket = self._socket, None
        if socket is not None:
            with contextlib.suppress(Exception):  # closing a dead socket may complain
                await socket.close()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        session, self._session = self._session, None
        if session is not None:
            await session.close()


@frozen
class HistoryPage:
    """Part of a page of history: events (unverified objects) not seen before, in arrival
    order; `overflowed` marks the end of a page that one second filled alone."""

    events: tuple[dict[str, Any], ...]
    overflowed: bool = False


async def fetch_history(
    connection: RelayConnection,
    address: Address,
    since: int,
    page_max: int,
    authors: tuple[str, ...] | None = None,
    skipped: frozenset[str] = frozenset(),
) -> AsyncIterator[HistoryPage]:
    """Every stored event of the session from `since` on (by `authors` only, if given; none
    by the `skipped` authors), newest page first, once each."""
    pager = HistoryPager(since, page_max, authors=authors)
    while True:
        async with contextlib.aclosing(connection.read_page(pager.query(address))) as chunks:
            async for chunk in chunks:
                fresh = pager.take(chunk)
                if skipped:
                    fresh = [obj for obj in fresh if obj.get("pubkey") not in skipped]
                if fresh:
                    yield HistoryPage(tuple(fresh))
        more = pager.answered()
        if pager.overflowed:
            log.warning(
                "%s returned a full page of %d events with nothing new down to second %s: "
                "events of that second beyond the relay's page limit may be missed",
                connection.url,
                pager.last_returned,
                pager.until,
            )
            yield HistoryPage((), overflowed=True)
        if not more:
            return


class RelayPublisher:
    """Publishes to every configured relay, (re)connecting to each when needed."""

    def __init__(self, urls: Sequence[str], *, timeout_s: float = 10.0) -> None:
        assert urls, "at least one relay"
        self.urls = tuple(urls)
        self.timeout_s = timeout_s
        self._connections: dict[str, RelayConnection] = {}
        self._locks = {url: asyncio.Lock() for url in self.urls}
        self._in_flight: dict[str, asyncio.Task[RelayResult]] = {}  # at most one per relay

    @property
    def relays_total(self) -> int:
        return len(self.urls)

    async def _connection(self, url: str) -> RelayConnection:
        connection = self._connections.get(url)
        if connection is not None and connection.is_connected():
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
        """Send to all relays at once; each answer (or why there was none) per relay. One
        acknowledgement is enough: the others then have ACK_GRACE_S, and one that has not
        answered by then counts as unreachable for this event but is not cancelled (a relay
        slow to connect would never get any event, and a late OK would answer the next one):
        it finishes in the background, and a relay still busy is left out of the next event."""
        results: dict[str, RelayResult] = {}
        tasks: dict[asyncio.Task[RelayResult], str] = {}
        for url in self.urls:
            busy = self._in_flight.get(url)
            if busy is not None and not busy.done():
                results[url] = RelayResult(
                    url, RelayAnswer.UNREACHABLE, "still busy with an earlier event"
                )
                continue
            task = asyncio.ensure_future(self._publish_to(url, event))
            task.add_done_callback(_retrieve)
            self._in_flight[url] = task
            tasks[task] = url
        waiting = set(tasks)
        while waiting:
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if any(task.result().answer is RelayAnswer.ACCEPTED for task in done):
                if waiting:
                    _, waiting = await asyncio.wait(waiting, timeout=ACK_GRACE_S)
                break
        late = "no answer before another relay acknowledged it (still trying)"
        for task, url in tasks.items():
            results[url] = (
                task.result() if task.done() else RelayResult(url, RelayAnswer.UNREACHABLE, late)
            )
        return tuple(results[url] for url in self.urls)

    async def _holds(self, url: str, event_id: str) -> bool | None:
        async with self._locks[url]:
            try:
                async with asyncio.timeout(2 * self.timeout_s):  # a trickle has no EOSE
                    connection = await self._connection(url)
                    found = await connection.fetch_page({"ids": [event_id], "limit": 1})
            except (RelayUnavailable, TimeoutError):
                return None
        return any(obj.get("id") == event_id for obj in found)

    async def holders(self, event_id: str) -> tuple[tuple[str, bool | None], ...]:
        """Whether each relay has the event stored (None: it could not be asked)."""
        answers = await asyncio.gather(*(self._holds(url, event_id) for url in self.urls))
        return tuple(zip(self.urls, answers, strict=True))

    async def close(self) -> None:
        in_flight = [task for task in self._in_flight.values() if not task.done()]
        for task in in_flight:
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
        self._in_flight.clear()
        for connection in self._connections.values():
            await connection.close()
        self._connections.clear()


def _retrieve(task: asyncio.Task[RelayResult]) -> None:
    """A publish left to finish in the background: its failure is logged, not lost."""
    if not task.cancelled() and task.exception() is not None:
        log.error("publishing to a relay failed", exc_info=task.exception())


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
