"""The backend's HTTP edge: one backend's wiring, bearer auth, bodies, OpenAI-shaped errors,
metrics and the metered streaming response. Route modules (`http_openai`, `http_accounts`,
`http_dapp`) build on these; `serve.py` assembles the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson
from attrs import define, field
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsproxy.adapters.accounts_db import AccountsDb
from dsproxy.adapters.node_keys import load_secret
from dsproxy.adapters.tokenizer import Tokenizer
from dsproxy.adapters.upstream import StreamChunk, Upstream
from dsproxy.bootstrap import address
from dsproxy.config import Settings
from dsproxy.domain.accounts import SESSION_PREFIX, hash_secret
from dsproxy.domain.metering import (
    ModelCatalog,
    Usage,
    parse_model_aliases,
    parse_model_numbers,
    parse_prices,
)
from dsproxy.entrypoints.node_metrics import NodeGauges
from dsproxy.errors import (
    AuthenticationFailed,
    BadInput,
    ClientGone,
    ConfigError,
    ContextTooLong,
    DsproxyError,
    InsufficientTokens,
    InvalidParameter,
    NotFound,
    RateLimited,
    StoreError,
    UpstreamCut,
    UpstreamError,
    UpstreamQuotaExhausted,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnauthorized,
)
from dsproxy.handlers.chat import Charge, ChatHandler, ChatStream, Meter, UserLimits, UserTicket
from dsproxy.services.node import Node
from dsproxy.wire.event import public_key_of

__all__ = [
    "Backend",
    "MeteredStreamResponse",
    "Metrics",
    "StreamRender",
    "authenticate",
    "charge_headers",
    "close_backend",
    "error_body",
    "error_response",
    "json_response",
    "now_s",
    "open_backend",
    "read_api_key_file",
    "read_json",
    "run_admitted",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_ROUTES_COUNTED = frozenset(
    {
        "/v1/chat/completions",
        "/v1/models",
        "/v1/balance",
        "/v1/transactions",
        "/v1/api-keys",
        "/v1/auth/challenge",
        "/v1/auth/login",
        "/v1/auth/logout",
        "/user",
        "/user/login",
        "/user/challenge",
        "/conversations",
        "/messages",
        "/healthz",
        "/metrics",
    }
)


_UPSTREAM_ERROR_KINDS: dict[type, str] = {
    UpstreamTimeout: "timeout",
    UpstreamRejected: "rejected",
    UpstreamUnauthorized: "unauthorized",
    UpstreamQuotaExhausted: "quota_exhausted",
    UpstreamRateLimited: "rate_limited",
    UpstreamCut: "cut",
}


BODY_S_MAX = 30.0  # as long as a request's head may take (http_protocol.HEAD_S_MAX)


def now_s() -> int:
    return int(time.time())


class Metrics:
    """Prometheus metrics of one backend, on their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dsproxy_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.tokens = Counter(
            "dsproxy_tokens",
            "Tokens by model: prompt, completion, charged",
            ["model", "kind"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "dsproxy_upstream_latency_seconds",
            "Time to the model server's first chunk (streamed) or whole answer (not streamed)",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.upstream_errors = Counter(
            "dsproxy_upstream_errors",
            "Chats the model server failed, by how (before an answer, or cutting a stream)",
            ["kind"],
            registry=r,
        )
        self.holds_open = Gauge("dsproxy_holds_open", "Holds of chats in flight", registry=r)
        self.tokens_held = Gauge("dsproxy_tokens_held", "Tokens reserved by open holds", registry=r)
        self.node = NodeGauges(r)

    def upstream_latency(self, seconds: float) -> None:
        self.upstream_seconds.observe(seconds)

    def upstream_failed(self, error: UpstreamError) -> None:
        kind = next(
            (
                _UPSTREAM_ERROR_KINDS[cls]
                for cls in type(error).__mro__
                if cls in _UPSTREAM_ERROR_KINDS
            ),
            "failed",
        )
        self.upstream_errors.labels(kind).inc()

    def charged(self, model: str, usage: Usage, tokens_charged: int) -> None:
        self.tokens.labels(model, "prompt").inc(usage.prompt_tokens)
        self.tokens.labels(model, "completion").inc(usage.completion_tokens)
        self.tokens.labels(model, "charged").inc(tokens_charged)

    async def refresh(self, backend: Backend) -> None:
        """Gauges read from the tables at scrape time."""
        holds_open, tokens_held = backend.meter.totals()
        self.holds_open.set(holds_open)
        self.tokens_held.set(tokens_held)
        await self.node.refresh(backend.node)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: count responses by route and status (unknown paths as `other`)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in _ROUTES_COUNTED else "other"
        if path.startswith("/v1/api-keys/"):
            route = "/v1/api-keys/{id}"
        elif path.startswith("/v1/models/"):
            route = "/v1/models/{name}"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


STORAGE_FAILURE_SHOWN_S = 60.0
"""/healthz says "failing" this long after a request failed on storage (a full disk)."""


@define
class StorageHealth:
    """The last storage failure a request met, for /healthz: the process itself keeps
    serving, but a full or broken disk fails every chat that must record its charge."""

    failure: str | None = None
    failed_at: float = 0.0  # time.monotonic()

    def failed(self, failure: str) -> None:
        self.failure, self.failed_at = failure, time.monotonic()

    def recent(self) -> str | None:
        """The failure, if it happened within STORAGE_FAILURE_SHOWN_S."""
        if self.failure is None or time.monotonic() - self.failed_at > STORAGE_FAILURE_SHOWN_S:
            return None
        return self.failure


@define
class Backend:
    """Everything one backend process serves with; build with `open_backend`."""

    settings: Settings
    node: Node
    accounts: AccountsDb
    upstream: Upstream
    tokenizer: Tokenizer
    catalog: ModelCatalog
    meter: Meter
    chats: ChatHandler
    limits: UserLimits
    metrics: Metrics
    server: str  # the public URL login challenges are bound to
    pubkey: str
    storage: StorageHealth = field(factory=StorageHealth)
    client_limits: UserLimits | None = None  # login challenges, by client address


def catalog_of(settings: Settings) -> ModelCatalog:
    if not settings.models:
        raise ConfigError("DSPROXY_MODELS is empty: list the models this backend sells")
    return ModelCatalog(
        models=settings.models,
        prices=parse_prices(settings.prices, "DSPROXY_PRICES"),
        context_windows=parse_model_numbers(settings.context_windows, "DSPROXY_CONTEXT_WINDOWS"),
        context_window_default=settings.context_window_tokens,
        completion_tokens_max=settings.completion_tokens_max,
        aliases=parse_model_aliases(settings.model_aliases, settings.models),
    )


def upstream_api_key(settings: Settings) -> str:
    """The operator's key for the upstream: from the variable or from a file (never logged)."""
    if settings.upstream_api_key and settings.upstream_api_key_file:
        raise ConfigError("set DSPROXY_UPSTREAM_API_KEY or DSPROXY_UPSTREAM_API_KEY_FILE, not both")
    if settings.upstream_api_key_file is None:
        return settings.upstream_api_key
    return read_api_key_file(settings.upstream_api_key_file, "DSPROXY_UPSTREAM_API_KEY_FILE")


def read_api_key_file(path: Path, key: str) -> str:
    """The API key in `path`; `key` names the setting or option that gave the path. A file
    others can read is refused, as the Nostr key's is: the key spends the operator's money."""
    try:
        text = path.read_text(encoding="utf-8").strip()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{key} {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:  # a binary file, or a key saved in another encoding
        raise ConfigError(f"{key} {str(path)!r}: not UTF-8 text, as an API key is") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{key} {str(path)!r} is readable by others: chmod 600 it")
    return text


async def open_backend(settings: Settings) -> Backend:
    """Open the ledger node (with the holds table), the accounts file and the upstream client,
    then close any holds a crash left open."""
    catalog = catalog_of(settings)
    secret_hex = load_secret(settings.nostr_key_file)
    pubkey = public_key_of(secret_hex)
    api_key = upstream_api_key(settings)
    if pubkey not in settings.trusted_backends:
        # its debits would be folded as untrusted: no balance would ever drop, and users would
        # chat for free
        raise ConfigError(
            f"this backend's key {pubkey} is not in DSPROXY_TRUSTED_BACKENDS: its debits would "
            "lower no balance; add it"
        )
    node = await Node.open(settings)
    try:
        accounts = await AccountsDb.open(settings.data_dir / "backend.sqlite")
    except BaseException:  # what is open would keep the process from exiting
        await node.aclose()
        raise
    ledger = node.ledger
    storage = StorageHealth()
    meter = Meter(
        ledger.store,
        ledger.db,
        ledger.projector,
        address(settings),
        secret_hex,
        catalog,
        wake_projector=node.wake.set,
        on_store_failure=storage.failed,
    )
    upstream = Upstream(
        settings.upstream_url,
        api_key,
        timeout_s=settings.upstream_timeout_s,
        connections_max=settings.upstream_connections_max,
        max_tokens_param=settings.upstream_max_tokens_param,
    )
    tokenizer = await asyncio.to_thread(Tokenizer)
    metrics = Metrics()
    chats = ChatHandler(meter, upstream, tokenizer, catalog, metrics)
    limits = UserLimits(settings.requests_per_minute_max, settings.concurrent_requests_max)
    server = settings.public_url or f"http://{settings.http_host}:{settings.http_port}"
    recovery = await meter.recover()
    if recovery.released or recovery.debits_appended or recovery.users_with_charges_to_issue:
        log.warning(
            "start-up recovery: released %d holds left open, appended %d recorded debits, "
            "issuing the settled charges of %d users",
            recovery.released,
            recovery.debits_appended,
            recovery.users_with_charges_to_issue,
        )
    return Backend(
        settings,
        node,
        accounts,
        upstream,
        tokenizer,
        catalog,
        meter,
        chats,
        limits,
        metrics,
        server,
        pubkey,
        storage,
        # logins are free, and each new wallet's leaves rows on disk: a client address may ask
        # for so many challenges a minute (the per-user limits cannot see new wallets)
        UserLimits(settings.challenges_per_minute_max, concurrent_max=1),
    )


async def close_backend(backend: Backend) -> None:
    """Close everything, each part even if another failed to close."""
    async with contextlib.AsyncExitStack() as parts:
        parts.push_async_callback(backend.node.aclose)
        parts.push_async_callback(backend.accounts.close)
        parts.push_async_callback(backend.upstream.aclose)
        await backend.meter.drain()  # settled charges become debit events before files close


# --- requests and responses ----------------------------------------------------------------------


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


JSON_WRITABLE_DEPTH = 254


async def read_json(request: Request, bytes_max: int) -> Any:
    """The body as JSON, refusing more than `bytes_max` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if (
        declared is not None
        and declared.isascii()
        and declared.isdigit()
        and (len(declared) > 18 or int(declared) > bytes_max)  # int() refuses 4,301 digits
    ):
        raise InvalidParameter(
            f"the body is over {bytes_max} bytes", param="body", code="request_too_large"
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(BODY_S_MAX):  # a body never finished held its connection
            async for chunk in request.stream():
                size += len(chunk)
                if size > bytes_max:
                    raise InvalidParameter(
                        f"the body is over {bytes_max} bytes",
                        param="body",
                        code="request_too_large",
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise InvalidParameter(
            f"the body did not arrive within {BODY_S_MAX:.0f} s",
            param="body",
            code="request_timeout",
        ) from None
    raw = b"".join(chunks)
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidParameter("the body is not valid JSON", param="body") from None
    # orjson reads 1024 levels of nesting but writes only 254: refuse now what could not be
    # passed on to the upstream (counting brackets first keeps the common case free)
    if raw.count(b"[") + raw.count(b"{") > JSON_WRITABLE_DEPTH:
        try:
            orjson.dumps(value)
        except orjson.JSONEncodeError:
            raise InvalidParameter("the body is nested too deeply", param="body") from None
    return value


def query_limit(request: Request, default: int, most: int) -> int:
    """`?limit=` from 1 to `most`, or InvalidParameter (the length is looked at first: int()
    refuses more than 4,300 digits, a ValueError and then a 500)."""
    raw = request.query_params.get("limit", str(default))
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9) or not 1 <= int(raw) <= most:
        raise InvalidParameter(f"limit must be 1..{most}", param="limit")
    return int(raw)


async def authenticate(request: Request, backend: Backend, *, session_only: bool = False) -> str:
    """The user a bearer token or API key belongs to; AuthenticationFailed otherwise.

    `session_only` refuses API keys: managing keys needs a fresh wallet login.
    """
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise AuthenticationFailed("send `Authorization: Bearer <token or API key>`")
    secret = secret.strip()
    if session_only and not secret.startswith(SESSION_PREFIX):
        raise AuthenticationFailed("this needs a login token (POST /v1/auth/login), not an API key")
    user = await backend.accounts.user_for(hash_secret(secret), now_s())
    if user is None:
        raise AuthenticationFailed("the token or API key is wrong, expired or revoked")
    return user


def charge_headers(charge: Charge) -> dict[str, str]:
    return {
        "x-dsproxy-tokens-charged": str(charge.tokens_charged),
        "x-dsproxy-balance": str(charge.balance),
        "x-dsproxy-available": str(charge.available),
    }


def _classify(exc: DsproxyError) -> tuple[int, str, str | None, str | None]:
    """(status, type, code, param) for one of our errors: the one place they meet HTTP."""
    if isinstance(exc, InvalidParameter):
        status = 404 if exc.code == "model_not_found" else 400
        status = 413 if exc.code == "request_too_large" else status
        status = 408 if exc.code == "request_timeout" else status
        return status, "invalid_request_error", exc.code, exc.param
    if isinstance(exc, ContextTooLong):
        return 400, "invalid_request_error", "context_length_exceeded", "messages"
    if isinstance(exc, BadInput):
        return 400, "invalid_request_error", None, None
    table: list[tuple[type[DsproxyError], int, str, str | None]] = [
        (AuthenticationFailed, 401, "authentication_error", "invalid_api_key"),
        (InsufficientTokens, 402, "insufficient_quota", "insufficient_balance"),
        (NotFound, 404, "invalid_request_error", "not_found"),
        (ClientGone, 499, "invalid_request_error", "client_closed_request"),  # nobody reads it
        (RateLimited, 429, "rate_limit_error", "rate_limit_exceeded"),
        (UpstreamRejected, 400, "invalid_request_error", "upstream_rejected"),
        (UpstreamUnauthorized, 502, "upstream_error", "upstream_unauthorized"),
        (UpstreamQuotaExhausted, 503, "upstream_error", "upstream_quota_exhausted"),
        (UpstreamRateLimited, 429, "upstream_error", "upstream_rate_limited"),
        (UpstreamTimeout, 504, "upstream_error", "upstream_timeout"),
        (UpstreamError, 502, "upstream_error", "upstream_error"),
        (StoreError, 503, "server_error", "storage_unavailable"),
    ]
    for kind, status, type_, code in table:
        if isinstance(exc, kind):
            return status, type_, code, None
    return 500, "server_error", None, None


def error_body(exc: DsproxyError, tokens_charged: int = 0) -> tuple[int, dict[str, Any]]:
    """The OpenAI-shaped error; `tokens_charged` is what a stream that broke charged for the
    part it delivered."""
    status, type_, code, param = _classify(exc)
    message = str(exc)
    if isinstance(exc, UpstreamError) and not isinstance(exc, UpstreamRejected):
        charged = (
            f"only the {tokens_charged} tokens of what was delivered were charged"
            if tokens_charged
            else "nothing was charged"
        )
        message += f" (a problem of this service or its model provider: {charged})"
    return status, {"error": {"message": message, "type": type_, "param": param, "code": code}}


DAPP_ROUTES = ("/user", "/conversations", "/messages")


def is_dapp_route(path: str) -> bool:
    return any(path == route or path.startswith(route + "/") for route in DAPP_ROUTES)


def dapp_error(body: dict[str, Any]) -> dict[str, Any]:
    """The dApp's routes say errors as the Go backend did, `{"error": "<message>"}` (the dApp
    shows `data.error` as text), with our `code` and `param` beside it."""
    error = body["error"]
    return {"error": error["message"], "code": error["code"], "param": error["param"]}


def error_response(exc: DsproxyError, *, dapp: bool = False) -> Response:
    status, body = error_body(exc)
    if dapp:
        body = dapp_error(body)
    headers: dict[str, str] = {}
    hopeless = isinstance(exc, UpstreamUnauthorized | UpstreamQuotaExhausted)
    if hopeless or (status < 500 and status != 429):
        headers["x-should-retry"] = "false"  # the OpenAI SDK retries 5xx and 429 otherwise
    if isinstance(exc, RateLimited | UpstreamRateLimited) and exc.retry_after_s is not None:
        headers["retry-after"] = str(exc.retry_after_s)
    return json_response(body, status, headers)


# --- the metered stream -------------------------------------------------------------------------


class StreamRender(Protocol):
    """How one route writes a metered stream on the wire."""

    def chunk(self, chunk: StreamChunk) -> bytes | None: ...

    async def end(self, charge: Charge, error: UpstreamError | None) -> bytes: ...

    async def aborted(self, charge: Charge) -> None: ...


async def _disconnected(receive: Receive, gone: asyncio.Event) -> None:
    """Return, with `gone` set, once the client has closed its connection (the request's body
    must have been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


async def _until_disconnect(
    work: Coroutine[Any, Any, None], receive: Receive, gone: asyncio.Event
) -> None:
    """Run `work`; cancel it if the client goes away first."""
    pump = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive, gone))
    try:
        await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pump, watcher):
            task.cancel()
        results = await asyncio.gather(pump, watcher, return_exceptions=True)
        failure = results[0]
        if isinstance(failure, Exception) and not isinstance(failure, OSError):
            log.error("a metered stream failed: %r", failure)


