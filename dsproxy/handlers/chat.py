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
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

from attrs import define, evolve, frozen

from dsproxy.adapters.event_store import AsyncEventStore
from dsproxy.adapters.holds_projection import open_holds, unissued_charges
from dsproxy.adapters.projection_db import ProjectionDb
from dsproxy.adapters.tokenizer import (
    TEMPLATE_TOKENS_PER_MESSAGE,
    TEMPLATE_TOKENS_PER_PROMPT,
    Tokenizer,
    prompt_schemas,
)
from dsproxy.adapters.upstream import StreamChunk, Upstream, UpstreamStream
from dsproxy.domain.chat_facts import DebitIssued, Hold, HoldOutcome
from dsproxy.domain.metering import (
    ModelCatalog,
    Price,
    Refused,
    Usage,
    UserView,
    cost,
    debit_for,
    decide_hold,
)
from dsproxy.errors import (
    ContextTooLong,
    DuplicateEvent,
    InsufficientTokens,
    InvalidParameter,
    RateLimited,
    StoreError,
    UpstreamError,
)
from dsproxy.services.projector import Projector
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.event import parse_event
from dsproxy.wire.messages import Transaction
from projections import Book, fold_into
from projections import issue as issue_charges
from projections import release as release_hold
from projections import reserve as reserve_hold
from projections import settle as settle_hold

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

