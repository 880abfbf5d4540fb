"""`dsproxy wallet ...` as a user runs it, against the local chain over HTTP JSON-RPC."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair

from dsproxy.entrypoints.cli import main
from dsproxy.localchain import LocalChain, LocalChainServer
from dsproxy.wire.envelope import DEFAULT_SESSION, Address
from dsproxy.wire.event import verify_event
from dsproxy.wire.messages import Request, parse_message
from dsproxy.wire.recover import verify_recover
from tests.integration.localchain_fixtures import (  # noqa: F401 (fixtures)
    Parties,
    chain_fixture,
    chain_server_fixture,
    parties_fixture,
)
from tests.integration.relay_fixtures import fetch_ids, free_port, local_relay

__all__ = ["local_relay"]  # a fixture: used by name

MACHINE = "ab" * 32
BOT = str(Keypair().pubkey())


def _keypair_file(directory: Path, keypair: Keypair, name: str = "user.json") -> Path:
    path = directory / name
    path.write_text(json.dumps(list(bytes(keypair))))
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def user_file(tmp_path: Path, parties: Parties) -> Path:
    return _keypair_file(tmp_path, parties.user)


@pytest.fixture(autouse=True)
def environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, chain_server: LocalChainServer
) -> None:
    monkeypatch.setenv("DSPROXY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DSPROXY_SOLANA_RPC_URL", chain_server.url)
    monkeypatch.setenv("DSPROXY_MACHINE_PUBKEY", MACHINE)


def test_authorize_prints_the_dapps_recover_info_bytes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, vectors: dict[str, Any]
) -> None:
    bp = vectors["balance_payment"]
    user = Keypair.from_seed(bytes.fromhex(bp["user_seed_hex"]))
    recover = bp["recover"]
    code, out, _ = _run(
        capsys,
        "wallet",
        "authorize",
        "--keypair",
        str(_keypair_file(tmp_path, user)),
        "--nonce",
        str(recover["nonce"]),
        "--deadline",
        str(recover["deadline"]),
        "--payload",
        recover["payload_hex"],
    )
    assert code == 0
    assert out == recover["recover_info_json"] + "\n"


def test_authorize_warns_of_a_deadline_already_passed(
    capsys: pytest.CaptureFixture[str], user_file: Path
) -> None:
    keypair = ["--keypair", str(user_file), "--nonce", "0"]
    code, out, err = _run(capsys, "wallet", "authorize", *keypair, "--deadline", "-1")
    assert code == 0 and json.loads(out)["deadline"] == -1
    assert "deadline -1 has passed" in err
    code, out, err = _run(capsys, "wallet", "authorize", *keypair, "--deadline", "4102444800")
    assert code == 0 and err == ""


def test_register_deposit_status_withdraw_move_the_vault(
    capsys: pytest.CaptureFixture[str], user_file: Path, chain: LocalChain, parties: Parties
) -> None:
    keypair = ["--keypair", str(user_file)]
    assert _run(capsys, "wallet", "register", *keypair)[0] == 0
    assert _run(capsys, "wallet", "deposit", "0.02", *keypair)[0] == 0
    assert _run(capsys, "wallet", "withdraw", "5000000", "--lamports", *keypair)[0] == 0

    code, out, _ = _run(capsys, "wallet", "status", *keypair)

    status = json.loads(out)
    assert code == 0
    assert status["registered"] is True
    assert status["nonce"] == 0
    assert status["vault_lamports"] == status["free_lamports"] == 15_000_000
    vault = chain.program.vault_pda(parties.user.pubkey())[0]
    assert chain.get_balance(vault) == 15_000_000


def test_refused_withdraw_prints_the_programs_error_and_exits_2(
    capsys: pytest.CaptureFixture[str], user_file: Path
) -> None:
    keypair = ["--keypair", str(user_file)]
    _run(capsys, "wallet", "register", *keypair)
    code, _, err = _run(capsys, "wallet", "withdraw", "1", *keypair)
    assert code == 2
    assert "InsufficientFunds (6001)" in err


def test_an_rpc_node_that_cannot_be_reached_is_named_with_why(
    capsys: pytest.CaptureFixture[str], user_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It said "<class 'httpx.ConnectError'> raised in ...", and named no URL."""
    unreachable = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("DSPROXY_SOLANA_RPC_URL", unreachable)
    code, _, err = _run(capsys, "wallet", "status", "--keypair", str(user_file))
    assert code == 2
    assert f"at {unreachable} failed: ConnectError" in err, err
    assert "raised in" not in err


