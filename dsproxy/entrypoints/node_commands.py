"""Node commands: keygen, node (ingest + projector + outbox), outbox (what is not published)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from pathlib import Path
from typing import Any

from dsproxy.adapters.data_dir_lock import exclusive_data_dir
from dsproxy.adapters.node_keys import create_key_file
from dsproxy.config import Settings
from dsproxy.entrypoints import arguments
from dsproxy.entrypoints.event_loop import run_service
from dsproxy.entrypoints.heap import freeze_startup_objects
from dsproxy.errors import ConfigError
from dsproxy.services.node import Node
from dsproxy.services.outbox import list_outbox

__all__ = ["add_commands"]


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser("keygen", help="create a Nostr key file (mode 0600)")
    parser.add_argument("file", type=Path)
    parser.set_defaults(run=run_keygen)

    parser = subparsers.add_parser(
        "node", help="keep the data dir in step with the relays: ingest, projector, outbox"
    )
    parser.set_defaults(run=run_node)

    parser = subparsers.add_parser("outbox", help="list our events no relay has acknowledged")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    parser.add_argument("--limit", type=arguments.count, default=1000, help="rows to list at most")
    parser.set_defaults(run=run_outbox)


def run_keygen(args: argparse.Namespace, settings: Settings) -> int:
    print(create_key_file(args.file))
    return 0


def run_node(args: argparse.Namespace, settings: Settings) -> int:
    with exclusive_data_dir(settings.data_dir, "dsproxy node"):
        return run_service(_node(settings))


async def _node(settings: Settings) -> int:
    node = await Node.open(settings)
    freeze_startup_objects()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await node.run(stop)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
        await node.aclose()
    stats = node.ingest.stats
    print(
        f"received {stats.received}, stored {stats.appended}, duplicate {stats.duplicates}, "
        f"refused {sum(stats.refused.values())} {dict(stats.refused)}"
    )
    return 0


def run_outbox(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_outbox(settings, args.json, args.limit))


async def _outbox(settings: Settings, as_json: bool, limit: int) -> int:
    if settings.nostr_key_file is None:  # the outbox holds the events of this node's key
        raise ConfigError("DSPROXY_NOSTR_KEY_FILE is not set: the outbox is that key's events")
    node = await Node.open(settings, rebuild=False)
    try:
        await node.ledger.projector.catch_up()
        rows = await list_outbox(node.ledger.db, ("pending", "failed"), limit)
    finally:
        await node.aclose()
    for row in rows:
        if as_json:
            print(
                json.dumps(
                    {
                        "event_id": row.event_id,
                        "status": row.status,
                        "created_at": row.created_at,
                        "rejections": row.rejections,
                        "reason": row.reason,
                    }
                )
            )
        else:
            reason = f"  {row.reason}" if row.reason else ""
            print(f"{row.status:8} {row.event_id}  at {row.created_at}  x{row.rejections}{reason}")
    if not as_json:
        pending = sum(row.status == "pending" for row in rows)
        print(f"{pending} pending, {len(rows) - pending} failed")
    return 0