async def unless_disconnected(work: Awaitable[T], receive: Receive) -> T:
    """Await `work` (a non-streamed chat, or opening a stream); if the client goes away first,
    cancel it and raise ClientGone: its hold is released, since nobody will read the answer.

    Starlette does not cancel a handler whose client left, and the answer would be charged."""
    task = asyncio.ensure_future(work)
    gone = asyncio.Event()
    watcher = asyncio.ensure_future(_disconnected(receive, gone))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and not gone.is_set():  # the watcher failed, not the client
            await task
    finally:
        watcher.cancel()
        task.cancel()  # a no-op once it is done
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientGone("the client closed the connection before the answer")
    return task.result()


class MeteredStreamResponse:
    """An SSE response that settles its chat exactly once, whatever ends it: the upstream's
    end, an upstream error, or the client going away (then only delivered chunks count)."""

    def __init__(
        self,
        stream: ChatStream,
        render: StreamRender,
        ticket: UserTicket,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.stream, self.render, self.ticket = stream, render, ticket
        self.headers = {"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ended = False
        gone = asyncio.Event()

        async def pump() -> None:
            nonlocal ended
            error: UpstreamError | None = None
            try:
                async with contextlib.aclosing(self.stream.chunks()) as chunks:
                    async for chunk in chunks:
                        data = self.render.chunk(chunk)
                        if not data:  # nothing of it goes to the client: not delivered
                            self.stream.skipped(chunk)
                            continue
                        await send({"type": "http.response.body", "body": data, "more_body": True})
                        # uvicorn's send returns silently once the client is gone, and chunks
                        # the upstream already sent never suspend us: let the watcher speak first
                        await asyncio.sleep(0)
                        if gone.is_set():
                            return
                        self.stream.delivered(chunk)
            except UpstreamError as exc:
                error = exc
            except Exception:  # a chunk we could not relay: end the stream properly all the same
                log.exception("relaying a streamed answer failed")
                error = UpstreamError("the model server sent a chunk that could not be relayed")
            charge = await asyncio.shield(self.stream.finish())
            tail = await self.render.end(charge, error)
            ended = True
            await send({"type": "http.response.body", "body": tail, "more_body": False})

        try:
            headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
            headers += [(k.encode(), v.encode()) for k, v in self.headers.items()]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await _until_disconnect(pump(), receive, gone)
        finally:
            try:
                charge = await asyncio.shield(self.stream.finish())
                if not ended:
                    await self.render.aborted(charge)
            finally:
                self.ticket.done()


async def run_admitted(
    backend: Backend,
    user: str,
    work: Callable[[UserTicket], Awaitable[Response | MeteredStreamResponse]],
) -> Response | MeteredStreamResponse:
    """Run a chat under the user's limits; a stream takes the ticket and ends it itself."""
    ticket = backend.limits.admit(user)
    try:
        response = await work(ticket)
    except BaseException:
        ticket.done()
        raise
    if not isinstance(response, MeteredStreamResponse):
        ticket.done()
    return response
