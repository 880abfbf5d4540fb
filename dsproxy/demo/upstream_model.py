"""THE BUILT-IN DEMO MODEL: a stand-in for an OpenAI-compatible LLM server. Not a real model.

It answers every chat with canned words, streamed or not, counts usage with the same tokenizer
and template allowance as the proxy (so charges in tests are exact), and honours `max_tokens`.
`dsproxy demo` and the tests run it so that nothing needs an outside service.

Test directives, written anywhere in the last message, change its behaviour:

    [[words:N]]      answer with N words (default 12)
    [[fail:STATUS]]  answer with that HTTP error status and an OpenAI-shaped error body
                     (`[[fail:200]]`: the error body with status 200, as some servers send;
                     `[[fail:429]]` says `retry-after: 7`)
    [[cut:N]]        stream N words, then drop the connection (no usage, no [DONE])
    [[pause:N]]      stream N words, then wait `pause_s` before going on (a slow model)
    [[omit-usage]]   never report usage
    [[think:MS]]     wait MS milliseconds before answering (a real model's time to first token)
    [[reason:N]]     think aloud first: N words of `reasoning_content` (counted in usage, as
                     deepseek-reasoner's are); `cut` and `pause` count answer words only
    [[early-usage]]  stream a usage of the prompt alone with the first chunk, none at the end
    [[function-call]] answer in the form before tool calls: the words are the `arguments` of a
                     `function_call` named `answer`
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dsproxy.adapters.tokenizer import Tokenizer, prompt_schemas

__all__ = ["DEMO_MODELS", "DemoModel", "main"]

DEMO_MODELS = ("deepseek-chat", "deepseek-reasoner")
_TEXT = "this is the dsproxy demo model speaking in canned words so that charges are easy to check"
_WORDS = _TEXT.split(" ")
_DIRECTIVE = re.compile(
    r"\[\[(words|fail|cut|pause|omit-usage|think|reason|early-usage|function-call)(?::(\d+))?\]\]"
)


class _CutConnection(Exception):
    """Raised inside the stream to make the server drop the connection."""


def _directives(messages: Sequence[Any]) -> dict[str, int]:
    last = messages[-1] if messages else {}
    content = last.get("content") if isinstance(last, dict) else ""
    text = content if isinstance(content, str) else orjson.dumps(content).decode()
    return {name: int(value or 0) for name, value in _DIRECTIVE.findall(text)}


def _error(status: int, message: str) -> JSONResponse:
    kind = {401: "authentication_error", 429: "rate_limit_exceeded"}.get(status, "api_error")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": str(status)}},
        status_code=status,
    )


class DemoModel:
    """The demo model's Starlette app (`.app`); `pause_s` is how long `[[pause:N]]` waits."""

    def __init__(
        self,
        models: Sequence[str] = DEMO_MODELS,
        *,
        api_key: str | None = None,
        pause_s: float = 60.0,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.models = tuple(models)
        self.api_key = api_key
        self.pause_s = pause_s
        self.tokenizer = tokenizer or Tokenizer()
        self.requests = 0
        self.answered = 0  # chats past their `think` time, for tests
        self.last_body: dict[str, Any] = {}  # what the last chat asked for, for tests
        self._ids = itertools.count(1)
        routes = []
        for prefix in ("", "/v1"):
            routes.append(Route(f"{prefix}/chat/completions", self.chat, methods=["POST"]))
            routes.append(Route(f"{prefix}/models", self.list_models, methods=["GET"]))
        self.app = Starlette(routes=routes)

    async def list_models(self, request: Request) -> Response:
        data = [{"id": m, "object": "model", "owned_by": "dsproxy-demo"} for m in self.models]
        return JSONResponse({"object": "list", "data": data})

    def _reply(self, words: int, max_tokens: int) -> tuple[list[str], str]:
        """Words as stream deltas, cut where `max_tokens` would be passed."""
        deltas: list[str] = []
        text = ""
        for index in range(words):
            delta = ("" if index == 0 else " ") + _WORDS[index % len(_WORDS)]
            if self.tokenizer.count(text + delta) > max_tokens:
                return deltas, "length"
            deltas.append(delta)
            text += delta
        return deltas, "stop"

    async def chat(self, request: Request) -> Response:
        self.requests += 1
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "demo model: wrong API key")
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(400, "demo model: the body is not JSON")
        self.last_body = body if isinstance(body, dict) else {}
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            return _error(400, "demo model: messages must be a non-empty list")
        model = body.get("model")
        if model not in self.models:
            return _error(404, f"demo model: no model {model!r}")
        directives = _directives(messages)
        if "think" in directives:
            await asyncio.sleep(directives["think"] / 1000)
        self.answered += 1
        if "fail" in directives:
            failure = _error(directives["fail"], "demo model: failing as asked")
            if directives["fail"] == 429:
                failure.headers["retry-after"] = "7"
            return failure
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 4096
        deltas, finish_reason = self._reply(directives.get("words", 12), int(max_tokens))
        reasoning = [f"r{index} " for index in range(directives.get("reason", 0))]
        prompt_tokens = self.tokenizer.count_prompt(messages, prompt_schemas(body))
        completion = self.tokenizer.count("".join(reasoning) + "".join(deltas))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        if "omit-usage" in directives:
            usage = {}
        head = {"id": f"chatcmpl-demo-{next(self._ids)}", "created": int(time.time())}
        head["model"] = model
        calls = "function-call" in directives
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": "".join(deltas)}
            if calls:
                message["content"] = None
                message["function_call"] = {"name": "answer", "arguments": "".join(deltas)}
            if reasoning:
                message["reasoning_content"] = "".join(reasoning)
            answer = {**head, "object": "chat.completion", "choices": []}
            answer["choices"] = [{"index": 0, "message": message, "finish_reason": finish_reason}]
            if usage:
                answer["usage"] = usage
            return JSONResponse(answer)
        stream_options = body.get("stream_options") or {}
        include_usage = bool(usage) and bool(stream_options.get("include_usage"))
        early = {**usage, "completion_tokens": 0, "total_tokens": prompt_tokens}
        chunks = self._stream(
            head,
            reasoning,
            deltas,
            finish_reason,
            usage if include_usage and "early-usage" not in directives else None,
            early if usage and "early-usage" in directives else None,
            calls,
        )
        return StreamingResponse(self._directed(chunks, directives), media_type="text/event-stream")

    async def _stream(
        self,
        head: dict[str, Any],
        reasoning: list[str],
        deltas: list[str],
        finish_reason: str,
        usage: dict[str, int] | None,
        early_usage: dict[str, int] | None = None,
        calls: bool = False,
    ) -> AsyncIterator[tuple[bool, bytes]]:
        """(is a word, SSE bytes) pairs, in the order OpenAI sends them."""

        def event(choices: list[Any], **extra: Any) -> bytes:
            chunk = {**head, "object": "chat.completion.chunk", "choices": choices, **extra}
            return b"data: " + orjson.dumps(chunk) + b"\n\n"

        role = {"role": "assistant", "content": ""}
        first = {"usage": early_usage} if early_usage else {}
        yield False, event([{"index": 0, "delta": role, "finish_reason": None}], **first)
        for thought in reasoning:
            thinking = {"reasoning_content": thought}
            yield False, event([{"index": 0, "delta": thinking, "finish_reason": None}])
        for index, delta in enumerate(deltas):
            name = {"name": "answer"} if index == 0 else {}
            content = (
                {"function_call": {**name, "arguments": delta}} if calls else {"content": delta}
            )
            yield True, event([{"index": 0, "delta": content, "finish_reason": None}])
        yield False, event([{"index": 0, "delta": {}, "finish_reason": finish_reason}])
        if usage is not None:
            yield False, event([], usage=usage)
        yield False, b"data: [DONE]\n\n"

    async def _directed(
        self, chunks: AsyncIterator[tuple[bool, bytes]], directives: dict[str, int]
    ) -> AsyncIterator[bytes]:
        words = 0
        async for is_word, data in chunks:
            if is_word and "cut" in directives and words == directives["cut"]:
                raise _CutConnection("demo model: cutting the stream as asked")
            if is_word and "pause" in directives and words == directives["pause"]:
                await asyncio.sleep(self.pause_s)
            words += is_word
            yield data


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo model alone: `python -m dsproxy.demo.upstream_model --port 9000`."""
    import uvicorn

    parser = argparse.ArgumentParser(description="the dsproxy demo model (not a real LLM)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    uvicorn.run(DemoModel().app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
