"""Ingest throughput and publish-to-balance latency against a real nostr-relay process.

    python scripts/bench_ingest.py [--events 5000] [--samples 200] [--pairs 15]

Throughput: the relay holds N credits; a bare nostr-sdk client connects and reads them all (one
REQ), then a fresh node connects and ingests them into its projection (history paging,
verification, store, fold). The two alternate `--pairs` times (so both meet the same
machine); the median of the pairs' ratios ingest/bare is the figure of merit (goal >= 0.90),
with the node's default settings (it asks for 5,000 events a query and pages until an answer
holds nothing new) and asking 500 a query (as against a relay that caps its answers at 500).

Latency: node A appends a credit (its outbox publishes it), node B ingests and projects it;
from A's append to B's balance, against a bare client's publish -> another bare client's
receipt through the same relay.

Projector: the fold of N events just appended, from the store's memory of what it committed last
against reading them back from SQLite (the figure is the ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nostr_sdk
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsproxy.adapters.relay import session_filter
from dsproxy.config import Settings, load_settings
from dsproxy.entrypoints.event_loop import run_service
from dsproxy.entrypoints.heap import freeze_startup_objects
from dsproxy.services.node import Node
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.event import NostrEvent, public_key_of
from dsproxy.wire.messages import Transaction
from tests.e2e.relay_process import RelayProcess
from tests.integration.relay_fixtures import USERS, credits

CONTROLLER_SECRET = "c1" * 32
MACHINE = public_key_of("3a" * 32)
ADDRESS = Address("dephy-dsproxy-controller", MACHINE)
PUBLISHERS = 8  # parallel connections used to fill the relay
WAIT_S_MAX = 300.0
SAMPLE_S_MAX = 30.0


def node_settings(data_dir: Path, relay: str, **changes: object) -> Settings:
    return load_settings(
        {
            "DSPROXY_DATA_DIR": str(data_dir),
            "DSPROXY_MACHINE_PUBKEY": MACHINE,
            "DSPROXY_TRUSTED_CONTROLLERS": public_key_of(CONTROLLER_SECRET),
            "DSPROXY_RELAYS": relay,
        }
    ).replace(**changes)


async def fill(url: str, count: int) -> None:
    events = credits(CONTROLLER_SECRET, ADDRESS, count, per_second=200)
    chunks = [events[index::PUBLISHERS] for index in range(PUBLISHERS)]

    async def one(chunk: list) -> None:
        client = nostr_sdk.Client()
        await client.add_relay(nostr_sdk.RelayUrl.parse(url))
        await client.try_connect(datetime.timedelta(seconds=10))
        for event in chunk:
            await client.send_event(nostr_sdk.Event.from_json(event.to_json()))
        await client.shutdown()

    await asyncio.gather(*(one(chunk) for chunk in chunks))


async def bare_read_s(url: str, count: int) -> float:
    """Seconds for a bare nostr-sdk client to connect and receive every event of the session
    (the node's time includes its connection too)."""
    query = nostr_sdk.Filter.from_json(orjson.dumps(session_filter(ADDRESS, limit=count)).decode())
    started = time.perf_counter()
    client = nostr_sdk.Client()
    relay_url = nostr_sdk.RelayUrl.parse(url)
    await client.add_relay(relay_url)
    await client.try_connect(datetime.timedelta(seconds=10))
    events = await client.fetch_events(
        nostr_sdk.ReqTarget.single(relay_url, [query]), datetime.timedelta(seconds=WAIT_S_MAX)
    )
    elapsed = time.perf_counter() - started
    await client.shutdown()
    assert len(events) == count, (len(events), count)
    return elapsed


async def ingest_s(url: str, count: int, page_max: int | None) -> float:
    """Seconds for a fresh node to have every event in its projection."""
    with tempfile.TemporaryDirectory() as directory:
        settings = node_settings(Path(directory), url, ingest_queue_len_max=20_000)
        if page_max is not None:
            settings = settings.replace(events_per_page_max=page_max)
        node = await Node.open(settings)
        freeze_startup_objects()  # as `dsproxy node` does once it has opened the node
        stop = asyncio.Event()
        started = time.perf_counter()
        task = asyncio.create_task(node.run(stop))
        try:
            await wait_postings(node, count)
            return time.perf_counter() - started
        finally:
            stop.set()
            await task
            await node.aclose()


async def catch_up_s(events: list[NostrEvent], from_memory: bool) -> float:
    """Seconds for the projector to fold events just appended (as ingest appends them), from
    the store's memory of what it committed last, or read back from SQLite."""
    with tempfile.TemporaryDirectory() as directory:
        node = await Node.open(node_settings(Path(directory), "ws://127.0.0.1:9"))
        try:
            for start in range(0, len(events), 500):
                await node.ledger.store.append_nostr(events[start : start + 500])
            if not from_memory:
                node.ledger.store.sync.recent.clear()
            started = time.perf_counter()
            await node.ledger.projector.catch_up()
            return time.perf_counter() - started
        finally:
            await node.aclose()


async def bare_round_trip_ms(url: str, samples: int) -> list[float]:
    """Publish by one bare client, receipt by another: the relay's own latency."""
    receiver = nostr_sdk.Client()
    relay_url = nostr_sdk.RelayUrl.parse(url)
    await receiver.add_relay(relay_url)
    stream = receiver.notifications()
    await receiver.try_connect(datetime.timedelta(seconds=10))
    query = nostr_sdk.Filter.from_json(orjson.dumps(session_filter(ADDRESS, limit=1)).decode())
    await receiver.subscribe(nostr_sdk.ReqTarget.single(relay_url, [query]))
    sender = nostr_sdk.Client()
    await sender.add_relay(relay_url)
    await sender.try_connect(datetime.timedelta(seconds=10))
    latencies = []
    for index in range(samples):
        event = seal(Transaction(USERS[0], 1_000_000 + index), ADDRESS, CONTROLLER_SECRET)
        started = time.perf_counter()
        await sender.send_event(nostr_sdk.Event.from_json(event.to_json()))
        while True:
            notification = await asyncio.wait_for(stream.next(), WAIT_S_MAX)
            if notification.is_new_event() and notification.event.id().to_hex() == event.id:
                break
        latencies.append((time.perf_counter() - started) * 1000)
    await sender.shutdown()
    await receiver.shutdown()
    return latencies


async def node_round_trip_ms(url: str, samples: int, key_file: Path, already: int) -> list[float]:
    """Node A appends a credit; node B shows the new balance."""
    with tempfile.TemporaryDirectory() as a_dir, tempfile.TemporaryDirectory() as b_dir:
        from dsproxy.adapters.node_keys import create_key_file, load_secret

        author = create_key_file(key_file)
        secret = load_secret(key_file)
        a = await Node.open(
            node_settings(
                Path(a_dir),
                url,
                nostr_key_file=key_file,
                trusted_controllers=(author, public_key_of(CONTROLLER_SECRET)),
            )
        )
        b = await Node.open(
            node_settings(
                Path(b_dir), url, trusted_controllers=(author, public_key_of(CONTROLLER_SECRET))
            )
        )
        stops = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(a.run(stops[0])), asyncio.create_task(b.run(stops[1]))]
        user = USERS[1]
        latencies = []
        try:
            for node in (a, b):  # both read the relay's history first: measure after that
                await wait_postings(node, already)
            expected = await balance_of(b, user)
            for index in range(samples):
                tokens = 1 + index
                expected += tokens
                event = seal(Transaction(user, tokens), ADDRESS, secret)
                started = time.perf_counter()
                await a.append([event])
                while True:
                    fired = b.ledger.projector.applied.next()  # before the check: no lost wake
                    if (await balance_of(b, user)) == expected:
                        break
                    if time.perf_counter() - started > SAMPLE_S_MAX:
                        raise TimeoutError(f"node B did not show credit {index} in time")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(fired.wait(), 1.0)
                latencies.append((time.perf_counter() - started) * 1000)
        finally:
            for stop in stops:
                stop.set()
            await asyncio.gather(*tasks)
            await a.aclose()
            await b.aclose()
        return latencies


