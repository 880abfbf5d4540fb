"""Benchmark the ledger: import N signed Transaction events, replay them, compare to a raw scan.

    python scripts/bench_ledger.py --events 200000 --users 5000

Prints import events/s, replay events/s, the ratio of replay to a raw sqlite3 scan of the same
stored rows (measured in the same run, as these machines are shared and noisy), and the peak
RSS of the `dsproxy replay` process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from solders.keypair import Keypair

from dsproxy.bootstrap import address, open_ledger
from dsproxy.config import load_settings
from dsproxy.services.importer import import_jsonl
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.event import public_key_of
from dsproxy.wire.messages import Transaction

SESSION = "dephy-dsproxy-controller"
CONTROLLER_SECRET = "11" * 32
BACKEND_SECRET = "22" * 32
MACHINE = public_key_of("33" * 32)


def _write_chunk(args: tuple[Path, int, int, list[str], int]) -> int:
    path, start, count, users, seed = args
    rng = random.Random(seed)
    where = Address(SESSION, MACHINE)
    with path.open("w") as handle:
        for index in range(start, start + count):
            user = users[rng.randrange(len(users))]
            if index % 4 == 0:
                message, secret = Transaction(user, rng.randint(1, 5_000_000)), CONTROLLER_SECRET
            else:
                message, secret = Transaction(user, -rng.randint(1, 2_000)), BACKEND_SECRET
            event = seal(message, where, secret, created_at=1_767_225_600 + index)
            handle.write(event.to_json() + "\n")
    return count


def generate(path: Path, events: int, users: int, workers: int) -> None:
    keys = [str(Keypair.from_seed(random.Random(i).randbytes(32)).pubkey()) for i in range(users)]
    size = -(-events // workers)
    parts = [path.with_suffix(f".part{w}") for w in range(workers)]
    jobs = [(parts[w], w * size, min(size, events - w * size), keys, w) for w in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_chunk, jobs))
    with path.open("wb") as out:
        for part in parts:
            out.write(part.read_bytes())
            part.unlink()


def raw_scan(events_db: Path) -> tuple[int, float]:
    """The floor: read every stored row with plain sqlite3 and touch its bytes."""
    connection = sqlite3.connect(events_db)
    started = time.perf_counter()
    rows = 0
    size = 0
    for _, topic, state in connection.execute(
        "SELECT rowid, topic, state FROM stored_events ORDER BY rowid"
    ):
        rows += 1
        size += len(state) + len(topic)
    elapsed = time.perf_counter() - started
    connection.close()
    assert size > 0
    return rows, elapsed


async def run_import(settings_env: dict[str, str], path: Path) -> tuple[int, float, float]:
    settings = load_settings(settings_env)
    node = await open_ledger(settings)
    try:
        started = time.perf_counter()
        report = await import_jsonl(
            path, node.store, address(settings), content_bytes_max=settings.content_bytes_max
        )
        stored_s = time.perf_counter() - started
        await node.projector.catch_up()
        total_s = time.perf_counter() - started
    finally:
        await node.aclose()
    assert not report.refused, report.refused[:3]
    return report.accepted, stored_s, total_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: temp)")
    args = parser.parse_args()

    work = args.dir or Path(tempfile.mkdtemp(prefix="dsproxy-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {
        "DSPROXY_DATA_DIR": str(work / "data"),
        "DSPROXY_MACHINE_PUBKEY": MACHINE,
        "DSPROXY_TRUSTED_CONTROLLERS": public_key_of(CONTROLLER_SECRET),
        "DSPROXY_TRUSTED_BACKENDS": public_key_of(BACKEND_SECRET),
    }
    source = work / "events.jsonl"
    started = time.perf_counter()
    generate(source, args.events, args.users, args.workers)
    print(f"generated {args.events:,} signed events in {time.perf_counter() - started:.1f} s")

    accepted, stored_s, total_s = asyncio.run(run_import(env, source))
    print(
        f"import:  {accepted:,} events, stored in {stored_s:.2f} s "
        f"({accepted / stored_s:,.0f} events/s verified+stored); "
        f"with projection {total_s:.2f} s ({accepted / total_s:,.0f} events/s)"
    )

    rows, raw_s = raw_scan(work / "data" / "events.sqlite")
    print(f"raw scan: {rows:,} rows in {raw_s:.2f} s ({rows / raw_s:,.0f} rows/s)")

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    completed = subprocess.run(
        [sys.executable, "-m", "dsproxy.entrypoints.cli", "replay"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    match = re.search(r"replayed (\d+) events.* in ([\d.]+) s", completed.stdout)
    assert match, completed.stdout + completed.stderr
    replayed, replay_s = int(match.group(1)), float(match.group(2))
    replay_rate = replayed / replay_s
    print(f"replay:  {completed.stdout.strip()}")
    print(f"replay / raw scan = {replay_rate / (rows / raw_s):.2f}")
    note = "" if peak_kib > before else " (an earlier child peaked higher)"
    print(f"peak RSS of `dsproxy replay`: {peak_kib / 1024:.0f} MiB{note}")


if __name__ == "__main__":
    main()
