"""Ledger commands: import, export, replay, balance."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from tqdm import tqdm

from dsproxy.adapters.data_dir_lock import exclusive_data_dir
from dsproxy.adapters.event_store import AsyncEventStore
from dsproxy.bootstrap import address, fact_projections, open_ledger, own_pubkey, trust_policy
from dsproxy.config import Settings
from dsproxy.domain.publication import Replacement
from dsproxy.entrypoints import arguments
from dsproxy.errors import BadInput, ConfigError
from dsproxy.services.importer import import_jsonl
from dsproxy.services.ingest import fetch_into_store
from dsproxy.services.node import ingest_limits
from dsproxy.services.projector import rebuild
from dsproxy.wire.messages import validate_user

__all__ = ["add_commands"]

_REFUSED_SHOWN_MAX = 20
REPLAY_GC_THRESHOLD = 200_000


def _progress_bar(total: int | None, unit: str, description: str) -> tqdm:
    """A bar on a terminal; silent in logs and pipes."""
    return tqdm(total=total, unit=unit, desc=description, disable=not sys.stderr.isatty())


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser("import", help="append Nostr events from a JSON Lines file")
    parser.add_argument("file", type=Path)
    parser.set_defaults(run=run_import)

    parser = subparsers.add_parser("export", help="write every stored Nostr event as JSON Lines")
    parser.add_argument("file", help="output file, or - for standard output")
    parser.add_argument("--force", action="store_true", help="replace the file if it exists")
    parser.set_defaults(run=run_export)

    parser = subparsers.add_parser("replay", help="rebuild the projection from the event store")
    parser.add_argument(
        "--from-relay", metavar="URL", help="first fetch the session's whole history from a relay"
    )
    parser.add_argument(
        "--since",
        type=arguments.unix_time,
        default=None,
        metavar="T",
        help="with --from-relay: from created_at T",
    )
    parser.set_defaults(run=run_replay)

    parser = subparsers.add_parser("balance", help="a user's balance and the events that moved it")
    parser.add_argument("user", help="the user's Solana public key (base58)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--limit", type=arguments.count, default=1000, help="postings to list at most"
    )
    parser.set_defaults(run=run_balance)


def run_import(args: argparse.Namespace, settings: Settings) -> int:
    if not args.file.is_file():
        raise BadInput(f"{str(args.file)!r} is not a readable file")
    return asyncio.run(_import(args.file, settings))


async def _import(path: Path, settings: Settings) -> int:
    node = await open_ledger(settings)
    try:
        with _progress_bar(None, "lines", "import") as bar:
            report = await import_jsonl(
                path,
                node.store,
                address(settings),
                content_bytes_max=settings.content_bytes_max,
                progress=bar.update,
            )
        with _progress_bar(None, "events", "project") as bar:
            await node.projector.catch_up(bar.update)
    finally:
        await node.aclose()
    print(
        f"accepted {report.accepted}, duplicate {report.duplicates}, refused {len(report.refused)}"
    )
    for refusal in report.refused[:_REFUSED_SHOWN_MAX]:
        print(f"  line {refusal.line}: {refusal.reason}")
    if len(report.refused) > _REFUSED_SHOWN_MAX:
        reasons = Counter(r.reason.split(":")[0] for r in report.refused)
        print(
            f"  ... and {len(report.refused) - _REFUSED_SHOWN_MAX} more; by kind: {dict(reasons)}"
        )
    return 1 if report.refused else 0


def existing_store(settings: Settings) -> Path:
    """A command that reads the ledger never creates one: a mistyped data directory would
    otherwise look like an empty ledger (balance 0, 0 events exported over a backup)."""
    if not settings.events_path.is_file():
        raise ConfigError(
            f"no event store at {str(settings.events_path)!r}: check --data-dir or DSPROXY_DATA_DIR"
        )
    return settings.events_path


def run_export(args: argparse.Namespace, settings: Settings) -> int:
    path = existing_store(settings)
    if args.file != "-":
        target = Path(args.file)
        if target.resolve() in {path.resolve(), Path(f"{path}-wal").resolve()}:
            raise BadInput(f"{args.file!r} is the event store itself")
        if target.is_dir():
            raise BadInput(f"{args.file!r} is a directory: name the file to write")
        if target.exists() and not args.force:
            raise BadInput(f"{args.file!r} exists; --force replaces it")
    store = AsyncEventStore.open(path)
    try:
        if args.file == "-":  # a full disk there is said by the command line (cli.py)
            written = _write_events(store, sys.stdout.buffer)
        else:
            written = _write_file(store, Path(args.file))
    finally:
        asyncio.run(store.close())
    print(f"exported {written} events", file=sys.stderr)
    return 0


def _write_file(store: AsyncEventStore, target: Path) -> int:
    """Write beside the target, then rename: a failed export leaves no half-written file and
    the old one as it was."""
    partial = target.with_name(target.name + ".partial")
    try:
        with partial.open("wb") as handle:
            written = _write_events(store, handle)
        os.replace(partial, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a missing directory, a full disk
            raise BadInput(f"cannot write {str(target)!r}: {exc.strerror or exc}") from None
        raise
    return written


def _write_events(store: AsyncEventStore, handle: Any) -> int:
    """Every stored event but ours that were signed again: no relay has those, and without
    the fact saying so a store imported from the file would count both."""
    facts: list[Any] = store.sync.facts_of(Replacement.Recorded)
    replaced = {fact.event_id for fact in facts}
    written = 0
    for record in store.sync.scan():
        if record.is_nostr and (not replaced or orjson.loads(record.state)["id"] not in replaced):
            handle.write(record.state + b"\n")
            written += 1
    handle.flush()
    return written


def run_replay(args: argparse.Namespace, settings: Settings) -> int:
    # A batch job that allocates millions of short-lived acyclic objects: collect the young
    # generation far less often (faster), but do collect (asyncio leaves cycles behind).
    if args.since is not None and args.from_relay is None:
        raise BadInput("--since is a point in the relay's history: use it with --from-relay")
    args.since = args.since or 0
    thresholds = gc.get_threshold()
    gc.set_threshold(REPLAY_GC_THRESHOLD, *thresholds[1:])
    try:
        if args.from_relay is not None and not settings.events_path.exists():
            return _replay_into_new_store(settings, args.from_relay, args.since)
        with exclusive_data_dir(settings.data_dir, "dsproxy replay", create=False):
            existing_store(settings)  # the projection is swapped: not under a running service
            if args.from_relay is not None:
                asyncio.run(_fetch(settings, settings.events_path, args.from_relay, args.since))
            return asyncio.run(_replay(settings))
    finally:
        gc.set_threshold(*thresholds)


def _replay_into_new_store(settings: Settings, url: str, since: int) -> int:
    """Fetch into a scratch store and move it in once the relay's history is all there: a
    relay that does not answer leaves no empty ledger behind (a mistyped data directory then
    read as balance 0), and no data directory it had to create."""
    data_dir = settings.data_dir
    with contextlib.ExitStack() as held:
        locked = data_dir.is_dir()
        if locked:  # the lock from the start: a service must not start on it meanwhile
            held.enter_context(exclusive_data_dir(data_dir, "dsproxy replay"))
        with tempfile.TemporaryDirectory(prefix=".replay-", dir=_existing_parent(data_dir)) as tmp:
            scratch = Path(tmp) / settings.events_path.name
            asyncio.run(_fetch(settings, scratch, url, since))
            if not locked:
                held.enter_context(exclusive_data_dir(data_dir, "dsproxy replay"))
            if settings.events_path.exists():
                raise ConfigError(f"{str(settings.events_path)!r} appeared while fetching")
            for name in [scratch.name, *(scratch.name + s for s in ("-wal", "-shm"))]:
                if (Path(tmp) / name).exists():
                    shutil.move(Path(tmp) / name, data_dir / name)
        return asyncio.run(_replay(settings))


def _existing_parent(path: Path) -> Path:
    """The directory itself if it exists, else its nearest existing ancestor (where creating
    it must be allowed anyway)."""
    path = path.absolute()
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


async def _fetch(settings: Settings, store_path: Path, url: str, since: int) -> None:
    """Page the session's history from the relay at `url` into the store at `store_path`."""
    policy = trust_policy(settings)
    store = AsyncEventStore.open(store_path)
    try:
        with _progress_bar(None, "events", "fetch") as bar:
            fetched = await fetch_into_store(
                url,
                store,
                address(settings),
                since=since,
                limits=ingest_limits(settings),
                progress=bar.update,
                trusted=(*policy.controllers, *policy.backends),
                own_pubkey=own_pubkey(settings),
            )
    finally:
        await store.close()
    print(
        f"fetched {fetched.received} events from {url}: {fetched.appended} new, "
        f"{fetched.duplicates} duplicate, refused {dict(fetched.refused)}"
    )


