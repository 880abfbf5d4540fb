"""The upstream adapter against the demo model on 127.0.0.1: answers, streams and errors."""

# ruff: noqa: F811 (pytest fixtures are imported by name, then requested by name)

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from dsproxy.adapters.tokenizer import Tokenizer
from dsproxy.adapters.upstream import Upstream
from dsproxy.demo.upstream_model import DemoModel
from dsproxy.errors import (
    UpstreamCut,
    UpstreamError,
    UpstreamQuotaExhausted,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnauthorized,
)
from tests.integration.upstream_fixtures import (  # noqa: F401 (fixtures)
    backend_settings,
    backend_url,
    client,
    demo_model,
    demo_url,
    free_port,
    serve_in_thread,
    tokenizer,
)


@pytest.fixture
async def upstream(demo_url: str) -> AsyncIterator[Upstream]:
    client = Upstream(demo_url, "operator-key", timeout_s=30)
    yield client
    await client.aclose()


def chat(content: str, **extra: object) -> dict[str, object]:
    return {"model": "deepseek-chat", "messages": [{"role": "user", "content": content}], **extra}


async def test_complete_returns_the_answer_and_its_usage(
    upstream: Upstream, tokenizer: Tokenizer
) -> None:
    answer = await upstream.complete(chat("hello [[words:5]]"))
    text = answer["choices"][0]["message"]["content"]
    assert text == "this is the dsproxy demo"
    assert answer["usage"]["completion_tokens"] == tokenizer.count(text)
    prompt = [{"role": "user", "content": "hello [[words:5]]"}]
    assert answer["usage"]["prompt_tokens"] == tokenizer.count_prompt(prompt)


async def test_complete_honours_max_tokens(upstream: Upstream) -> None:
    answer = await upstream.complete(chat("hello [[words:50]]", max_tokens=3))
    assert answer["usage"]["completion_tokens"] <= 3
    assert answer["choices"][0]["finish_reason"] == "length"


async def test_stream_yields_chunks_then_usage_and_finishes(upstream: Upstream) -> None:
    stream = await upstream.open_stream(
        chat("hi [[words:4]]", stream=True, stream_options={"include_usage": True})
    )
    try:
        chunks = [chunk.data async for chunk in stream.chunks()]
    finally:
        await stream.aclose()
    assert stream.finished
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "this is the dsproxy"
    assert chunks[-1]["usage"]["completion_tokens"] > 0


