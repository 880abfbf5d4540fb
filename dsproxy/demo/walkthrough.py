"""The demo's user: a wallet on the local chain, one recharge sent as the dApp sends it, a
wallet login and an API key through the backend's HTTP API, then what to run next.

Every step goes through the real interfaces a user meets (Solana JSON-RPC, the Nostr relay,
the backend's HTTP API), so a demo that works shows that the deployment works.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shlex
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, TextIO

import httpx
import nostr_sdk
from attrs import frozen
from solders.keypair import Keypair

from dsproxy.adapters.recharges_projection import RechargesProjection
from dsproxy.adapters.relay import RelayPublisher, RelayUnavailable
from dsproxy.adapters.solana_rpc import BalancePaymentRpc
from dsproxy.demo.stack import LAMPORTS_PER_SOL, Stack, write_keypair
from dsproxy.domain.publication import RelayAnswer
from dsproxy.domain.recharge import recharge_request
from dsproxy.errors import DsproxyError
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.event import NostrEvent
from dsproxy.wire.recover import new_payload, sign_recover

__all__ = [
    "DemoAccount",
    "DemoFailed",
    "Progress",
    "describe",
    "instructions",
    "recharge_event",
    "run_walkthrough",
]

WALLET_AIRDROP_LAMPORTS = LAMPORTS_PER_SOL
DEPOSIT_LAMPORTS = LAMPORTS_PER_SOL // 20  # 0.05 SOL: ten recharges at the default price
RECHARGE_DEADLINE_S = 30 * 60  # the dApp signs for 30 minutes
CREDIT_WAIT_S_MAX = 60.0
CREDIT_POLL_S = 0.1
HTTP_TIMEOUT_S = 30.0
_SPINNER = "|/-\\"


class DemoFailed(DsproxyError):
    """A step of the demo did not work; the message says which and why."""


@frozen
class DemoAccount:
    """The demo user, once credited and holding an API key."""

    user: str
    tokens: int
    request_id: str
    api_key: str


class Progress:
    """Steps as plain lines; a spinner while waiting, only on a terminal (logs stay quiet)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()

    def step(self, text: str) -> None:
        print(f"  - {text}", file=self.stream, flush=True)

    @contextlib.asynccontextmanager
    async def waiting(self, text: str) -> AsyncIterator[None]:
        if not self.live:
            self.step(text + " ...")
            yield
            return
        spinner = asyncio.create_task(self._spin(text))
        try:
            yield
        finally:
            spinner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await spinner
            print("\r\x1b[K", end="", file=self.stream, flush=True)

    async def _spin(self, text: str) -> None:
        started = time.monotonic()
        for frame in itertools.cycle(_SPINNER):
            elapsed_s = time.monotonic() - started
            print(f"\r  {frame} {text} ({elapsed_s:.0f} s)", end="", file=self.stream, flush=True)
            await asyncio.sleep(0.1)


# --- the chain --------------------------------------------------------------------------------


async def fund_wallet(stack: Stack, user: Keypair) -> int:
    """Airdrop, register and deposit as a wallet would; return the on-chain nonce to sign."""
    await asyncio.to_thread(stack.chain.airdrop, user.pubkey(), WALLET_AIRDROP_LAMPORTS)
    async with BalancePaymentRpc.connect(stack.chain_url, stack.program) as rpc:
        await rpc.register(user)
        await rpc.deposit(user, DEPOSIT_LAMPORTS)
        account = await rpc.fetch_user(user.pubkey())
    assert account is not None, user.pubkey()  # registered just above
    return account.nonce


# --- the recharge ---------------------------------------------------------------------------


def recharge_event(user: Keypair, nonce: int, address: Address, now: int) -> NostrEvent:
    """The Request the dApp sends: a recover signature over the nonce, valid for 30 minutes,
    a random payload, signed into an event by a throw-away Nostr key."""
    info = sign_recover(user, new_payload(), nonce, now + RECHARGE_DEADLINE_S)
    request = recharge_request(info, nonce, str(user.pubkey()))
    throwaway = nostr_sdk.Keys.generate().secret_key().to_hex()
    return seal(request, address, throwaway, created_at=now)


async def publish_request(relay_url: str, event: NostrEvent, timeout_s: float) -> None:
    """Send the Request to the relay and require its OK."""
    publisher = RelayPublisher([relay_url], timeout_s=timeout_s)
    try:
        (result,) = await publisher.publish(event)
    finally:
        await publisher.close()
    if result.answer is not RelayAnswer.ACCEPTED:
        raise RelayUnavailable(
            f"the relay did not take the recharge Request: {result.answer.value} {result.reason}"
        )


async def wait_for_credit(stack: Stack, user: str, request_id: str) -> int:
    """The user's balance once the backend's projection shows the credit; a refusal or a
    failed payment, as the controller recorded it, ends the wait with its reason."""
    deadline = time.monotonic() + CREDIT_WAIT_S_MAX
    while True:
        account = await stack.backend.node.ledger.db.account(user)
        if account is not None and account.balance > 0:
            return int(account.balance)
        row = await RechargesProjection.request(stack.controller_db, request_id)
        if row is not None and row.state in ("refused", "failed"):
            raise DemoFailed(f"the controller {row.state} the recharge: {row.detail}")
        if time.monotonic() > deadline:
            state = "not seen by the controller" if row is None else f"{row.state}"
            raise DemoFailed(
                f"no credit after {CREDIT_WAIT_S_MAX:.0f} s (the Request is {state}); "
                "rerun with --log-level INFO to see the controller at work"
            )
        await asyncio.sleep(CREDIT_POLL_S)