DEBIT_BATCH_S = 0.25  # a user's charges settled within this long share one debit event
SETTLE_RETRY_S_MIN, SETTLE_RETRY_S_MAX = 0.5, 30.0  # a delivered answer's charge, retried
SETTLE_DRAIN_S = 30.0  # a stop waits this long for charges being written
DEBIT_SKEW_S = 20  # equal debits of one user spread over this many past seconds (relays allow ~30)


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
    """Holds and charges of every user: decided in memory, recorded in the event store.

    Each user's `Book` (projections.holds) is the ledger balance plus what the ledger does not
    show yet. A decision reads the book and changes it with no await in between, so concurrent
    chats of one user can never reserve more than the balance. The projector tells the meter,
    right after each commit, which balances changed and how far it has folded.
    """

    def __init__(
        self,
        store: AsyncEventStore,
        db: ProjectionDb,
        projector: Projector,
        address: Address,
        secret_hex: str,
        catalog: ModelCatalog,
        *,
        wake_projector: Callable[[], None] | None = None,
        on_store_failure: Callable[[str], None] | None = None,
        books_idle_max: int = 100_000,
        debit_batch_s: float = DEBIT_BATCH_S,
    ) -> None:
        self.store, self.db, self.projector = store, db, projector
        self.address, self.catalog = address, catalog
        self._secret_hex = secret_hex
        self._wake_projector = wake_projector or (lambda: None)
        self._on_store_failure = on_store_failure or (lambda failure: None)
        self._books: OrderedDict[str, Book] = OrderedDict()
        self._books_idle_max = books_idle_max
        self._stale: set[str] = set()  # balances another process may have moved
        self._folded_to = 0  # the position every book's balance is true at
        # the `created_at` each (user, tokens) debit used lately, and when each was taken
        self._debit_seconds: dict[tuple[str, int], set[int]] = {}
        self._debit_seconds_taken: deque[tuple[int, tuple[str, int]]] = deque()
        self._issuers: dict[str, asyncio.Task[None]] = {}
        self._issue_wake: dict[str, asyncio.Event] = {}
        self._debit_batch_s = debit_batch_s
        self._flush = asyncio.Event()  # set while draining: issue without waiting for more
        self._settling: set[asyncio.Task[Any]] = set()  # tasks writing a charge now
        projector.listeners.append(self)

    # --- what the projector tells us (FoldListener) ---

    def folded(self, balances: Mapping[str, int], position: int) -> None:
        self._folded_to = max(self._folded_to, position)
        for user, balance in balances.items():
            if user in self._books:
                self._books[user] = fold_into(self._books[user], balance, self._folded_to)

    def moved(self) -> None:
        self._stale.update(self._books)

    # --- books ---

    async def _book(self, user: str) -> Book:
        """The user's book, its balance read from the projection the first time."""
        book = self._books.get(user)
        if book is not None and user not in self._stale:
            self._books.move_to_end(user)
            self._books[user] = book = fold_into(book, None, self._folded_to)
            return book
        while True:
            balance, position = await self.db.balance_at(user)
            if position >= self._folded_to:  # no fold was announced after this read
                break
        book = evolve(self._books.get(user, Book()), balance=balance)
        self._books[user] = book = fold_into(book, None, position)
        self._stale.discard(user)
        self._forget_idle_books()
        return book

    def _forget_idle_books(self) -> None:
        if len(self._books) <= self._books_idle_max:
            return
        for user in [user for user, book in self._books.items() if book.idle]:
            del self._books[user]
            if len(self._books) <= self._books_idle_max // 2:
                break

    def _view(self, user: str, book: Book) -> UserView:
        return UserView(user, book.spendable(self._folded_to), book.held)

    async def view(self, user: str) -> UserView:
        """The user's balance (less charges the ledger does not show yet) and holds."""
        return self._view(user, await self._book(user))

    async def charged_unfolded(self, user: str) -> int:
        """Tokens charged that the projection's balance does not include yet."""
        return (await self._book(user)).charged_unfolded(self._folded_to)

    def totals(self) -> tuple[int, int]:
        """(open holds, tokens they reserve), over every user."""
        holds = [tokens for book in self._books.values() for tokens in book.holds.values()]
        return len(holds), sum(holds)

    # --- chats ---

    async def take_hold(
        self, user: str, model: str, prompt_tokens: int, max_tokens: int
    ) -> OpenHold:
        """Reserve tokens for a chat, or raise InsufficientTokens."""
        price = self.catalog.price(model)
        book = await self._book(user)
        decision = decide_hold(self._view(user, book), prompt_tokens, max_tokens, price)
        if isinstance(decision, Refused):
            raise InsufficientTokens(
                f"this chat needs at least {decision.tokens_needed} tokens and "
                f"{decision.tokens_available} are available: recharge to continue",
                tokens_available=decision.tokens_available,
                tokens_needed=decision.tokens_needed,
            )
        chat_id = uuid.uuid4()
        self._books[user] = reserve_hold(book, chat_id.hex, decision.tokens, self._folded_to)
        return OpenHold(
            chat_id,
            user,
            model,
            decision.tokens,
            prompt_tokens,
            decision.completion_tokens_max,
            price,
        )

    def _facts(self, hold: OpenHold) -> Hold:
        return Hold.take(
            hold.chat_id,
            hold.user,
            hold.model,
            hold.tokens,
            hold.prompt_tokens,
            hold.completion_tokens_max,
        )

    async def settle(self, hold: OpenHold, usage: Usage, *, delivered: bool = False) -> Charge:
        """Record the exact charge (durable before this returns); its debit event follows.

        `delivered`: the user has the answer already (a stream), so a write that fails is tried
        again until it lands, the hold kept meanwhile; otherwise it is not charged."""
        settling = asyncio.current_task()
        if settling is not None:  # a stop waits for it: its files stay open until it is written
            self._settling.add(settling)
        try:
            return await self._settle(hold, usage, delivered)
        finally:
            self._settling.discard(settling)  # type: ignore[arg-type]

    async def _settle(self, hold: OpenHold, usage: Usage, delivered: bool) -> Charge:
        tokens = debit_for(hold.price, usage, hold.tokens)
        if tokens == 0:
            return await self.release(hold, "nothing to charge")

        def settled() -> HoldOutcome:
            return HoldOutcome.settled(
                hold.chat_id, hold.user, tokens, usage.prompt_tokens, usage.completion_tokens
            )

        try:
            if delivered:
                await self._record_until_landed(hold, settled)
            else:
                await self.store.record([], self._facts(hold), settled())
        except Exception:  # not recorded: not charged (a cancel may have recorded it: keep it)
            self._books[hold.user] = release_hold(self._books[hold.user], hold.chat_id.hex)
            raise
        # the book holds this chat's hold, so it is never forgotten: no await before the change
        book = settle_hold(self._books[hold.user], hold.chat_id.hex, tokens)
        self._books[hold.user] = book
        self.issue_debits(hold.user)
        view = self._view(hold.user, book)
        return Charge(tokens, view.balance, view.tokens_available, usage)

    async def _record_until_landed(
        self, hold: OpenHold, outcome_of: Callable[[], HoldOutcome]
    ) -> None:
        """Storage that fails (a full disk, another process holding the file) is waited out:
        text already delivered stays charged. A write reported failed may have landed: the
        outcome's id is derived from the chat's, so it is looked for before trying again. Each
        attempt records new aggregates: the store takes an aggregate's pending events from it
        as it writes, so one that failed once has nothing left to record."""
        delay_s = SETTLE_RETRY_S_MIN
        while True:
            outcome = outcome_of()
            try:
                await self.store.record([], self._facts(hold), outcome)
                return
            except StoreError as exc:
                if await self._recorded(outcome):
                    return
                self._on_store_failure(str(exc))
                log.error(
                    "recording the charge of chat %s (%s) failed: %s; trying again in %.1f s",
                    hold.chat_id,
                    hold.user,
                    exc,
                    delay_s,
                )
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, SETTLE_RETRY_S_MAX)

    async def _recorded(self, outcome: HoldOutcome) -> bool:
        try:
            await self.store.aggregate(outcome.id)
        except Exception:  # not found, or the store is still away: not landed as far as we know
            return False
        return True

    async def release(self, hold: OpenHold, reason: str) -> Charge:
        """Close the hold with no charge (recorded, so the chat's end is on file)."""
        try:
            await self.store.record(
                [], self._facts(hold), HoldOutcome.released(hold.chat_id, hold.user, reason)
            )
        finally:
            if hold.user in self._books:  # no await before the change
                self._books[hold.user] = release_hold(self._books[hold.user], hold.chat_id.hex)
        view = await self.view(hold.user)
        return Charge(0, view.balance, view.tokens_available)

    # --- debits ---

    def issue_debits(self, user: str) -> None:
        """Make sure this user's issuer runs: it signs debits for their settled charges."""
        wake = self._issue_wake.setdefault(user, asyncio.Event())
        wake.set()
        if user not in self._issuers:
            self._issuers[user] = asyncio.create_task(self._issue(user), name=f"debits {user}")

    async def _issue(self, user: str) -> None:
        """One user's debits, one batch at a time: all their settled charges not yet issued,
        summed into one signed Transaction with an id no other debit has.

        Each batch first waits a moment for more charges: a busy user's chats then cost one
        signature, one write, one fold and one relay message per batch instead of each."""
        wake = self._issue_wake[user]
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._debit_batch_s):
                        await self._flush.wait()
                wake.clear()
                charges = dict(list((await self._book(user)).unissued.items())[:1_000])
                if not charges:
                    if wake.is_set():  # settled while we looked: look again
                        continue
                    return  # no await from here to `finally`: a new settle starts a new issuer
                total = sum(charges.values())
                position = await self._record_debit(user, total, list(charges))
                if position is None:  # this sum is used at every allowed second: wait for more
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):  # wait_for can eat a cancel on 3.11
                            await wake.wait()
                    continue
                book = issue_charges(self._books[user], charges, position)  # no await first
                self._books[user] = fold_into(book, None, self._folded_to)
                self._wake_projector()
        except Exception:
            log.exception("issuing debits of %s failed; start-up recovery will finish it", user)
        finally:
            del self._issuers[user]
            del self._issue_wake[user]

    async def _record_debit(self, user: str, tokens: int, chat_ids: list[str]) -> int | None:
        """Sign and record one debit (and the fact naming the charges it covers), in one write;
        its store position, or None if no `created_at` is free right now.

        The wire format gives a Transaction no nonce: two equal debits of one user signed in the
        same second have the same id, and every store and relay keeps only one. So each gets its
        own `created_at`, within the relays' clock-skew allowance, and the store refuses an id it
        already has (signed by an earlier run).
        """
        now = int(time.time())
        self._forget_debit_seconds(now - 2 * DEBIT_SKEW_S)
        key = (user, tokens)
        used = self._debit_seconds.setdefault(key, set())
        for created_at in (now - offset for offset in (*range(DEBIT_SKEW_S), -1, -2)):
            if created_at in used:
                continue
            used.add(created_at)
            self._debit_seconds_taken.append((created_at, key))
            event = seal(Transaction(user, -tokens), self.address, self._secret_hex, created_at)
            fact = DebitIssued.issue(user, tokens, event.id, event.to_json(), chat_ids)
            try:
                outcome = await self.store.record([event], fact, new_only=True)
            except DuplicateEvent:
                continue
            return outcome.appended[0][0]
        return None

    def _forget_debit_seconds(self, horizon: int) -> None:
        """Forget seconds taken before `horizon` (no relay takes a debit that old), in the
        order they were taken: the table holds only the last minute's debits, at O(1) each."""
        taken = self._debit_seconds_taken
        while taken and taken[0][0] < horizon:
            second, key = taken.popleft()
            used = self._debit_seconds.get(key)
            if used is not None:
                used.discard(second)
                if not used:
                    del self._debit_seconds[key]

    async def drain(self) -> None:
        """Wait for the charges being written (at most SETTLE_DRAIN_S: storage may be away),
        then until every settled charge is issued, and the projection has folded it."""
        if self._settling:
            _, late = await asyncio.wait(set(self._settling), timeout=SETTLE_DRAIN_S)
            if late:
                log.error("stopping with %d charges not yet written: storage is away", len(late))
        self._flush.set()
        try:
            while self._issuers:
                await asyncio.gather(*self._issuers.values(), return_exceptions=True)
        finally:
            self._flush.clear()
        await self.projector.catch_up()

    async def recover(self) -> Recovery:
        """Finish what a crash interrupted: debits issued but not stored are appended again
        (the store dedupes), settled charges not issued are issued, and holds recorded without
        an outcome (by earlier versions) are released."""
        await self.projector.catch_up()
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
        await self.projector.catch_up()
        charges = await unissued_charges(self.db)
        for charge in charges:
            book = await self._book(charge.user)
            self._books[charge.user] = evolve(
                book, unissued={**book.unissued, charge.chat_id: charge.tokens_charged}
            )
        users = sorted({charge.user for charge in charges})
        for user in users:
            self.issue_debits(user)
        return Recovery(len(released), len(debits), len(users))


