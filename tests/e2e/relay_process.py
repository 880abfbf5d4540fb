"""The `nostr-relay` server from PyPI as a real process with SQLite storage, for e2e tests.

Its limits, set here on purpose: events of content up to `max_event_size` characters (4096, its
default; longer ones get `invalid: ...`), `created_at` no older than `oldest_event` (a year) and
no more than an hour ahead, 6000 events per query, no rate limit (no `rate_limits` key), and an
exclusive `until` (`created_at < until`), unlike NIP-01.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import nostr_sdk
import pytest

from dsproxy.wire.event import NostrEvent
from tests.integration.relay_fixtures import free_port

START_S_MAX = 30.0
STOP_S_MAX = 15.0
MAX_EVENT_SIZE = 4096

_CONFIG = """\
DEBUG: false
relay_name: dsproxy e2e relay
storage:
  sqlalchemy.url: sqlite+aiosqlite:///{database}
  num_concurrent_reqs: 10
  num_concurrent_adds: 2
  validators:
    - nostr_relay.validators.is_not_too_large
    - nostr_relay.validators.is_signed
    - nostr_relay.validators.is_recent
gunicorn:
  bind: 127.0.0.1:{port}
  workers: 1
  loglevel: warning
  reload: false
verification:
  nip05_verification: disabled
message_timeout: 1800
subscription_limit: 32
max_limit: 6000
max_event_size: {max_event_size}
oldest_event: 31536000
logging:
  version: 1
  root: {{level: WARNING}}
"""


class RelayProcess:
    """One nostr-relay server; `stop()` and `start()` again keep its SQLite storage."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = port or free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.config = directory / "relay.yaml"
        self.config.write_text(
            _CONFIG.format(
                database=directory / "relay.sqlite3", port=self.port, max_event_size=MAX_EVENT_SIZE
            )
        )
        self.log = directory / "relay.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        executable = Path(sys.executable).parent / "nostr-relay"
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [str(executable), "-c", str(self.config), "serve"],
                cwd=self.directory,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: gunicorn's worker stops with it
            )
        deadline = time.monotonic() + START_S_MAX
        while not self._accepting():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nostr-relay did not start; see {self.log}")
            time.sleep(0.05)

    def _accepting(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
            return True
        return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)  # the group we started, by its id
        try:
            process.wait(STOP_S_MAX)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_S_MAX)


@pytest.fixture
def relay_process(tmp_path: Path) -> Iterator[RelayProcess]:
    relay = RelayProcess(tmp_path / "relay")
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()


@contextlib.asynccontextmanager
async def patient_client(url: str) -> AsyncIterator[nostr_sdk.Client]:
    """A plain nostr-sdk client (its own reconnect on) for another party's publishing."""
    client = nostr_sdk.Client()
    await client.add_relay(nostr_sdk.RelayUrl.parse(url))
    await client.connect()
    try:
        yield client
    finally:
        await client.shutdown()


async def publish_until_accepted(
    client: nostr_sdk.Client, url: str, events: Sequence[NostrEvent], attempts_max: int = 600
) -> None:
    """Publish each event in turn, retrying through relay restarts (bounded)."""
    relay_url = nostr_sdk.RelayUrl.parse(url)
    for event in events:
        sdk_event = nostr_sdk.Event.from_json(event.to_json())
        for _ in range(attempts_max):
            output = await client.send_event(sdk_event)
            if relay_url in output.success or "duplicate" in str(output.failed.get(relay_url)):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"relay never accepted {event.id}")
