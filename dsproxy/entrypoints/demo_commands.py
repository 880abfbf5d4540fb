"""`dsproxy demo`: the whole system in one process, on embedded defaults, with no outside service.

An in-process relay, the local Solana stand-in, a controller, a backend and the built-in demo
model (or `--upstream URL`) start on one asyncio loop; a demo wallet then recharges, logs in
and gets an API key, and the command prints what to run next and serves until Ctrl-C.
The environment's `DSPROXY_*` settings and `--config` are ignored on purpose: a demo never
touches a real relay, chain or data directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

from dsproxy.config import Settings, http_url
from dsproxy.demo.stack import (
    DemoLayout,
    DemoOptions,
    bind_api_port,
    discard_layout,
    open_stack,
    prepare_layout,
    watch,
)
from dsproxy.demo.walkthrough import Progress, describe, instructions, run_walkthrough
from dsproxy.entrypoints.http_api import read_api_key_file
from dsproxy.errors import BadInput

__all__ = ["add_commands"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run relay, chain, controller, backend and a demo model locally, in one process",
        description="Start everything on 127.0.0.1, recharge a demo wallet, create an API key, "
        "print how to use it, and serve until Ctrl-C.",
    )
    parser.add_argument(
        "--port", type=int, default=8080, help="the API's port on 127.0.0.1 (0 = any free port)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=argparse.SUPPRESS,  # keeps a global --data-dir given before `demo`
        help="a new or empty directory for the demo's files (default: a new temporary one)",
    )
    parser.add_argument(
        "--upstream", metavar="URL", help="a real OpenAI-compatible model server's base URL"
    )
    parser.add_argument(
        "--upstream-api-key-file", type=Path, metavar="FILE", help="its API key (with --upstream)"
    )
    parser.add_argument("--model", metavar="NAME", help="the model to sell (default: the demo's)")
    parser.set_defaults(run=run_demo, own_settings=True)


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that do not go together, before anything starts."""
    if not 0 <= args.port <= 65_535:
        raise BadInput(f"--port {args.port} is not a TCP port (0-65535)")
    if args.upstream is not None:
        http_url(args.upstream, "--upstream")
    if args.upstream_api_key_file is not None and args.upstream is None:
        raise BadInput("--upstream-api-key-file needs --upstream (the demo model takes no key)")
    if args.upstream_api_key_file is not None:
        read_api_key_file(args.upstream_api_key_file, "--upstream-api-key-file")


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Serve until SIGINT or SIGTERM, then stop every part cleanly and exit 0."""
    check_flags(args)
    sock = bind_api_port(args.port)  # first: a busy port fails before any file is written
    try:
        root = getattr(args, "data_dir", None)
        layout = (
            prepare_layout(root)
            if root is not None
            else prepare_layout(Path(tempfile.mkdtemp(prefix="dsproxy-demo-")), created=True)
        )
        options = DemoOptions(args.upstream, args.upstream_api_key_file, args.model)
        return asyncio.run(_serve(options, layout, sock))
    finally:
        sock.close()


async def _serve(options: DemoOptions, layout: DemoLayout, sock: socket.socket) -> int:
    main = asyncio.current_task()
    assert main is not None, "runs inside asyncio.run"
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        main.cancel()  # a second signal also interrupts a slow shutdown

    loop = asyncio.get_running_loop()
    for signum in _SIGNALS:
        loop.add_signal_handler(signum, interrupt)
    print("dsproxy demo: starting the relay, the chain, a controller and a backend", flush=True)
    started = False
    try:
        async with contextlib.AsyncExitStack() as exits:
            stack = await open_stack(options, layout, sock, exits)
            progress = Progress()
            describe(stack, progress)
            account = await run_walkthrough(stack, progress)
            print(instructions(stack, account), flush=True)
            started = True
            await watch(stack)
    except asyncio.CancelledError:
        if not interrupted:
            raise
        if started:
            print(f"dsproxy demo: stopped; its files stay in {layout.root}", flush=True)
        return 0
    finally:
        for signum in _SIGNALS:
            loop.remove_signal_handler(signum)
        if not started:  # a half-made demo directory would refuse the next try
            discard_layout(layout)
            print("dsproxy demo: stopped before it was ready; its files are removed", flush=True)