def test_recharge_print_only_signs_the_request_for_the_onchain_nonce(
    capsys: pytest.CaptureFixture[str], user_file: Path, parties: Parties
) -> None:
    _run(capsys, "wallet", "register", "--keypair", str(user_file))
    code, out, _ = _run(capsys, "wallet", "recharge", "--keypair", str(user_file), "--print-only")

    assert code == 0
    event = verify_event(out.strip())
    assert event.kind == 1573 and event.tag("p") == MACHINE
    request = parse_message(event.content)
    assert isinstance(request, Request)
    assert request.payload.nonce == 0
    assert request.payload.user == str(parties.user.pubkey())
    assert verify_recover(request.payload.recover, parties.user.pubkey(), 0)


def test_recharge_without_relays_says_so_and_publishes_nothing(
    capsys: pytest.CaptureFixture[str], user_file: Path
) -> None:
    _run(capsys, "wallet", "register", "--keypair", str(user_file))
    code, out, err = _run(capsys, "wallet", "recharge", "--keypair", str(user_file))
    assert code == 2
    assert out == ""
    assert "DSPROXY_RELAYS" in err and "--print-only" in err


async def test_recharge_publishes_the_signed_request_to_the_relay(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    user_file: Path,
    local_relay: str,
    parties: Parties,
) -> None:
    """The Request reaches the relay, under the session and machine the controller follows."""
    monkeypatch.setenv("DSPROXY_RELAYS", local_relay)
    await asyncio.to_thread(main, ["wallet", "register", "--keypair", str(user_file)])
    capsys.readouterr()

    code = await asyncio.to_thread(main, ["wallet", "recharge", "--keypair", str(user_file)])

    answer = json.loads(capsys.readouterr().out)
    assert code == 0
    assert answer["relays"] == {local_relay: "accepted"}
    assert answer["user"] == str(parties.user.pubkey()) and answer["nonce"] == 0
    assert answer["request_id"] in await fetch_ids(local_relay, Address(DEFAULT_SESSION, MACHINE))


async def test_recharge_no_relay_takes_exits_2_naming_the_relay(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, user_file: Path
) -> None:
    unreachable = f"ws://127.0.0.1:{free_port()}"
    monkeypatch.setenv("DSPROXY_RELAYS", unreachable)
    monkeypatch.setenv("DSPROXY_RELAY_TIMEOUT_S", "1")
    await asyncio.to_thread(main, ["wallet", "register", "--keypair", str(user_file)])
    capsys.readouterr()

    code = await asyncio.to_thread(main, ["wallet", "recharge", "--keypair", str(user_file)])

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert "no relay took the recharge Request" in captured.err and unreachable in captured.err


def test_a_bad_keypair_file_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "bad.json"
    path.write_text("[1, 2, 3]")
    code, _, err = _run(capsys, "wallet", "status", "--keypair", str(path))
    assert code == 2
    assert "64 bytes" in err


def test_an_amount_past_any_number_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], user_file: Path
) -> None:
    """1e999999999 SOL was a decimal.Overflow traceback."""
    for amount in ("1e999999999", "18446744073709551616"):
        code, _, err = _run(
            capsys, "wallet", "deposit", amount, "--lamports", "--keypair", str(user_file)
        )
        assert code == 2, err
        assert "is more lamports than Solana counts" in err


def _localchain(*args: str) -> subprocess.CompletedProcess[str]:
    """`dsproxy localchain` that is expected to refuse to start (a started one serves on)."""
    return subprocess.run(
        [sys.executable, "-m", "dsproxy.entrypoints.cli", "localchain", "--bot", BOT, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_localchain_options_it_cannot_use_are_one_line_errors() -> None:
    """A busy port, --port 99999 and an address not of this machine were tracebacks, and a
    negative --slot-ms spun a CPU."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args, expected in (
            (["--port", port], f"port {port} on 127.0.0.1 is already in use"),
            (["--port", "99999"], "argument --port: '99999' is not from 0 to 65535"),
            (["--host", "192.0.2.1"], "cannot listen on 192.0.2.1:8899"),
            (["--slot-ms", "-5"], "argument --slot-ms: '-5' is not from 0 to"),
        ):
            result = _localchain(*args)
            assert result.returncode == 2, (args, result.stderr)
            assert expected in result.stderr and "Traceback" not in result.stderr


def test_registering_twice_and_depositing_unregistered_say_what_to_do(
    capsys: pytest.CaptureFixture[str], user_file: Path
) -> None:
    """They said "custom program error 0" and "AccountNotInitialized (3012)", and no more."""
    keypair = ["--keypair", str(user_file)]
    code, _, err = _run(capsys, "wallet", "deposit", "0.01", *keypair)
    assert code == 2 and "dsproxy wallet register" in err, err
    assert _run(capsys, "wallet", "register", *keypair)[0] == 0
    code, _, err = _run(capsys, "wallet", "register", *keypair)
    assert code == 2 and "registered already?" in err, err