USERS_REMEMBERED_MIN = 1_024  # the per-minute table is swept of idle users past this size


class UserLimits:
    """Per-user requests per minute (sliding window) and concurrent requests."""

    def __init__(self, per_minute_max: int, concurrent_max: int, clock: Any = time.monotonic):
        self.per_minute_max, self.concurrent_max = per_minute_max, concurrent_max
        self._clock = clock
        self._recent: dict[str, deque[float]] = {}
        self._running: dict[str, int] = {}
        self._sweep_at = USERS_REMEMBERED_MIN

    @property
    def users_remembered(self) -> int:
        """Users whose requests of the last minute are kept."""
        return len(self._recent)

    def admit(self, user: str) -> UserTicket:
        """Count a request in, or raise RateLimited (429)."""
        recent, now = self._within_the_minute(user)
        if self._running.get(user, 0) >= self.concurrent_max:
            raise RateLimited(f"more than {self.concurrent_max} requests at once")
        recent.append(now)
        self._running[user] = self._running.get(user, 0) + 1
        return UserTicket(self, user)

    def count(self, user: str) -> None:
        """Count a quick request (nothing runs on after its answer) against the minute only."""
        recent, now = self._within_the_minute(user)
        recent.append(now)

    def _within_the_minute(self, user: str) -> tuple[deque[float], float]:
        """The user's requests of the last minute, or RateLimited if there are too many."""
        now = self._clock()
        if len(self._recent) >= self._sweep_at:
            self._forget_idle(now)
        recent = self._recent.setdefault(user, deque())
        while recent and now - recent[0] >= 60.0:
            recent.popleft()
        if len(recent) >= self.per_minute_max:
            retry_after_s = max(1, int(60.0 - (now - recent[0])) + 1)
            raise RateLimited(
                f"more than {self.per_minute_max} requests a minute", retry_after_s=retry_after_s
            )
        return recent, now

    def _forget_idle(self, now: float) -> None:
        """Logins are free, so users are unbounded: forget those with no request in the last
        minute (amortized, as the table doubles)."""
        self._recent = {u: r for u, r in self._recent.items() if r and now - r[-1] < 60.0}
        self._sweep_at = max(USERS_REMEMBERED_MIN, 2 * len(self._recent))

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


