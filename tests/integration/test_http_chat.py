"""`/v1/chat/completions` through the official OpenAI SDK and raw HTTP, against the demo model:
exact charges, every failure mode, bad input and limits."""

# ruff: noqa: F811 (pytest fixtures are imported by name, then requested by name)

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from dsproxy.adapters.event_store import EventStore
from dsproxy.adapters.tokenizer import Tokenizer
from dsproxy.config import Settings, load_settings
from dsproxy.demo.upstream_model import DemoModel
from dsproxy.domain.chat_facts import HoldOutcome
from dsproxy.entrypoints.http_api import close_backend, open_backend
from dsproxy.entrypoints.serve import build_app
from dsproxy.errors import ConfigError
from tests.integration.relay_fixtures import local_relay  # noqa: F401 (a fixture)
from tests.integration.upstream_fixtures import (  # noqa: F401 (fixtures)
    USER_KEYS,
    WAIT_S_MAX,
    append_credit,
    backend_env,
    backend_in_thread,
    backend_settings,
    backend_url,
    balance,
    bearer,
    client,
    create_api_key,
    demo_model,
    demo_url,
    eventually,
    free_port,
    funded,
    issued_debits,
    login,
    read_debits,
    served,
    tokenizer,
)

WALLET = USER_KEYS[0]
USER = str(WALLET.pubkey())


def _deep(depth: int) -> list[Any]:
    nested: list[Any] = []
    for _ in range(depth):
        nested = [nested]
    return nested


