"""The whole demo deployment in one process: relay, chain, controller, backend and model.

Everything runs on one asyncio loop. nostr-sdk's LocalRelay keeps its own (tokio) threads and
the local chain serves JSON-RPC from its thread, as they always do; everything else is a task.
Nothing listens beyond 127.0.0.1. `open_stack` registers each part's shutdown on an
AsyncExitStack as it starts it, so leaving the stack stops the parts in reverse order: the HTTP
servers first, then the nodes (which finish publishing and storing), then the relay and chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn

import nostr_sdk
import uvicorn
from attrs import define, frozen
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from dsproxy.adapters.balance_payment import BalancePayment
from dsproxy.adapters.data_dir_lock import exclusive_data_dir, make_data_dir
from dsproxy.adapters.listening import bind_port
from dsproxy.adapters.node_keys import create_key_file, load_secret
from dsproxy.adapters.projection_db import ProjectionDb
from dsproxy.adapters.relay import build_local_relay
from dsproxy.adapters.solana_rpc import BalancePaymentRpc
from dsproxy.bootstrap import address, program_from_settings
from dsproxy.config import Settings, load_settings
from dsproxy.demo.upstream_model import DEMO_MODELS, DemoModel
from dsproxy.entrypoints.http_api import Backend, close_backend, open_backend
from dsproxy.entrypoints.http_protocol import BoundedHttpTools
from dsproxy.entrypoints.serve import build_app
from dsproxy.errors import ConfigError, DsproxyError
from dsproxy.handlers.recharge import build_recharge_handler
from dsproxy.localchain import LocalChain, LocalChainServer
from dsproxy.services.controller import ControllerLoop
from dsproxy.services.node import Node
from dsproxy.wire.envelope import Address

__all__ = [
    "DemoLayout",
    "DemoOptions",
    "Stack",
    "bind_api_port",
    "discard_layout",
    "open_stack",
    "prepare_layout",
    "watch",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
LAMPORTS_PER_SOL = 1_000_000_000
BOT_AIRDROP_LAMPORTS = 10 * LAMPORTS_PER_SOL  # the bot pays the fees of every `pay`
SLOT_INTERVAL_S = 0.4  # a slot every 400 ms, as on a real cluster
STOP_TIMEOUT_S = 30.0


@frozen
class DemoOptions:
    """What the `demo` command was asked for."""

    upstream_url: str | None = None
    upstream_api_key_file: Path | None = None
    model: str | None = None


@frozen
class DemoLayout:
    """Where the demo keeps its files: two data directories and the keys, under one root."""

    root: Path
    created: bool = False  # the demo made `root`: a failed start removes it

    @property
    def controller_dir(self) -> Path:
        return self.root / "controller"

    @property
    def backend_dir(self) -> Path:
        return self.root / "backend"

    @property
    def controller_key(self) -> Path:
        return self.controller_dir / "nostr.key"

    @property
    def backend_key(self) -> Path:
        return self.backend_dir / "nostr.key"

    @property
    def bot_keypair(self) -> Path:
        return self.controller_dir / "bot.json"

    @property
    def wallet(self) -> Path:
        return self.root / "wallet.json"

    def config_file(self, data_dir: Path) -> Path:
        return data_dir / "dsproxy.toml"


@define
class Stack:
    """The running demo: what the walkthrough drives and what the instructions name."""

    layout: DemoLayout
    relay_url: str
    chain: LocalChain
    chain_url: str
    program: BalancePayment
    address: Address
    backend: Backend
    controller_db: ProjectionDb
    api_url: str  # the OpenAI base URL, ending in /v1
    models: tuple[str, ...]
    demo_model: bool
    tasks: list[asyncio.Task[Any]]  # if one ends, the demo is broken


# --- files and ports ------------------------------------------------------------------------


def prepare_layout(root: Path, *, created: bool = False) -> DemoLayout:
    """A fresh demo directory; an earlier demo's cannot be reused (its chain was in memory).
    `created`: the caller made `root` for the demo (a temporary directory)."""
    root = root.expanduser().resolve()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(
            f"--data-dir {str(root)!r} is not an empty directory: the demo's chain and relay "
            "live in memory and start empty, so give it a new directory"
        )
    layout = DemoLayout(root, created=created or not root.exists())
    for directory in (layout.root, layout.controller_dir, layout.backend_dir):
        make_data_dir(directory)  # 0700, as every data directory: conversations, keys
    return layout


def discard_layout(layout: DemoLayout) -> None:
    """Remove what the demo wrote, so that a start that failed can be tried again in the same
    directory (it was empty, or the demo made it)."""
    for directory in (layout.controller_dir, layout.backend_dir):
        shutil.rmtree(directory, ignore_errors=True)
    layout.wallet.unlink(missing_ok=True)
    if layout.created:
        with contextlib.suppress(OSError):  # something else was put there meanwhile: kept
            layout.root.rmdir()


def write_keypair(path: Path, keypair: Keypair) -> Path:
    """A Solana CLI keypair file, mode 0600 from the start."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(list(bytes(keypair)), handle)
    return path


