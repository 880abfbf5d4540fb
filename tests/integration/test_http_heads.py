"""Request heads from clients that never end them: a real backend, raw sockets on 127.0.0.1."""

# ruff: noqa: F811 (pytest fixtures are imported by name, then requested by name)

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest

from dsproxy.config import load_settings
from dsproxy.entrypoints import http_protocol
from tests.integration.upstream_fixtures import (  # noqa: F401 (fixtures)
    USER_KEYS,
    WAIT_S_MAX,
    backend_env,
    backend_in_thread,
    bearer,
    demo_model,
    demo_url,
    funded,
    tokenizer,
)


async def _exchange(base: str, *parts: bytes, pause_s: float = 0.0) -> bytes:
    """Send the parts (pausing between them), then read until the server closes."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause_s)
        async with asyncio.timeout(WAIT_S_MAX):
            return await reader.read()
    finally:
        writer.close()


async def test_a_head_past_its_limit_is_refused_and_the_server_stays_well(
    node_env: dict[str, str], demo_url: str
) -> None:
    """One header of 150 MiB was kept in memory (about 400 MB) while it arrived."""
    settings = load_settings(backend_env(node_env, demo_url))
    with backend_in_thread(settings) as base:
        # past the limit, then nothing more: sending on after the server closes would reset
        # the connection and lose its answer
        too_long = b"x" * (http_protocol.HEAD_BYTES_MAX + 16 * 1024)
        answer = await _exchange(base, b"GET /healthz HTTP/1.1\r\nhost: a\r\nx-big: " + too_long)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        error = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert "line and headers" in error["message"]
        # a head that passes the limit in the read that also ends it, and on a connection's
        # second request, whose first read was not counted: both were served
        half = b"x" * (http_protocol.HEAD_BYTES_MAX // 2 + 8 * 1024)
        split = await _exchange(
            base, b"GET /healthz HTTP/1.1\r\nhost: a\r\nx-big: " + half, half + b"\r\n\r\n"
        )
        assert split.startswith(b"HTTP/1.1 431 "), split[:200]
        second = await _exchange(
            base,
            b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nhost: a\r\nx-big: " + half + half + b"\r\n\r\n",
            pause_s=0.2,
        )
        assert second.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 431 " in second, second[:300]
        async with httpx.AsyncClient(base_url=base, timeout=WAIT_S_MAX) as http:
            assert (await http.get("/healthz")).status_code == 200
            # a large body is no large head, even when it comes in the same read
            wallet = await funded(http, settings, USER_KEYS[0], 1_000)
            big = {
                "model": "deepseek-chat",
                "messages": [{"role": "user", "content": "x" * 300_000}],
            }
            response = await http.post("/v1/chat/completions", json=big, headers=bearer(wallet))
            assert response.status_code in (400, 402), response.text  # refused on its merits


async def test_a_head_that_never_ends_is_closed_after_its_time(
    node_env: dict[str, str], demo_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thousand half-sent requests stayed open for good (and an idle connection too)."""
    monkeypatch.setattr(http_protocol, "HEAD_S_MAX", 1.0)
    settings = load_settings(backend_env(node_env, demo_url))
    with backend_in_thread(settings) as base:
        started = time.monotonic()
        half_sent = await _exchange(base, b"GET /healthz HTTP/1.1\r\nhost: a\r\n")
        assert half_sent.startswith(b"HTTP/1.1 408 "), half_sent[:200]
        silent = await _exchange(base)  # connected, never a byte
        assert silent.startswith(b"HTTP/1.1 408 "), silent[:200]
        assert time.monotonic() - started < WAIT_S_MAX
        # a slow but finished head is served; keep-alive then works as before
        async with httpx.AsyncClient(base_url=base, timeout=WAIT_S_MAX) as http:
            for _ in range(2):
                assert (await http.get("/healthz")).status_code == 200
        slow = await _exchange(
            base,
            b"GET /healthz HTTP/1.1\r\n",
            b"host: a\r\n",
            b"connection: close\r\n\r\n",
            pause_s=0.4,
        )
        assert slow.startswith(b"HTTP/1.1 200 "), slow[:200]


async def test_a_body_that_never_ends_is_answered_after_its_time(
    node_env: dict[str, str], demo_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A complete head and half a body (a login needs no account) held the connection and its
    request for good."""
    from dsproxy.entrypoints import http_api

    monkeypatch.setattr(http_api, "BODY_S_MAX", 1.0)
    settings = load_settings(backend_env(node_env, demo_url))
    with backend_in_thread(settings) as base:
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(
                b"POST /v1/auth/login HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\n"
                b"content-length: 100\r\n\r\n{"
            )
            await writer.drain()
            async with asyncio.timeout(WAIT_S_MAX):
                status = await reader.readuntil(b"\r\n")
        finally:
            writer.close()
        assert status.startswith(b"HTTP/1.1 408 "), status
