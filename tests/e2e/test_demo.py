"""`dsproxy demo` as a newcomer runs it: one process, then the official openai SDK against it."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from attrs import frozen
from openai import OpenAI

pytestmark = pytest.mark.e2e

START_S_MAX = 60.0  # generous ceilings for bounded waits, never timing assertions
DEBIT_WAIT_S_MAX = 20.0
STOP_S_MAX = 30.0
MODEL = "deepseek-chat"
MESSAGES = [{"role": "user", "content": "Hello, demo"}]


@frozen
class Demo:
    process: subprocess.Popen[str]
    api: str
    key: str
    output: list[str]

    def balance(self) -> dict[str, Any]:
        response = httpx.get(
            f"{self.api}/balance", headers={"authorization": f"Bearer {self.key}"}, timeout=10
        )
        response.raise_for_status()
        return response.json()


def _read_lines(stream: object, lines: queue.Queue[str | None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line)
    lines.put(None)


def _wait_for_ready(process: subprocess.Popen[str], log: Path) -> tuple[str, str, list[str]]:
    """The API URL and key from the demo's printed instructions."""
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    seen: list[str] = []
    api = key = None
    deadline = time.monotonic() + START_S_MAX
    while api is None or key is None:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"the demo printed no API key in time: {seen} {log.read_text()[-2000:]}")
        if line is None:
            pytest.fail(f"the demo exited early: {seen} {log.read_text()[-2000:]}")
        seen.append(line)
        if found := re.fullmatch(r"API: (\S+)\n", line):
            api = found.group(1)
        if found := re.fullmatch(r"API key: (\S+)\n", line):
            key = found.group(1)
    return api, key, seen


@contextlib.contextmanager
def running_demo(tmp_path: Path) -> Iterator[Demo]:
    log = tmp_path / "demo.log"
    with log.open("w") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "dsproxy.entrypoints.cli", "demo", "--port", "0",
             "--data-dir", str(tmp_path / "demo")],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            # a demo ignores the environment: an operator's own settings, even broken, stay out
            env={**os.environ, "DSPROXY_HTTP_PORT": "not-a-port", "DSPROXY_RELAYS": "ws://x:1"},
        )  # fmt: skip
    try:
        api, key, output = _wait_for_ready(process, log)
        yield Demo(process, api, key, output)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(STOP_S_MAX)
        assert process.stdout is not None
        process.stdout.close()


def _wait_for_balance(demo: Demo, expected: int) -> dict[str, Any]:
    """The debit is appended just after the response: poll, with a bounded wait."""
    deadline = time.monotonic() + DEBIT_WAIT_S_MAX
    while (balance := demo.balance())["balance"] != expected:
        if time.monotonic() > deadline:
            pytest.fail(f"balance {balance} never reached {expected}")
        time.sleep(0.05)
    return balance


def test_demo_recharges_serves_the_openai_sdk_charges_usage_and_stops_on_sigint(
    tmp_path: Path,
) -> None:
    """One command: the SDK chats (plain and streamed), each charged exactly its usage."""
    with running_demo(tmp_path) as demo:
        assert any("DEMO MODEL" in line for line in demo.output)
        before = demo.balance()
        assert before["balance"] > 0 and before["held"] == 0

        with OpenAI(base_url=demo.api, api_key=demo.key, max_retries=0) as client:
            reply = client.chat.completions.create(model=MODEL, messages=MESSAGES)
            assert reply.choices[0].message.content
            assert reply.usage is not None
            used = reply.usage.total_tokens
            chunks = list(
                client.chat.completions.create(
                    model=MODEL,
                    messages=MESSAGES,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
        assert streamed and usage is not None
        used += usage.total_tokens

        after = _wait_for_balance(demo, before["balance"] - used)
        assert after["held"] == 0
        assert after["available"] == before["balance"] - used

        demo.process.send_signal(signal.SIGINT)
        assert demo.process.wait(STOP_S_MAX) == 0