def bind_api_port(port: int) -> socket.socket:
    """Take the API's port before anything starts, so a busy port is the first, clear error."""
    return bind_port(HOST, port, hint="pick another with --port (0 = any free port)")


def _free_socket() -> socket.socket:
    return bind_api_port(0)


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


# --- settings ---------------------------------------------------------------------------------


def write_config(path: Path, settings: Settings) -> None:
    """The node's settings as a TOML file, so `dsproxy --config FILE balance ...` sees the same
    ledger (another trust policy or key would make it rebuild the projection)."""
    lines = [
        f"data_dir = {json.dumps(str(settings.data_dir))}",
        f"machine_pubkey = {json.dumps(settings.machine_pubkey)}",
        f"trusted_controllers = {json.dumps(list(settings.trusted_controllers))}",
        f"trusted_backends = {json.dumps(list(settings.trusted_backends))}",
        f"nostr_key_file = {json.dumps(str(settings.nostr_key_file))}",
    ]
    path.write_text("\n".join(lines) + "\n")


def base_settings(
    layout: DemoLayout, relay_url: str, chain_url: str, controller: str, backend: str
) -> Settings:
    """Embedded defaults: the environment and any config file are ignored on purpose, so
    that the demo never touches a real relay, chain or data directory."""
    return load_settings(
        {},
        data_dir=str(layout.root),
        machine_pubkey=nostr_sdk.Keys.generate().public_key().to_hex(),
        trusted_controllers=[controller],
        trusted_backends=[backend],
        relays=[relay_url],
        solana_rpc_url=chain_url,
    )


def controller_settings(base: Settings, layout: DemoLayout) -> Settings:
    return base.replace(
        data_dir=layout.controller_dir,
        nostr_key_file=layout.controller_key,
        bot_keypair_file=layout.bot_keypair,
    )


def backend_settings(
    base: Settings, layout: DemoLayout, options: DemoOptions, port: int, upstream_url: str
) -> Settings:
    models = DEMO_MODELS if options.upstream_url is None else base.models
    if options.model is not None:
        models = (options.model,)
    return base.replace(
        data_dir=layout.backend_dir,
        nostr_key_file=layout.backend_key,
        http_host=HOST,
        http_port=port,
        public_url=f"http://{HOST}:{port}",
        upstream_url=upstream_url,
        upstream_api_key="",
        upstream_api_key_file=options.upstream_api_key_file,
        models=tuple(models),
        prices=(),  # 1 token of balance per prompt and per completion token
    )


# --- tasks ---------------------------------------------------------------------------------------


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the demo handles SIGINT and SIGTERM itself."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()


def spawn(
    exits: contextlib.AsyncExitStack,
    work: Coroutine[Any, Any, Any],
    name: str,
    stop: Callable[[], None] | None = None,
) -> asyncio.Task[Any]:
    """Run `work` as a task; on leaving `exits`, ask it to stop (or cancel it) and wait."""
    task = asyncio.create_task(work, name=name)

    async def finish() -> None:
        if stop is None:
            task.cancel()
        else:
            stop()
        # asyncio.wait, not wait_for(shield(task)): that raised the CancelledError of a task
        # we had cancelled, in place of the error that made the demo stop
        done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)
        if not done:
            log.error("%s did not stop within %.0f s: cancelling it", name, STOP_TIMEOUT_S)
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    exits.push_async_callback(finish)
    return task


