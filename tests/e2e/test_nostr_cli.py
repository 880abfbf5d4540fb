"""The commands as users run them, against the nostr-relay process: keygen, node, replay."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsproxy.wire.envelope import Address
from tests.conftest import CONTROLLER_SECRET
from tests.e2e.relay_process import RelayProcess, relay_process
from tests.integration.relay_fixtures import USERS, credits, publish, totals

pytestmark = pytest.mark.e2e
__all__ = ["relay_process"]

COMMAND_S_MAX = 60.0


def dsproxy(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsproxy.entrypoints.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=COMMAND_S_MAX,
        check=False,
    )


def balance_of(env: dict[str, str], user: str) -> int:
    done = dsproxy(env, "balance", user, "--json")
    assert done.returncode == 0, done.stderr
    return int(json.loads(done.stdout)["balance"])


def test_keygen_writes_a_private_key_file_and_prints_its_public_key(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "node.key"
    done = dsproxy({"DSPROXY_DATA_DIR": str(tmp_path / "data")}, "keygen", str(path))
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip()) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700  # a data directory to be
    again = dsproxy({"DSPROXY_DATA_DIR": str(tmp_path / "data")}, "keygen", str(path))
    assert again.returncode == 2
    assert "not overwriting" in again.stderr


def test_replay_from_relay_pages_the_whole_history(
    relay_process: RelayProcess, node_env: dict[str, str], address: Address
) -> None:
    """700 credits (more than a page) come back from the relay into an empty data dir."""
    events = credits(CONTROLLER_SECRET, address, 700, per_second=50)
    asyncio.run(publish(relay_process.url, events))
    env = {**node_env, "DSPROXY_EVENTS_PER_PAGE_MAX": "300"}
    done = dsproxy(env, "replay", "--from-relay", relay_process.url)
    assert done.returncode == 0, done.stderr
    assert "700 new" in done.stdout
    assert [balance_of(env, user) for user in USERS] == totals(events)
    data_dir = Path(env["DSPROXY_DATA_DIR"])  # fetched into a scratch store, then moved in
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert not [path for path in data_dir.parent.iterdir() if path.name.startswith(".replay")]
    again = dsproxy(env, "replay", "--from-relay", relay_process.url)
    assert "0 new, 700 duplicate" in again.stdout
    assert [balance_of(env, user) for user in USERS] == totals(events)


def checkpoint_of(data_dir: Path, relay: str) -> int | None:
    """Read the node's checkpoint file directly (read-only; the node keeps writing it)."""
    path = data_dir / "checkpoints.sqlite"
    if not path.exists():
        return None
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        try:
            row = db.execute(
                "SELECT created_at FROM checkpoints WHERE relay = ?", (relay,)
            ).fetchone()
        except sqlite3.OperationalError:  # the table is not created yet
            return None
    return None if row is None else int(row[0])


def test_node_command_ingests_and_stops_cleanly_on_sigterm(
    relay_process: RelayProcess, node_env: dict[str, str], address: Address, tmp_path: Path
) -> None:
    """`dsproxy node` stores the relay's history, checkpoints it, and exits 0 on SIGTERM."""
    events = credits(CONTROLLER_SECRET, address, 100)
    asyncio.run(publish(relay_process.url, events))
    env = {**node_env, "DSPROXY_RELAYS": relay_process.url}
    data_dir = Path(node_env["DSPROXY_DATA_DIR"])
    with (tmp_path / "node.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dsproxy.entrypoints.cli", "node"],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + COMMAND_S_MAX
            while checkpoint_of(data_dir, relay_process.url) != events[-1].created_at:
                assert process.poll() is None, (tmp_path / "node.log").read_text()
                assert time.monotonic() < deadline, "the node never checkpointed the history"
                time.sleep(0.1)
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(COMMAND_S_MAX) == 0
    assert "stored 100" in (tmp_path / "node.log").read_text()
    assert [balance_of(env, user) for user in USERS] == totals(events)
