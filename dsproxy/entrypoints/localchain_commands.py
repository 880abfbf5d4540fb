"""`dsproxy localchain`: run the local Solana stand-in on 127.0.0.1 for development.

It initializes the program's GLOBAL account (bot and treasury), funds the bot and any
`--airdrop` keys, prints what it set up as one JSON line, and serves JSON-RPC until Ctrl-C.
Production points `DSPROXY_SOLANA_RPC_URL` at a real cluster instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from solders.keypair import Keypair
from solders.pubkey import Pubkey

from dsproxy.adapters.listening import bind_port
from dsproxy.adapters.solana_keys import load_keypair
from dsproxy.bootstrap import program_from_settings
from dsproxy.config import Settings
from dsproxy.entrypoints import arguments
from dsproxy.entrypoints.wallet_commands import LAMPORTS_PER_SOL
from dsproxy.errors import BadInput, ConfigError
from dsproxy.localchain import LocalChain, LocalChainServer

__all__ = ["add_commands"]

AIRDROP_LAMPORTS = 10 * LAMPORTS_PER_SOL
SLOT_MS = arguments.int_between(0, 86_400_000)  # a slot a day at most; a negative one spun


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "localchain", help="a local Solana JSON-RPC stand-in with the balance-payment program"
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (keep it local)")
    parser.add_argument("--port", type=arguments.port, default=8899, help="0: any free port")
    parser.add_argument(
        "--slot-ms", type=SLOT_MS, default=400, help="a new slot every N ms (0: off)"
    )
    parser.add_argument("--bot", help="bot public key (default: DSPROXY_BOT_KEYPAIR_FILE's)")
    parser.add_argument("--treasury", help="treasury public key (default: a new one)")
    parser.add_argument("--authority", help="authority public key (default: a new one)")
    parser.add_argument(
        "--airdrop", action="append", default=[], metavar="PUBKEY", help="fund with 10 SOL"
    )
    parser.add_argument(
        "--keypair", action="append", default=[], type=Path, metavar="FILE",
        help="fund this Solana CLI keypair file's key with 10 SOL",
    )  # fmt: skip
    parser.set_defaults(run=run_localchain)


def _pubkey(text: str, option: str) -> Pubkey:
    try:
        return Pubkey.from_string(text)
    except ValueError:
        raise BadInput(f"{option} {text!r} is not a base58 public key") from None


def _bot(args: argparse.Namespace, settings: Settings) -> Pubkey:
    if args.bot:
        return _pubkey(args.bot, "--bot")
    if settings.bot_keypair_file is not None:
        return load_keypair(settings.bot_keypair_file).pubkey()
    raise ConfigError(
        "the local chain needs the bot's key: --bot PUBKEY or DSPROXY_BOT_KEYPAIR_FILE"
    )


def run_localchain(args: argparse.Namespace, settings: Settings) -> int:
    if settings.program_version != 1:
        raise ConfigError(
            "the local chain implements balance-payment v1 (DSPROXY_PROGRAM_VERSION=1)"
        )
    chain = LocalChain(program_from_settings(settings))
    bot = _bot(args, settings)
    treasury = _pubkey(args.treasury, "--treasury") if args.treasury else Keypair().pubkey()
    authority = _pubkey(args.authority, "--authority") if args.authority else Keypair().pubkey()
    chain.initialize_global(authority=authority, bot=bot, treasury=treasury)
    funded = [bot] + [_pubkey(key, "--airdrop") for key in args.airdrop]
    funded += [load_keypair(path).pubkey() for path in args.keypair]
    for key in funded:
        chain.airdrop(key, AIRDROP_LAMPORTS)
    sock = bind_port(args.host, args.port, hint="pick another with --port (0 = any free port)")
    server = LocalChainServer(chain, host=args.host, slot_interval_s=args.slot_ms / 1000 or None)
    server.bind(sock)
    print(
        json.dumps(
            {
                "rpc_url": server.url,
                "program_id": str(chain.program.program_id),
                "global": str(chain.program.global_pda()[0]),
                "authority": str(authority),
                "bot": str(bot),
                "treasury": str(treasury),
                "funded": [str(key) for key in funded],
                "note": "local stand-in for development and tests; production uses a real cluster",
            }
        ),
        flush=True,
    )
    asyncio.run(server.serve())
    return 0