async def _replay(settings: Settings) -> int:
    store = AsyncEventStore.open(settings.events_path)
    try:
        total = await store.max_position()
        started = time.perf_counter()
        with _progress_bar(total, "events", "replay") as bar:
            result = await rebuild(
                store,
                settings.projection_path,
                trust_policy(settings),
                progress=bar.update,
                content_bytes_max=settings.content_bytes_max,
                extensions=fact_projections(settings),
            )
        elapsed_s = time.perf_counter() - started
    finally:
        await store.close()
    node = await open_ledger(settings)
    try:
        counts = await node.db.counts()
    finally:
        await node.aclose()
    rate = result.records / elapsed_s if elapsed_s > 0 else 0.0
    print(
        f"replayed {result.records} events, {counts['accounts']} users, "
        f"{counts['postings']} postings, {counts['ignored']} ignored "
        f"in {elapsed_s:.2f} s ({rate:,.0f} events/s)"
    )
    return 0


def run_balance(args: argparse.Namespace, settings: Settings) -> int:
    user = validate_user(args.user, "USER")
    existing_store(settings)
    return asyncio.run(_balance(user, args.json, args.limit, settings))


async def _balance(user: str, as_json: bool, limit: int, settings: Settings) -> int:
    node = await open_ledger(settings, rebuild=False)
    try:
        await node.projector.catch_up()
        account = await node.db.account(user)
        postings = await node.db.postings(user, limit)
    finally:
        await node.aclose()
    credited = account.credited if account else 0
    debited = account.debited if account else 0
    if as_json:
        print(
            json.dumps(
                {
                    "user": user,
                    "balance": credited - debited,
                    "credited": credited,
                    "debited": debited,
                    "events": [
                        {
                            "event_id": p.event_id,
                            "tokens": p.tokens,
                            "author": p.author,
                            "created_at": p.created_at,
                            "position": p.position,
                        }
                        for p in postings
                    ],
                },
                indent=2,
            )
        )
        return 0
    print(f"user      {user}")
    print(f"balance   {credited - debited}")
    print(f"credited  {credited}")
    print(f"debited   {debited}")
    for p in postings:
        print(f"  {p.tokens:+d}  {p.event_id}  by {p.author[:16]}…  at {p.created_at}")
    return 0
