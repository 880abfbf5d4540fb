"""The upstream model: any OpenAI-compatible `/chat/completions`, over httpx, streaming or not.

Every httpx error and every error status is translated here into our tree, so callers never see
httpx. A stream is opened (and its status checked) before the caller sends anything to its own
client: an upstream error before any output can then still become a clean HTTP error.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import httpx
import orjson
from attrs import frozen
from httpx_aiohttp import AiohttpTransport
from httpx_sse import EventSource, SSEError

from dsproxy.errors import (
    UpstreamCut,
    UpstreamError,
    UpstreamQuotaExhausted,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnauthorized,
)

__all__ = ["StreamChunk", "Upstream", "UpstreamStream", "error_for_status"]

log = logging.getLogger(__name__)

ERROR_BODY_BYTES_MAX = 4_096
RESPONSE_BYTES_MAX = 16 * 1_048_576
_DONE = "[DONE]"


def _detail(body: bytes) -> str:
    """The upstream's own error message, if it sent an OpenAI-shaped one."""
    try:
        obj = orjson.loads(body[:ERROR_BODY_BYTES_MAX])
        message = obj["error"]["message"]
        return str(message)[:500]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body[:200].decode(errors="replace")


def _seconds(retry_after: str | None) -> int | None:
    """A `retry-after` in seconds (an HTTP date is not passed on), at most an hour."""
    seconds = (retry_after or "").strip()
    if not (seconds.isascii() and seconds.isdigit()):
        return None
    return 3600 if len(seconds) > 4 else min(int(seconds), 3600)  # int() refuses 4,301 digits


def error_for_status(status: int, body: bytes, retry_after: str | None = None) -> UpstreamError:
    """Our error for an upstream error status (its message is logged, not shown, for 401/402)."""
    detail = _detail(body)
    if status in (400, 404, 413, 422):
        return UpstreamRejected(f"the model server refused the request: {detail}", status=status)
    log.warning("upstream answered %s: %s", status, detail)
    if status in (401, 403):
        return UpstreamUnauthorized("the model server refused this service's credentials")
    if status == 402:
        return UpstreamQuotaExhausted("this service's account at the model server is exhausted")
    if status == 429:
        return UpstreamRateLimited(
            "the model server is rate-limiting this service", retry_after_s=_seconds(retry_after)
        )
    return UpstreamError(f"the model server failed with status {status}")


async def _start_of(response: httpx.Response, bytes_max: int) -> bytes:
    """The first `bytes_max` bytes of a body (an error's), then the response is closed: a
    server that answers a stream with a long refusal is not read to its end."""
    content = b""
    try:
        async for piece in response.aiter_bytes():
            content += piece
            if len(content) >= bytes_max:
                break
    except httpx.HTTPError:
        pass
    finally:
        await response.aclose()
    return content[:bytes_max]


def _error_of(response: httpx.Response, body: bytes) -> UpstreamError:
    return error_for_status(response.status_code, body, response.headers.get("retry-after"))


def _reason(exc: httpx.HTTPError) -> str:
    """What went wrong, as aiohttp saw it (httpx-aiohttp names every failure to connect, a
    refused connection too, a ConnectTimeout)."""
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientError):
        return f"{type(cause).__name__}: {cause}"[:200]
    return type(exc).__name__


def _translate(exc: httpx.HTTPError) -> UpstreamError:
    cause = exc.__cause__
    timed_out = isinstance(exc, httpx.TimeoutException) and (
        not isinstance(cause, aiohttp.ClientConnectionError) or isinstance(cause, TimeoutError)
    )
    if timed_out:
        return UpstreamTimeout(f"the model server did not answer in time ({_reason(exc)})")
    return UpstreamError(f"cannot reach the model server ({_reason(exc)})")


def _note_choices(choices: Any, begun: set[Any], ended: set[Any]) -> None:
    for choice in choices if isinstance(choices, list) else ():
        if isinstance(choice, dict):
            index = choice.get("index", 0)
            if isinstance(index, int):
                begun.add(index)
                if choice.get("finish_reason") is not None:
                    ended.add(index)


@frozen
class StreamChunk:
    """One `data:` event of a stream: its raw bytes and its parsed JSON object."""

    raw: bytes
    data: dict[str, Any]


class UpstreamStream:
    """An open streamed answer; iterate `chunks()`, always `aclose()`."""

    def __init__(self, response: httpx.Response) -> None:
        # SSE is UTF-8 by definition; httpx would otherwise parse the content type with the
        # email package on every stream (about 5% of a streamed chat's CPU)
        response.encoding = "utf-8"
        self._response = response
        self.finished = False  # saw `data: [DONE]`

    async def chunks(self) -> AsyncIterator[StreamChunk]:
        """Parsed chunks; raises UpstreamCut if the stream ends before `[DONE]`, unless every
        choice it began had its `finish_reason` (some servers leave `[DONE]` out).

        Events are read as the SSE standard says (httpx-sse): a line ends only at CR or LF (a
        model's U+2028 inside a JSON string once cut a chunk in two), the `data:` lines of one
        event are joined, and an event without data is skipped."""
        begun: set[Any] = set()  # choice indexes seen, and those that ended
        ended: set[Any] = set()
        try:
            async for event in EventSource(self._response).aiter_sse():
                payload = event.data.strip()
                if not payload:
                    continue  # `data:` with nothing after it
                if payload == _DONE:
                    self.finished = True
                    return
                try:
                    data = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    raise UpstreamCut("the model server sent a malformed chunk") from None
                if not isinstance(data, dict):
                    raise UpstreamCut("the model server sent a chunk that is not an object")
                if "error" in data:
                    raise UpstreamCut(f"the model server failed mid-stream: {data['error']}")
                _note_choices(data.get("choices"), begun, ended)
                yield StreamChunk(payload.encode(), data)
        except SSEError as exc:  # open_stream checked the content type: not seen
            raise UpstreamCut(f"the model server's stream is not SSE: {exc}") from None
        except httpx.HTTPError as exc:
            if isinstance(_translate(exc), UpstreamTimeout):
                raise UpstreamTimeout("the model server stopped sending mid-stream") from exc
            raise UpstreamCut(f"the stream was cut ({_reason(exc)})") from exc
        if begun and begun <= ended:
            self.finished = True
            return
        raise UpstreamCut("the stream ended without its end marker")

    async def aclose(self) -> None:
        await self._response.aclose()


