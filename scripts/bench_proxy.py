"""Proxy overhead: the same chats sent to the demo model directly and through dsproxy-serve.

Both servers run as their own processes (as in production); metering is on (every chat takes a
hold, records its charge durably before answering, and its debit event follows). Prints latency
percentiles, the latency the proxy adds, the throughput ratio and the CPU time each process
spends per chat, at concurrency 1 and 32, for each upstream speed in `--think-ms`: 0 is an
instant model (the proxy's own cost is all there is to see), 50 a fast real one. Direct and
proxied runs alternate `--pairs` times; the added latency and the throughput ratio are taken
within each pair and their median printed, with their range.

    python scripts/bench_proxy.py [--requests 400] [--stream] [--think-ms 0,50] [--pairs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from httpx_aiohttp import AiohttpTransport
from solders.keypair import Keypair

from dsproxy.adapters.event_store import EventStore
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.event import public_key_of
from dsproxy.wire.messages import Transaction

CONTROLLER_SECRET = "c1" * 32
BACKEND_SECRET = "b1" * 32
MACHINE = public_key_of("3a" * 32)
SESSION = "dephy-dsproxy-controller"
_RUNS = itertools.count(1)
GOALS = "goals: added p50 <= 2 ms, added p99 <= 10 ms, throughput >= 50% of direct"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url}: the server exited")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not start")


def start_servers(data_dir: Path) -> tuple[list[subprocess.Popen[bytes]], str, str]:
    upstream_port, proxy_port = free_port(), free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "dsproxy.demo.upstream_model", "--port", str(upstream_port)]
    )
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    wait_ready(upstream_url + "/models", upstream)
    key_file = data_dir.parent / "backend.key"
    key_file.write_text(BACKEND_SECRET)
    key_file.chmod(0o600)
    env = {
        **os.environ,
        "DSPROXY_DATA_DIR": str(data_dir),
        "DSPROXY_MACHINE_PUBKEY": MACHINE,
        "DSPROXY_TRUSTED_CONTROLLERS": public_key_of(CONTROLLER_SECRET),
        "DSPROXY_TRUSTED_BACKENDS": public_key_of(BACKEND_SECRET),
        "DSPROXY_NOSTR_KEY_FILE": str(key_file),
        "DSPROXY_UPSTREAM_URL": upstream_url,
        "DSPROXY_HTTP_PORT": str(proxy_port),
        "DSPROXY_REQUESTS_PER_MINUTE_MAX": "100000000",
        "DSPROXY_CONCURRENT_REQUESTS_MAX": "10000",
    }
    proxy = subprocess.Popen([sys.executable, "-m", "dsproxy.entrypoints.serve"], env=env)
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    wait_ready(proxy_url + "/healthz", proxy)
    return [upstream, proxy], upstream_url, proxy_url


def credit(data_dir: Path, user: str, tokens: int) -> None:
    store = EventStore(data_dir / "events.sqlite")
    try:
        store.append_nostr(
            [seal(Transaction(user, tokens), Address(SESSION, MACHINE), CONTROLLER_SECRET)]
        )
    finally:
        store.close()


async def api_key(proxy_url: str, wallet: Keypair) -> str:
    async with httpx.AsyncClient(base_url=proxy_url) as http:
        user = str(wallet.pubkey())
        message = (await http.post("/v1/auth/challenge", json={"user_pubkey": user})).json()
        text = message["message"]
        import base64

        signature = base64.b64encode(bytes(wallet.sign_message(text.encode()))).decode()
        login = await http.post(
            "/v1/auth/login", json={"user_pubkey": user, "message": text, "signature": signature}
        )
        token = login.json()["token"]
        created = await http.post(
            "/v1/api-keys", json={"name": "bench"}, headers={"Authorization": f"Bearer {token}"}
        )
        return str(created.json()["key"])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(
    base_url: str, key: str, requests: int, concurrency: int, stream: bool, think_ms: int
) -> dict:
    run_id = next(_RUNS)

    def body(index: int) -> dict:
        # every chat's prompt is new, so no token count is remembered from an earlier chat
        content = f"benchmark {run_id}.{index} [[words:12]] [[think:{think_ms}]]"
        return {
            "model": "deepseek-chat",
            "messages": [{"role": "user", "content": content}],
            "stream": stream,
        }

    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)

    # httpcore's pool scans every connection per request: at 32 the load generator itself would
    # be the bottleneck (and more so the slower the server), so it uses aiohttp's pool
    transport = AiohttpTransport(limits=limits)
    async with httpx.AsyncClient(base_url=base_url, transport=transport, timeout=60) as http:

        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                started = time.perf_counter()
                if stream:
                    async with http.stream(
                        "POST", "/chat/completions", json=body(index), headers=headers
                    ) as response:
                        async for _ in response.aiter_bytes():
                            pass
                else:
                    response = await http.post(
                        "/chat/completions", json=body(index), headers=headers
                    )
                assert response.status_code == 200, response.status_code
                latencies.append(time.perf_counter() - started)

        # warm every connection the run will use, ours and the proxy's to the upstream: one
        # after another, all would reuse one connection and the first round would time
        # `concurrency` connects on each side (the steady state is what is measured)
        await asyncio.gather(
            *(
                http.post(
                    "/chat/completions", json={**body(-1 - index), "stream": False}, headers=headers
                )
                for index in range(concurrency)
            )
        )
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "rps": requests / elapsed,
    }


def summary(
    think_ms: int, concurrency: int, directs: list[dict], proxieds: list[dict], cpus_ms: list[float]
) -> str:
    """Medians over the pairs; each figure of merit is taken within a pair, then its median."""

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    pairs = list(zip(directs, proxieds, strict=True))
    added_p50 = sorted(proxied["p50_ms"] - direct["p50_ms"] for direct, proxied in pairs)
    added_p99 = sorted(proxied["p99_ms"] - direct["p99_ms"] for direct, proxied in pairs)
    ratios = sorted(proxied["rps"] / direct["rps"] for direct, proxied in pairs)
    return (
        f"upstream {think_ms:>3} ms, concurrency {concurrency:>2}: "
        f"direct p50 {median(directs, 'p50_ms'):.2f} ms p99 {median(directs, 'p99_ms'):.2f} ms "
        f"{median(directs, 'rps'):.0f} req/s | proxy p50 {median(proxieds, 'p50_ms'):.2f} ms "
        f"p99 {median(proxieds, 'p99_ms'):.2f} ms {median(proxieds, 'rps'):.0f} req/s | "
        f"added p50 {statistics.median(added_p50):+.2f} ms "
        f"({added_p50[0]:+.2f}..{added_p50[-1]:+.2f}) "
        f"p99 {statistics.median(added_p99):+.2f} ms | "
        f"throughput ratio {statistics.median(ratios):.2f} ({ratios[0]:.2f}..{ratios[-1]:.2f}) | "
        f"proxy CPU {statistics.median(cpus_ms):.2f} ms/chat"
    )


async def bench(requests: int, stream: bool, thinks_ms: list[int], pairs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        wallet = Keypair.from_seed(bytes([42]) * 32)
        credit(data_dir, str(wallet.pubkey()), 10**12)
        processes, upstream_url, proxy_url = start_servers(data_dir)
        try:
            key = await api_key(proxy_url, wallet)
            kind = "streamed" if stream else "non-streamed"
            print(f"{requests} {kind} chats per run, {pairs} pairs; {os.cpu_count()} CPUs; {GOALS}")
            proxy_pid = processes[1].pid
            for think_ms, concurrency in itertools.product(thinks_ms, (1, 32)):
                directs, proxieds, cpus_ms = [], [], []
                for _ in range(pairs):  # alternate, so both sides meet the same machine
                    directs.append(
                        await run(upstream_url, "unused", requests, concurrency, stream, think_ms)
                    )
                    before = cpu_seconds(proxy_pid)
                    proxieds.append(
                        await run(proxy_url + "/v1", key, requests, concurrency, stream, think_ms)
                    )
                    cpus_ms.append((cpu_seconds(proxy_pid) - before) * 1000 / requests)
                print(summary(think_ms, concurrency, directs, proxieds, cpus_ms))
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
                process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--stream", action="store_true", help="streamed chats")
    parser.add_argument(
        "--think-ms", default="0,50", help="the demo model's time to answer, comma-separated"
    )
    parser.add_argument("--pairs", type=int, default=3, help="direct/proxy runs alternated")
    args = parser.parse_args()
    thinks_ms = [int(value) for value in args.think_ms.split(",")]
    asyncio.run(bench(args.requests, args.stream, thinks_ms, args.pairs))


if __name__ == "__main__":
    main()