async def test_a_cut_stream_raises_upstream_cut_after_the_delivered_chunks(
    upstream: Upstream,
) -> None:
    stream = await upstream.open_stream(chat("hi [[cut:2]]", stream=True))
    words: list[str] = []
    with pytest.raises(UpstreamCut):
        async for chunk in stream.chunks():
            words.append(chunk.data["choices"][0]["delta"].get("content") or "")
    await stream.aclose()
    assert "".join(words) == "this is"


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, UpstreamRejected),
        (401, UpstreamUnauthorized),
        (402, UpstreamQuotaExhausted),
        (429, UpstreamRateLimited),
        (500, UpstreamError),
        (503, UpstreamError),
    ],
)
async def test_error_statuses_become_our_errors(
    upstream: Upstream, status: int, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await upstream.complete(chat(f"[[fail:{status}]]"))
    with pytest.raises(error):
        await upstream.open_stream(chat(f"[[fail:{status}]]", stream=True))


async def test_an_unreachable_server_is_an_upstream_error_not_a_timeout() -> None:
    """A refused connection was reported as a timeout (a 504 at once): httpx-aiohttp names every
    failure to connect a ConnectTimeout."""
    client = Upstream(f"http://127.0.0.1:{free_port()}/v1", "", timeout_s=5)
    try:
        for opening in (client.complete, client.open_stream):
            with pytest.raises(UpstreamError) as raised:
                await opening(chat("hi"))
            assert not isinstance(raised.value, UpstreamTimeout)
            assert "refused" in str(raised.value).lower() or "connect" in str(raised.value)
    finally:
        await client.aclose()


async def test_the_operator_key_is_sent_and_a_wrong_one_is_the_operators_problem(
    tokenizer: Tokenizer,
) -> None:
    guarded = DemoModel(api_key="right-key", tokenizer=tokenizer)
    with serve_in_thread(guarded.app) as base:
        client = Upstream(base + "/v1", "wrong-key", timeout_s=5)
        try:
            with pytest.raises(UpstreamUnauthorized):
                await client.complete(chat("hi"))
        finally:
            await client.aclose()
        client = Upstream(base + "/v1", "right-key", timeout_s=5)
        try:
            assert (await client.complete(chat("hi")))["choices"]
            stream = await client.open_stream(chat("hi", stream=True))
            assert [chunk async for chunk in stream.chunks()]
            await stream.aclose()
        finally:
            await client.aclose()


async def test_a_model_slower_than_the_timeout_is_an_upstream_timeout(demo_url: str) -> None:
    """The timeout travels with each request (chats skip the client's layers)."""
    client = Upstream(demo_url, "operator-key", timeout_s=0.3)
    try:
        with pytest.raises(UpstreamTimeout):
            await client.complete(chat("slow [[think:2000]]"))
        with pytest.raises(UpstreamTimeout):
            await client.open_stream(chat("slow [[think:2000]]", stream=True))
    finally:
        await client.aclose()


async def test_the_upstreams_cookies_are_not_kept_and_encodings_are_decodable() -> None:
    """A cookie set on one chat's answer is not sent with the next chat (another user's),
    and the upstream is offered only the compressions httpx can decode."""
    seen: list[tuple[str | None, str | None]] = []

    async def answer(request: Request) -> JSONResponse:
        seen.append((request.headers.get("cookie"), request.headers.get("accept-encoding")))
        response = JSONResponse({"choices": [], "usage": {"prompt_tokens": 1}})
        response.set_cookie("session", "alice")
        return response

    app = Starlette(routes=[Route("/v1/chat/completions", answer, methods=["POST"])])
    with serve_in_thread(app) as base:
        # a host name, not an IP address: aiohttp's default jar ignores cookies from IPs
        client = Upstream(base.replace("127.0.0.1", "localhost") + "/v1", "key", timeout_s=5)
        try:
            for _ in range(2):
                await client.complete(chat("hi"))
        finally:
            await client.aclose()
    decodable = httpx.AsyncClient().headers["accept-encoding"]
    assert seen == [(None, decodable), (None, decodable)]


async def test_a_stream_is_read_as_utf8_even_split_inside_a_character() -> None:
    """SSE is UTF-8: a character split across network writes arrives whole, whatever
    charset the upstream's content type claims."""
    chunk = orjson.dumps({"choices": [{"index": 0, "delta": {"content": "你好, Grüße"}}]})
    wire = b"data: " + chunk + b"\n\ndata: [DONE]\n\n"
    cut = wire.index("好".encode()) + 1

    async def pieces() -> AsyncIterator[bytes]:
        for piece in (wire[:cut], wire[cut:]):
            yield piece
            await asyncio.sleep(0.05)

    async def answer(request: Request) -> StreamingResponse:
        return StreamingResponse(pieces(), media_type="text/event-stream; charset=latin-1")

    app = Starlette(routes=[Route("/v1/chat/completions", answer, methods=["POST"])])
    with serve_in_thread(app) as base:
        client = Upstream(base + "/v1", "key", timeout_s=5)
        try:
            stream = await client.open_stream(chat("hi", stream=True))
            received = [chunk.data async for chunk in stream.chunks()]
            await stream.aclose()
        finally:
            await client.aclose()
    assert [c["choices"][0]["delta"]["content"] for c in received] == ["你好, Grüße"]
    assert stream.finished


@pytest.mark.parametrize(("sent", "passed_on"), [("7", 7), ("86400", 3600), ("9" * 5000, 3600)])
async def test_a_429s_retry_after_is_passed_on_within_an_hour(sent: str, passed_on: int) -> None:
    """A 5,000-digit retry-after made int() raise, and the 429 became a 500."""

    async def busy(request: Request) -> JSONResponse:
        return JSONResponse({"error": {"message": "slow down"}}, 429, {"retry-after": sent})

    app = Starlette(routes=[Route("/v1/chat/completions", busy, methods=["POST"])])
    with serve_in_thread(app) as base:
        client = Upstream(base + "/v1", "key", timeout_s=5)
        try:
            with pytest.raises(UpstreamRateLimited) as refused:
                await client.complete(chat("hi"))
        finally:
            await client.aclose()
    assert refused.value.retry_after_s == passed_on


def _event(delta: dict[str, object], finish: str | None = None) -> bytes:
    return orjson.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


async def _streamed(
    wire: bytes, media_type: str | None = "text/event-stream"
) -> tuple[list[dict[str, object]], bool, Exception | None]:
    """What the adapter reads of a stream sent as these bytes: chunks, finished, the error."""

    async def answer(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield wire

        return StreamingResponse(body(), media_type=media_type)

    app = Starlette(routes=[Route("/v1/chat/completions", answer, methods=["POST"])])
    received: list[dict[str, object]] = []
    failure: Exception | None = None
    with serve_in_thread(app) as base:
        client = Upstream(base + "/v1", "key", timeout_s=5)
        try:
            stream = await client.open_stream(chat("hi", stream=True))
            try:
                async for piece in stream.chunks():
                    received.append(piece.data)
            except UpstreamCut as exc:
                failure = exc
            await stream.aclose()
        finally:
            await client.aclose()
    return received, stream.finished, failure


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
async def test_a_stream_splits_lines_only_at_cr_and_lf(separator: str) -> None:
    """JSON holds these characters raw and servers write them so; reading lines as Python's
    splitlines does cut the chunk in two, and the stream failed as malformed."""
    text = f"one{separator}two"
    wire = b"data: " + _event({"content": text}) + b"\r\n\r\ndata: [DONE]\n\n"
    received, finished, failure = await _streamed(wire)
    assert failure is None and finished
    assert [c["choices"][0]["delta"]["content"] for c in received] == [text]  # type: ignore[index]


async def test_a_stream_joins_data_lines_and_skips_empty_data() -> None:
    """The SSE standard: the `data:` lines of one event are one value; an event with empty data
    (`data:` alone) carries nothing. Both once ended the stream as malformed."""
    first = orjson.dumps(
        {"choices": [{"index": 0, "delta": {"content": "a"}}]}, option=orjson.OPT_INDENT_2
    )
    split = b"\n".join(b"data: " + line for line in first.splitlines())
    wire = b"data:\n\n" + split + b"\n\n: keep-alive\n\n" + b"data: [DONE]\n\n"
    received, finished, failure = await _streamed(wire)
    assert failure is None and finished
    assert [c["choices"][0]["delta"]["content"] for c in received] == ["a"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("ends", "complete"),
    [
        ([("a", "stop")], True),  # every choice begun ended: some servers send no [DONE]
        ([("a", None)], False),  # cut before its finish_reason
        ([], False),  # nothing at all
    ],
)
async def test_a_stream_without_done_is_complete_only_if_its_choices_ended(
    ends: list[tuple[str, str | None]], complete: bool
) -> None:
    wire = b"".join(b"data: " + _event({"content": t}, f) + b"\n\n" for t, f in ends)
    received, finished, failure = await _streamed(wire)
    assert finished is complete
    assert (failure is None) is complete
    assert len(received) == len(ends)


@pytest.mark.parametrize("media_type", ["text/plain; charset=utf-8", None])
async def test_a_stream_labelled_otherwise_is_read_as_sse(media_type: str | None) -> None:
    """Servers that stream SSE as text/plain or with no type were served before httpx-sse read
    the streams, which reads only text/event-stream; they are read as SSE all the same."""
    wire = b"data: " + _event({"content": "a"}, "stop") + b"\n\ndata: [DONE]\n\n"
    received, finished, failure = await _streamed(wire, media_type)
    assert failure is None and finished
    assert [c["choices"][0]["delta"]["content"] for c in received] == ["a"]  # type: ignore[index]