async def wait_postings(node: Node, count: int) -> None:
    while True:
        fired = node.ledger.projector.applied.next()  # before the check: no lost wake-up
        if (await node.ledger.db.counts())["postings"] >= count:
            return
        await asyncio.wait_for(fired.wait(), WAIT_S_MAX)


async def balance_of(node: Node, user: str) -> int:
    account = await node.ledger.db.account(user)
    return 0 if account is None else account.balance


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5_000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=15, help="bare/ingest runs alternated")
    args = parser.parse_args()
    # the throughput nodes have no key, on purpose: keep their warning about it off the figures
    logging.getLogger("dsproxy.services.node").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as directory:
        relay = RelayProcess(Path(directory) / "relay")
        relay.start()
        try:
            started = time.perf_counter()
            await fill(relay.url, args.events)
            print(
                f"relay filled with {args.events} events in {time.perf_counter() - started:.1f} s"
            )
            default_page = node_settings(Path(directory), relay.url).events_per_page_max
            for page_max in (None, 500):
                bares, ours = [], []
                for _ in range(args.pairs):  # alternate, so both sides meet the same machine
                    bares.append(await bare_read_s(relay.url, args.events))
                    ours.append(await ingest_s(relay.url, args.events, page_max))
                ratios = sorted(bare / our for bare, our in zip(bares, ours, strict=True))
                name = f"default page ({default_page})" if page_max is None else f"page {page_max}"
                print(
                    f"{name:<20}: bare client {args.events / statistics.median(bares):>8,.0f} "
                    f"events/s, ingest to projection {args.events / statistics.median(ours):>8,.0f}"
                    f" events/s, ratio {statistics.median(ratios):.2f} "
                    f"(pairs from {ratios[0]:.2f} to {ratios[-1]:.2f})"
                )
            events = credits(CONTROLLER_SECRET, ADDRESS, args.events, per_second=200)
            memory, read_back = [], []
            for pair in range(args.pairs):  # each goes first in every other pair
                for from_memory in (pair % 2 == 0, pair % 2 == 1):
                    times = memory if from_memory else read_back
                    times.append(await catch_up_s(events, from_memory=from_memory))
            print(
                f"projector catch-up of {args.events} just-appended events: read back from SQLite "
                f"{statistics.median(read_back) * 1000:.1f} ms, from the store's memory "
                f"{statistics.median(memory) * 1000:.1f} ms, ratio "
                f"{statistics.median(read_back) / statistics.median(memory):.2f}"
            )
            bare_ms = await bare_round_trip_ms(relay.url, args.samples)
            key_file = Path(directory) / "a.key"
            node_ms = await node_round_trip_ms(relay.url, args.samples, key_file, args.events)
            for name, values in (
                ("bare publish->receive", bare_ms),
                ("node A append->B balance", node_ms),
            ):
                print(
                    f"{name:<26} p50 {percentile(values, 0.5):6.1f} ms  "
                    f"p99 {percentile(values, 0.99):6.1f} ms  max {max(values):6.1f} ms"
                )
            p50 = percentile(node_ms, 0.5) / percentile(bare_ms, 0.5)
            p99 = percentile(node_ms, 0.99) / percentile(bare_ms, 0.99)
            print(
                f"latency ratio node/bare: p50 {p50:.2f}, p99 {p99:.2f} (goal: node p99 < 100 ms)"
            )
        except BaseException:
            log = relay.log.read_text(errors="replace").splitlines()[-20:]
            print("the relay's log ends with:", *log, sep="\n", file=sys.stderr)
            raise
        finally:
            relay.stop()


if __name__ == "__main__":
    run_service(main())  # the loop `dsproxy node` runs on
