"""The existing dApp's chat routes, metered like the rest: conversations and their messages.

    POST|GET /conversations
    POST /messages {conversation_id, content, model?} -> SSE `event:message` /
         `data:{"content": delta}` ... then `event:done` / `data:<message json>`, written as
         gin writes them (no space after the colon): the dApp matches `event:message`
    GET /messages?conversation_id=...

A conversation is its owner's only: another user's id is a 404, checked before anything is
reserved. The history sent upstream is trimmed from the oldest messages to fit the model's
context window; if even the new message does not fit, the request fails (nothing is charged).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dsproxy.adapters.accounts_db import CONVERSATIONS_PER_USER_MAX, ConversationRow, MessageRow
from dsproxy.adapters.tokenizer import TEMPLATE_TOKENS_PER_PROMPT
from dsproxy.adapters.upstream import StreamChunk
from dsproxy.domain.metering import trim_to_window
from dsproxy.entrypoints.http_api import (
    Backend,
    MeteredStreamResponse,
    authenticate,
    dapp_error,
    error_body,
    json_response,
    now_s,
    query_limit,
    read_json,
    run_admitted,
    unless_disconnected,
)
from dsproxy.errors import ContextTooLong, InvalidParameter, NotFound, UpstreamError
from dsproxy.handlers.chat import Charge, UserTicket

__all__ = ["routes"]

TITLE_CHARS_MAX = 200
CONVERSATIONS_LISTED_MAX = 500


def _conversation_json(row: ConversationRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "title": row.title,
        "model": row.model,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def _message_json(row: MessageRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "conversation_id": row.conversation_id,
        "role": row.role,
        "content": row.content,
        "tokens_charged": row.tokens_charged,
        "created_at": row.created_at,
    }


class DappStreamRender:
    """The dApp's SSE: content deltas, then the stored assistant message.

    The user's message is stored with the answer, and only if something was delivered or
    charged: stored when the stream opened, a client that left before the first word paid
    nothing and left its message (a megabyte, counted again on every later turn) for free."""

    def __init__(self, backend: Backend, conversation_id: str, said: str, said_at: int) -> None:
        self.backend, self.conversation_id = backend, conversation_id
        self.said, self.said_at = said, said_at
        self.parts: list[str] = []
        self._stored: asyncio.Future[MessageRow] | None = None

    def chunk(self, chunk: StreamChunk) -> bytes | None:
        choices = chunk.data.get("choices")
        text = "".join(
            str(choice["delta"].get("content") or "")
            for choice in (choices if isinstance(choices, list) else ())
            if isinstance(choice, dict) and isinstance(choice.get("delta"), dict)
        )
        if not text:
            return None
        self.parts.append(text)
        return b"event:message\ndata:" + orjson.dumps({"content": text}) + b"\n\n"

    async def _store(self, charge: Charge) -> MessageRow:
        """Store the exchange once: a disconnect during `end` lets the write finish, and the
        `aborted` that follows waits for it instead of storing it again."""
        if self._stored is None:
            self._stored = asyncio.ensure_future(self._add_exchange(charge))
        return await asyncio.shield(self._stored)

    async def _add_exchange(self, charge: Charge) -> MessageRow:
        accounts = self.backend.accounts
        await accounts.add_message(self.conversation_id, "user", self.said, 0, self.said_at)
        answer = "".join(self.parts)
        return await accounts.add_message(
            self.conversation_id, "assistant", answer, charge.tokens_charged, now_s()
        )

    def _kept(self, charge: Charge) -> bool:
        return bool(self.parts) or charge.tokens_charged > 0

    async def end(self, charge: Charge, error: UpstreamError | None) -> bytes:
        if error is not None:
            if self._kept(charge):
                await self._store(charge)
            _, body = error_body(error, charge.tokens_charged)
            return b"event:error\ndata:" + orjson.dumps(dapp_error(body)) + b"\n\n"
        row = await self._store(charge)
        message = {**_message_json(row), "balance": charge.balance}
        return b"event:done\ndata:" + orjson.dumps(message) + b"\n\n"

    async def aborted(self, charge: Charge) -> None:
        if self._kept(charge):
            await self._store(charge)


def routes(backend: Backend) -> list[Route]:
    settings, catalog = backend.settings, backend.catalog

    async def create_conversation(request: Request) -> Response:
        """Free, so under the user's request limits and a cap on how many one user keeps."""
        user = await authenticate(request, backend)
        backend.limits.count(user)
        body = await read_json(request, 4_096)
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise InvalidParameter("the body must be a JSON object", param="body")
        title = body.get("title")
        title = "New conversation" if title in (None, "") else title
        asked = body.get("model")
        model = catalog.models[0] if asked in (None, "") else catalog.sold(asked)
        if not isinstance(title, str) or len(title) > TITLE_CHARS_MAX:
            raise InvalidParameter(
                f"title must be at most {TITLE_CHARS_MAX} characters", param="title"
            )
        if model is None:
            raise InvalidParameter(f"no model {asked!r}", param="model", code="model_not_found")
        row = await backend.accounts.add_conversation(user, title, model, now_s())
        if row is None:
            raise InvalidParameter(
                f"a user may have at most {CONVERSATIONS_PER_USER_MAX} conversations",
                param="title",
                code="conversation_limit_reached",
            )
        return json_response(_conversation_json(row), 201)

    async def list_conversations(request: Request) -> Response:
        """The newest first; `?limit=` (at most 500) and `?after=<id>` page a longer list."""
        user = await authenticate(request, backend)
        limit = query_limit(request, CONVERSATIONS_LISTED_MAX, CONVERSATIONS_LISTED_MAX)
        after = request.query_params.get("after")
        last = None if after is None else await owned(user, after, param="after")
        rows = await backend.accounts.conversations(user, limit, last)
        return json_response([_conversation_json(row) for row in rows])

    async def owned(
        user: str, conversation_id: Any, param: str = "conversation_id"
    ) -> ConversationRow:
        if not isinstance(conversation_id, str) or not conversation_id:
            raise InvalidParameter(f"{param} is required", param=param)
        row = await backend.accounts.conversation(user, conversation_id)
        if row is None:
            raise NotFound(f"no conversation {conversation_id!r}")
        return row

    async def list_messages(request: Request) -> Response:
        user = await authenticate(request, backend)
        conversation = await owned(user, request.query_params.get("conversation_id"))
        rows = await backend.accounts.messages(conversation.id, settings.conversation_messages_max)
        return json_response([_message_json(row) for row in rows])

    async def post_message(request: Request) -> Response | MeteredStreamResponse:
        user = await authenticate(request, backend)
        body = await read_json(request, settings.request_bytes_max)
        body = body if isinstance(body, dict) else {}
        conversation = await owned(user, body.get("conversation_id"))
        content = body.get("content")
        if not isinstance(content, str) or not content.strip():
            raise InvalidParameter("content must be a non-empty string", param="content")
        asked = body.get("model") or conversation.model
        model = catalog.sold(asked)
        if model is None:
            raise InvalidParameter(f"no model {asked!r}", param="model", code="model_not_found")

        async def work(ticket: UserTicket) -> MeteredStreamResponse:
            # the history is counted under the user's limits, off the event loop when long, and
            # only for a user who can pay for a message at all
            await backend.chats.refuse_if_broke(user, model, [content])
            history = await backend.accounts.messages(
                conversation.id, settings.conversation_messages_max
            )
            messages = [{"role": row.role, "content": row.content} for row in history]
            messages = [message for message in messages if message["content"]]
            messages.append({"role": "user", "content": content})
            window = catalog.context_window(model)
            reply_tokens = min(catalog.completion_tokens_max, max(1, window // 4))
            said_at = now_s()
            async with backend.chats.counting_turn(user):  # the history, then the prompt kept
                counts = await backend.tokenizer.count_messages_async(messages)
                start = trim_to_window(counts, window - reply_tokens - TEMPLATE_TOKENS_PER_PROMPT)
                if start is None:
                    raise ContextTooLong(
                        f"this message alone is about {counts[-1]} tokens; {model} reads at most "
                        f"{window - reply_tokens} besides its answer"
                    )
                upstream_body = {
                    "model": model,
                    "messages": messages[start:],
                    "stream": True,
                    "max_tokens": reply_tokens,
                }
                chat = await backend.chats.prepare(upstream_body)
            stream = await unless_disconnected(backend.chats.stream(user, chat), request.receive)
            render = DappStreamRender(backend, conversation.id, content, said_at)
            return MeteredStreamResponse(stream, render, ticket)

        return await run_admitted(backend, user, work)

    return [
        Route("/conversations", create_conversation, methods=["POST"]),
        Route("/conversations", list_conversations, methods=["GET"]),
        Route("/messages", post_message, methods=["POST"]),
        Route("/messages", list_messages, methods=["GET"]),
    ]