async def serve_app(
    exits: contextlib.AsyncExitStack, app: Any, sock: socket.socket, name: str
) -> asyncio.Task[Any]:
    """Serve an ASGI app on a bound socket; return once it accepts connections."""
    config = uvicorn.Config(
        app,
        http=BoundedHttpTools,
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    server = _EmbeddedServer(config)
    exits.callback(sock.close)

    def stop() -> None:
        server.should_exit = True

    task = spawn(exits, server.serve(sockets=[sock]), name, stop)
    while not server.started:  # uvicorn offers no event to wait on
        if task.done():
            task.result()
            raise DsproxyError(f"the {name} server stopped during start-up")
        await asyncio.sleep(0.01)
    return task


# --- the parts -----------------------------------------------------------------------------------


async def start_relay(exits: contextlib.AsyncExitStack) -> str:
    """nostr-sdk's in-process relay on a free port of 127.0.0.1, rate limit raised."""
    relay = build_local_relay(host=HOST)
    await relay.run()
    exits.callback(relay.shutdown)
    return str(await relay.url())


async def start_chain(exits: contextlib.AsyncExitStack, bot: Pubkey) -> tuple[LocalChain, str]:
    """The local Solana stand-in, the program initialized, the bot funded, served over HTTP."""
    chain = LocalChain(BalancePayment())
    chain.initialize_global(authority=Keypair().pubkey(), bot=bot, treasury=Keypair().pubkey())
    chain.airdrop(bot, BOT_AIRDROP_LAMPORTS)
    server = LocalChainServer(chain, host=HOST, slot_interval_s=SLOT_INTERVAL_S)
    await asyncio.to_thread(server.start)
    exits.push_async_callback(asyncio.to_thread, server.close)
    return chain, server.url


async def start_controller(
    exits: contextlib.AsyncExitStack, settings: Settings, bot: Keypair
) -> tuple[Node, list[asyncio.Task[Any]]]:
    """A controller as `dsproxy controller` builds one: node, chain client, handler, loop."""
    exits.enter_context(exclusive_data_dir(settings.data_dir, "dsproxy demo's controller"))
    node = await Node.open(settings, untrusted_too=True)  # users' Requests
    exits.push_async_callback(node.aclose)
    rpc = await exits.enter_async_context(
        BalancePaymentRpc.connect(
            settings.solana_rpc_url,
            program_from_settings(settings),
            commitment=settings.solana_commitment,
        )
    )
    program = await rpc.fetch_settings()
    handler = build_recharge_handler(
        settings,
        node.ledger.projector,
        rpc,
        program,
        signer_secret=load_secret(settings.nostr_key_file),
        bot=bot,
    )
    stop = asyncio.Event()
    node_task = spawn(exits, node.run(stop), "controller node", stop.set)
    loop = ControllerLoop(handler, concurrency_max=settings.controller_concurrency_max)
    loop_task = spawn(exits, loop.run(), "controller loop")
    return node, [node_task, loop_task]


async def start_backend(
    exits: contextlib.AsyncExitStack, settings: Settings, sock: socket.socket
) -> tuple[Backend, list[asyncio.Task[Any]]]:
    """The backend as `dsproxy serve` builds it: the node and the HTTP API on `sock`."""
    exits.enter_context(exclusive_data_dir(settings.data_dir, "dsproxy demo's backend"))
    backend = await open_backend(settings)
    exits.push_async_callback(close_backend, backend)
    stop = asyncio.Event()
    node_task = spawn(exits, backend.node.run(stop), "backend node", stop.set)
    http_task = await serve_app(exits, build_app(backend), sock, "backend API")
    return backend, [node_task, http_task]


def make_keys(layout: DemoLayout) -> tuple[str, str, Keypair]:
    """The controller's and the backend's Nostr keys (0600 files) and the bot's keypair."""
    controller = create_key_file(layout.controller_key)
    backend = create_key_file(layout.backend_key)
    bot = Keypair()
    write_keypair(layout.bot_keypair, bot)
    return controller, backend, bot


async def open_stack(
    options: DemoOptions,
    layout: DemoLayout,
    api_socket: socket.socket,
    exits: contextlib.AsyncExitStack,
) -> Stack:
    """Start every part, in the order each needs the one before; stopped by leaving `exits`."""
    controller_pubkey, backend_pubkey, bot = make_keys(layout)
    relay_url = await start_relay(exits)
    chain, chain_url = await start_chain(exits, bot.pubkey())
    base = base_settings(layout, relay_url, chain_url, controller_pubkey, backend_pubkey)
    controller = controller_settings(base, layout)
    model_socket = None if options.upstream_url else _free_socket()
    upstream_url = options.upstream_url or ""
    if model_socket is not None:
        exits.callback(model_socket.close)
        upstream_url = f"http://{HOST}:{port_of(model_socket)}/v1"
    backend = backend_settings(base, layout, options, port_of(api_socket), upstream_url)
    write_config(layout.config_file(layout.controller_dir), controller)
    write_config(layout.config_file(layout.backend_dir), backend)
    controller_node, tasks = await start_controller(exits, controller, bot)
    running_backend, backend_tasks = await start_backend(exits, backend, api_socket)
    tasks += backend_tasks
    if model_socket is not None:  # shares the backend's tokenizer: one load, exact counts
        model = DemoModel(backend.models, tokenizer=running_backend.tokenizer)
        tasks.append(await serve_app(exits, model.app, model_socket, "demo model"))
    return Stack(
        layout=layout,
        relay_url=relay_url,
        chain=chain,
        chain_url=chain_url,
        program=program_from_settings(base),
        address=address(base),
        backend=running_backend,
        controller_db=controller_node.ledger.db,
        api_url=f"{backend.public_url}/v1",
        models=backend.models,
        demo_model=model_socket is not None,
        tasks=tasks,
    )


async def watch(stack: Stack) -> NoReturn:
    """Serve until cancelled; a part that ends on its own ends the demo with its error."""
    done, _ = await asyncio.wait(stack.tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    names = ", ".join(task.get_name() for task in done)
    raise DsproxyError(f"the demo's {names} stopped unexpectedly")
