"""`dsproxy import | export | replay | balance`, run as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsproxy.adapters.listening import bind_port
from dsproxy.config import load_settings
from dsproxy.errors import ConfigError
from dsproxy.wire.envelope import DEPHY_KIND, Address
from dsproxy.wire.event import NostrEvent, sign_event
from tests.builders import credit, debit
from tests.conftest import CONTROLLER_SECRET, STRANGER_SECRET
from tests.integration.upstream_fixtures import backend_env

ALICE = "Dp5nyDG2fjpVy99TtJrKCTsXoeFieTJNeYr2wz6TFT3h"
BOB = "7U84W13X2v7Uj99sDc9gRjyoDp5xHnSchdc8HqHwJ3Qb"


def dsproxy(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsproxy.entrypoints.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def balance(env: dict[str, str], user: str) -> dict:
    result = dsproxy(env, "balance", user, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def mixed_file(tmp_path: Path, address: Address) -> tuple[Path, list[NostrEvent]]:
    trusted = [
        credit(address, ALICE, 1_000),
        credit(address, BOB, 300),
        debit(address, ALICE, 250),
        debit(address, BOB, 301),
    ]
    untrusted = [
        credit(address, ALICE, 50_000, secret=STRANGER_SECRET),
        debit(address, BOB, 5, secret=CONTROLLER_SECRET),
    ]
    forged = json.loads(credit(address, ALICE, 7).to_json())
    forged["content"] = forged["content"].replace("7", "7000")
    off_session = credit(Address("another-session", address.machine), ALICE, 9)
    lines = [
        *(e.to_json() for e in trusted),
        *(e.to_json() for e in untrusted),
        json.dumps(forged),
        "this is not json",
        "",
        off_session.to_json(),
        trusted[0].to_json(),  # a duplicate
    ]
    return write_lines(tmp_path / "mixed.jsonl", lines), trusted


def test_import_of_a_mixed_file_yields_exactly_the_trusted_balances(
    tmp_path: Path, node_env: dict[str, str], address: Address
) -> None:
    path, trusted = mixed_file(tmp_path, address)
    result = dsproxy(node_env, "import", str(path))
    assert result.returncode == 1, result.stderr  # some lines were refused
    assert "accepted 6, duplicate 1, refused 3" in result.stdout
    assert "line 7: event" in result.stdout and "id does not match" in result.stdout
    assert "line 8: not valid JSON" in result.stdout
    assert "line 10:" in result.stdout and "not kind 1573 for this session" in result.stdout

    alice, bob = balance(node_env, ALICE), balance(node_env, BOB)
    assert (alice["balance"], alice["credited"], alice["debited"]) == (750, 1_000, 250)
    assert (bob["balance"], bob["credited"], bob["debited"]) == (-1, 300, 301)
    assert [e["event_id"] for e in alice["events"]] == [trusted[0].id, trusted[2].id]


def test_replay_reproduces_the_balances(
    tmp_path: Path, node_env: dict[str, str], address: Address
) -> None:
    path, _ = mixed_file(tmp_path, address)
    dsproxy(node_env, "import", str(path))
    before = balance(node_env, ALICE), balance(node_env, BOB)
    result = dsproxy(node_env, "replay")
    assert result.returncode == 0, result.stderr
    assert "replayed 6 events, 2 users, 4 postings, 2 ignored" in result.stdout
    assert "events/s" in result.stdout
    assert (balance(node_env, ALICE), balance(node_env, BOB)) == before


def test_export_then_import_elsewhere_gives_the_same_ledger(
    tmp_path: Path, node_env: dict[str, str], address: Address
) -> None:
    path, _ = mixed_file(tmp_path, address)
    dsproxy(node_env, "import", str(path))
    exported = tmp_path / "exported.jsonl"
    result = dsproxy(node_env, "export", str(exported))
    assert result.returncode == 0, result.stderr
    assert len(exported.read_text().splitlines()) == 6

    elsewhere = {**node_env, "DSPROXY_DATA_DIR": str(tmp_path / "elsewhere")}
    result = dsproxy(elsewhere, "import", str(exported))
    assert result.returncode == 0, result.stdout
    assert "accepted 6, duplicate 0, refused 0" in result.stdout
    assert balance(elsewhere, ALICE) == balance(node_env, ALICE)


def test_missing_file_is_a_clear_error_and_changes_nothing(
    tmp_path: Path, node_env: dict[str, str], address: Address
) -> None:
    good = write_lines(tmp_path / "good.jsonl", [credit(address, ALICE, 5).to_json()])
    dsproxy(node_env, "import", str(good))
    result = dsproxy(node_env, "import", str(tmp_path / "missing.jsonl"))
    assert result.returncode == 2
    assert "missing.jsonl" in result.stderr and "not a readable file" in result.stderr
    assert balance(node_env, ALICE)["balance"] == 5


def test_bad_configuration_names_the_key_and_value(
    tmp_path: Path, node_env: dict[str, str]
) -> None:
    result = dsproxy({**node_env, "DSPROXY_TRUSTED_BACKENDS": "abc"}, "balance", ALICE)
    assert result.returncode == 2
    assert "DSPROXY_TRUSTED_BACKENDS has 'abc': not a 64-char hex public key" in result.stderr
    result = dsproxy({**node_env, "DSPROXY_RELAYS": "notaurl"}, "balance", ALICE)
    assert result.returncode == 2
    assert "DSPROXY_RELAYS has 'notaurl': not a ws:// or wss:// relay URL" in result.stderr


def test_balance_of_a_bad_user_key_is_refused(node_env: dict[str, str]) -> None:
    result = dsproxy(node_env, "balance", "not-a-key")
    assert result.returncode == 2
    assert "USER: 'not-a-key' is not a 32-byte base58 Solana public key" in result.stderr


def test_config_file_supplies_settings_and_env_overrides_it(
    tmp_path: Path, node_env: dict[str, str], address: Address
) -> None:
    config = tmp_path / "dsproxy.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "from-file"}"\n'
        f'machine_pubkey = "{address.machine}"\n'
        f'trusted_controllers = ["{node_env["DSPROXY_TRUSTED_CONTROLLERS"]}"]\n'
    )
    env = {"DSPROXY_CONFIG": str(config)}
    good = write_lines(tmp_path / "one.jsonl", [credit(address, ALICE, 42).to_json()])
    assert dsproxy(env, "import", str(good)).returncode == 0
    assert (tmp_path / "from-file" / "events.sqlite").exists()
    assert balance(env, ALICE)["balance"] == 42
    overridden = {**env, "DSPROXY_DATA_DIR": str(tmp_path / "from-env")}
    result = dsproxy(overridden, "balance", ALICE)  # no ledger there: said, not made up
    assert result.returncode == 2 and str(tmp_path / "from-env") in result.stderr

    config.write_text("unknown_key = 1\n")
    result = dsproxy(env, "balance", ALICE)
    assert result.returncode == 2 and "unknown key 'unknown_key'" in result.stderr


def test_reading_commands_never_create_a_ledger_or_overwrite_a_backup(
    tmp_path: Path, node_env: dict[str, str], address: Address
) -> None:
    """A mistyped data directory once read as an empty ledger: balance 0, and `export` wrote
    0 events over an existing backup (or JSON over the store itself), exiting 0."""
    path, _ = mixed_file(tmp_path, address)
    dsproxy(node_env, "import", str(path))
    backup = tmp_path / "backup.jsonl"
    assert dsproxy(node_env, "export", str(backup)).returncode == 0
    kept = backup.read_text()

    typo = {**node_env, "DSPROXY_DATA_DIR": str(tmp_path / "typo")}
    for command in (["balance", ALICE], ["export", str(backup), "--force"], ["replay"]):
        result = dsproxy(typo, *command)
        assert result.returncode == 2, command
        assert "no event store at" in result.stderr
    assert not (tmp_path / "typo").exists()

    result = dsproxy(node_env, "export", str(backup))
    assert result.returncode == 2 and "--force replaces it" in result.stderr
    store = Path(node_env["DSPROXY_DATA_DIR"]) / "events.sqlite"
    result = dsproxy(node_env, "export", str(store), "--force")
    assert result.returncode == 2 and "is the event store itself" in result.stderr
    assert backup.read_text() == kept
    assert dsproxy(node_env, "export", str(backup), "--force").returncode == 0
    assert balance(node_env, ALICE)["balance"] == 750


def test_an_export_that_cannot_be_written_is_a_one_line_error_and_leaves_nothing(
    tmp_path: Path, node_env: dict[str, str], address: Address
) -> None:
    """They were tracebacks (FileNotFoundError, IsADirectoryError, OSError), and a directory
    given with --force left DIR.partial behind."""
    path, _ = mixed_file(tmp_path, address)
    dsproxy(node_env, "import", str(path))
    directory = tmp_path / "a-directory"
    directory.mkdir()
    for command, expected in (
        (["export", str(tmp_path / "missing" / "x.jsonl")], "No such file or directory"),
        (["export", str(directory), "--force"], "is a directory"),
    ):
        result = dsproxy(node_env, *command)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("dsproxy: error: ") and expected in result.stderr
        assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-directory", "data", "mixed.jsonl"]
    assert list(directory.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_output_that_cannot_be_written_is_a_one_line_error(
    tmp_path: Path, node_env: dict[str, str], address: Address
) -> None:
    """`dsproxy export - > /dev/full` (or balance) was an OSError traceback."""
    path, _ = mixed_file(tmp_path, address)
    dsproxy(node_env, "import", str(path))
    for command in (["export", "-"], ["balance", ALICE], ["balance", ALICE, "--json"]):
        with open("/dev/full", "w") as full:
            result = subprocess.run(
                [sys.executable, "-m", "dsproxy.entrypoints.cli", *command],
                env={**os.environ, **node_env},
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=120,
            )
        assert result.returncode == 2, (command, result.stderr)
        expected = "dsproxy: error: cannot write standard output: No space left on device\n"
        assert result.stderr.endswith(expected) and "Traceback" not in result.stderr


def test_numbers_past_what_the_command_takes_are_usage_errors(
    tmp_path: Path, node_env: dict[str, str], address: Address
) -> None:
    """Past 2^63 a --limit was an OverflowError from SQLite and a --since a TypeError from the
    relay filter, both tracebacks."""
    path, _ = mixed_file(tmp_path, address)
    dsproxy(node_env, "import", str(path))
    huge = "99999999999999999999"
    relay = ["--from-relay", "ws://127.0.0.1:9"]
    for command in (
        ["balance", ALICE, "--limit", huge],
        ["outbox", "--limit", huge],
        ["controller", "status", "--limit", huge],
        ["replay", *relay, "--since", huge],
        ["replay", *relay, "--since", "-1"],
    ):
        result = dsproxy(node_env, *command)
        assert result.returncode == 2, (command, result.stderr)
        option = command[-2]
        assert f"error: argument {option}: '{command[-1]}' is not from 0 to" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_replay_from_a_relay_that_does_not_answer_creates_nothing(
    tmp_path: Path, node_env: dict[str, str]
) -> None:
    """It created events.sqlite first, so that a mistyped data directory then read as an
    empty ledger (balance 0) instead of 'no event store'."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for data_dir in (tmp_path / "typo", empty):
        env = {**node_env, "DSPROXY_DATA_DIR": str(data_dir)}
        result = dsproxy(env, "replay", "--from-relay", "ws://127.0.0.1:9")
        assert result.returncode == 2, result.stderr
        assert "cannot connect to ws://127.0.0.1:9" in result.stderr
        result = dsproxy(env, "balance", ALICE)
        assert result.returncode == 2 and "no event store at" in result.stderr
    assert not (tmp_path / "typo").exists()
    assert [path.name for path in empty.iterdir() if path.name != ".lock"] == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty"]  # no scratch left


