"""`dsproxy-serve` (and `dsproxy serve`): the backend, an OpenAI-compatible metered proxy.

One asyncio loop runs the HTTP API (Starlette on uvicorn) beside the node (ingest, projector
and outbox). Start-up closes holds a crash left open before the first request is accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from dsproxy.adapters.data_dir_lock import exclusive_data_dir
from dsproxy.adapters.listening import bind_port
from dsproxy.config import Settings
from dsproxy.entrypoints import http_accounts, http_dapp, http_openai
from dsproxy.entrypoints.event_loop import run_service
from dsproxy.entrypoints.heap import freeze_startup_objects
from dsproxy.entrypoints.http_api import (
    Backend,
    CountRequests,
    close_backend,
    dapp_error,
    error_response,
    is_dapp_route,
    json_response,
    open_backend,
)
from dsproxy.entrypoints.http_protocol import BoundedHttpTools
from dsproxy.errors import DsproxyError, StoreError

__all__ = ["add_commands", "build_app", "main", "serve"]

log = logging.getLogger(__name__)

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})  # every interface: no address of ours


def build_app(backend: Backend) -> ASGIApp:
    """The ASGI app of one backend: every route, OpenAI-shaped errors, request metrics."""

    async def healthz(request: Request) -> Response:
        """200 while it can serve chats; "degraded" when no relay is connected (debits wait in
        the outbox, credits do not arrive), which a restart would not mend; 503 "failing" for a
        minute after a request failed on storage (a full disk fails every chat)."""
        ledger = backend.node.ledger
        relays = backend.node.settings.relays
        connected = len(backend.node.ingest.connected)
        storage_failure = backend.storage.recent()
        status = "degraded" if relays and not connected else "ok"
        body: dict[str, object] = {
            "status": "failing" if storage_failure else status,
            "relays": {"configured": len(relays), "connected": connected},
            "storage": {"last_failure": storage_failure},
        }
        try:
            body["store_position"] = await ledger.store.max_position()
            body["projection_position"] = await ledger.db.position()
        except DsproxyError as exc:
            backend.storage.failed(str(exc))
            body["status"], body["storage"] = "failing", {"last_failure": str(exc)}
        return json_response(body, 503 if body["status"] == "failing" else 200)

    async def metrics(request: Request) -> Response:
        await backend.metrics.refresh(backend)
        return Response(backend.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def our_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DsproxyError), exc
        response = error_response(exc, dapp=is_dapp_route(request.url.path))
        if response.status_code >= 500:  # the operator's to fix (a full disk): say so in the log
            log.error("%s %s: %s", request.method, request.url.path, exc)
        if isinstance(exc, StoreError):
            backend.storage.failed(str(exc))
        return response

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException), exc
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = {"error": {"message": exc.detail, "type": kind, "param": None, "code": None}}
        if is_dapp_route(request.url.path):
            body = dapp_error(body)
        return json_response(body, exc.status_code, headers=dict(exc.headers or {}))  # 405: Allow

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        body = {"error": {"message": "internal error", "type": "server_error"}}
        body["error"].update(param=None, code=None)
        return json_response(dapp_error(body) if is_dapp_route(request.url.path) else body, 500)

    routes = [
        *http_openai.routes(backend),
        *http_accounts.routes(backend),
        *http_dapp.routes(backend),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            DsproxyError: our_error,
            HTTPException: http_error,
            Exception: server_error,
        },
    )
    return CountRequests(app, backend.metrics)


async def serve(
    settings: Settings,
    *,
    on_started: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until `stop` is set or a signal arrives; `on_started(port)` once listening."""
    sock = bind_port(  # first: a busy port is a clear error before anything is opened
        settings.http_host, settings.http_port, hint="pick another with DSPROXY_HTTP_PORT"
    )
    if not settings.public_url:  # login messages name this server: the port it really has
        settings = settings.replace(http_port=sock.getsockname()[1])
        if settings.http_host in WILDCARD_HOSTS:
            log.warning(
                "DSPROXY_PUBLIC_URL is not set: login messages name http://%s:%d, an address "
                "users cannot recognise; set it to the URL they reach this server at",
                settings.http_host,
                settings.http_port,
            )
    try:
        backend = await open_backend(settings)
    except BaseException:
        sock.close()
        raise
    freeze_startup_objects()
    try:
        config = uvicorn.Config(
            build_app(backend),
            host=settings.http_host,
            port=settings.http_port,
            http=BoundedHttpTools,  # bounded request heads: see http_protocol
            lifespan="off",
            access_log=False,
            log_level="warning",
            # chats in flight may finish (docker compose waits 30 s before it kills)
            timeout_graceful_shutdown=settings.shutdown_grace_s,
        )
        server = _Server(config)
        if stop is None:  # run as a command: SIGINT and SIGTERM both stop cleanly (exit 0)
            stop = asyncio.Event()
            for signum in (signal.SIGINT, signal.SIGTERM):
                asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        node_stop = asyncio.Event()
        node = asyncio.create_task(backend.node.run(node_stop), name="node")
        http = asyncio.create_task(server.serve(sockets=[sock]), name="http")
        watchers = [
            asyncio.create_task(_report_started(server, on_started)),
            asyncio.create_task(_stop_when(stop, server)),
        ]
        try:
            done, _ = await asyncio.wait({node, http}, return_when=asyncio.FIRST_COMPLETED)
            for task in (node, http):  # the HTTP server can fail too (it could not listen)
                if task in done and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            server.should_exit = True
            node_stop.set()
            for task in watchers:
                task.cancel()
            await asyncio.gather(http, node, *watchers, return_exceptions=True)
    finally:
        await close_backend(backend)
        sock.close()


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: it re-raises SIGTERM after a graceful stop
    (exit 143, before the node and the stores are closed); `serve` handles signals itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _report_started(server: uvicorn.Server, on_started: Callable[[int], None] | None) -> None:
    while not server.started:  # noqa: ASYNC110 (uvicorn offers no event to wait on)
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    log.warning("dsproxy backend listening on port %d", port)
    if on_started is not None:
        on_started(port)