def messages(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def streamed_with_usage(content: str) -> dict[str, Any]:
    """A streamed chat's body that asks for the final usage chunk."""
    return {
        "model": "deepseek-chat",
        "messages": messages(content),
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def expected_charge(tokenizer: Tokenizer, content: str, completion_text: str) -> int:
    return tokenizer.count_prompt(messages(content)) + tokenizer.count(completion_text)


@pytest.fixture
async def token(client: httpx.AsyncClient, backend_settings: Settings) -> str:
    return await funded(client, backend_settings, WALLET, 1_000)


@pytest.fixture
async def sdk(
    client: httpx.AsyncClient, backend_url: str, token: str
) -> AsyncIterator[openai.AsyncOpenAI]:
    key = (await create_api_key(client, token))["key"]
    async with openai.AsyncOpenAI(base_url=backend_url + "/v1", api_key=key) as sdk_client:
        yield sdk_client


async def post_chat(client: httpx.AsyncClient, token: str, body: Any) -> httpx.Response:
    return await client.post("/v1/chat/completions", json=body, headers=bearer(token))


async def test_sdk_chat_is_charged_its_exact_usage(
    sdk: openai.AsyncOpenAI,
    client: httpx.AsyncClient,
    token: str,
    backend_settings: Settings,
    tokenizer: Tokenizer,
) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(
        model="deepseek-chat", messages=messages("hello [[words:6]]")
    )
    answer = raw.parse()
    text = answer.choices[0].message.content or ""
    assert text == "this is the dsproxy demo model"
    charged = expected_charge(tokenizer, "hello [[words:6]]", text)
    assert answer.usage is not None
    assert answer.usage.prompt_tokens + answer.usage.completion_tokens == charged
    assert raw.headers["x-dsproxy-tokens-charged"] == str(charged)
    assert raw.headers["x-dsproxy-balance"] == str(1_000 - charged)
    assert await balance(client, token) == {
        "user": USER,
        "balance": 1_000 - charged,
        "held": 0,
        "available": 1_000 - charged,
    }
    debits = await issued_debits(backend_settings, USER, charged)
    assert [tokens for _, tokens in debits] == [-charged]
    ledger: list[dict] = []

    async def projected() -> bool:  # the debit is in the store; the projection follows
        nonlocal ledger
        ledger = (await client.get("/v1/transactions", headers=bearer(token))).json()["data"]
        return len(ledger) == 2

    await eventually(projected, "the debit in /v1/transactions")
    assert [entry["tokens"] for entry in ledger] == [1_000, -charged]
    assert ledger[1]["event_id"] == debits[0][0]


async def test_sdk_stream_ends_with_a_usage_chunk_carrying_the_charge(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient, token: str, tokenizer: Tokenizer
) -> None:
    stream = await sdk.chat.completions.create(
        model="deepseek-chat",
        messages=messages("hi [[words:5]]"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "this is the dsproxy demo"
    charged = expected_charge(tokenizer, "hi [[words:5]]", text)
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert final.usage.total_tokens == charged
    extra = final.model_extra or {}
    assert extra["dsproxy"]["tokens_charged"] == charged
    assert extra["dsproxy"]["balance"] == 1_000 - charged
    assert (await balance(client, token))["balance"] == 1_000 - charged


async def test_a_stream_stops_at_what_its_hold_pays_for_when_reasoning_runs_on(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient, token: str, tokenizer: Tokenizer
) -> None:
    """A reasoner whose chain of thought `max_tokens` does not bound (the demo model's, as
    DeepSeek R1 was first served) once streamed 801 tokens for a charge of 20."""
    said = "hi [[reason:300]] [[words:3]]"
    stream = await sdk.chat.completions.create(
        model="deepseek-chat",
        messages=messages(said),
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert reasoning and not "".join(d.content or "" for d in deltas)
    assert tokenizer.count(reasoning) <= 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    charged = expected_charge(tokenizer, said, reasoning)
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == charged
    assert (await balance(client, token))["balance"] == 1_000 - charged


async def test_an_answer_longer_than_its_hold_is_cut_to_what_the_hold_pays_for(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient, token: str, tokenizer: Tokenizer
) -> None:
    said = "hi [[reason:300]] [[words:3]]"
    answer = await sdk.chat.completions.create(
        model="deepseek-chat", messages=messages(said), max_tokens=5
    )
    message = answer.choices[0].message
    reasoning = (message.model_extra or {})["reasoning_content"]
    assert reasoning.startswith("r0 r1") and tokenizer.count(reasoning) == 5
    assert not message.content and answer.choices[0].finish_reason == "length"
    charged = expected_charge(tokenizer, said, reasoning)
    assert answer.usage is not None and answer.usage.total_tokens == charged
    assert (await balance(client, token))["balance"] == 1_000 - charged


async def test_stream_without_include_usage_has_no_usage_chunk_but_is_charged(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient, token: str, tokenizer: Tokenizer
) -> None:
    stream = await sdk.chat.completions.create(
        model="deepseek-chat", messages=messages("hi [[words:3]]"), stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    charged = expected_charge(tokenizer, "hi [[words:3]]", "this is the")
    assert (await balance(client, token))["balance"] == 1_000 - charged


async def test_too_little_balance_is_402_and_records_nothing(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient, backend_settings: Settings
) -> None:
    poor = await funded(client, backend_settings, USER_KEYS[1], 5)
    response = await post_chat(
        client, poor, {"model": "deepseek-chat", "messages": messages("a prompt of some length")}
    )
    assert response.status_code == 402
    assert response.headers["x-should-retry"] == "false"
    assert response.json()["error"]["code"] == "insufficient_balance"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert (await balance(client, poor))["balance"] == 5
    assert read_debits(backend_settings, str(USER_KEYS[1].pubkey())) == []


async def test_only_standard_parameters_reach_the_model_server(
    client: httpx.AsyncClient, token: str, demo_model: DemoModel
) -> None:
    """Every field went to the provider: a paid web search, a priority tier, another model to
    fall back on (billed at the sold model's price), prompts stored in the operator's account."""
    extras = {
        "web_search_options": {},
        "service_tier": "priority",
        "models": ["an-expensive-model"],
        "store": True,
        "metadata": {"who": "me"},
        "best_of": 20,
    }
    standard = {"temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": ["zz"], "user": "u1"}
    body = {"model": "deepseek-chat", "messages": messages("hi [[words:2]]"), **extras, **standard}
    assert (await post_chat(client, token, body)).status_code == 200
    sent = demo_model.last_body
    assert not set(extras) & set(sent), sent
    assert {k: sent[k] for k in standard} == standard


async def test_a_user_who_cannot_pay_is_refused_before_the_prompt_is_counted(
    client: httpx.AsyncClient, backend_settings: Settings
) -> None:
    """Counting a megabyte takes half a second of CPU, and logins are free: new wallets with
    nothing to spend sent megabyte prompts and slowed every paying chat to 20 s. Such a
    prompt is a 402 now; it was a 400 "too long" because it was counted first."""
    broke = await funded(client, backend_settings, USER_KEYS[2], 0)
    huge = messages("words " * 170_000)  # about a megabyte: past the context window too
    response = await post_chat(client, broke, {"model": "deepseek-chat", "messages": huge})
    assert response.status_code == 402, response.text
    assert response.json()["error"]["code"] == "insufficient_balance"
    conversation = await client.post("/conversations", json={}, headers=bearer(broke))
    assert conversation.status_code == 201
    body = {"conversation_id": conversation.json()["id"], "content": "words " * 170_000}
    response = await client.post("/messages", json=body, headers=bearer(broke))
    assert response.status_code == 402, response.text


async def test_a_small_balance_lowers_max_tokens_and_never_goes_below_zero(
    client: httpx.AsyncClient, backend_settings: Settings
) -> None:
    poor = await funded(client, backend_settings, USER_KEYS[1], 25)
    response = await post_chat(
        client, poor, {"model": "deepseek-chat", "messages": messages("hi [[words:40]]")}
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"
    left = await balance(client, poor)
    assert 0 <= left["balance"] == 25 - int(response.headers["x-dsproxy-tokens-charged"])


@pytest.mark.parametrize(
    ("upstream_status", "status", "code"),
    [
        (401, 502, "upstream_unauthorized"),
        (402, 503, "upstream_quota_exhausted"),
        (429, 429, "upstream_rate_limited"),
        (500, 502, "upstream_error"),
        (503, 502, "upstream_error"),
        (400, 400, "upstream_rejected"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_errors_before_output_charge_nothing(
    client: httpx.AsyncClient,
    token: str,
    backend_settings: Settings,
    upstream_status: int,
    status: int,
    code: str,
    stream: bool,
) -> None:
    body = {
        "model": "deepseek-chat",
        "messages": messages(f"[[fail:{upstream_status}]]"),
        "stream": stream,
    }
    response = await post_chat(client, token, body)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    if upstream_status == 429:  # the model server's own wait is passed on
        assert response.headers["retry-after"] == "7"
    assert await balance(client, token) == {
        "user": USER,
        "balance": 1_000,
        "held": 0,
        "available": 1_000,
    }
    assert read_debits(backend_settings, USER) == []


async def test_a_stream_cut_by_the_upstream_charges_only_what_was_delivered(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient, token: str, tokenizer: Tokenizer
) -> None:
    stream = await sdk.chat.completions.create(
        model="deepseek-chat", messages=messages("hi [[cut:3]]"), stream=True
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as raised:
        async for chunk in stream:
            received.extend(choice.delta.content or "" for choice in chunk.choices)
    assert "".join(received) == "this is the"
    charged = expected_charge(tokenizer, "hi [[cut:3]]", "this is the")
    assert f"only the {charged} tokens of what was delivered were charged" in raised.value.message
    assert await balance(client, token) == {
        "user": USER,
        "balance": 1_000 - charged,
        "held": 0,
        "available": 1_000 - charged,
    }


async def test_a_cut_before_any_word_charges_nothing(client: httpx.AsyncClient, token: str) -> None:
    body = {"model": "deepseek-chat", "messages": messages("hi [[cut:0]]"), "stream": True}
    response = await post_chat(client, token, body)
    assert response.status_code == 200
    assert b'"error"' in response.content and b"[DONE]" not in response.content
    assert (await balance(client, token))["balance"] == 1_000


@pytest.mark.parametrize("stream", [False, True])
async def test_an_error_the_model_server_sends_with_status_200_charges_nothing(
    client: httpx.AsyncClient, token: str, stream: bool
) -> None:
    """Not a 200 stream that ends in a meaningless error: an HTTP error with its words."""
    body = {"model": "deepseek-chat", "messages": messages("hi [[fail:200]]"), "stream": stream}
    response = await post_chat(client, token, body)
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["type"] == "upstream_error"
    assert "failing as asked" in error["message"]
    assert (await balance(client, token))["balance"] == 1_000


@pytest.mark.parametrize("stream", [False, True])
async def test_missing_usage_is_counted_locally(
    client: httpx.AsyncClient, token: str, tokenizer: Tokenizer, stream: bool
) -> None:
    content = "hi [[omit-usage]] [[words:4]]"
    body = {"model": "deepseek-chat", "messages": messages(content), "stream": stream}
    response = await post_chat(client, token, body)
    assert response.status_code == 200
    charged = expected_charge(tokenizer, content, "this is the dsproxy")
    assert (await balance(client, token))["balance"] == 1_000 - charged


async def test_a_client_disconnect_charges_only_what_was_delivered(
    backend_url: str, client: httpx.AsyncClient, token: str, tokenizer: Tokenizer
) -> None:
    content = "hi [[pause:2]]"
    body = {"model": "deepseek-chat", "messages": messages(content), "stream": True}
    words: list[str] = []
    async with (
        httpx.AsyncClient(base_url=backend_url, timeout=WAIT_S_MAX) as own,
        own.stream("POST", "/v1/chat/completions", json=body, headers=bearer(token)) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                delta = orjson.loads(line[6:])["choices"][0]["delta"]
                words.append(delta.get("content") or "")
            if "".join(words) == "this is":
                break  # the model now pauses; leaving closes the connection
    charged = expected_charge(tokenizer, content, "this is")

    async def settled() -> bool:
        return (await balance(client, token))["held"] == 0

    await eventually(settled, "the disconnected chat to settle")
    assert (await balance(client, token))["balance"] == 1_000 - charged


async def test_a_client_that_leaves_before_a_non_streamed_answer_pays_nothing(
    backend_url: str, client: httpx.AsyncClient, token: str, backend_settings: Settings
) -> None:
    """Starlette does not cancel a handler whose client left: the answer would have been
    charged in full when the model finished, though nobody read it."""
    think_s = 1.0
    body = {"model": "deepseek-chat", "messages": messages(f"hi [[think:{think_s * 1000:.0f}]]")}
    async with httpx.AsyncClient(base_url=backend_url) as own:
        with pytest.raises(httpx.ReadTimeout):
            await own.post(
                "/v1/chat/completions",
                json=body,
                headers=bearer(token),
                timeout=httpx.Timeout(WAIT_S_MAX, read=0.3),
            )

    async def released() -> bool:
        return (await balance(client, token))["held"] == 0

    await eventually(released, "the hold of the abandoned chat to be released")
    await asyncio.sleep(think_s + 1.5)  # the model has answered by now: it must change nothing
    assert (await balance(client, token))["balance"] == 1_000
    assert read_debits(backend_settings, USER) == []


async def test_a_client_that_leaves_before_a_stream_opens_frees_its_hold_at_once(
    node_env: dict[str, str], demo_url: str, demo_model: DemoModel
) -> None:
    """A streamed chat waited for the model's first answer before it saw its client was gone:
    its hold and its concurrency slot stayed taken until the model answered (up to the
    upstream timeout, ten minutes)."""
    settings = load_settings(backend_env(node_env, demo_url, DSPROXY_CONCURRENT_REQUESTS_MAX="1"))
    async with served(settings) as http:
        session = await funded(http, settings, WALLET, 1_000)
        answered = demo_model.answered
        body = {"model": "deepseek-chat", "messages": messages("hi [[think:4000]]")}
        leaving = asyncio.create_task(post_chat(http, session, {**body, "stream": True}))

        async def held() -> bool:
            return (await balance(http, session))["held"] > 0

        await eventually(held, "the streamed chat to take its hold")
        leaving.cancel()

        async def released() -> bool:
            return (await balance(http, session))["held"] == 0

        await eventually(released, "the hold of the chat whose client left")
        assert demo_model.answered == answered  # released before the model answered
        second = await post_chat(http, session, {**body, "messages": messages("hi")})
        assert second.status_code == 200  # the slot is free again

        async def model_done() -> bool:
            return demo_model.answered == answered + 2

        await eventually(model_done, "the model to end the abandoned chat")
        balance_left = (await balance(http, session))["balance"]
        assert balance_left == 1_000 - second.json()["dsproxy"]["tokens_charged"]


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_in_a_function_call_is_charged_when_counted_here(
    client: httpx.AsyncClient, token: str, tokenizer: Tokenizer, stream: bool
) -> None:
    """The form of tool calls before `tool_calls`: its text was not counted, so an answer that
    came without usage was charged its prompt alone, and a stream of it nothing at all."""
    content = "hi [[function-call]] [[omit-usage]] [[words:4]]"
    body = {"model": "deepseek-chat", "messages": messages(content), "stream": stream}
    response = await post_chat(client, token, body)
    assert response.status_code == 200
    charged = expected_charge(tokenizer, content, "answer" + "this is the dsproxy")
    assert (await balance(client, token))["balance"] == 1_000 - charged


async def test_a_usage_sent_early_in_a_stream_does_not_bill_the_text_after_it(
    client: httpx.AsyncClient, token: str, tokenizer: Tokenizer
) -> None:
    """A usage on the first chunk (none at the end) once billed the whole stream: the prompt,
    and none of the words that followed."""
    content = "hi [[early-usage]] [[words:4]]"
    body = streamed_with_usage(content)
    response = await post_chat(client, token, body)
    assert response.status_code == 200
    charged = expected_charge(tokenizer, content, "this is the dsproxy")
    assert (await balance(client, token))["balance"] == 1_000 - charged


async def test_a_function_call_in_the_history_is_part_of_the_prompt(
    client: httpx.AsyncClient, token: str, backend_settings: Settings
) -> None:
    """A history message's `function_call` is read by the model (and billed by it), but was not
    counted: a prompt of thousands of tokens took a hold of a few and passed the balance."""
    history = [
        {"role": "user", "content": "call it"},
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "f", "arguments": "word " * 3000},
        },
        {"role": "user", "content": "go on"},
    ]
    response = await post_chat(client, token, {"model": "deepseek-chat", "messages": history})
    assert response.status_code == 402, response.text
    assert response.json()["error"]["code"] == "insufficient_balance"
    assert (await balance(client, token))["balance"] == 1_000
    assert read_debits(backend_settings, USER) == []


async def test_a_client_gone_while_the_answer_waits_in_buffers_pays_only_what_it_was_sent(
    backend_settings: Settings, tokenizer: Tokenizer
) -> None:
    """uvicorn's `send` returns silently once the client is gone, and chunks the upstream has
    already sent are read without suspending: the stream once went on marking them delivered
    (and, with [DONE] buffered too, charged the whole answer). Here an ASGI server that behaves
    so loses its client after three chunks of a 40-word answer."""
    await asyncio.to_thread(append_credit, backend_settings, USER, 1_000)
    backend = await open_backend(backend_settings)
    try:
        app = build_app(backend)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://backend") as http:
            key = (await create_api_key(http, await login(http, WALLET)))["key"]
        content = "hi [[words:40]]"
        request = orjson.dumps(
            {"model": "deepseek-chat", "messages": messages(content), "stream": True}
        )
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "root_path": "",
            "query_string": b"",
            "headers": [
                (b"authorization", f"Bearer {key}".encode()),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(request)).encode()),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
        }
        gone = asyncio.Event()
        bodies: list[bytes] = []
        requests = [{"type": "http.request", "body": request, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if requests:
                return requests.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] != "http.response.body" or gone.is_set():
                return  # what uvicorn does once the connection is lost: nothing
            if len(bodies) == 3:
                gone.set()  # the connection is lost before the fourth chunk is written
                return
            bodies.append(message["body"])

        await app(scope, receive, send)
        sent = [orjson.loads(body.removeprefix(b"data: ")) for body in bodies]
        text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in sent)
        assert text == "this is"  # the role chunk, then two words
        view = await backend.meter.view(USER)
        assert (view.held, view.balance) == (0, 1_000 - expected_charge(tokenizer, content, text))
    finally:
        await close_backend(backend)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "no-such-model", "messages": messages("hi")}, 404, "model"),
        ({"model": "deepseek-chat"}, 400, "messages"),
        ({"model": "deepseek-chat", "messages": []}, 400, "messages"),
        ({"model": "deepseek-chat", "messages": [{"content": "x"}]}, 400, "messages[0]"),
        ({"model": "deepseek-chat", "messages": messages("hi"), "n": 2}, 400, "n"),
        ({"model": "deepseek-chat", "messages": messages("hi"), "n": True}, 400, "n"),
        ({"model": "deepseek-chat", "messages": messages("hi"), "n": 1.0}, 400, "n"),
        (
            {"model": "deepseek-chat", "messages": messages("hi"), "max_tokens": 0},
            400,
            "max_tokens",
        ),
        ({"model": "deepseek-chat", "messages": messages("hi"), "stream": "yes"}, 400, "stream"),
        ([1, 2], 400, "body"),
        (  # the model bills an image; dsproxy could not estimate it, so the hold would not cover it
            {
                "model": "deepseek-chat",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this?"},
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                        ],
                    }
                ],
            },
            400,
            "messages[0].content[1]",
        ),
        ({"model": "deepseek-chat", "messages": messages("hi"), "functions": {}}, 400, "functions"),
        (  # orjson reads this nesting but could not write it on to the upstream
            {"model": "deepseek-chat", "messages": messages("hi"), "tools": _deep(300)},
            400,
            "body",
        ),
    ],
)
async def test_bad_input_is_an_openai_error_and_changes_nothing(
    client: httpx.AsyncClient,
    token: str,
    backend_settings: Settings,
    body: Any,
    status: int,
    param: str,
) -> None:
    response = await post_chat(client, token, body)
    assert response.status_code == status
    assert response.json()["error"]["param"] == param
    assert (await balance(client, token))["balance"] == 1_000
    assert read_debits(backend_settings, USER) == []


async def test_explicit_nulls_mean_the_defaults_and_a_wrong_method_says_what_is_allowed(
    client: httpx.AsyncClient, token: str
) -> None:
    """Some clients write every parameter, null for "the default", as OpenAI reads them."""
    body = {"model": "deepseek-chat", "messages": messages("hi"), "stream": None, "n": None}
    response = await post_chat(client, token, body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    response = await client.get("/v1/chat/completions", headers=bearer(token))
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_function_and_schema_definitions_are_in_the_hold(
    client: httpx.AsyncClient, token: str, tokenizer: Tokenizer
) -> None:
    """The model reads them as it reads the messages, and bills them the same way: a schema
    the balance cannot pay for is a 402 before the model is called."""
    said = [{"role": "user", "content": [{"type": "text", "text": "hi [[words:2]]"}]}]
    functions = [{"name": "lookup", "parameters": {"type": "object"}}]
    small = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["a b"]}}}
    body = {"model": "deepseek-chat", "messages": said, "functions": functions}
    response = await post_chat(client, token, {**body, "response_format": small})
    assert response.status_code == 200, response.text
    expected_prompt = tokenizer.count_prompt(said, [*functions, small])
    assert response.json()["usage"]["prompt_tokens"] == expected_prompt
    assert expected_prompt > tokenizer.count_prompt(said)
    left = (await balance(client, token))["available"]
    words = " ".join(f"w{index}" for index in range(left))  # a token or more each
    large = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": [words]}}}
    response = await post_chat(client, token, {**body, "response_format": large})
    assert response.status_code == 402
    assert response.json()["error"]["code"] == "insufficient_balance"
    assert (await balance(client, token))["available"] == left