def test_configuration_of_the_wrong_type_or_range_is_refused(
    tmp_path: Path, node_env: dict[str, str]
) -> None:
    """TOML values were turned into their Python spelling (a session of "['a', 'b']" would
    match no event) and a port of 70000 wrapped around to 4464."""
    config = tmp_path / "dsproxy.toml"
    for line, expected in (
        ('upstream_url = ["a", "b"]', "upstream_url has ['a', 'b']: must be text"),
        ("context_windows = [1, 2]", "context_windows has 1: must be text"),
        ("http_port = 70000", "http_port has 70000: must be at most 65535"),
        (  # the controller's credits would be refused by every node, its own included
            "pay_amount_lamports = 5000000\ntokens_per_lamport = 2000000000000000",
            "a recharge may credit at most 9007199254740991 tokens",
        ),
    ):
        config.write_text(line + "\n")
        result = dsproxy(node_env, "--config", str(config), "balance", ALICE)
        assert result.returncode == 2, line
        assert expected in result.stderr, result.stderr
    config.write_bytes(b"session = '\xff'\n")
    result = dsproxy(node_env, "--config", str(config), "balance", ALICE)
    assert result.returncode == 2 and "is not valid TOML" in result.stderr
    result = dsproxy(node_env, "--config", str(tmp_path), "balance", ALICE)
    assert result.returncode == 2 and "config file" in result.stderr