class Upstream:
    """A pooled client for one OpenAI-compatible base URL (e.g. https://api.deepseek.com)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 600,
        connections_max: int = 256,
        max_tokens_param: str = "max_tokens",
    ) -> None:
        # DeepSeek and most servers read `max_tokens`; OpenAI's reasoning models refuse it and
        # read only `max_completion_tokens`
        self._max_tokens_param = max_tokens_param
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(
            max_connections=connections_max, max_keepalive_connections=connections_max
        )
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10))

        def pool() -> aiohttp.ClientSession:
            # aiohttp's pool: httpcore's checks every idle connection on every request. No
            # cookie jar: one user's upstream cookie must never ride along with another's chat.
            connector = aiohttp.TCPConnector(
                limit=connections_max,
                keepalive_timeout=limits.keepalive_expiry,
                ssl=httpx.create_ssl_context(),
            )
            return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

        self._transport = AiohttpTransport(limits=limits, client=pool)
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=timeout,
            transport=self._transport,
        )
        # a chat's request is built from these parts, parsed and encoded once (build_request
        # re-parses and merges the URL and headers on every call); httpx's own defaults
        # (accept-encoding: only what httpx can decode; user-agent) are kept
        self._chat_url = httpx.URL(base_url.rstrip("/") + "/chat/completions")
        common = {
            **{k: v for k, v in self._client.headers.items() if k != "connection"},
            "host": self._chat_url.netloc.decode("ascii"),
            "content-type": "application/json",
        }
        self._chat_headers = {
            stream: [
                (name.lower().encode(), value.encode())
                for name, value in {**common, "accept": accept}.items()
            ]
            for stream, accept in ((False, "application/json"), (True, "text/event-stream"))
        }
        self._chat_extensions = {"timeout": timeout.as_dict()}

    def _chat_request(self, body: Mapping[str, Any], *, stream: bool = False) -> httpx.Request:
        if self._max_tokens_param != "max_tokens" and "max_tokens" in body:
            renamed = {k: v for k, v in body.items() if k != "max_tokens"}
            renamed[self._max_tokens_param] = body["max_tokens"]
            body = renamed
        content = orjson.dumps(body)
        headers = [*self._chat_headers[stream], (b"content-length", b"%d" % len(content))]
        return httpx.Request(
            "POST",
            self._chat_url,
            headers=httpx.Headers(headers),
            stream=httpx.ByteStream(content),
            extensions=self._chat_extensions,
        )

    async def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """A chat goes straight to the pool: it is one POST that must not follow redirects, run
        an auth flow or keep cookies. The client's layers for those cost a fifth of a chat's
        CPU."""
        response = await self._transport.handle_async_request(request)
        response.request = request
        if not stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response

    async def complete(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """A non-streamed answer as the upstream's JSON object."""
        try:
            response = await self._send(self._chat_request(body))
        except httpx.HTTPError as exc:
            raise _translate(exc) from exc
        if response.status_code != 200:
            raise _error_of(response, response.content)
        if len(response.content) > RESPONSE_BYTES_MAX:
            raise UpstreamError("the model server's answer is too large")
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise UpstreamError("the model server's answer is not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            if isinstance(data, dict) and "error" in data:  # an error sent with status 200
                raise UpstreamError(f"the model server failed: {_detail(response.content)}")
            raise UpstreamError("the model server's answer has no choices")
        return data

    async def open_stream(self, body: Mapping[str, Any]) -> UpstreamStream:
        """Send a streamed request and check its status before any chunk is read."""
        try:
            request = self._chat_request(body, stream=True)
            response = await self._send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _translate(exc) from exc
        media_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        if response.status_code != 200 or media_type == "application/json":
            # some servers say 200 over an error (as JSON)
            content = await _start_of(response, ERROR_BODY_BYTES_MAX)
            if response.status_code == 200:
                raise UpstreamError(f"the model server answered with no stream: {_detail(content)}")
            raise _error_of(response, content)
        if media_type != "text/event-stream":
            # some servers stream SSE as text/plain, or with no type: read it as SSE all the
            # same (httpx-sse reads only what is labelled so)
            response.headers["content-type"] = "text/event-stream"
        return UpstreamStream(response)

    async def list_models(self) -> list[str]:
        """The upstream's model ids (for start-up checks and the benchmark)."""
        try:
            response = await self._client.get("/models")
        except httpx.HTTPError as exc:
            raise _translate(exc) from exc
        if response.status_code != 200:
            raise _error_of(response, response.content)
        return [str(item.get("id")) for item in orjson.loads(response.content).get("data", [])]

    async def aclose(self) -> None:
        await self._client.aclose()
