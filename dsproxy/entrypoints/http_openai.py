"""OpenAI-compatible routes: `POST /v1/chat/completions` (streamed or not) and `GET /v1/models`."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dsproxy.adapters.upstream import StreamChunk
from dsproxy.entrypoints.http_api import (
    Backend,
    MeteredStreamResponse,
    authenticate,
    charge_headers,
    error_body,
    json_response,
    read_json,
    run_admitted,
    unless_disconnected,
)
from dsproxy.errors import InvalidParameter, UpstreamError
from dsproxy.handlers.chat import Charge, ChatRequest, ChatStream, UserTicket

__all__ = ["OpenAIStreamRender", "routes"]


class OpenAIStreamRender:
    """`data: <chunk>` events, then (if asked) a usage chunk with the charge, then `[DONE]`."""

    def __init__(self, request: ChatRequest, stream: ChatStream) -> None:
        self.request, self.stream = request, stream
        self._head: dict[str, Any] = {"object": "chat.completion.chunk", "model": request.model}

    def chunk(self, chunk: StreamChunk) -> bytes | None:
        if "id" in chunk.data and "id" not in self._head:
            self._head.update(id=chunk.data["id"], created=chunk.data.get("created", 0))
        raw = chunk.raw or orjson.dumps(chunk.data)
        return b"data: " + raw + b"\n\n"

    async def end(self, charge: Charge, error: UpstreamError | None) -> bytes:
        if error is not None:
            _, body = error_body(error, charge.tokens_charged)
            return b"data: " + orjson.dumps(body) + b"\n\n"
        tail = b""
        if self.request.include_usage:
            usage = charge.usage
            total = usage.prompt_tokens + usage.completion_tokens
            final = {
                **self._head,
                "choices": [],
                "usage": {
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "total_tokens": total,
                },
                "dsproxy": _charge_json(charge),
            }
            tail = b"data: " + orjson.dumps(final) + b"\n\n"
        return tail + b"data: [DONE]\n\n"

    async def aborted(self, charge: Charge) -> None:
        return None


def _charge_json(charge: Charge) -> dict[str, Any]:
    return {
        "tokens_charged": charge.tokens_charged,
        "balance": charge.balance,
        "available": charge.available,
    }


def routes(backend: Backend) -> list[Route]:
    async def chat_completions(request: Request) -> Response | MeteredStreamResponse:
        user = await authenticate(request, backend)
        body = await read_json(request, backend.settings.request_bytes_max)

        async def work(ticket: UserTicket) -> Response | MeteredStreamResponse:
            # counting the prompt is the costly part of a refusal: it waits for the user's limits,
            # and a user who could not pay for any prompt is refused before it
            if isinstance(body, dict):
                model = backend.catalog.sold(body.get("model"))
                await backend.chats.refuse_if_broke(user, model, body.get("messages"))
            async with backend.chats.counting_turn(user):
                chat = await backend.chats.prepare(body)
            if chat.stream:
                # a client that leaves before the model answers must not keep its hold (and
                # a concurrency slot) until the model does
                stream = await unless_disconnected(
                    backend.chats.stream(user, chat), request.receive
                )
                held = {"x-dsproxy-tokens-held": str(stream.hold.tokens)}
                return MeteredStreamResponse(stream, OpenAIStreamRender(chat, stream), ticket, held)
            answer, charge = await unless_disconnected(
                backend.chats.complete(user, chat), request.receive
            )
            answer["dsproxy"] = _charge_json(charge)
            return json_response(answer, headers=charge_headers(charge))

        return await run_admitted(backend, user, work)

    async def models(request: Request) -> Response:
        await authenticate(request, backend)
        data = [_model_json(model) for model in backend.catalog.models]
        return json_response({"object": "list", "data": data})

    async def model(request: Request) -> Response:
        """`client.models.retrieve(name)` in the SDK; an alias is found too (chats take it)."""
        await authenticate(request, backend)
        name = request.path_params["name"]
        if backend.catalog.sold(name) is None:
            raise InvalidParameter(
                f"the model {name!r} does not exist; GET /v1/models lists them",
                param="model",
                code="model_not_found",
            )
        return json_response(_model_json(name))

    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
    ]


def _model_json(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "dsproxy"}
