"""`dsproxy controller`: run the controller node; `dsproxy controller status`: recent payments."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from typing import Any

import attrs

from dsproxy.adapters.data_dir_lock import exclusive_data_dir
from dsproxy.adapters.node_keys import load_secret
from dsproxy.adapters.recharges_projection import RechargesProjection
from dsproxy.adapters.solana_keys import load_keypair
from dsproxy.adapters.solana_rpc import BalancePaymentRpc
from dsproxy.bootstrap import open_ledger, program_from_settings
from dsproxy.config import Settings
from dsproxy.entrypoints import arguments
from dsproxy.entrypoints.controller_metrics import ControllerMetrics, serve_metrics
from dsproxy.entrypoints.event_loop import run_service
from dsproxy.entrypoints.heap import freeze_startup_objects
from dsproxy.errors import ConfigError
from dsproxy.handlers.recharge import build_recharge_handler
from dsproxy.services.controller import ControllerLoop
from dsproxy.services.node import Node
from dsproxy.wire.event import public_key_of

__all__ = ["add_commands"]

log = logging.getLogger(__name__)


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "controller", help="pay recharge Requests on Solana and publish the credits"
    )
    parser.add_argument("action", nargs="?", choices=["run", "status"], default="run")
    parser.add_argument(
        "--limit", type=arguments.count, default=20, help="status: payments to list"
    )
    parser.add_argument("--json", action="store_true", help="status: print JSON")
    parser.set_defaults(run=run_controller)


def run_controller(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "status":
        return asyncio.run(_status(settings, args.limit, args.json))
    with exclusive_data_dir(settings.data_dir, "dsproxy controller"):
        return run_service(_serve(settings))


async def _status(settings: Settings, limit: int, as_json: bool) -> int:
    node = await open_ledger(settings, rebuild=False)
    try:
        await node.projector.catch_up()
        payments = await RechargesProjection.recent_payments(node.db, limit)
    finally:
        await node.aclose()
    if as_json:
        print(json.dumps([attrs.asdict(p) for p in payments], indent=2))
        return 0
    if not payments:
        print("no payments yet")
    for p in payments:
        print(
            f"{p.state:<9} {p.user}  nonce {p.nonce}  {p.amount_lamports} lamports -> "
            f"{p.tokens} tokens  request {p.request_id[:16]}…  tx {p.signature or '-'}"
            + (f"  ({p.detail})" if p.detail else "")
        )
    return 0


async def _serve(settings: Settings) -> int:
    secret = load_secret(settings.nostr_key_file)
    if settings.bot_keypair_file is None:
        raise ConfigError("DSPROXY_BOT_KEYPAIR_FILE is not set: the bot's Solana keypair file")
    bot = load_keypair(settings.bot_keypair_file)
    payer = load_keypair(settings.payer_keypair_file) if settings.payer_keypair_file else None
    if public_key_of(secret) not in settings.trusted_controllers:
        log.warning("this controller's key is not in DSPROXY_TRUSTED_CONTROLLERS: "
                    "its own projection will not count its credits")  # fmt: skip
    settings.require_machine()  # fail before opening anything
    node = await Node.open(settings, untrusted_too=True)  # users' Requests
    try:
        async with BalancePaymentRpc.connect(
            settings.solana_rpc_url,
            program_from_settings(settings),
            commitment=settings.solana_commitment,
        ) as rpc:
            program = await rpc.fetch_settings()
            if program.bot != bot.pubkey():
                raise ConfigError(
                    f"DSPROXY_BOT_KEYPAIR_FILE holds {bot.pubkey()}, but the program's bot is "
                    f"{program.bot}: payments would fail with Unauthorized"
                )
            handler = build_recharge_handler(
                settings, node.ledger.projector, rpc, program,
                signer_secret=secret, bot=bot, payer=payer,
            )  # fmt: skip
            metrics = ControllerMetrics(node)
            loop = ControllerLoop(
                handler,
                concurrency_max=settings.controller_concurrency_max,
                on_retry=metrics.retried,
            )
            async with contextlib.AsyncExitStack() as served:
                if settings.controller_metrics_port:
                    port = await served.enter_async_context(
                        serve_metrics(metrics, settings.http_host, settings.controller_metrics_port)
                    )
                    log.warning(
                        "controller metrics on http://%s:%d/metrics", settings.http_host, port
                    )
                freeze_startup_objects()
                await _run_until_signalled(node, loop)
    finally:
        await node.aclose()
    return 0


async def _run_until_signalled(node: Node, loop: ControllerLoop) -> None:
    stop = asyncio.Event()
    running = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        running.add_signal_handler(signum, stop.set)
    log.info("controller running for machine %s", node.settings.machine_pubkey)
    node_task = asyncio.create_task(node.run(stop), name="node")
    loop_task = asyncio.create_task(loop.run(), name="controller")
    try:
        done, _ = await asyncio.wait([node_task, loop_task], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # a crashed part stops the controller with its error
    finally:
        stop.set()
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
        await node_task