UPSTREAM_PARAMETERS = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "frequency_penalty",
        "presence_penalty",
        "stop",
        "seed",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "reasoning_effort",
        "user",
        "n",
    }
)
"""The chat parameters passed to the model server (max_tokens is set by the hold)."""


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
        """The client's standard parameters (UPSTREAM_PARAMETERS) with the completion limit the
        hold pays for, and usage asked. Others are left out: a provider's own (a paid web
        search, a priority tier, another model to fall back on, storing prompts in the
        operator's account) cost what dsproxy does not meter, or expose what it should not."""
        body = {k: v for k, v in self.body.items() if k in UPSTREAM_PARAMETERS}
        body["model"] = self.model  # the model sold under the name asked for
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
        for place, part in enumerate(content if isinstance(content, list) else ()):
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):  # an image or a sound is billed by the model, and cannot be estimated here
                raise InvalidParameter(
                    f"messages[{index}].content[{place}]: only text parts are supported",
                    param=f"messages[{index}].content[{place}]",
                )
    return messages


async def parse_chat_request(body: Any, catalog: ModelCatalog, tokenizer: Tokenizer) -> ChatRequest:
    """Validate an OpenAI chat body; bad input raises before anything is reserved."""
    if not isinstance(body, dict):
        raise InvalidParameter("the body must be a JSON object", param="body")
    model = catalog.sold(body.get("model"))
    if model is None:
        raise InvalidParameter(
            f"the model {body.get('model')!r} does not exist; GET /v1/models lists them",
            param="model",
            code="model_not_found",
        )
    messages = _check_messages(body.get("messages"))
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):  # null is the default, as OpenAI has it
        raise InvalidParameter("only n = 1 is supported", param="n")
    stream = False if body.get("stream") is None else body["stream"]
    if not isinstance(stream, bool):
        raise InvalidParameter("stream must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidParameter("stream_options must be an object", param="stream_options")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise InvalidParameter("tools must be an array", param="tools")
    functions = body.get("functions")  # the older spelling of tools, still read by models
    if functions is not None and not isinstance(functions, list):
        raise InvalidParameter("functions must be an array", param="functions")
    response_format = body.get("response_format")  # a JSON schema the model reads
    if response_format is not None and not isinstance(response_format, dict):
        raise InvalidParameter("response_format must be an object", param="response_format")
    schemas = prompt_schemas(body)
    asked = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    prompt_tokens = await tokenizer.count_prompt_async(messages, schemas)
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
        calls = part.get("tool_calls")
        functions = (
            [call.get("function") for call in calls if isinstance(call, dict)]
            if isinstance(calls, list)
            else []
        )
        functions.append(part.get("function_call"))  # the form before tool calls
        for function in functions:
            if isinstance(function, dict):
                yield str(function.get("name") or "") + str(function.get("arguments") or "")


def _trim_to_hold(answer: dict[str, Any], tokens_max: int, tokenizer: Tokenizer) -> int:
    """Cut an answer longer than its hold pays for (a reasoner whose chain of thought
    `max_tokens` does not bound) to `tokens_max`, reasoning first as it was written; tool calls
    go, being incomplete. Returns the tokens kept."""
    kept = 0
    for choice in answer.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        for key in ("reasoning_content", "content"):
            if isinstance(message.get(key), str):
                message[key] = tokenizer.truncate(message[key], tokens_max - kept)
                kept += tokenizer.count(message[key])
        message.pop("tool_calls", None)
        message.pop("function_call", None)
        choice["finish_reason"] = "length"
    return kept


def _length_end(chunk: StreamChunk) -> StreamChunk:
    """The last chunk of a stream stopped at the hold: no text, finish_reason "length"."""
    data = {k: v for k, v in chunk.data.items() if k not in ("choices", "usage")}
    data["choices"] = [{"index": 0, "delta": {}, "finish_reason": "length"}]
    return StreamChunk(b"", data)


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
        self._usage_stale = False  # text came after the last usage: it does not count that
        self.complete = False
        self._started_s = started_s
        self._texts: list[str] = []  # of the chunks delivered
        self._pending: deque[list[str]] = deque()  # texts of chunks handed out, in order
        self._finish: asyncio.Task[Charge] | None = None
        self._text_bytes = 0  # of everything handed out: a token is at least one byte
        self._tokens_out: int | None = None  # counted once the bytes could pass the hold

    async def chunks(self) -> AsyncIterator[StreamChunk]:
        """Chunks to send on (usage kept back); raises UpstreamError if the stream breaks.

        Output stops at what the hold pays for: a model whose reasoning `max_tokens` does not
        bound (DeepSeek R1 as first served) would otherwise deliver more than is charged."""
        first = True
        handed: list[str] = []
        upstream = self.upstream.chunks()
        while True:
            try:
                chunk = await anext(upstream)
            except StopAsyncIteration:
                break
            except UpstreamError as exc:  # the model server cut the stream
                self.handler.observe_failure(exc)
                raise
            if first:
                self.handler.observe_latency(self._started_s)
                first = False
            usage = _usage_of(chunk.data)
            if usage is not None:
                self.usage, self._usage_stale = usage, False
                if not chunk.data.get("choices"):
                    continue
                chunk = StreamChunk(b"", {k: v for k, v in chunk.data.items() if k != "usage"})
            texts = list(_choice_texts(chunk.data.get("choices"), "delta"))
            if usage is None and self.usage is not None and any(texts):
                self._usage_stale = True  # a usage sent early (first or middle chunk)
            if await self._passes_hold(handed, texts):
                # what the model wrote up to here, as it bills it (reasoning the route does not
                # show included), not the usage of the chunk held back
                tokens = await self.handler.tokenizer.count_async("".join(handed))
                prompt = self.usage.prompt_tokens if self.usage else self.hold.prompt_tokens
                self.usage = Usage(prompt, tokens) if tokens else None
                self._usage_stale = False
                self._pending.append([])
                yield _length_end(chunk)
                break
            handed += texts
            self._pending.append(texts)
            yield chunk
        self.complete = not self._pending

    async def _passes_hold(self, handed: list[str], texts: list[str]) -> bool:
        """Whether handing out these texts too would pass the hold's completion tokens."""
        self._text_bytes += sum(len(text.encode()) for text in texts)
        limit = self.hold.completion_tokens_max
        if self._text_bytes <= limit:
            return False  # no need to count: fewer bytes than tokens paid for
        tokenizer = self.handler.tokenizer
        if self._tokens_out is None:
            self._tokens_out = await tokenizer.count_async("".join(handed))
        added = sum(tokenizer.count(text) for text in texts)  # a chunk is a token or a few
        if self._tokens_out + added > limit:  # counted in pieces: make sure before stopping
            self._tokens_out = await tokenizer.count_async("".join(handed + texts))
            if self._tokens_out > limit:
                return True
        else:
            self._tokens_out += added
        return False

    def delivered(self, chunk: StreamChunk) -> None:
        """The chunk reached the client's connection: it counts towards the charge."""
        self._texts += self._pending.popleft()

    def skipped(self, chunk: StreamChunk) -> None:
        """The route sends nothing of this chunk (the dApp shows no reasoning): if the stream is
        cut, its text is not charged; if it ends, the upstream's usage is."""
        self._pending.popleft()

    def finish(self) -> asyncio.Task[Charge]:
        """Settle once (idempotent); await it shielded, it must survive a disconnect."""
        if self._finish is None:
            self._finish = asyncio.ensure_future(self._settle())
        return self._finish

    async def _settle(self) -> Charge:
        with contextlib.suppress(Exception):
            await self.upstream.aclose()
        if self.complete and self.usage is not None and not self._usage_stale:
            usage = self.usage
        else:  # cut, disconnected, or no usage (of it all) reported: charge what was delivered
            completion = await self.handler.tokenizer.count_async("".join(self._texts))
            if completion == 0:
                return await self.handler.meter.release(self.hold, "no output delivered")
            prompt = self.usage.prompt_tokens if self.usage else self.hold.prompt_tokens
            usage = Usage(prompt, completion)
        return await self.handler.charge(self.hold, usage, delivered=True)


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
        self._counting_turns: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    async def prepare(self, body: Any) -> ChatRequest:
        return await parse_chat_request(body, self.catalog, self.tokenizer)

    @contextlib.asynccontextmanager
    async def counting_turn(self, user: str) -> AsyncIterator[None]:
        """A user's prompts are counted one at a time: the counting thread is shared, and one
        user's four megabyte prompts at once held every other user's long prompt back for
        seconds (any balance passes `refuse_if_broke`)."""
        entry = self._counting_turns.setdefault(user, (asyncio.Lock(), [0]))
        lock, waiting = entry
        waiting[0] += 1
        try:
            async with lock:
                yield
        finally:
            waiting[0] -= 1
            if waiting[0] == 0:
                del self._counting_turns[user]

    async def refuse_if_broke(self, user: str, model: str | None, messages: Any) -> None:
        """402 before the prompt is counted (the costly part: a megabyte takes half a second)
        for a user who cannot pay for even the smallest prompt of this many messages; logins
        are free, so anyone could otherwise spend the server's CPU."""
        if model is None or not isinstance(messages, list):
            return  # refused as bad input when parsed
        prompt_min = TEMPLATE_TOKENS_PER_PROMPT + TEMPLATE_TOKENS_PER_MESSAGE * len(messages)
        needed = cost(self.catalog.price(model), prompt_min, 1)
        available = (await self.meter.view(user)).tokens_available
        if available < needed:
            raise InsufficientTokens(
                f"this chat needs at least {needed} tokens and {available} are available: "
                "recharge to continue",
                tokens_available=available,
                tokens_needed=needed,
            )

    def observe_latency(self, started_s: float) -> None:
        if self.metrics is not None:
            self.metrics.upstream_latency(time.perf_counter() - started_s)

    def observe_failure(self, error: BaseException) -> None:
        if self.metrics is not None and isinstance(error, UpstreamError):
            self.metrics.upstream_failed(error)

    async def charge(self, hold: OpenHold, usage: Usage, *, delivered: bool = False) -> Charge:
        charge = await self.meter.settle(hold, usage, delivered=delivered)
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
            self.observe_failure(exc)
            reason = f"upstream failed: {exc}" if isinstance(exc, UpstreamError) else "cancelled"
            await self._release(hold, reason)
            raise
        self.observe_latency(started_s)
        settle = asyncio.ensure_future(self._charge_answer(hold, answer))
        charge = await asyncio.shield(settle)  # a disconnect now must not leave the hold open
        return answer, charge

    async def _charge_answer(self, hold: OpenHold, answer: dict[str, Any]) -> Charge:
        try:
            usage = await self._usage_delivered(hold, answer)
        except Exception:  # an answer we cannot read is not delivered: nothing is charged
            log.exception("reading a model answer failed")
            await self._release(hold, "the model server's answer could not be read")
            raise UpstreamError("the model server's answer could not be read") from None
        return await self.charge(hold, usage)

    async def _usage_delivered(self, hold: OpenHold, answer: dict[str, Any]) -> Usage:
        """The upstream's usage (the charge caps it at the hold), counted here when it sent
        none, and for an answer cut to the hold (see `_trim_to_hold`) what is left of it."""
        usage = _usage_of(answer)
        if usage is not None and usage.completion_tokens <= hold.completion_tokens_max:
            return usage
        text = "".join(_choice_texts(answer.get("choices"), "message"))
        completion = await self.tokenizer.count_async(text)
        if completion <= hold.completion_tokens_max:
            return usage or Usage(hold.prompt_tokens, completion)  # hidden tokens: capped
        limit = hold.completion_tokens_max
        completion = await asyncio.to_thread(_trim_to_hold, answer, limit, self.tokenizer)
        prompt = hold.prompt_tokens if usage is None else usage.prompt_tokens
        if isinstance(answer.get("usage"), dict):  # what was delivered, and is charged
            answer["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        return Usage(prompt, completion)

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
            self.observe_failure(exc)
            reason = f"upstream failed: {exc}" if isinstance(exc, UpstreamError) else "cancelled"
            await self._release(hold, reason)
            raise
        return ChatStream(self, hold, upstream, started_s)