async def test_malformed_json_and_oversized_bodies_are_refused(
    client: httpx.AsyncClient, token: str
) -> None:
    response = await client.post(
        "/v1/chat/completions", content=b"{not json", headers=bearer(token)
    )
    assert response.status_code == 400
    huge = {"model": "deepseek-chat", "messages": messages("x" * 2_000_000)}
    response = await post_chat(client, token, huge)
    assert response.status_code == 413


async def test_a_prompt_over_the_context_window_is_refused(
    node_env: dict[str, str], demo_url: str
) -> None:
    settings = load_settings(
        backend_env(node_env, demo_url, DSPROXY_CONTEXT_WINDOWS="deepseek-chat=50")
    )
    with backend_in_thread(settings) as base:
        async with httpx.AsyncClient(base_url=base, timeout=WAIT_S_MAX) as http:
            session = await funded(http, settings, WALLET, 1_000)
            long_prompt = " ".join(["word"] * 100)
            response = await post_chat(
                http, session, {"model": "deepseek-chat", "messages": messages(long_prompt)}
            )
            assert response.status_code == 400
            assert response.json()["error"]["code"] == "context_length_exceeded"
            assert (await balance(http, session))["balance"] == 1_000


async def test_missing_or_wrong_credentials_are_401(client: httpx.AsyncClient) -> None:
    body = {"model": "deepseek-chat", "messages": messages("hi")}
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 401
    response = await post_chat(client, "dsk-not-a-key", body)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