async def _stop_when(stop: asyncio.Event, server: uvicorn.Server) -> None:
    await stop.wait()
    server.should_exit = True


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    changes = {"http_host": args.host, "http_port": args.port}
    settings = settings.replace(**{k: v for k, v in changes.items() if v is not None})
    with (
        exclusive_data_dir(settings.data_dir, "dsproxy serve"),
        contextlib.suppress(KeyboardInterrupt),
    ):
        run_service(serve(settings))
    return 0


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the metered OpenAI-compatible API (the backend)",
        epilog="dsproxy-serve also takes dsproxy's own options: --config FILE, --data-dir DIR, "
        "--log-level LEVEL.",
    )
    parser.add_argument("--host", help="listen address (or DSPROXY_HTTP_HOST)")
    parser.add_argument("--port", type=int, help="listen port (or DSPROXY_HTTP_PORT)")
    parser.set_defaults(run=run_serve)


def main(argv: Sequence[str] | None = None) -> int:
    """`dsproxy-serve [--config F] [--data-dir D] [--host H] [--port P]`."""
    from dsproxy.entrypoints import cli

    args = list(sys.argv[1:] if argv is None else argv)
    globals_: list[str] = []
    rest: list[str] = []
    takes_value = {"--config", "--data-dir", "--log-level"}
    index = 0
    while index < len(args):
        name = args[index].split("=", 1)[0]
        target = globals_ if name in takes_value else rest
        target.append(args[index])
        if name in takes_value and "=" not in args[index] and index + 1 < len(args):
            target.append(args[index + 1])
            index += 1
        index += 1
    return cli.main([*globals_, "serve", *rest])


if __name__ == "__main__":
    sys.exit(main())
