"""Real servers for the backend's tests: the demo model and the backend, each on 127.0.0.1.

Import the fixtures by name. Helpers are plain functions so e2e tests can share them: a wallet
login, an API key, a controller's credit appended to the store (as the controller would).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from solders.keypair import Keypair

from dsproxy.adapters.event_store import EventStore
from dsproxy.adapters.tokenizer import Tokenizer
from dsproxy.config import Settings, load_settings
from dsproxy.demo.upstream_model import DemoModel
from dsproxy.entrypoints.serve import serve
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.messages import Transaction
from tests.conftest import BACKEND_SECRET, CONTROLLER_SECRET

START_S_MAX = 60.0  # a generous ceiling for a server to start, never a timing assertion
WAIT_S_MAX = 30.0
USER_KEYS = tuple(Keypair.from_seed(bytes([90 + index]) * 32) for index in range(4))
PUBLIC_URL = "http://dsproxy.test"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Run an ASGI app on uvicorn in a thread; yields its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_S_MAX
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(START_S_MAX)


@pytest.fixture
def demo_model(tokenizer: Tokenizer) -> DemoModel:
    return DemoModel(pause_s=WAIT_S_MAX, tokenizer=tokenizer)


@pytest.fixture
def demo_url(demo_model: DemoModel) -> Iterator[str]:
    """The demo model's OpenAI base URL (…/v1)."""
    with serve_in_thread(demo_model.app) as base:
        yield base + "/v1"


def write_key_file(path: Path, secret_hex: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(secret_hex + "\n")
    path.chmod(0o600)
    return path


def backend_env(node_env: dict[str, str], upstream_url: str, **extra: str) -> dict[str, str]:
    """Environment of a backend on port 0 that trusts the test controller and its own key."""
    data_dir = Path(node_env["DSPROXY_DATA_DIR"])
    key_file = write_key_file(data_dir.parent / "backend.key", BACKEND_SECRET)
    return {
        **node_env,
        "DSPROXY_NOSTR_KEY_FILE": str(key_file),
        "DSPROXY_UPSTREAM_URL": upstream_url,
        "DSPROXY_HTTP_PORT": "0",
        "DSPROXY_PUBLIC_URL": PUBLIC_URL,
        "DSPROXY_REQUESTS_PER_MINUTE_MAX": "100000",
        "DSPROXY_CONCURRENT_REQUESTS_MAX": "1000",
        "DSPROXY_COMPLETION_TOKENS_MAX": "64",
        **extra,
    }


@contextlib.contextmanager
def backend_in_thread(settings: Settings) -> Iterator[str]:
    """Run `serve(settings)` on its own loop in a thread; yields the backend's base URL."""
    started = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        state["loop"], state["stop"] = asyncio.get_running_loop(), asyncio.Event()

        def on_started(port: int) -> None:
            state["port"] = port
            started.set()

        await serve(settings, on_started=on_started, stop=state["stop"])

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            state["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(START_S_MAX)
    if "port" not in state:
        raise RuntimeError(f"the backend did not start: {state.get('error')!r}")
    try:
        yield f"http://127.0.0.1:{state['port']}"
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(START_S_MAX)


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A backend of its own under these settings, and a client of it."""
    with backend_in_thread(settings) as base:
        async with httpx.AsyncClient(base_url=base, timeout=WAIT_S_MAX) as http:
            yield http


@pytest.fixture
def backend_settings(node_env: dict[str, str], demo_url: str) -> Settings:
    return load_settings(backend_env(node_env, demo_url))


@pytest.fixture
def backend_url(backend_settings: Settings) -> Iterator[str]:
    with backend_in_thread(backend_settings) as base:
        yield base


@pytest.fixture
async def client(backend_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=backend_url, timeout=WAIT_S_MAX) as http:
        yield http


def append_credit(
    settings: Settings, user: str, tokens: int, secret: str = CONTROLLER_SECRET
) -> str:
    """Append a controller's signed credit to the store, as the controller's node would."""
    address = Address(settings.session, settings.require_machine())
    event = seal(Transaction(user, tokens), address, secret)
    store = EventStore(settings.events_path)
    try:
        store.append_nostr([event])
    finally:
        store.close()
    return event.id


async def credit(
    client: httpx.AsyncClient, settings: Settings, token: str, user: str, tokens: int
) -> None:
    """Credit `user` and wait until the backend's projection shows it."""
    before = (await balance(client, token))["balance"]
    await asyncio.to_thread(append_credit, settings, user, tokens)
    await eventually(
        lambda: _balance_is(client, token, before + tokens), f"a credit of {tokens} to {user}"
    )


async def _balance_is(client: httpx.AsyncClient, token: str, expected: int) -> bool:
    return (await balance(client, token))["balance"] == expected


async def balance(client: httpx.AsyncClient, token: str) -> dict[str, Any]:
    response = await client.get("/v1/balance", headers=bearer(token))
    assert response.status_code == 200, response.text
    return dict(response.json())


async def eventually(check: Any, what: str, timeout_s: float = WAIT_S_MAX) -> None:
    """Poll an async `check` until true; fail naming `what` after a generous ceiling."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sign(keypair: Keypair, message: str) -> str:
    return base64.b64encode(bytes(keypair.sign_message(message.encode()))).decode()


async def challenge(client: httpx.AsyncClient, keypair: Keypair) -> str:
    response = await client.post("/v1/auth/challenge", json={"user_pubkey": str(keypair.pubkey())})
    assert response.status_code == 200, response.text
    return str(response.json()["message"])


async def login(client: httpx.AsyncClient, keypair: Keypair) -> str:
    """A session token for this wallet, by the challenge flow."""
    message = await challenge(client, keypair)
    response = await client.post(
        "/v1/auth/login",
        json={
            "user_pubkey": str(keypair.pubkey()),
            "message": message,
            "signature": sign(keypair, message),
        },
    )
    assert response.status_code == 200, response.text
    return str(response.json()["token"])


async def create_api_key(client: httpx.AsyncClient, session_token: str, name: str = "sdk") -> dict:
    response = await client.post("/v1/api-keys", json={"name": name}, headers=bearer(session_token))
    assert response.status_code == 201, response.text
    return dict(response.json())


async def funded(
    client: httpx.AsyncClient, settings: Settings, keypair: Keypair, tokens: int
) -> str:
    """Log this wallet in and credit it; returns its session token."""
    token = await login(client, keypair)
    if tokens:
        await credit(client, settings, token, str(keypair.pubkey()), tokens)
    return token


async def issued_debits(settings: Settings, user: str, total: int) -> list[tuple[str, int]]:
    """The user's debits in the store, once they add up to `total` (they are issued just after
    the chats settle)."""

    async def added_up() -> bool:
        debits = await asyncio.to_thread(read_debits, settings, user)
        return -sum(tokens for _, tokens in debits) == total

    await eventually(added_up, f"debits of {user} adding up to {total}")
    return await asyncio.to_thread(read_debits, settings, user)


def read_debits(settings: Settings, user: str) -> list[tuple[str, int]]:
    """(event id, tokens) of every debit of `user` in the store, read with a fresh store."""
    from dsproxy.wire.event import parse_event
    from dsproxy.wire.messages import parse_message

    store = EventStore(settings.events_path)
    try:
        found = []
        for record in store.scan():
            if not record.is_nostr:
                continue
            event = parse_event(record.state)
            message = parse_message(event.content)
            if isinstance(message, Transaction) and message.user == user and message.tokens < 0:
                found.append((event.id, message.tokens))
        return found
    finally:
        store.close()
