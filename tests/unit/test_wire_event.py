"""Nostr event verification: our verifier against nostr-sdk's `Event.verify()`."""

from __future__ import annotations

import json
from typing import Any

import nostr_sdk
import pytest

from dsproxy.errors import InvalidEvent
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.event import canonical_id, parse_event, public_key_of, sign_event, verify_event
from dsproxy.wire.messages import Transaction, parse_message

EVENT_NAMES = ["request", "credit", "debit", "status"]


def sdk_verifies(obj: dict[str, Any]) -> bool:
    try:
        return bool(nostr_sdk.Event.from_json(json.dumps(obj)).verify())
    except Exception:  # nostr-sdk raises its own error type for unparseable events
        return False


@pytest.mark.parametrize("name", EVENT_NAMES)
def test_vector_events_verify_and_serialize_back_identically(
    vectors: dict[str, Any], name: str
) -> None:
    raw = vectors["nostr"]["events"][name]
    event = verify_event(json.dumps(raw))
    assert event.to_obj() == raw
    assert canonical_id(event) == raw["id"]
    assert sdk_verifies(raw)


def test_seal_reproduces_the_vector_id_with_the_vector_key(vectors: dict[str, Any]) -> None:
    nostr = vectors["nostr"]
    event = seal(
        parse_message(nostr["credit_content"]),
        Address(nostr["session"], nostr["machine_pubkey"]),
        nostr["signer_secret_hex"],
        created_at=nostr["created_at"],
    )
    assert event.id == nostr["events"]["credit"]["id"]
    assert event.pubkey == nostr["signer_pubkey"] == public_key_of(nostr["signer_secret_hex"])
    assert event.tags == (("s", nostr["session"]), ("p", nostr["machine_pubkey"]))
    assert sdk_verifies(event.to_obj())


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("content", '{"Transaction":{"user":"x","tokens":1}}', "id does not match"),
        ("created_at", 1767225601, "id does not match"),
        ("tags", [["s", "other"]], "id does not match"),
        ("sig", "00" * 64, "signature does not verify"),
        ("pubkey", "ee" * 32, "id does not match"),
        ("id", "AB" * 32, "64 lowercase hex"),
        ("sig", "zz", "128 lowercase hex"),
        ("kind", "1573", "kind must be an integer"),
        ("created_at", -1, "[0, 2^63-1]"),
        ("tags", [["s", 1]], "lists of strings"),
        ("content", None, "content must be a string"),
    ],
)
def test_tampered_events_are_refused_like_nostr_sdk_refuses_them(
    vectors: dict[str, Any], field: str, value: Any, expected: str
) -> None:
    raw = dict(vectors["nostr"]["events"]["credit"], **{field: value})
    with pytest.raises(InvalidEvent) as caught:
        verify_event(json.dumps(raw))
    assert expected in str(caught.value)
    assert not sdk_verifies(raw)


def test_signature_of_another_key_is_refused(vectors: dict[str, Any]) -> None:
    good = vectors["nostr"]["events"]["credit"]
    forged = sign_event("77" * 32, 1573, good["tags"], good["content"], good["created_at"])
    raw = dict(good, sig=forged.sig)
    with pytest.raises(InvalidEvent, match="signature does not verify"):
        verify_event(raw)
    assert not sdk_verifies(raw)


@pytest.mark.parametrize(
    "raw", ["", "null", "[1,2]", '{"id": "00"}', "{" * 10, b"\xff\xfe"], ids=repr
)
def test_shapeless_input_is_refused_with_a_reason(raw: str | bytes) -> None:
    with pytest.raises(InvalidEvent):
        parse_event(raw)


def test_events_signed_here_verify_in_nostr_sdk(address: Address) -> None:
    event = seal(
        Transaction("Dp5nyDG2fjpVy99TtJrKCTsXoeFieTJNeYr2wz6TFT3h", -3), address, "12" * 32
    )
    assert sdk_verifies(event.to_obj())
    assert verify_event(event.to_json()) == event


def test_a_signed_event_dated_past_what_sqlite_holds_is_refused_at_the_door() -> None:
    """NIP-01 allows any u64, and such an event verifies; stored, it stopped every fold of the
    log (SQLite integers end at 2^63-1)."""
    event = sign_event("77" * 32, 1573, [["s", "x"], ["p", "00" * 32]], "{}", 2**63)
    with pytest.raises(InvalidEvent, match=r"\[0, 2\^63-1\]"):
        verify_event(event.to_json())
    assert verify_event(sign_event("77" * 32, 1573, [], "{}", 2**63 - 1).to_json())