def test_keygen_and_outbox_mistakes_are_one_line_errors(
    tmp_path: Path, node_env: dict[str, str]
) -> None:
    """They were tracebacks (FileExistsError from mkdir, "no such table: outbox")."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = dsproxy(node_env, "keygen", str(blocker / "node.key"))
    assert result.returncode == 2
    assert result.stderr.startswith("dsproxy: error: cannot create"), result.stderr
    env = {k: v for k, v in node_env.items() if k != "DSPROXY_NOSTR_KEY_FILE"}
    result = dsproxy(env, "outbox")
    assert result.returncode == 2
    assert result.stderr.startswith("dsproxy: error: DSPROXY_NOSTR_KEY_FILE is not set")


def test_an_option_that_would_do_nothing_is_refused_and_log_levels_take_any_case(
    node_env: dict[str, str],
) -> None:
    """`replay --since T` without a relay ignored T; `--log-level debug` was refused."""
    result = dsproxy(node_env, "replay", "--since", "5")
    assert result.returncode == 2
    assert "--since" in result.stderr and "--from-relay" in result.stderr
    result = dsproxy(node_env, "--log-level", "debug", "balance", "not-a-key")
    assert result.returncode == 2 and "invalid choice" not in result.stderr, result.stderr


def test_a_reader_that_stops_early_ends_export_quietly(
    tmp_path: Path, node_env: dict[str, str], address: Address
) -> None:
    """`dsproxy export - | head -1`: the closed pipe ends the command as it ends a Unix
    filter (status 141, as if killed by SIGPIPE), with no traceback."""
    events = [credit(address, ALICE, tokens) for tokens in range(1, 401)]  # past a pipe's buffer
    path = write_lines(tmp_path / "many.jsonl", [event.to_json() for event in events])
    assert dsproxy(node_env, "import", str(path)).returncode == 0
    process = subprocess.Popen(
        [sys.executable, "-m", "dsproxy.entrypoints.cli", "export", "-"],
        env={**os.environ, **node_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    first = json.loads(process.stdout.readline())
    process.stdout.close()  # the reader is gone
    with process.stderr:
        stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141, stderr
    assert stderr == ""
    assert first["id"] in {event.id for event in events}


def test_import_refuses_what_the_door_refuses(
    tmp_path: Path, node_env: dict[str, str], address: Address
) -> None:
    """A ledger rebuilt from a file holds what live ingest would have: content over
    DSPROXY_CONTENT_BYTES_MAX and content that is not JSON are refused there too."""
    tags = (("s", address.session), ("p", address.machine))
    padded = json.dumps({"Transaction": {"user": ALICE, "tokens": 500}}) + " " * 300
    lines = [
        sign_event(CONTROLLER_SECRET, DEPHY_KIND, tags, padded, 1_700_000_001).to_json(),
        sign_event(CONTROLLER_SECRET, DEPHY_KIND, tags, "not json", 1_700_000_002).to_json(),
        credit(address, ALICE, 40).to_json(),
    ]
    env = {**node_env, "DSPROXY_CONTENT_BYTES_MAX": "256"}
    result = dsproxy(env, "import", str(write_lines(tmp_path / "door.jsonl", lines)))
    assert result.returncode == 1, result.stderr
    assert "accepted 1, duplicate 0, refused 2" in result.stdout
    assert "line 1:" in result.stdout and "over 256" in result.stdout
    assert "line 2:" in result.stdout and "content is not JSON" in result.stdout
    assert balance(env, ALICE)["balance"] == 40


def test_one_service_per_data_directory(node_env: dict[str, str], data_dir: Path) -> None:
    """Two backends on one directory each reserved against their own book: a user overspent.
    A second service (or a replay swapping the projection under it) is now refused; reading
    commands still work beside it."""
    first = subprocess.Popen(
        [sys.executable, "-m", "dsproxy.entrypoints.cli", "node"],
        env={**os.environ, **node_env},
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = data_dir / ".lock"
        deadline = time.monotonic() + 60
        while not (lock.exists() and "dsproxy node" in lock.read_text()):
            assert time.monotonic() < deadline and first.poll() is None, "the node did not start"
            time.sleep(0.05)
        for command in (["node"], ["serve"], ["replay"]):
            result = dsproxy(node_env, *command)
            assert result.returncode == 2, (command, result.stderr)
            assert f"is in use by dsproxy node (pid {first.pid})" in result.stderr
        assert dsproxy(node_env, "balance", ALICE).returncode == 0
        # a reading command under other settings once rebuilt the projection and swapped its
        # file under the node, which went on writing to the old, deleted one; and with nobody
        # running, a forgotten --config read as balance 0: it reads nothing and says why
        projection = load_settings(node_env).projection_path
        built = projection.stat().st_ino
        for other in ({"DSPROXY_TRUSTED_BACKENDS": ""}, {"DSPROXY_CONTENT_BYTES_MAX": "256"}):
            result = dsproxy({**node_env, **other}, "balance", ALICE)
            assert result.returncode == 2, (other, result.stderr)
            assert "built under other settings" in result.stderr and "--config" in result.stderr
            assert projection.stat().st_ino == built
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0
    assert dsproxy(node_env, "replay").returncode == 0  # the lock went with the process
    replayed = projection.stat().st_ino
    changed = {**node_env, "DSPROXY_CONTENT_BYTES_MAX": "256"}
    assert dsproxy(changed, "balance", ALICE).returncode == 2  # reads nothing under these
    assert projection.stat().st_ino == replayed
    assert dsproxy(changed, "replay").returncode == 0  # rebuilt under them: nobody runs on it
    assert dsproxy(changed, "balance", ALICE).returncode == 0
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700  # conversations are its owner's


def test_a_data_directory_that_cannot_be_used_is_a_one_line_error(
    tmp_path: Path, node_env: dict[str, str]
) -> None:
    """They were tracebacks (a read-only disk gives the same errors, as root cannot be shown)."""
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "events.sqlite").write_text("not a database")
    broken_projection = tmp_path / "broken-projection"
    broken_projection.mkdir()
    (broken_projection / "projection.sqlite").write_text("not a database")
    for data_dir, command, expected in (
        (in_the_way, ["node"], "cannot create the data directory"),
        (broken, ["balance", ALICE], "cannot open the event store"),
        # it hung after its error line: the store's and projection's threads kept it alive
        (broken_projection, ["node"], "cannot open projection"),
    ):
        result = dsproxy({**node_env, "DSPROXY_DATA_DIR": str(data_dir)}, *command)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("dsproxy: error: ") and expected in result.stderr
        assert "Traceback" not in result.stderr


def test_a_port_taken_is_taken_at_once() -> None:
    """Bound but not yet listening, a port could be bound again (SO_REUSEADDR): a second
    backend got past the check and then hung, never listening."""
    first = bind_port("127.0.0.1", 0, hint="pick another")
    with first:
        port = first.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is already in use"):
            bind_port("127.0.0.1", port, hint="pick another")


async def test_connections_to_a_bound_port_send_small_writes_at_once() -> None:
    """asyncio sets TCP_NODELAY only on sockets it knows are TCP: on ours (protocol 0) Nagle's
    wait met the client's delayed ACK, and every keep-alive request took 40 ms more."""
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(
        on_connection, sock=bind_port("127.0.0.1", 0, hint="pick another")
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(accepted, 10) != 0
        writer.close()


def test_a_busy_port_is_a_one_line_error_before_anything_starts(
    node_env: dict[str, str], data_dir: Path
) -> None:
    """uvicorn exited from inside its task (status 3, a traceback, nothing on what to do)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = backend_env(node_env, "http://127.0.0.1:9/v1")  # all a backend needs to start
        result = dsproxy(env, "serve", "--port", str(port))
    assert result.returncode == 2, result.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "DSPROXY_HTTP_PORT" in result.stderr and "Traceback" not in result.stderr
    assert not (data_dir / "events.sqlite").exists()  # refused before anything was opened


def test_an_upstream_key_file_that_is_not_text_is_a_one_line_error(
    tmp_path: Path, node_env: dict[str, str]
) -> None:
    """It was a UnicodeDecodeError traceback."""
    key_file = tmp_path / "binary.key"
    key_file.write_bytes(b"\xff\xfe")
    env = backend_env(
        node_env, "http://127.0.0.1:9/v1", DSPROXY_UPSTREAM_API_KEY_FILE=str(key_file)
    )
    result = dsproxy(env, "serve")
    assert result.returncode == 2, result.stderr
    expected = f"DSPROXY_UPSTREAM_API_KEY_FILE {str(key_file)!r}: not UTF-8 text, as an API key is"
    assert result.stderr == f"dsproxy: error: {expected}\n"
    # a key others can read is refused, as the Nostr key's is (it was taken)
    key_file.write_text("sk-upstream\n")
    key_file.chmod(0o644)
    result = dsproxy(env, "serve")
    assert result.returncode == 2, result.stderr
    assert "is readable by others: chmod 600 it" in result.stderr


def test_dsproxy_serve_help_names_the_options_it_takes_besides_its_own() -> None:
    """`dsproxy-serve --help` showed `usage: dsproxy serve` with --host and --port only, yet
    --config, --data-dir and --log-level work there too."""
    done = subprocess.run(
        [sys.executable, "-m", "dsproxy.entrypoints.serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for option in ("--host", "--port", "--config FILE", "--data-dir DIR", "--log-level LEVEL"):
        assert option in done.stdout, done.stdout
