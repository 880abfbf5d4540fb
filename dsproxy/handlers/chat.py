"""The backend's chat: hold, call the upstream, replace the hold by the exact debit.

`Meter` is the only writer of holds and debits. Taking a hold is atomic per user (one lock
around read view -> decide -> save fact -> project), so concurrent chats cannot reserve more
than the balance. Settling saves the exact charge (durable before the answer ends); a per-user
issuer then signs the user's settled charges into one debit event, records it, and appends it.
Start-up `recover()` finishes whatever a crash interrupted. Publishing is the outbox's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from attrs import define, frozen

from dsproxy.adapters.event_store import AsyncEventStore
from dsproxy.adapters.holds_projection import (
    debit_recorded,
    held_by,
    open_holds,
    unissued,
    users_with_unissued,
)
from dsproxy.adapters.projection_db import ProjectionDb
from dsproxy.adapters.tokenizer import Tokenizer
from dsproxy.adapters.upstream import StreamChunk, Upstream, UpstreamStream
from dsproxy.domain.chat_facts import DebitIssued, Hold, HoldOutcome
from dsproxy.domain.metering import (
    ModelCatalog,
    Price,
    Refused,
    Usage,
    UserView,
    debit_for,
    decide_hold,
)
from dsproxy.errors import (
    ContextTooLong,
    InsufficientTokens,
    InvalidParameter,
    RateLimited,
    UpstreamError,
)
from dsproxy.services.projector import Projector
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.event import NostrEvent, parse_event
from dsproxy.wire.messages import Transaction

__all__ = [
    "Charge",
    "ChatHandler",
    "ChatRequest",
    "ChatStream",
    "Meter",
    "OpenHold",
    "Recovery",
    "UserLimits",
    "parse_chat_request",
]

log = logging.getLogger(__name__)

DEBIT_SKEW_S = 20  # equal debits of one user spread over this many past seconds (relays allow ~30)
DEBIT_SECONDS_TRACKED_MAX = 100_000


NO_USAGE = Usage(0, 0)


@frozen
class Charge:
    """What a chat cost and what the user has left afterwards."""

    tokens_charged: int
    balance: int  # after this chat, whether or not its debit event is stored yet
    available: int
    usage: Usage = NO_USAGE  # what was billed (nothing when released)


@frozen
class OpenHold:
    """A hold taken and not yet closed, with what the upstream may be asked for."""

    chat_id: uuid.UUID
    user: str
    model: str
    tokens: int
    prompt_tokens: int
    completion_tokens_max: int
    price: Price


@frozen
class Recovery:
    """What start-up recovery did with holds a crash left open."""

    released: int
    debits_appended: int
    users_with_charges_to_issue: int


class Meter:
    """Holds and debits of every user, over the event store and its projection."""

    def __init__(
        self,
        store: AsyncEventStore,
        db: ProjectionDb,
        projector: Projector,
        address: Address,
        secret_hex: str,
        catalog: ModelCatalog,
    ) -> None:
        self.store, self.db, self.projector = store, db, projector
        self.address, self.catalog = address, catalog
        self._secret_hex = secret_hex
        self._user_locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._debit_seconds: dict[tuple[str, int], set[int]] = {}
        self._issuers: dict[str, asyncio.Task[None]] = {}
        self._issue_wake: dict[str, asyncio.Event] = {}

    async def catch_up(self) -> None:
        await self.projector.catch_up()  # it runs one caller at a time

    @contextlib.asynccontextmanager
    async def _locked(self, user: str) -> AsyncIterator[None]:
        lock, users = self._user_locks.setdefault(user, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._user_locks[user]

    async def view(self, user: str) -> UserView:
        """The user's balance (less charges whose debit is still being issued) and holds."""
        balance, held, unissued_tokens = await held_by(self.db, user)
        return UserView(user, balance - unissued_tokens, held)

    async def take_hold(
        self, user: str, model: str, prompt_tokens: int, max_tokens: int
    ) -> OpenHold:
        """Reserve tokens for a chat, or raise InsufficientTokens; atomic per user."""
        price = self.catalog.price(model)
        async with self._locked(user):
            view = await self.view(user)
            decision = decide_hold(view, prompt_tokens, max_tokens, price)
            if isinstance(decision, Refused):
                raise InsufficientTokens(
                    f"this chat needs at least {decision.tokens_needed} tokens and "
                    f"{decision.tokens_available} are available: recharge to continue",
                    tokens_available=decision.tokens_available,
                    tokens_needed=decision.tokens_needed,
                )
            hold = Hold.take(
                user, model, decision.tokens, prompt_tokens, decision.completion_tokens_max
            )
            await self.store.save(hold)
            await self.catch_up()
        return OpenHold(
            hold.id,
            user,
            model,
            decision.tokens,
            prompt_tokens,
            decision.completion_tokens_max,
            price,
        )

    async def settle(self, hold: OpenHold, usage: Usage) -> Charge:
        """Replace the hold by the exact charge (durable now); its debit event follows."""
        tokens = debit_for(hold.price, usage, hold.tokens)
        if tokens == 0:
            return await self.release(hold, "nothing to charge")
        outcome = HoldOutcome.settled(
            hold.chat_id, hold.user, tokens, usage.prompt_tokens, usage.completion_tokens
        )
        await self.store.save(outcome)
        await self.catch_up()
        self.issue_debits(hold.user)
        view = await self.view(hold.user)
        return Charge(tokens, view.balance, view.tokens_available, usage)

    async def release(self, hold: OpenHold, reason: str) -> Charge:
        """Close the hold with no debit."""
        await self.store.save(HoldOutcome.released(hold.chat_id, hold.user, reason))
        await self.catch_up()
        view = await self.view(hold.user)
        return Charge(0, view.balance, view.tokens_available)

    def issue_debits(self, user: str) -> None:
        """Make sure this user's issuer runs: it signs debits for their settled charges."""
        wake = self._issue_wake.setdefault(user, asyncio.Event())
        wake.set()
        if user not in self._issuers:
            self._issuers[user] = asyncio.create_task(self._issue(user), name=f"debits {user}")

    async def _issue(self, user: str) -> None:
        """One user's debits, one batch at a time: all their settled charges not yet issued,
        summed into one signed Transaction with an id no other debit has."""
        wake = self._issue_wake[user]
        try:
            while True:
                wake.clear()
                charges = await unissued(self.db, user)
                if not charges:
                    if wake.is_set():  # settled while we looked: look again
                        continue
                    return  # no await from here to `finally`: a new settle starts a new issuer
                total = sum(charge.tokens_charged for charge in charges)
                event = await self._unique_debit(user, total)
                if event is None:  # this sum is used at every allowed second: wait for more
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):  # wait_for can eat a cancel on 3.11
                            await wake.wait()
                    continue
                hold_ids = [charge.chat_id for charge in charges]
                fact = DebitIssued.issue(user, total, event.id, event.to_json(), hold_ids)
                await self.store.save(fact)  # first: recovery re-appends the event it carries
                await self.store.append_nostr([event])
                await self.catch_up()
        except Exception:
            log.exception("issuing debits of %s failed; start-up recovery will finish it", user)
        finally:
            del self._issuers[user]
            del self._issue_wake[user]

    async def _unique_debit(self, user: str, tokens: int) -> NostrEvent | None:
        """A signed debit whose id no other debit has, or None if none is free right now.

        The wire format gives a Transaction no nonce: two equal debits of one user signed in the
        same second have the same id, and every store and relay keeps only one. So each gets its
        own `created_at`, within the relays' clock-skew allowance.
        """
        now = int(time.time())
        used = self._debit_seconds.setdefault((user, tokens), set())
        used.difference_update([t for t in used if t < now - 2 * DEBIT_SKEW_S])
        if len(self._debit_seconds) > DEBIT_SECONDS_TRACKED_MAX:
            self._debit_seconds = {
                key: value for key, value in self._debit_seconds.items() if value
            }
        for created_at in (now - offset for offset in (*range(DEBIT_SKEW_S), -1, -2)):
            if created_at in used:
                continue
            used.add(created_at)
            event = seal(Transaction(user, -tokens), self.address, self._secret_hex, created_at)
            if not await debit_recorded(self.db, event.id):  # by an earlier run
                return event
        return None

    async def drain(self) -> None:
        """Wait until every issuer has finished (settled charges all issued)."""
        while self._issuers:
            await asyncio.gather(*self._issuers.values(), return_exceptions=True)

    async def recover(self) -> Recovery:
        """Finish what a crash interrupted: debits issued but not stored are appended again
        (the store dedupes), settled charges not issued are issued, and holds with no outcome
        are released (the user is never billed for an answer whose delivery we cannot prove)."""
        await self.catch_up()
        leftovers = await open_holds(self.db)
        debits = {row.debit_event for row in leftovers if row.debit_event}
        if debits:
            await self.store.append_nostr([parse_event(text) for text in sorted(debits)])
        released = [
            HoldOutcome.released(uuid.UUID(row.chat_id), row.user, "open at start-up (crash)")
            for row in leftovers
            if row.state == "held"
        ]
        if released:
            await self.store.save(*released)
        await self.catch_up()
        users = await users_with_unissued(self.db)
        for user in users:
            self.issue_debits(user)
        return Recovery(len(released), len(debits), len(users))


