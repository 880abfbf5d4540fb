"""`dsproxy wallet ...`: the dApp's user actions from a terminal, for users without the dApp.

The keypair is a Solana CLI file (a JSON list of 64 integers). `authorize` prints the
recover_info JSON exactly as the dApp builds it; `recharge` signs the recharge Request as the
dApp does (with a throw-away Nostr key) and sends it to the relays of DSPROXY_RELAYS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from decimal import Decimal, DecimalException, InvalidOperation
from pathlib import Path
from typing import Any

import nostr_sdk
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from dsproxy.adapters.relay import RelayPublisher, RelayUnavailable
from dsproxy.adapters.solana_keys import load_keypair
from dsproxy.adapters.solana_rpc import BalancePaymentRpc
from dsproxy.bootstrap import program_from_settings
from dsproxy.config import Settings
from dsproxy.domain.publication import RelayAnswer, RelayResult
from dsproxy.domain.recharge import recharge_request
from dsproxy.errors import BadInput, ConfigError
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.event import NostrEvent
from dsproxy.wire.messages import U64_MAX, RecoverInfo
from dsproxy.wire.recover import (
    PAYLOAD_LEN,
    SIGN_MESSAGE_PREFIX_V1,
    new_payload,
    sign_message_prefix,
    sign_recover,
)

__all__ = ["LAMPORTS_PER_SOL", "add_commands"]

LAMPORTS_PER_SOL = 1_000_000_000
DEFAULT_KEYPAIR = Path("~/.config/solana/id.json")
DEADLINE_IN_S = 30 * 60  # the dApp signs for 30 minutes


def _lamports(text: str, in_lamports: bool) -> int:
    """An amount in SOL (as the dApp takes it) or, with --lamports, in lamports."""
    try:
        value = Decimal(text) * (1 if in_lamports else LAMPORTS_PER_SOL)
    except InvalidOperation:
        raise BadInput(f"amount {text!r} is not a number") from None
    except DecimalException:  # Overflow: an exponent past what Decimal holds, let alone u64
        raise BadInput(f"amount {text!r} is more lamports than Solana counts (2^64-1)") from None
    if not value.is_finite() or value != value.to_integral_value() or value <= 0:
        raise BadInput(f"amount {text!r} must be a positive whole number of lamports")
    if value > U64_MAX:
        raise BadInput(f"amount {text!r} is more lamports than Solana counts (2^64-1)")
    return int(value)


def _payload(text: str | None) -> bytes:
    if text is None:
        return new_payload()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise BadInput(f"--payload {text!r} is not hex") from None
    if len(raw) > PAYLOAD_LEN:
        raise BadInput(f"--payload has {len(raw)} bytes, at most {PAYLOAD_LEN}")
    return raw + bytes(PAYLOAD_LEN - len(raw))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def add_commands(subparsers: Any) -> None:
    wallet = subparsers.add_parser("wallet", help="register, deposit, authorize and recharge")
    commands = wallet.add_subparsers(dest="wallet_command", required=True, metavar="ACTION")

    def action(name: str, help_text: str, run: Any) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument(
            "--keypair", type=Path, default=DEFAULT_KEYPAIR, help="user keypair (Solana CLI JSON)"
        )
        parser.add_argument("--url", help="Solana RPC URL (default: DSPROXY_SOLANA_RPC_URL)")
        parser.set_defaults(run=run)
        return parser

    parser = action("register", "create your account on the balance-payment program", _register)
    parser.add_argument("--payer", type=Path, help="fee payer keypair (default: --keypair)")
    for name, run in (("deposit", _deposit), ("withdraw", _withdraw)):
        verb = "into" if name == "deposit" else "out of"
        parser = action(name, f"move SOL {verb} your vault", run)
        parser.add_argument("amount", help="SOL (or lamports with --lamports)")
        parser.add_argument("--lamports", action="store_true", help="the amount is in lamports")
        parser.add_argument("--payer", type=Path, help="fee payer keypair (default: --keypair)")
    parser = action("status", "your account: nonce, vault balance, free balance", _status)
    parser.add_argument("--user", help="any user's public key instead of --keypair's")

    parser = action("authorize", "sign a recover_info offline and print it", _authorize)
    parser.add_argument("--nonce", type=int, required=True, help="the on-chain nonce to sign")
    parser.add_argument("--deadline", type=int, required=True, help="unix time it expires")
    parser.add_argument("--payload", help="hex, zero-padded to 64 bytes (default: random)")
    parser.add_argument("--namespace-name", help="v2 only: the namespace's name (the prefix)")

    parser = action("recharge", "sign a recharge Request for the controller", _recharge)
    parser.add_argument("--deadline-in", type=int, default=DEADLINE_IN_S, help="seconds")
    parser.add_argument("--payload", help="hex, zero-padded to 64 bytes (default: random)")
    parser.add_argument("--print-only", action="store_true", help="print the event, do not send")


def _rpc(args: argparse.Namespace, settings: Settings) -> Any:
    return BalancePaymentRpc.connect(
        args.url or settings.solana_rpc_url,
        program_from_settings(settings),
        commitment=settings.solana_commitment,
    )


def _payer(args: argparse.Namespace) -> Keypair | None:
    return load_keypair(args.payer) if args.payer else None


def _register(args: argparse.Namespace, settings: Settings) -> int:
    user, payer = load_keypair(args.keypair), _payer(args)

    async def run() -> str:
        async with _rpc(args, settings) as rpc:
            return await rpc.register(user, payer)

    _print_json({"action": "register", "user": str(user.pubkey()), "signature": asyncio.run(run())})
    return 0


def _deposit(args: argparse.Namespace, settings: Settings) -> int:
    return _move(args, settings, "deposit")


def _withdraw(args: argparse.Namespace, settings: Settings) -> int:
    return _move(args, settings, "withdraw")


def _move(args: argparse.Namespace, settings: Settings, name: str) -> int:
    user, payer = load_keypair(args.keypair), _payer(args)
    lamports = _lamports(args.amount, args.lamports)

    async def run() -> str:
        async with _rpc(args, settings) as rpc:
            method = rpc.deposit if name == "deposit" else rpc.withdraw
            return await method(user, lamports, payer)

    signature = asyncio.run(run())
    _print_json(
        {"action": name, "user": str(user.pubkey()), "lamports": lamports, "signature": signature}
    )
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    if args.user:
        try:
            user = Pubkey.from_string(args.user)
        except ValueError:
            raise BadInput(f"--user {args.user!r} is not a base58 public key") from None
    else:
        user = load_keypair(args.keypair).pubkey()

    async def run() -> dict[str, Any]:
        async with _rpc(args, settings) as rpc:
            program = rpc.program
            account = await rpc.fetch_user(user)
            vault = program.vault_pda(user)[0]
            vault_lamports = await rpc.fetch_balance(vault)
            locked = 0 if account is None else account.locked_amount
            return {
                "user": str(user),
                "wallet_lamports": await rpc.fetch_balance(user),
                "registered": account is not None,
                "nonce": None if account is None else account.nonce,
                "vault": str(vault),
                "vault_lamports": vault_lamports,
                "locked_lamports": locked,
                "free_lamports": vault_lamports - locked,
                "program_id": str(program.program_id),
            }

    _print_json(asyncio.run(run()))
    return 0


def _prefix(settings: Settings, namespace_name: str | None) -> bytes:
    if settings.program_version == 1:
        return SIGN_MESSAGE_PREFIX_V1
    if not namespace_name:
        raise ConfigError("program version 2 signs with the namespace's name: --namespace-name")
    return sign_message_prefix(namespace_name)


def _sign(
    settings: Settings, user: Keypair, payload: bytes, nonce: int, deadline: int, prefix: bytes
) -> RecoverInfo:
    namespace_id = settings.namespace_id if settings.program_version == 2 else None
    return sign_recover(user, payload, nonce, deadline, namespace_id=namespace_id, prefix=prefix)


def _authorize(args: argparse.Namespace, settings: Settings) -> int:
    user = load_keypair(args.keypair)
    if args.nonce < 0:
        raise BadInput(f"--nonce {args.nonce} must not be negative")
    prefix = _prefix(settings, args.namespace_name)
    info = _sign(settings, user, _payload(args.payload), args.nonce, args.deadline, prefix)
    if args.deadline <= time.time():  # still printed: the bytes may be wanted (test vectors)
        print(
            f"dsproxy: warning: deadline {args.deadline} has passed; "
            "the program refuses this authorization",
            file=sys.stderr,
        )
    print(info.to_json(v2=settings.program_version == 2))
    return 0


def _throwaway_secret_hex() -> str:
    """A fresh Nostr key for one Request: as in the dApp, it proves nothing about the user."""
    return nostr_sdk.Keys.generate().secret_key().to_hex()


def _recharge(args: argparse.Namespace, settings: Settings) -> int:
    user = load_keypair(args.keypair)
    machine = settings.require_machine()
    payload = _payload(args.payload)

    async def run() -> tuple[int, bytes]:
        async with _rpc(args, settings) as rpc:
            account = await rpc.fetch_user(user.pubkey())
            if account is None:
                raise BadInput(f"{user.pubkey()} is not registered: run `dsproxy wallet register`")
            prefix = SIGN_MESSAGE_PREFIX_V1
            if settings.program_version == 2:
                prefix = (await rpc.fetch_settings()).sign_prefix or prefix
            return account.nonce, prefix

    nonce, prefix = asyncio.run(run())
    deadline = int(time.time()) + args.deadline_in
    info = _sign(settings, user, payload, nonce, deadline, prefix)
    namespace_id = settings.namespace_id if settings.program_version == 2 else None
    request = recharge_request(info, nonce, str(user.pubkey()), namespace_id)
    event = seal(request, Address(settings.session, machine), _throwaway_secret_hex())
    if args.print_only:
        print(event.to_json())
        return 0
    results = asyncio.run(_publish(event, settings))
    _print_json(
        {
            "action": "recharge",
            "user": str(user.pubkey()),
            "nonce": nonce,
            "deadline": deadline,
            "request_id": event.id,
            "relays": {
                r.relay: " ".join(filter(None, (r.answer.value, r.reason))) for r in results
            },
        }
    )
    return 0


async def _publish(event: NostrEvent, settings: Settings) -> tuple[RelayResult, ...]:
    """Send the Request to every configured relay, as the dApp does; one must take it."""
    if not settings.relays:
        raise ConfigError(
            "DSPROXY_RELAYS is empty: name the relays the controller listens to, "
            "or rerun with --print-only to print the event"
        )
    publisher = RelayPublisher(settings.relays, timeout_s=settings.relay_timeout_s)
    try:
        results = await publisher.publish(event)
    finally:
        await publisher.close()
    if not any(r.answer is RelayAnswer.ACCEPTED for r in results):
        answers = "; ".join(f"{r.relay}: {r.answer.value} {r.reason}".strip() for r in results)
        raise RelayUnavailable(f"no relay took the recharge Request ({answers})")
    return results