# --- the backend's HTTP API ---------------------------------------------------------------


async def _post(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], token: str | None = None
) -> dict[str, Any]:
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    try:
        response = await client.post(path, json=body, headers=headers)
    except httpx.HTTPError as exc:
        raise DemoFailed(f"POST {path} failed: {exc!r}") from exc
    if response.is_error:
        raise DemoFailed(f"POST {path} answered {response.status_code}: {response.text}")
    answer: dict[str, Any] = response.json()
    return answer


async def login(client: httpx.AsyncClient, user: Keypair) -> str:
    """Sign the server's challenge with the wallet key (as `signMessage` does); a bearer token."""
    pubkey = str(user.pubkey())
    challenge = await _post(client, "/v1/auth/challenge", {"user_pubkey": pubkey})
    message = str(challenge["message"])
    signature = str(user.sign_message(message.encode()))  # base58
    body = {"user_pubkey": pubkey, "message": message, "signature": signature}
    return str((await _post(client, "/v1/auth/login", body))["token"])


async def create_api_key(client: httpx.AsyncClient, token: str) -> str:
    return str((await _post(client, "/v1/api-keys", {"name": "dsproxy demo"}, token))["key"])


# --- the whole walk -------------------------------------------------------------------------


async def run_walkthrough(stack: Stack, progress: Progress) -> DemoAccount:
    """Wallet, recharge, credit, login, API key: what a new user does, in order."""
    user = Keypair()
    write_keypair(stack.layout.wallet, user)
    pubkey = str(user.pubkey())
    progress.step(f"wallet {pubkey} (keypair in {stack.layout.wallet})")
    nonce = await fund_wallet(stack, user)
    progress.step(
        f"airdropped {WALLET_AIRDROP_LAMPORTS / LAMPORTS_PER_SOL:g} SOL, registered, deposited "
        f"{DEPOSIT_LAMPORTS / LAMPORTS_PER_SOL:g} SOL into the vault"
    )
    event = recharge_event(user, nonce, stack.address, int(time.time()))
    await publish_request(stack.relay_url, event, stack.backend.settings.relay_timeout_s)
    progress.step(f"recharge Request {event.id[:16]}... signed for nonce {nonce} and sent")
    async with progress.waiting("the controller pays on chain; the credit reaches the backend"):
        tokens = await wait_for_credit(stack, pubkey, event.id)
    progress.step(f"credited {tokens} tokens")
    async with httpx.AsyncClient(
        base_url=stack.backend.settings.public_url, timeout=HTTP_TIMEOUT_S
    ) as client:
        token = await login(client, user)
        api_key = await create_api_key(client, token)
    progress.step("logged in with the wallet's signature and created an API key")
    return DemoAccount(pubkey, tokens, event.id, api_key)


def model_label(stack: Stack) -> str:
    if stack.demo_model:
        return "the built-in DEMO MODEL (canned words, not a real LLM)"
    return f"the OpenAI-compatible server at {stack.backend.settings.upstream_url}"


def describe(stack: Stack, progress: Progress) -> None:
    """What runs in this process, and where."""
    progress.step(f"relay {stack.relay_url} (nostr-sdk LocalRelay, in memory)")
    progress.step(f"chain {stack.chain_url} (the local Solana stand-in, in memory)")
    progress.step(f"controller and backend data in {stack.layout.root}")
    progress.step(f"model: {model_label(stack)}; selling {', '.join(stack.models)}")


def instructions(stack: Stack, account: DemoAccount) -> str:
    """What to run next; the `API:` and `API key:` lines are meant to be parsed."""
    api, key, model = stack.api_url, account.api_key, stack.models[0]
    auth = shlex.quote(f"Authorization: Bearer {key}")
    body = shlex.quote(f'{{"model":"{model}","messages":[{{"role":"user","content":"Hello"}}]}}')
    config = shlex.quote(str(stack.layout.config_file(stack.layout.backend_dir)))
    return f"""
dsproxy demo is ready. Model: {model_label(stack)}.
User {account.user} has {account.tokens} tokens. Files: {stack.layout.root}

API: {api}
API key: {key}

Chat with curl:
  curl -s {api}/chat/completions -H {auth} \\
    -H 'content-type: application/json' -d {body}

Chat with the openai SDK (pip install openai):
  from openai import OpenAI

  client = OpenAI(base_url="{api}", api_key="{key}")
  reply = client.chat.completions.create(
      model="{model}", messages=[{{"role": "user", "content": "Hello"}}]
  )
  print(reply.choices[0].message.content, reply.usage)

Balance and ledger (prices are 1:1, so a chat costs its usage.total_tokens):
  curl -s {api}/balance -H {auth}
  curl -s {api}/transactions -H {auth}
  dsproxy --config {config} balance {account.user}   # after Ctrl-C

Serving until Ctrl-C.
"""
