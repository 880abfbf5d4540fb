"""The recover message, digest and signature against the vectors; verification rules."""

from __future__ import annotations

import hashlib
from typing import Any

import base58
import pytest
from hypothesis import given
from hypothesis import strategies as st
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from dsproxy.errors import MalformedMessage
from dsproxy.wire.messages import RecoverInfo
from dsproxy.wire.recover import (
    is_curve_point,
    keccak256,
    new_payload,
    recover_digest,
    recover_message,
    sign_message_prefix,
    sign_recover,
    verify_recover,
)


@pytest.fixture
def recover(vectors: dict[str, Any]) -> dict[str, Any]:
    return vectors["balance_payment"]["recover"]


@pytest.fixture
def user(vectors: dict[str, Any]) -> Keypair:
    return Keypair.from_seed(bytes.fromhex(vectors["balance_payment"]["user_seed_hex"]))


def _args(recover: dict[str, Any]) -> tuple[bytes, int, int]:
    return bytes.fromhex(recover["payload_hex"]), recover["nonce"], recover["deadline"]


def test_message_is_payload_nonce_deadline(recover: dict[str, Any]) -> None:
    assert recover_message(*_args(recover)).hex() == recover["message_hex"]


def test_keccak_is_the_original_not_sha3(recover: dict[str, Any]) -> None:
    message = bytes.fromhex(recover["message_hex"])
    assert keccak256(message).hex() == recover["keccak256_hex"]
    assert hashlib.sha3_256(message).hexdigest() != recover["keccak256_hex"]
    assert base58.b58encode(keccak256(message)).decode() == recover["keccak256_base58"]


def test_digest_is_prefix_and_base58_text(recover: dict[str, Any]) -> None:
    assert recover_digest(*_args(recover)).decode() == recover["digest_utf8"]


def test_signing_gives_the_dapps_signature_and_json(recover: dict[str, Any], user: Keypair) -> None:
    info = sign_recover(user, *_args(recover))
    assert info.signature.hex() == recover["signature_hex"]
    assert info.to_json() == recover["recover_info_json"]


def test_vector_signature_verifies_only_for_its_nonce_key_and_payload(
    recover: dict[str, Any], user: Keypair
) -> None:
    info = RecoverInfo.parse(recover["recover_info_json"])
    nonce = recover["nonce"]
    assert verify_recover(info, user.pubkey(), nonce)
    assert verify_recover(info, str(user.pubkey()), nonce)
    assert not verify_recover(info, user.pubkey(), nonce + 1)
    assert not verify_recover(info, Keypair().pubkey(), nonce)
    tampered = RecoverInfo(info.signature, b"\x00" + info.payload[1:], info.deadline)
    assert not verify_recover(tampered, user.pubkey(), nonce)
    later = RecoverInfo(info.signature, info.payload, info.deadline + 1)
    assert not verify_recover(later, user.pubkey(), nonce)


def test_v2_message_adds_the_namespace_and_its_prefix(recover: dict[str, Any]) -> None:
    payload, nonce, deadline = _args(recover)
    message = recover_message(payload, nonce, deadline, namespace_id=2)
    assert (
        message == payload + (2).to_bytes(8, "little") + bytes.fromhex(recover["message_hex"])[64:]
    )
    digest = recover_digest(
        payload, nonce, deadline, namespace_id=2, prefix=sign_message_prefix("Chat")
    )
    assert digest.startswith(b"DePHY vending machine/Chat:\n")


@pytest.mark.parametrize(
    ("payload", "nonce", "deadline", "problem"),
    [
        (bytes(63), 0, 0, "64 bytes"),
        (bytes(64), -1, 0, "nonce"),
        (bytes(64), 2**64, 0, "nonce"),
        (bytes(64), 0, 2**63, "deadline"),
    ],
)
def test_out_of_range_inputs_are_refused(
    payload: bytes, nonce: int, deadline: int, problem: str
) -> None:
    with pytest.raises(MalformedMessage, match=problem):
        recover_message(payload, nonce, deadline)


def test_new_payload_is_a_zero_padded_uuid() -> None:
    first, second = new_payload(), new_payload()
    assert len(first) == 64 and first[16:] == bytes(48) and first != second


@given(st.binary(min_size=32, max_size=32))
def test_curve_point_check_agrees_with_solders(encoded: bytes) -> None:
    assert is_curve_point(encoded) == Pubkey.from_bytes(encoded).is_on_curve()
