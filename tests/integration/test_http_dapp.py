"""The dApp's routes: conversations keep history, answers stream as `message`/`done` events,
history is trimmed to the context window, and another user's conversation is a 404."""

# ruff: noqa: F811 (pytest fixtures are imported by name, then requested by name)

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from dsproxy.adapters.tokenizer import Tokenizer
from dsproxy.adapters.upstream import StreamChunk
from dsproxy.config import Settings, load_settings
from dsproxy.demo.upstream_model import DemoModel
from dsproxy.entrypoints.http_api import catalog_of
from dsproxy.entrypoints.http_dapp import DappStreamRender
from dsproxy.errors import ConfigError
from tests.integration.upstream_fixtures import (  # noqa: F401 (fixtures)
    USER_KEYS,
    WAIT_S_MAX,
    backend_env,
    backend_in_thread,
    backend_settings,
    backend_url,
    balance,
    bearer,
    client,
    demo_model,
    demo_url,
    eventually,
    funded,
    read_debits,
    served,
    tokenizer,
)

WALLET = USER_KEYS[0]


def sse_events(body: bytes) -> list[tuple[str, Any]]:
    """Events as the dApp reads them: blocks split on a blank line, each starting with
    `event:message` or `event:done` (no space, as gin writes them; the dApp matches that)."""
    events = []
    for block in body.decode().split("\n\n"):
        lines = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        if "event" in lines:
            assert block.startswith(f"event:{lines['event']}\ndata:"), block
            events.append((lines["event"], orjson.loads(lines["data"])))
    return events


async def new_conversation(http: httpx.AsyncClient, token: str) -> str:
    response = await http.post("/conversations", json={"title": "t"}, headers=bearer(token))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def say(http: httpx.AsyncClient, token: str, conversation_id: str, text: str) -> Any:
    body = {"conversation_id": conversation_id, "content": text}
    return await http.post("/messages", json=body, headers=bearer(token))


async def test_a_message_streams_its_answer_and_keeps_the_history(
    client: httpx.AsyncClient, backend_settings: Settings, tokenizer: Tokenizer
) -> None:
    token = await funded(client, backend_settings, WALLET, 1_000)
    conversation = await new_conversation(client, token)
    response = await say(client, token, conversation, "hello [[words:3]]")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.content)
    assert [name for name, _ in events] == ["message", "message", "message", "done"]
    assert "".join(data["content"] for name, data in events[:-1]) == "this is the"
    done = events[-1][1]
    prompt = [{"role": "user", "content": "hello [[words:3]]"}]
    charged = tokenizer.count_prompt(prompt) + tokenizer.count("this is the")
    assert done["role"] == "assistant" and done["content"] == "this is the"
    assert done["tokens_charged"] == charged and done["balance"] == 1_000 - charged
    history = (
        await client.get(f"/messages?conversation_id={conversation}", headers=bearer(token))
    ).json()
    assert [(m["role"], m["content"]) for m in history] == [
        ("user", "hello [[words:3]]"),
        ("assistant", "this is the"),
    ]
    listed = (await client.get("/conversations", headers=bearer(token))).json()
    assert [c["id"] for c in listed] == [conversation]
    user = (await client.get("/user", headers=bearer(token))).json()
    assert user["tokens"] == 1_000 - charged and user["tokens_consumed"] == charged


