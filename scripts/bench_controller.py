"""Benchmark the controller end to end: Request published -> paid on the local chain -> credit
visible in a backend's projection.

    python scripts/bench_controller.py --users 50

Everything runs in one process: nostr-sdk's LocalRelay, the local chain over HTTP JSON-RPC,
a controller (its node, handler and loop) and a backend-side node. It prints recharges per
second (all users recharging at once) and the latency from publishing a Request to its credit
in the backend's projection (p50/p99, one user at a time), against the relay's own round trip
(publish -> the other node stores it) measured in the same run as the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from solders.keypair import Keypair

from dsproxy.adapters.balance_payment import BalancePayment
from dsproxy.adapters.relay import RelayPublisher, build_local_relay
from dsproxy.adapters.solana_rpc import BalancePaymentRpc
from dsproxy.config import Settings, load_settings
from dsproxy.domain.recharge import recharge_request
from dsproxy.handlers.recharge import RechargeHandler
from dsproxy.localchain import LocalChain, LocalChainServer
from dsproxy.services.controller import ControllerLoop
from dsproxy.services.node import Node
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.event import public_key_of
from dsproxy.wire.messages import (
    Transaction,
)
from dsproxy.wire.recover import new_payload, sign_recover

CONTROLLER_SECRET = "c1" * 32
PAY_LAMPORTS = 5_000_000
WAIT_S_MAX = 120.0


def settings_for(directory: Path, relay_url: str, rpc_url: str, key: Path | None) -> Settings:
    env = {
        "DSPROXY_DATA_DIR": str(directory),
        "DSPROXY_MACHINE_PUBKEY": public_key_of("3a" * 32),
        "DSPROXY_TRUSTED_CONTROLLERS": public_key_of(CONTROLLER_SECRET),
        "DSPROXY_RELAYS": relay_url,
        "DSPROXY_SOLANA_RPC_URL": rpc_url,
        "DSPROXY_PAY_AMOUNT_LAMPORTS": str(PAY_LAMPORTS),
    }
    if key is not None:
        env["DSPROXY_NOSTR_KEY_FILE"] = str(key)
    return load_settings(env)


def request_for(address: Address, user: Keypair, nonce: int) -> object:
    info = sign_recover(user, new_payload(), nonce, int(time.time()) + 600)
    message = recharge_request(info, nonce, str(user.pubkey()))
    return seal(message, address, Keypair().secret().hex())


async def balance(node: Node, user: Keypair) -> int:
    row = await node.ledger.db.account(str(user.pubkey()))
    return 0 if row is None else row.balance


async def wait_until(check: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S_MAX
    while not await check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def run(users_total: int, serial_total: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="dsproxy-bench-controller-"))
    relay = build_local_relay()
    await relay.run()
    relay_url = str(await relay.url())
    chain = LocalChain(BalancePayment())
    bot, treasury = Keypair(), Keypair()
    chain.initialize_global(authority=Keypair().pubkey(), bot=bot.pubkey(),
                            treasury=treasury.pubkey())  # fmt: skip
    chain.airdrop(bot.pubkey(), 100_000_000_000)
    server = LocalChainServer(chain)
    server.start()
    key = work / "controller.key"
    key.write_text(CONTROLLER_SECRET)
    key.chmod(0o600)
    controller_settings = settings_for(work / "controller", relay_url, server.url, key)
    backend_settings = settings_for(work / "backend", relay_url, server.url, None)
    address = Address(controller_settings.session, controller_settings.require_machine())
    controller = await Node.open(controller_settings, untrusted_too=True)  # users' Requests
    backend = await Node.open(backend_settings)
    stop = asyncio.Event()
    publisher = RelayPublisher([relay_url])
    async with BalancePaymentRpc.connect(
        server.url, chain.program, poll_interval_s=0.005, resend_interval_s=0.5
    ) as rpc:
        handler = RechargeHandler(
            store=controller.ledger.store,
            projector=controller.ledger.projector,
            rpc=rpc,
            bot=bot,
            treasury=treasury.pubkey(),
            signer_secret=CONTROLLER_SECRET,
            address=address,
            amount_lamports=PAY_LAMPORTS,
            tokens_per_lamport=1,
        )
        tasks = [
            asyncio.create_task(controller.run(stop)),
            asyncio.create_task(backend.run(stop)),
            asyncio.create_task(ControllerLoop(handler, concurrency_max=32, poll_s=0.05).run()),
        ]
        try:
            users = []
            for _ in range(users_total + serial_total):
                user = Keypair()
                chain.airdrop(user.pubkey(), 1_000_000_000)
                await rpc.register(user)
                await rpc.deposit(user, 50_000_000)
                users.append(user)

            # baseline: the relay's round trip from one node to the other, same sizes
            baseline_ms = []
            probe_user = Keypair()
            for index in range(serial_total):
                event = seal(Transaction(str(probe_user.pubkey()), index + 1), address,
                             CONTROLLER_SECRET)  # fmt: skip
                started = time.perf_counter()
                await publisher.publish(event)
                target = (index + 1) * (index + 2) // 2
                await wait_until(lambda t=target: _balance_is(backend, probe_user, t), "baseline")
                baseline_ms.append((time.perf_counter() - started) * 1000)

            # latency: one Request at a time, publish -> credit in the backend's projection
            latencies_ms = []
            for user in users[users_total:]:
                started = time.perf_counter()
                await publisher.publish(request_for(address, user, 0))  # type: ignore[arg-type]
                await wait_until(lambda u=user: _balance_is(backend, u, PAY_LAMPORTS), "credit")
                latencies_ms.append((time.perf_counter() - started) * 1000)

            # throughput: every user recharges at once
            started = time.perf_counter()
            for user in users[:users_total]:
                await publisher.publish(request_for(address, user, 0))  # type: ignore[arg-type]
            for user in users[:users_total]:
                await wait_until(lambda u=user: _balance_is(backend, u, PAY_LAMPORTS), "credits")
            elapsed_s = time.perf_counter() - started
        finally:
            stop.set()
            for task in tasks[2:]:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await publisher.close()
            await controller.aclose()
            await backend.aclose()
            server.close()
    report = {
        "recharges": users_total,
        "recharges_per_s": round(users_total / elapsed_s, 1),
        "request_to_credit_ms": _percentiles(latencies_ms),
        "relay_round_trip_ms (baseline)": _percentiles(baseline_ms),
        "p50_ratio_to_baseline": round(
            statistics.median(latencies_ms) / statistics.median(baseline_ms), 1
        ),
    }
    print(json.dumps(report, indent=2))


async def _balance_is(node: Node, user: Keypair, tokens: int) -> bool:
    return await balance(node, user) == tokens


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered), 1),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50, help="recharges at once")
    parser.add_argument("--samples", type=int, default=50, help="one-at-a-time recharges")
    args = parser.parse_args()
    asyncio.run(run(args.users, args.samples))


if __name__ == "__main__":
    main()