class UserLimits:
    """Per-user requests per minute (sliding window) and concurrent requests."""

    def __init__(self, per_minute_max: int, concurrent_max: int, clock: Any = time.monotonic):
        self.per_minute_max, self.concurrent_max = per_minute_max, concurrent_max
        self._clock = clock
        self._recent: dict[str, list[float]] = {}
        self._running: dict[str, int] = {}

    def admit(self, user: str) -> UserTicket:
        """Count a request in, or raise RateLimited (429)."""
        now = self._clock()
        recent = [t for t in self._recent.get(user, ()) if now - t < 60.0]
        if len(recent) >= self.per_minute_max:
            retry_after_s = max(1, int(60.0 - (now - recent[0])) + 1)
            raise RateLimited(
                f"more than {self.per_minute_max} requests a minute", retry_after_s=retry_after_s
            )
        if self._running.get(user, 0) >= self.concurrent_max:
            raise RateLimited(f"more than {self.concurrent_max} requests at once")
        recent.append(now)
        self._recent[user] = recent
        self._running[user] = self._running.get(user, 0) + 1
        return UserTicket(self, user)

    def _done(self, user: str) -> None:
        self._running[user] -= 1
        if self._running[user] == 0:
            del self._running[user]


@define
class UserTicket:
    """One admitted request; `done()` exactly once when it ends."""

    limits: UserLimits
    user: str
    closed: bool = False

    def done(self) -> None:
        if not self.closed:
            self.closed = True
            self.limits._done(self.user)