async def test_a_model_is_retrieved_by_name(sdk: openai.AsyncOpenAI) -> None:
    model = await sdk.models.retrieve("deepseek-chat")
    assert model.id == "deepseek-chat" and model.object == "model"
    with pytest.raises(openai.NotFoundError) as raised:
        await sdk.models.retrieve("no-such-model")
    assert raised.value.code == "model_not_found"


async def test_metrics_count_what_happened(
    client: httpx.AsyncClient, token: str, tokenizer: Tokenizer, backend_settings: Settings
) -> None:
    body = {"model": "deepseek-chat", "messages": messages("hi [[words:3]]")}
    assert (await post_chat(client, token, body)).status_code == 200
    model = await client.get("/v1/models/deepseek-chat", headers=bearer(token))
    assert model.status_code == 200
    failing = {"model": "deepseek-chat", "messages": messages("hi [[fail:500]]")}
    assert (await post_chat(client, token, failing)).status_code == 502
    charged = expected_charge(tokenizer, "hi [[words:3]]", "this is the")
    await issued_debits(backend_settings, USER, charged)  # signed and stored: now in the outbox
    cut = {"model": "deepseek-chat", "messages": messages("hi [[cut:2]]"), "stream": True}
    assert (await post_chat(client, token, cut)).status_code == 200  # cut after it began

    async def all_issued() -> bool:  # what a cut stream delivered depends on when it broke
        issued = -sum(tokens for _, tokens in read_debits(backend_settings, USER))
        shown = await balance(client, token)
        return shown["held"] == 0 and issued == 1_000 - shown["balance"]

    await eventually(all_issued, "every charge issued")
    debits = read_debits(backend_settings, USER)
    charged = -sum(tokens for _, tokens in debits)
    text = (await client.get("/metrics")).text
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values['dsproxy_tokens_total{kind="charged",model="deepseek-chat"}'] == charged
    assert values['dsproxy_requests_total{route="/v1/chat/completions",status="200"}'] == 2
    assert values['dsproxy_requests_total{route="/v1/chat/completions",status="502"}'] == 1
    assert values['dsproxy_requests_total{route="/v1/models/{name}",status="200"}'] == 1
    assert values['dsproxy_upstream_errors_total{kind="failed"}'] == 1  # its 500
    assert values['dsproxy_upstream_errors_total{kind="cut"}'] == 1
    assert values["dsproxy_holds_open"] == values["dsproxy_tokens_held"] == 0
    assert values["dsproxy_outbox_backlog_events"] == len(debits)  # no relay here: they wait
    assert values["dsproxy_outbox_failed_events"] == 0