async def test_reasoning_the_dapp_never_shows_is_not_charged_when_the_client_leaves(
    client: httpx.AsyncClient, backend_url: str, backend_settings: Settings, tokenizer: Tokenizer
) -> None:
    """The dApp's SSE carries no reasoning: a client that leaves mid-answer pays for the words
    it was sent, not for reasoning it never saw. A stream that ends is charged the model's
    usage, reasoning included, as the model bills it."""
    token = await funded(client, backend_settings, WALLET, 1_000)
    conversation = await new_conversation(client, token)
    first = "hello [[reason:5]] [[pause:1]]"  # five words of reasoning, one of answer, a pause
    async with (
        httpx.AsyncClient(base_url=backend_url, timeout=WAIT_S_MAX) as own,
        own.stream(
            "POST",
            "/messages",
            json={"conversation_id": conversation, "content": first},
            headers=bearer(token),
        ) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                assert orjson.loads(line[5:]) == {"content": "this"}
                break  # the model now pauses; leaving closes the connection

    async def settled() -> bool:
        return (await balance(client, token))["held"] == 0

    await eventually(settled, "the abandoned chat to settle")
    prompt = [{"role": "user", "content": first}]
    charged = tokenizer.count_prompt(prompt) + tokenizer.count("this")
    assert (await balance(client, token))["balance"] == 1_000 - charged

    said = "hello [[reason:3]] [[words:2]]"
    events = sse_events((await say(client, token, conversation, said)).content)
    assert [name for name, _ in events] == ["message", "message", "done"]
    prompt = [*prompt, {"role": "assistant", "content": "this"}, {"role": "user", "content": said}]
    assert events[-1][1]["tokens_charged"] == (
        tokenizer.count_prompt(prompt) + tokenizer.count("r0 r1 r2 this is")
    )


async def test_a_message_whose_client_left_before_any_answer_is_not_kept(
    client: httpx.AsyncClient, backend_url: str, backend_settings: Settings
) -> None:
    """The user's message was stored when the model's stream opened: a client that left before
    the first word paid nothing and left its message (up to a megabyte, counted again on every
    later turn) for free. It is kept with the answer, when one was delivered or charged."""
    token = await funded(client, backend_settings, WALLET, 10_000)
    conversation = await new_conversation(client, token)
    async with (
        httpx.AsyncClient(base_url=backend_url, timeout=WAIT_S_MAX) as own,
        own.stream(
            "POST",
            "/messages",
            json={"conversation_id": conversation, "content": "x " * 1_000 + "[[pause:0]]"},
            headers=bearer(token),
        ) as response,
    ):
        assert response.status_code == 200  # the model's stream is open; it pauses: leave

    async def settled() -> bool:
        return (await balance(client, token))["held"] == 0

    await eventually(settled, "the abandoned chat to settle")
    assert (await balance(client, token))["balance"] == 10_000
    listed = await client.get(f"/messages?conversation_id={conversation}", headers=bearer(token))
    assert listed.json() == []
    events = sse_events((await say(client, token, conversation, "hi [[words:2]]")).content)
    assert [name for name, _ in events] == ["message", "message", "done"]
    listed = await client.get(f"/messages?conversation_id={conversation}", headers=bearer(token))
    assert [(m["role"], m["content"]) for m in listed.json()] == [
        ("user", "hi [[words:2]]"),
        ("assistant", "this is"),
    ]


async def test_another_users_conversation_is_404_and_never_charged(
    client: httpx.AsyncClient, backend_settings: Settings
) -> None:
    owner = await funded(client, backend_settings, WALLET, 1_000)
    intruder_wallet = USER_KEYS[1]
    intruder = await funded(client, backend_settings, intruder_wallet, 1_000)
    conversation = await new_conversation(client, owner)
    response = await say(client, intruder, conversation, "let me in")
    assert response.status_code == 404
    listed = await client.get(f"/messages?conversation_id={conversation}", headers=bearer(intruder))
    assert listed.status_code == 404
    assert (await client.get("/conversations", headers=bearer(intruder))).json() == []
    for token in (owner, intruder):
        assert (await balance(client, token))["balance"] == 1_000
    assert read_debits(backend_settings, str(intruder_wallet.pubkey())) == []
    assert read_debits(backend_settings, str(WALLET.pubkey())) == []


async def test_conversations_are_listed_in_pages(
    client: httpx.AsyncClient, backend_settings: Settings
) -> None:
    """A user with more conversations than one answer lists could never see the older ones."""
    owner = await funded(client, backend_settings, WALLET, 1_000)
    other = await funded(client, backend_settings, USER_KEYS[1], 0)
    made = [await new_conversation(client, owner) for _ in range(7)]
    everything = (await client.get("/conversations", headers=bearer(owner))).json()
    assert sorted(c["id"] for c in everything) == sorted(made)
    pages: list[str] = []
    after = ""
    for _ in range(len(made)):  # bounded: a server ignoring the page would repeat it
        response = await client.get(f"/conversations?limit=3{after}", headers=bearer(owner))
        assert response.status_code == 200, response.text
        page = [c["id"] for c in response.json()]
        if not pages:  # a message to the last of the first page, as a user reads on
            await asyncio.sleep(1.1)  # in a later second than the conversations were made
            assert (await say(client, owner, page[-1], "hi")).status_code == 200
        pages += page
        if len(page) < 3:
            break
        after = f"&after={page[-1]}"
    assert pages == [c["id"] for c in everything]  # the same order, each once
    for query, param in (("?limit=0", "limit"), ("?limit=" + "9" * 5000, "limit")):
        refused = await client.get(f"/conversations{query}", headers=bearer(owner))
        assert refused.status_code == 400 and refused.json()["param"] == param
        assert isinstance(refused.json()["error"], str)  # the dApp shows `data.error` as text
    # another user's conversation is no place to start from
    refused = await client.get(f"/conversations?after={made[0]}", headers=bearer(other))
    assert refused.status_code == 404


async def test_conversations_are_made_within_the_users_limits(
    node_env: dict[str, str], demo_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Making a conversation is free: any user logged in (no balance needed) made 5,000 in 8 s,
    past the per-minute limit, each a row on the server's disk."""
    from dsproxy.adapters import accounts_db

    monkeypatch.setattr(accounts_db, "CONVERSATIONS_PER_USER_MAX", 3)
    settings = load_settings(backend_env(node_env, demo_url, DSPROXY_REQUESTS_PER_MINUTE_MAX="4"))
    async with served(settings) as http:
        owner = await funded(http, settings, WALLET, 0)
        made = [await new_conversation(http, owner) for _ in range(3)]
        capped = await http.post("/conversations", json={}, headers=bearer(owner))
        assert capped.status_code == 400, capped.text
        assert capped.json()["code"] == "conversation_limit_reached"
        limited = await http.post("/conversations", json={}, headers=bearer(owner))
        assert limited.status_code == 429, limited.text
        listed = (await http.get("/conversations", headers=bearer(owner))).json()
        assert sorted(c["id"] for c in listed) == sorted(made)


async def test_the_dapps_model_names_are_served_by_the_models_they_alias(
    node_env: dict[str, str], demo_url: str, demo_model: DemoModel
) -> None:
    """The published dApp asks for the names of the provider the Go backend used: without an
    alias every message was a 400 model_not_found."""
    v3, r1 = "deepseek/deepseek-v3/community", "deepseek/deepseek-r1/community"
    aliases = f"{v3}=deepseek-chat,{r1}=deepseek-reasoner"
    settings = load_settings(backend_env(node_env, demo_url, DSPROXY_MODEL_ALIASES=aliases))
    async with served(settings) as http:
        token = await funded(http, settings, WALLET, 1_000)
        conversation = await new_conversation(http, token)
        for asked, model in ((v3, "deepseek-chat"), (r1, "deepseek-reasoner")):
            body = {"conversation_id": conversation, "content": "hi", "model": asked}
            response = await http.post("/messages", json=body, headers=bearer(token))
            assert response.status_code == 200, response.text
            assert sse_events(response.content)[-1][0] == "done"
            assert demo_model.last_body["model"] == model
        listed = await http.get("/v1/models", headers=bearer(token))
        sold = [model["id"] for model in listed.json()["data"]]
        assert sold == ["deepseek-chat", "deepseek-reasoner"]  # aliases are not listed
        found = await http.get(f"/v1/models/{v3}", headers=bearer(token))
        assert found.status_code == 200 and found.json()["id"] == v3  # but found
    with pytest.raises(ConfigError, match="not one of the models sold"):
        catalog_of(load_settings({**node_env, "DSPROXY_MODEL_ALIASES": f"{v3}=gpt-5"}))


async def test_history_is_trimmed_to_the_context_window(
    node_env: dict[str, str], demo_url: str, demo_model: DemoModel, tokenizer: Tokenizer
) -> None:
    extra = {"DSPROXY_CONTEXT_WINDOWS": "deepseek-chat=120"}
    settings = load_settings(backend_env(node_env, demo_url, **extra))
    async with served(settings) as http:
        token = await funded(http, settings, WALLET, 10_000)
        conversation = await new_conversation(http, token)
        for turn in range(6):
            response = await say(http, token, conversation, f"turn {turn} [[words:8]]")
            assert sse_events(response.content)[-1][0] == "done"
        sent = demo_model.last_body["messages"]
        assert sent[-1] == {"role": "user", "content": "turn 5 [[words:8]]"}
        assert len(sent) < 11  # older turns were left out
        budget = 120 - 30  # the window less the answer's reserve
        assert tokenizer.count_prompt(sent) <= budget
        charged = sse_events(response.content)[-1][1]["tokens_charged"]
        assert charged == tokenizer.count_prompt(sent) + tokenizer.count(
            "this is the dsproxy demo model speaking in"
        )
        too_long = " ".join(["word"] * 200)
        refused = await say(http, token, conversation, too_long)
        assert refused.status_code == 400
        assert refused.json()["code"] == "context_length_exceeded"


async def test_bad_conversation_and_message_bodies_are_refused_and_charge_nothing(
    client: httpx.AsyncClient, backend_settings: Settings
) -> None:
    token = await funded(client, backend_settings, WALLET, 1_000)
    for body in ([1, 2], "x", {"title": 0}):
        response = await client.post("/conversations", json=body, headers=bearer(token))
        assert response.status_code == 400, body
    assert (await client.get("/conversations", headers=bearer(token))).json() == []
    created = await client.post("/conversations", content=b"null", headers=bearer(token))
    assert created.status_code == 201 and created.json()["title"] == "New conversation"
    body = {"conversation_id": created.json()["id"], "content": "hi", "model": "nope"}
    response = await client.post("/messages", json=body, headers=bearer(token))
    assert response.status_code == 404
    assert response.json()["code"] == "model_not_found"
    assert "no model" in response.json()["error"]  # as the Go backend said errors: a text
    assert (await balance(client, token))["balance"] == 1_000


def test_chunks_without_a_delta_object_send_nothing_and_raise_nothing() -> None:
    """`"delta": null` (or choices that are not a list) from an upstream once crashed the
    stream after its charge: the client got a broken response."""
    render = DappStreamRender(backend=None, conversation_id="c", said="hi", said_at=0)  # type: ignore[arg-type]
    for data in (
        {"choices": [{"index": 0, "delta": None}]},
        {"choices": [{"index": 0}]},
        {"choices": 7},
        {"choices": [{"delta": {"content": None}}]},
    ):
        assert render.chunk(StreamChunk(b"", data)) is None
    sent = render.chunk(StreamChunk(b"", {"choices": [{"delta": {"content": "hi"}}]}))
    assert sent == b'event:message\ndata:{"content":"hi"}\n\n' and render.parts == ["hi"]


async def test_reasoning_stopped_at_the_hold_is_charged_as_the_model_bills_it(
    node_env: dict[str, str], demo_url: str, tokenizer: Tokenizer
) -> None:
    """The dApp shows no reasoning, yet the model wrote it and bills it: a stream stopped at
    what the hold pays for is charged what was handed out, never nothing."""
    settings = load_settings(backend_env(node_env, demo_url, DSPROXY_COMPLETION_TOKENS_MAX="5"))
    async with served(settings) as http:
        token = await funded(http, settings, WALLET, 1_000)
        conversation = await new_conversation(http, token)
        said = "hi [[reason:300]] [[words:3]]"
        events = sse_events((await say(http, token, conversation, said)).content)
        assert [name for name, _ in events] == ["done"]  # only reasoning, none shown
        prompt = tokenizer.count_prompt([{"role": "user", "content": said}])
        assert events[-1][1]["tokens_charged"] == prompt + 5  # r0 .. : five tokens
        assert (await balance(http, token))["balance"] == 1_000 - prompt - 5
