"""The controller as users run it: a real relay process, the local chain over HTTP, the
`dsproxy controller` process (killed with SIGKILL at each step boundary), and a backend-side
node that must end up with exactly one credit per paid Request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from attrs import define
from solders.keypair import Keypair

from dsproxy.adapters.balance_payment import BalancePayment
from dsproxy.adapters.solana_rpc import BalancePaymentRpc
from dsproxy.config import Settings, load_settings
from dsproxy.localchain import LocalChain, LocalChainServer
from dsproxy.services.node import Node
from dsproxy.wire.envelope import Address
from dsproxy.wire.event import NostrEvent
from dsproxy.wire.messages import Transaction, parse_message
from dsproxy.wire.recover import new_payload, sign_recover
from tests.conftest import CONTROLLER_SECRET
from tests.e2e.relay_process import (
    RelayProcess,
    patient_client,
    publish_until_accepted,
    relay_process,  # noqa: F401
)
from tests.integration.recharge_fixtures import dapp_request
from tests.integration.upstream_fixtures import free_port

pytestmark = pytest.mark.e2e

PAY_LAMPORTS = 5_000_000
DEPOSIT_LAMPORTS = 30_000_000
WAIT_S_MAX = 60.0


@define
class Deployment:
    """Everything but the controller process, which each test starts (and kills) itself."""

    relay: RelayProcess
    chain: LocalChain
    rpc: BalancePaymentRpc
    bot: Keypair
    treasury: Keypair
    env: dict[str, str]
    backend: Node
    address: Address
    logs: Path

    def controller(self, *, crash_at: str = "", **settings: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.env, "DSPROXY_CRASH_AT": crash_at, **settings}
        with (self.logs / f"controller-{time.monotonic_ns()}.log").open("wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "dsproxy.entrypoints.cli", "--log-level", "INFO",
                 "controller"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    async def user(self) -> Keypair:
        """A registered user with DEPOSIT_LAMPORTS in the vault."""
        user = Keypair()
        self.chain.airdrop(user.pubkey(), 1_000_000_000)
        await self.rpc.register(user)
        await self.rpc.deposit(user, DEPOSIT_LAMPORTS)
        return user

    def recharge_request(self, user: Keypair, nonce: int) -> NostrEvent:
        info = sign_recover(user, new_payload(), nonce, int(time.time()) + 600)
        return dapp_request(self.address, user, info, nonce, created_at=int(time.time()))

    async def publish(self, *events: NostrEvent) -> None:
        async with patient_client(self.relay.url) as client:
            await publish_until_accepted(client, self.relay.url, events)

    async def backend_balance(self, user: Keypair) -> int:
        row = await self.backend.ledger.db.account(str(user.pubkey()))
        return 0 if row is None else row.balance

    async def wait_for_balance(self, user: Keypair, tokens: int) -> None:
        deadline = time.monotonic() + WAIT_S_MAX
        while await self.backend_balance(user) != tokens:
            assert time.monotonic() < deadline, (
                f"balance {await self.backend_balance(user)} never reached {tokens}; "
                f"logs in {self.logs}"
            )
            await asyncio.sleep(0.1)

    async def credits(self) -> list[Transaction]:
        """Every credit the backend-side node stored (from the relay)."""
        found = []
        for record in await self.backend.ledger.store.read(0, 10_000):
            if record.is_nostr:
                event = json.loads(record.state)
                message = (
                    parse_message(event["content"]) if '"Transaction"' in event["content"] else None
                )
                if isinstance(message, Transaction) and message.tokens > 0:
                    found.append(message)
        return found


def write_keys(directory: Path, bot: Keypair) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    nostr_key = directory / "controller.nostr"
    nostr_key.write_text(CONTROLLER_SECRET + "\n")
    nostr_key.chmod(0o600)
    bot_file = directory / "bot.json"
    bot_file.write_text(json.dumps(list(bytes(bot))))
    bot_file.chmod(0o600)
    return nostr_key, bot_file


@pytest.fixture
def chain_server() -> Iterator[tuple[LocalChain, LocalChainServer, Keypair, Keypair]]:
    chain = LocalChain(BalancePayment())
    bot, treasury = Keypair(), Keypair()
    chain.initialize_global(
        authority=Keypair().pubkey(), bot=bot.pubkey(), treasury=treasury.pubkey()
    )
    chain.airdrop(bot.pubkey(), 1_000_000_000)
    server = LocalChainServer(chain)
    server.start()
    try:
        yield chain, server, bot, treasury
    finally:
        server.close()


@pytest.fixture
async def deployment(
    tmp_path: Path,
    relay_process: RelayProcess,  # noqa: F811
    chain_server: tuple[LocalChain, LocalChainServer, Keypair, Keypair],
    node_env: dict[str, str],
    address: Address,
) -> AsyncIterator[Deployment]:
    chain, server, bot, treasury = chain_server
    nostr_key, bot_file = write_keys(tmp_path / "keys", bot)
    env = {
        **node_env,
        "DSPROXY_DATA_DIR": str(tmp_path / "controller"),
        "DSPROXY_RELAYS": relay_process.url,
        "DSPROXY_NOSTR_KEY_FILE": str(nostr_key),
        "DSPROXY_SOLANA_RPC_URL": server.url,
        "DSPROXY_BOT_KEYPAIR_FILE": str(bot_file),
        "DSPROXY_PAY_AMOUNT_LAMPORTS": str(PAY_LAMPORTS),
    }
    backend_settings: Settings = load_settings(
        {
            **node_env,
            "DSPROXY_DATA_DIR": str(tmp_path / "backend"),
            "DSPROXY_RELAYS": relay_process.url,
        }
    )
    backend = await Node.open(backend_settings)
    stop = asyncio.Event()
    running = asyncio.create_task(backend.run(stop))
    logs = tmp_path / "logs"
    logs.mkdir()
    async with BalancePaymentRpc.connect(
        server.url, chain.program, poll_interval_s=0.01, resend_interval_s=0.2
    ) as rpc:
        try:
            yield Deployment(relay_process, chain, rpc, bot, treasury, env, backend, address, logs)
        finally:
            stop.set()
            await running
            await backend.aclose()


@contextlib.contextmanager
def running(process: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


async def wait_for_exit(process: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + WAIT_S_MAX
    while process.poll() is None:
        assert time.monotonic() < deadline, "the controller never reached its crash point"
        await asyncio.sleep(0.05)
    return process.returncode


async def test_a_dapp_request_is_paid_and_credited_on_the_backend(
    deployment: Deployment,
) -> None:
    user = await deployment.user()
    treasury_before = deployment.chain.get_balance(deployment.treasury.pubkey())
    port = free_port()
    with running(deployment.controller(DSPROXY_CONTROLLER_METRICS_PORT=str(port))):
        await deployment.publish(deployment.recharge_request(user, 0))
        await deployment.wait_for_balance(user, PAY_LAMPORTS)
        # an operator sees it too (the controller had no metrics)
        async with httpx.AsyncClient(timeout=WAIT_S_MAX) as http:
            scraped = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    for line in (
        'dsproxy_controller_requests{state="paid"} 1.0',
        'dsproxy_controller_requests{state="new"} 0.0',
        'dsproxy_controller_payments{state="credited"} 1.0',
    ):
        assert line in scraped.splitlines(), (line, scraped)
    assert "dsproxy_outbox_backlog_events" in scraped
    assert deployment.chain.get_balance(deployment.treasury.pubkey()) - treasury_before == (
        PAY_LAMPORTS
    )
    assert (await deployment.rpc.fetch_onchain_user(user.pubkey())).nonce == 1
    assert [c.tokens for c in await deployment.credits()] == [PAY_LAMPORTS]


@pytest.mark.parametrize("crash_at", ["accepted", "submitted", "confirmed"])
async def test_a_crash_at_any_step_ends_with_one_payment_and_one_credit(
    deployment: Deployment, crash_at: str
) -> None:
    user = await deployment.user()
    treasury_before = deployment.chain.get_balance(deployment.treasury.pubkey())
    await deployment.publish(deployment.recharge_request(user, 0))
    with running(deployment.controller(crash_at=crash_at)) as doomed:
        assert await wait_for_exit(doomed) == -9  # SIGKILL, at the named step
    with running(deployment.controller()):
        await deployment.wait_for_balance(user, PAY_LAMPORTS)
        await asyncio.sleep(1.0)  # time enough for a second (wrong) credit to show up
    assert deployment.chain.get_balance(deployment.treasury.pubkey()) - treasury_before == (
        PAY_LAMPORTS
    )
    assert (await deployment.rpc.fetch_onchain_user(user.pubkey())).nonce == 1
    assert [c.tokens for c in await deployment.credits()] == [PAY_LAMPORTS]
    assert await deployment.backend_balance(user) == PAY_LAMPORTS


async def test_requests_sent_while_the_controller_is_down_are_paid_after_it_starts(
    deployment: Deployment,
) -> None:
    users = [await deployment.user() for _ in range(3)]
    await deployment.publish(*(deployment.recharge_request(u, 0) for u in users))
    with running(deployment.controller()):
        for user in users:
            await deployment.wait_for_balance(user, PAY_LAMPORTS)
    assert len(await deployment.credits()) == 3


async def test_ten_users_recharging_at_the_same_moment_are_all_credited(
    deployment: Deployment,
) -> None:
    users = [await deployment.user() for _ in range(10)]
    with running(deployment.controller()):
        await deployment.publish(*(deployment.recharge_request(u, 0) for u in users))
        for user in users:
            await deployment.wait_for_balance(user, PAY_LAMPORTS)
    assert len(await deployment.credits()) == 10