async def test_healthz_says_whether_a_relay_is_connected(
    node_env: dict[str, str], demo_url: str, local_relay: str
) -> None:
    """Without a relay debits wait in the outbox and credits never arrive: "degraded"."""
    dead = f"ws://127.0.0.1:{free_port()}"
    for relays, status, connected in ((dead, "degraded", 0), (f"{local_relay},{dead}", "ok", 1)):
        settings = load_settings(backend_env(node_env, demo_url, DSPROXY_RELAYS=relays))
        async with served(settings) as http:
            health: dict[str, Any] = {}

            async def reported(expected: str = status) -> bool:
                nonlocal health
                response = await http.get("/healthz")
                health = response.json()
                return response.status_code == 200 and health["status"] == expected

            await eventually(reported, f"/healthz to say {status}")
            configured = len(relays.split(","))
            assert health["relays"] == {"configured": configured, "connected": connected}


async def test_healthz_says_failing_after_a_request_failed_on_storage(
    backend_settings: Settings, client: httpx.AsyncClient
) -> None:
    """A full or locked disk fails every request that must record something, while /healthz
    said "ok": an orchestrator saw nothing wrong."""
    assert (await client.get("/healthz")).json()["status"] == "ok"
    accounts = sqlite3.connect(backend_settings.data_dir / "backend.sqlite", isolation_level=None)
    try:
        accounts.execute("BEGIN EXCLUSIVE")  # another writer holds the file past the timeout
        refused = await client.post("/v1/auth/challenge", json={"user_pubkey": USER})
    finally:
        accounts.close()
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "storage_unavailable"
    health = await client.get("/healthz")
    assert health.status_code == 503
    assert health.json()["status"] == "failing"
    assert "locked" in health.json()["storage"]["last_failure"]


