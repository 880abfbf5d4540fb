"""Kill -9 the backend process around a chat: the debit is never lost nor doubled, and a chat
killed mid-stream leaves no hold behind."""

# ruff: noqa: F811 (pytest fixtures are imported by name, then requested by name)

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dsproxy.config import Settings, load_settings
from tests.e2e.serve_process import ServeProcess
from tests.integration.upstream_fixtures import (  # noqa: F401 (fixtures)
    USER_KEYS,
    WAIT_S_MAX,
    append_credit,
    backend_env,
    balance,
    bearer,
    demo_model,
    demo_url,
    free_port,
    issued_debits,
    login,
    read_debits,
    tokenizer,
)

pytestmark = pytest.mark.e2e

WALLET = USER_KEYS[3]
USER = str(WALLET.pubkey())


@pytest.fixture
def env(node_env: dict[str, str], demo_url: str) -> dict[str, str]:
    return backend_env(node_env, demo_url)


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return load_settings(env)


@pytest.fixture
def serve(env: dict[str, str], tmp_path: Path) -> Iterator[ServeProcess]:
    process = ServeProcess(env, free_port(), tmp_path / "serve.log")
    yield process
    process.stop()


async def test_a_kill_after_the_response_loses_no_debit_and_restarts_add_none(
    serve: ServeProcess, settings: Settings
) -> None:
    append_credit(settings, USER, 1_000)
    serve.start()
    async with httpx.AsyncClient(base_url=serve.url, timeout=WAIT_S_MAX) as http:
        token = await login(http, WALLET)
        body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}
        response = await http.post("/v1/chat/completions", json=body, headers=bearer(token))
        assert response.status_code == 200
    charged = int(response.headers["x-dsproxy-tokens-charged"])
    serve.kill()  # the debit event may not be issued yet: the settled charge is durable

    for _ in range(2):
        serve.start()
        async with httpx.AsyncClient(base_url=serve.url, timeout=WAIT_S_MAX) as http:
            assert await balance(http, token) == {
                "user": USER,
                "balance": 1_000 - charged,
                "held": 0,
                "available": 1_000 - charged,
            }
        debits = await issued_debits(settings, USER, charged)
        assert [tokens for _, tokens in debits] == [-charged]
        serve.kill()
    assert read_debits(settings, USER) == debits


async def test_a_kill_mid_stream_leaves_no_hold_and_no_debit(
    serve: ServeProcess, settings: Settings
) -> None:
    append_credit(settings, USER, 1_000)
    serve.start()
    body = {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "hi [[pause:2]]"}],
        "stream": True,
    }
    async with httpx.AsyncClient(base_url=serve.url, timeout=WAIT_S_MAX) as http:
        token = await login(http, WALLET)
        async with http.stream(
            "POST", "/v1/chat/completions", json=body, headers=bearer(token)
        ) as response:
            lines = response.aiter_lines()  # kept referenced: the connection stays open
            async for line in lines:
                if '" is"' in line:
                    break  # two words delivered; the model now pauses
            assert (await balance(http, token))["held"] > 0
            serve.kill()
            del lines

    serve.start()
    async with httpx.AsyncClient(base_url=serve.url, timeout=WAIT_S_MAX) as http:
        assert await balance(http, token) == {
            "user": USER,
            "balance": 1_000,
            "held": 0,
            "available": 1_000,
        }
    assert read_debits(settings, USER) == []


async def test_a_stop_lets_a_chat_in_flight_finish_within_the_grace(
    serve: ServeProcess, settings: Settings
) -> None:
    """SIGTERM (a deploy) cut every stream after a fixed 5 s, with no end and a traceback;
    chats now have DSPROXY_SHUTDOWN_GRACE_S (25 s; compose waits 30 s) to finish."""
    append_credit(settings, USER, 1_000)
    serve.start()
    async with httpx.AsyncClient(base_url=serve.url, timeout=WAIT_S_MAX) as http:
        token = await login(http, WALLET)
        said = "hi [[think:6500]] [[words:3]]"  # longer than the old 5 s
        body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": said}]}
        chat = asyncio.create_task(
            http.post("/v1/chat/completions", json={**body, "stream": True}, headers=bearer(token))
        )
        await asyncio.sleep(1.0)  # the chat is in flight
        assert serve.process is not None
        serve.process.send_signal(signal.SIGTERM)
        response = await chat
    assert response.status_code == 200
    assert b"[DONE]" in response.content and b'"error"' not in response.content
    assert await asyncio.to_thread(serve.process.wait, WAIT_S_MAX) == 0
    assert "Traceback" not in serve.log_path.read_text()
