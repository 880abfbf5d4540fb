"""Many concurrent chats on a balance that affords a few: never below zero, and the debits are
exactly what was delivered."""

# ruff: noqa: F811 (pytest fixtures are imported by name, then requested by name)

from __future__ import annotations

import asyncio

import httpx
import orjson

from dsproxy.config import Settings
from tests.integration.upstream_fixtures import (  # noqa: F401 (fixtures)
    USER_KEYS,
    WAIT_S_MAX,
    backend_settings,
    backend_url,
    balance,
    bearer,
    client,
    demo_model,
    demo_url,
    funded,
    issued_debits,
    tokenizer,
)

CHATS = 200
COST_OF_ONE = 21  # prompt 8 + twelve words 13, priced 1:1
BALANCE = 20 * COST_OF_ONE


async def one_chat(http: httpx.AsyncClient, token: str, index: int) -> tuple[int, int]:
    """(status, tokens the answer says were used); streams every other chat."""
    stream = index % 2 == 1
    body = {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 20,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }
    if not stream:
        response = await http.post("/v1/chat/completions", json=body, headers=bearer(token))
        if response.status_code != 200:
            return response.status_code, 0
        usage = response.json()["usage"]
        return 200, usage["prompt_tokens"] + usage["completion_tokens"]
    async with http.stream(
        "POST", "/v1/chat/completions", json=body, headers=bearer(token)
    ) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, 0
        used = 0
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = orjson.loads(line[6:])
                if chunk.get("usage"):
                    used = chunk["usage"]["total_tokens"]
        return 200, used


async def test_concurrent_chats_never_overspend_and_debits_sum_to_delivery(
    backend_url: str, client: httpx.AsyncClient, backend_settings: Settings
) -> None:
    wallet = USER_KEYS[2]
    user = str(wallet.pubkey())
    token = await funded(client, backend_settings, wallet, BALANCE)
    limits = httpx.Limits(max_connections=CHATS, max_keepalive_connections=CHATS)
    async with httpx.AsyncClient(base_url=backend_url, timeout=WAIT_S_MAX, limits=limits) as http:
        results = await asyncio.gather(*(one_chat(http, token, i) for i in range(CHATS)))
    statuses = sorted({status for status, _ in results})
    assert set(statuses) <= {200, 402}, statuses
    served = [used for status, used in results if status == 200]
    assert 1 <= len(served) < CHATS
    final = await balance(client, token)
    assert final["held"] == 0
    assert final["balance"] >= 0
    assert final["balance"] == BALANCE - sum(served)
    debits = await issued_debits(backend_settings, user, sum(served))
    assert 1 <= len(debits) <= len(served)  # a user's charges settled together share a debit
    assert len({event_id for event_id, _ in debits}) == len(debits)