async def test_a_streamed_answer_is_charged_once_storage_comes_back(
    node_env: dict[str, str], demo_url: str, tokenizer: Tokenizer
) -> None:
    """The user has a streamed answer before its charge is written: a write that failed (here
    another process held the event store past the timeout) released the hold, and the words
    were free; the stream also broke off without its end."""
    env = backend_env(node_env, demo_url, DSPROXY_STORE_LOCK_TIMEOUT_S="1")
    settings = load_settings(env)
    content = "hi [[words:4]]"
    body = streamed_with_usage(content)
    with backend_in_thread(settings) as base:
        async with httpx.AsyncClient(base_url=base, timeout=WAIT_S_MAX) as http:
            session = await funded(http, settings, WALLET, 1_000)
            other = sqlite3.connect(settings.events_path, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")  # the store's writer now waits, then fails
                chat = asyncio.create_task(post_chat(http, session, body))

                async def failing() -> bool:
                    return (await http.get("/healthz")).status_code == 503

                await eventually(failing, "/healthz to say the store is failing")
                assert (await balance(http, session))["held"] > 0  # kept while it retries
            finally:
                other.close()  # rolls back: the store is free again
            response = await chat
    assert response.status_code == 200
    assert response.text.rstrip().endswith("data: [DONE]")  # the stream ended whole
    charged = expected_charge(tokenizer, content, "this is the dsproxy")
    assert f'"tokens_charged":{charged}' in response.text
    # the backend has stopped, its debits issued: the charge is in the store, once, with its
    # facts (a retry once wrote the hold without its outcome: a restart released it)
    assert [tokens for _, tokens in read_debits(settings, USER)] == [-charged]
    store = EventStore(settings.events_path)
    try:
        outcomes = store.facts_of(HoldOutcome.Settled)
    finally:
        store.close()
    assert [(o.user, o.tokens_charged) for o in outcomes] == [(USER, charged)]  # type: ignore[attr-defined]


async def test_a_stop_waits_for_a_charge_being_written(
    node_env: dict[str, str], demo_url: str, tokenizer: Tokenizer
) -> None:
    """A stop closed the store under a streamed chat's charge that was still being written (the
    store busy): the words delivered were never charged."""
    env = backend_env(
        node_env, demo_url, DSPROXY_STORE_LOCK_TIMEOUT_S="1", DSPROXY_SHUTDOWN_GRACE_S="0"
    )  # no grace: the stop cancels the stream's handler, and its charge is written on its own
    settings = load_settings(env)
    content = "hi [[words:4]]"
    with backend_in_thread(settings) as base:
        async with httpx.AsyncClient(base_url=base, timeout=WAIT_S_MAX) as http:
            session = await funded(http, settings, WALLET, 1_000)
            other = sqlite3.connect(
                settings.events_path, isolation_level=None, check_same_thread=False
            )
            other.execute("BEGIN IMMEDIATE")  # the store's writer now waits, then fails
            chat = asyncio.create_task(post_chat(http, session, streamed_with_usage(content)))

            async def failing() -> bool:
                return (await http.get("/healthz")).status_code == 503

            await eventually(failing, "the charge's write to fail once")
            # the store comes back while the backend is stopping
            threading.Timer(1.5, other.close).start()
        # leaving the block stops the backend and waits for it
    await asyncio.gather(chat, return_exceptions=True)
    charged = expected_charge(tokenizer, content, "this is the dsproxy")
    assert [tokens for _, tokens in read_debits(settings, USER)] == [-charged]


async def test_models_lists_the_configured_models(sdk: openai.AsyncOpenAI) -> None:
    models = await sdk.models.list()
    assert [model.id for model in models.data] == ["deepseek-chat", "deepseek-reasoner"]


async def test_requests_per_minute_are_limited_per_user(
    node_env: dict[str, str], demo_url: str
) -> None:
    settings = load_settings(backend_env(node_env, demo_url, DSPROXY_REQUESTS_PER_MINUTE_MAX="2"))
    async with served(settings) as http:
        session = await funded(http, settings, WALLET, 1_000)
        other = await funded(http, settings, USER_KEYS[1], 1_000)
        body = {"model": "deepseek-chat", "messages": messages("hi")}
        statuses = [(await post_chat(http, session, body)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        refused = await post_chat(http, session, body)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(refused.headers["retry-after"]) >= 1
        assert (await post_chat(http, other, body)).status_code == 200
        # a prompt too long to serve costs the server its counting: it counts as a request
        third = await funded(http, settings, USER_KEYS[2], 1_000)
        too_long = {"model": "deepseek-chat", "messages": messages("word " * 200_000)}
        statuses = [(await post_chat(http, third, too_long)).status_code for _ in range(3)]
        assert statuses == [400, 400, 429]


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
async def test_the_completion_limit_goes_upstream_under_the_name_it_reads(
    node_env: dict[str, str], demo_url: str, demo_model: DemoModel, param: str
) -> None:
    """OpenAI's reasoning models refuse `max_tokens`; DeepSeek reads only `max_tokens`."""
    env = backend_env(node_env, demo_url, DSPROXY_UPSTREAM_MAX_TOKENS_PARAM=param)
    settings = load_settings(env)
    with backend_in_thread(settings) as base:
        async with httpx.AsyncClient(base_url=base, timeout=WAIT_S_MAX) as http:
            session = await funded(http, settings, WALLET, 1_000)
            body = {"model": "deepseek-chat", "messages": messages("hi"), "max_tokens": 7}
            for stream in (False, True):
                response = await post_chat(http, session, {**body, "stream": stream})
                assert response.status_code == 200, response.text
                sent = demo_model.last_body
                assert sent[param] == 7
                assert {"max_tokens", "max_completion_tokens"} & set(sent) == {param}
    with pytest.raises(ConfigError, match="expected max_tokens or max_completion_tokens"):
        load_settings({**env, "DSPROXY_UPSTREAM_MAX_TOKENS_PARAM": "max_output_tokens"})


async def test_concurrent_requests_are_limited_per_user(
    node_env: dict[str, str], demo_url: str
) -> None:
    settings = load_settings(backend_env(node_env, demo_url, DSPROXY_CONCURRENT_REQUESTS_MAX="1"))
    async with served(settings) as http:
        session = await funded(http, settings, WALLET, 1_000)
        slow = {"model": "deepseek-chat", "messages": messages("[[pause:1]]"), "stream": True}
        async with http.stream(
            "POST", "/v1/chat/completions", json=slow, headers=bearer(session)
        ) as first:
            lines = first.aiter_lines()  # kept referenced: the first chat stays open
            async for line in lines:
                if '"this"' in line:
                    break  # the first chat is now paused, still running
            body = {"model": "deepseek-chat", "messages": messages("hi")}
            second = await post_chat(http, session, body)
            assert second.status_code == 429


def test_texts_of_odd_choices_are_read_without_failing() -> None:
    """A `tool_calls` that is not a list once made reading an answer fail with its hold open."""
    from dsproxy.handlers.chat import _choice_texts

    odd = [
        {"message": {"content": "a", "tool_calls": 1}},
        {"message": {"tool_calls": [{"function": {"name": "f", "arguments": "{}"}}, 7]}},
        {"message": None},
        "choice",
    ]
    assert list(_choice_texts(odd, "message")) == ["a", "f{}"]
    assert list(_choice_texts({"message": {}}, "message")) == []