@frozen
class ChatRequest:
    """A validated chat request: what the client asked for, and the prompt's token estimate."""

    model: str
    body: Mapping[str, Any]
    stream: bool
    include_usage: bool
    prompt_tokens: int
    max_tokens: int

    def upstream_body(self, completion_tokens_max: int) -> dict[str, Any]:
        """The client's body with the completion limit the hold pays for, and usage asked."""
        body = {k: v for k, v in self.body.items() if k != "max_completion_tokens"}
        body["max_tokens"] = completion_tokens_max
        if self.stream:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return body


def _positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise InvalidParameter(f"{name} must be a positive integer", param=name)
    return value


def _check_messages(messages: Any) -> list[Mapping[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidParameter("messages must be a non-empty array", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidParameter(
                f"messages[{index}] must be an object with a role", param=f"messages[{index}]"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidParameter(
                f"messages[{index}].content must be a string or an array",
                param=f"messages[{index}].content",
            )
    return messages


async def parse_chat_request(body: Any, catalog: ModelCatalog, tokenizer: Tokenizer) -> ChatRequest:
    """Validate an OpenAI chat body; bad input raises before anything is reserved."""
    if not isinstance(body, dict):
        raise InvalidParameter("the body must be a JSON object", param="body")
    model = body.get("model")
    if not isinstance(model, str) or model not in catalog.models:
        raise InvalidParameter(
            f"the model {model!r} does not exist; GET /v1/models lists them",
            param="model",
            code="model_not_found",
        )
    messages = _check_messages(body.get("messages"))
    if body.get("n", 1) != 1:
        raise InvalidParameter("only n = 1 is supported", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidParameter("stream must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidParameter("stream_options must be an object", param="stream_options")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise InvalidParameter("tools must be an array", param="tools")
    asked = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    prompt_tokens = await tokenizer.count_prompt_async(messages, tools)
    window = catalog.context_window(model)
    if prompt_tokens >= window:
        raise ContextTooLong(
            f"the prompt is about {prompt_tokens} tokens; {model} reads at most {window}"
        )
    max_tokens = min(asked or catalog.completion_tokens_max, catalog.completion_tokens_max)
    max_tokens = min(max_tokens, window - prompt_tokens)
    include_usage = bool(options.get("include_usage")) and stream
    return ChatRequest(model, body, stream, include_usage, prompt_tokens, max_tokens)


def _usage_of(data: Mapping[str, Any]) -> Usage | None:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if type(prompt) is not int or type(completion) is not int or prompt < 0 or completion < 0:
        return None
    return Usage(prompt, completion)


def _choice_texts(choices: Any, key: str) -> Iterator[str]:
    """Text the model wrote in these choices (`message` or stream `delta`)."""
    for choice in choices if isinstance(choices, list) else ():
        part = choice.get(key) if isinstance(choice, dict) else None
        if not isinstance(part, dict):
            continue
        for name in ("content", "reasoning_content"):
            if isinstance(part.get(name), str):
                yield part[name]
        for call in part.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                yield str(function.get("name") or "") + str(function.get("arguments") or "")


class ChatStream:
    """A streamed chat in flight: content chunks out, then exactly one settlement."""

    def __init__(
        self,
        handler: ChatHandler,
        hold: OpenHold,
        upstream: UpstreamStream,
        started_s: float,
    ) -> None:
        self.handler, self.hold, self.upstream = handler, hold, upstream
        self.usage: Usage | None = None
        self.complete = False
        self._started_s = started_s
        self._texts: list[str] = []
        self._pending = 0  # chunks handed out and not yet marked delivered
        self._finish: asyncio.Task[Charge] | None = None

    async def chunks(self) -> AsyncIterator[StreamChunk]:
        """Chunks to send on (usage kept back); raises UpstreamError if the stream breaks."""
        first = True
        async for chunk in self.upstream.chunks():
            if first:
                self.handler.observe_latency(self._started_s)
                first = False
            usage = _usage_of(chunk.data)
            if usage is not None:
                self.usage = usage
                if not chunk.data.get("choices"):
                    continue
                chunk = StreamChunk(b"", {k: v for k, v in chunk.data.items() if k != "usage"})
            self._pending += 1
            yield chunk
        self.complete = self._pending == 0

    def delivered(self, chunk: StreamChunk) -> None:
        """The chunk reached the client's connection: it counts towards the charge."""
        self._pending -= 1
        self._texts.extend(_choice_texts(chunk.data.get("choices"), "delta"))

    def finish(self) -> asyncio.Task[Charge]:
        """Settle once (idempotent); await it shielded, it must survive a disconnect."""
        if self._finish is None:
            self._finish = asyncio.ensure_future(self._settle())
        return self._finish

    async def _settle(self) -> Charge:
        with contextlib.suppress(Exception):
            await self.upstream.aclose()
        if self.complete and self.usage is not None:
            usage = self.usage
        else:  # cut, disconnected, or no usage reported: charge what was delivered
            completion = await self.handler.tokenizer.count_async("".join(self._texts))
            if completion == 0:
                return await self.handler.meter.release(self.hold, "no output delivered")
            prompt = self.usage.prompt_tokens if self.usage else self.hold.prompt_tokens
            usage = Usage(prompt, completion)
        return await self.handler.charge(self.hold, usage)


class ChatHandler:
    """Chats for the HTTP routes: prepare, then complete or stream."""

    def __init__(
        self,
        meter: Meter,
        upstream: Upstream,
        tokenizer: Tokenizer,
        catalog: ModelCatalog,
        metrics: Any = None,
    ) -> None:
        self.meter, self.upstream, self.tokenizer = meter, upstream, tokenizer
        self.catalog, self.metrics = catalog, metrics

    async def prepare(self, body: Any) -> ChatRequest:
        return await parse_chat_request(body, self.catalog, self.tokenizer)

    def observe_latency(self, started_s: float) -> None:
        if self.metrics is not None:
            self.metrics.upstream_latency(time.perf_counter() - started_s)

    async def charge(self, hold: OpenHold, usage: Usage) -> Charge:
        charge = await self.meter.settle(hold, usage)
        if self.metrics is not None:
            self.metrics.charged(hold.model, usage, charge.tokens_charged)
        return charge

    async def _release(self, hold: OpenHold, reason: str) -> None:
        await asyncio.shield(asyncio.ensure_future(self.meter.release(hold, reason)))

    async def complete(self, user: str, request: ChatRequest) -> tuple[dict[str, Any], Charge]:
        """A non-streamed chat, settled before the answer is returned."""
        hold = await self.meter.take_hold(
            user, request.model, request.prompt_tokens, request.max_tokens
        )
        started_s = time.perf_counter()
        try:
            answer = await self.upstream.complete(request.upstream_body(hold.completion_tokens_max))
        except BaseException as exc:
            reason = f"upstream failed: {exc}" if isinstance(exc, UpstreamError) else "cancelled"
            await self._release(hold, reason)
            raise
        self.observe_latency(started_s)
        usage = _usage_of(answer)
        if usage is None:
            text = "".join(_choice_texts(answer.get("choices"), "message"))
            usage = Usage(hold.prompt_tokens, await self.tokenizer.count_async(text))
        settle = asyncio.ensure_future(self.charge(hold, usage))
        charge = await asyncio.shield(settle)
        return answer, charge

    async def stream(self, user: str, request: ChatRequest) -> ChatStream:
        """Open a streamed chat; an upstream error here has charged nothing."""
        hold = await self.meter.take_hold(
            user, request.model, request.prompt_tokens, request.max_tokens
        )
        started_s = time.perf_counter()
        try:
            upstream = await self.upstream.open_stream(
                request.upstream_body(hold.completion_tokens_max)
            )
        except BaseException as exc:
            reason = f"upstream failed: {exc}" if isinstance(exc, UpstreamError) else "cancelled"
            await self._release(hold, reason)
            raise
        return ChatStream(self, hold, upstream, started_s)
