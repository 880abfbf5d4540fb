"""`dsproxy demo` as a newcomer runs it: one process, then the official openai SDK against it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import signal
import stat
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

from dsproxy.demo.stack import DemoOptions, bind_api_port, prepare_layout
from dsproxy.entrypoints.demo_commands import _serve
from dsproxy.errors import ConfigError

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


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    """`dsproxy demo` that is expected to refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", "dsproxy.entrypoints.cli", "demo", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=START_S_MAX,
    )


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
        root = tmp_path / "demo"  # conversations and keys: the owner's only
        for directory in (root, root / "controller", root / "backend"):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
        for role in ("controller", "backend"):  # held as a service holds its directory
            replay = subprocess.run(
                [sys.executable, "-m", "dsproxy.entrypoints.cli", "--data-dir",
                 str(root / role), "replay"],
                capture_output=True, text=True, timeout=START_S_MAX,
            )  # fmt: skip
            assert replay.returncode == 2 and "in use by dsproxy demo" in replay.stderr, replay
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


def test_a_key_file_the_demo_cannot_read_is_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    """A missing key file was a CancelledError traceback (exit 1) after the controller had
    started, and the files it left made the same --data-dir refused as not empty."""
    binary = tmp_path / "binary.key"
    binary.write_bytes(b"\xff\xfe")
    for key_file, expected in (
        (tmp_path / "missing.key", "No such file or directory"),
        (binary, "not UTF-8 text"),
    ):
        result = _demo(
            "--data-dir", str(tmp_path / "demo"), "--upstream", "http://127.0.0.1:9/v1",
            "--upstream-api-key-file", str(key_file),
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert result.stderr == f"dsproxy: error: --upstream-api-key-file {str(key_file)!r}: " + (
            f"{expected}, as an API key is\n" if key_file == binary else f"{expected}\n"
        )
    assert not (tmp_path / "demo").exists()


def test_an_upstream_that_is_not_an_http_url_is_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    """`--upstream 'http://[::1'` passed the check of its scheme and was an httpx.InvalidURL
    traceback."""
    result = _demo("--data-dir", str(tmp_path / "demo"), "--upstream", "http://[::1")
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "dsproxy: error: --upstream has 'http://[::1': not a http:// or https:// URL\n"
    )
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("made_by_the_demo", [True, False])
def test_a_start_that_fails_says_why_and_leaves_the_directory_as_it_found_it(
    tmp_path: Path, made_by_the_demo: bool
) -> None:
    """Stopping the started parts re-raised the CancelledError of a task the demo had itself
    cancelled, in place of the error; the files a failed start wrote blocked the next one."""
    root = tmp_path / "demo"
    if not made_by_the_demo:
        root.mkdir()
    binary = tmp_path / "binary.key"  # read by the backend, which starts after the controller
    binary.write_bytes(b"\xff\xfe")
    options = DemoOptions("http://127.0.0.1:9/v1", binary)
    with bind_api_port(0) as sock, pytest.raises(ConfigError, match="not UTF-8 text"):
        asyncio.run(_serve(options, prepare_layout(root), sock))
    assert root.exists() != made_by_the_demo
    if root.exists():
        assert list(root.iterdir()) == []
    prepare_layout(root)  # a new try is not refused
