"""The DePHY messages against the byte-exact vectors, and every kind of bad input."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsproxy.domain.recharge import recharge_request
from dsproxy.errors import MalformedMessage
from dsproxy.wire.messages import (
    DeviceStatus,
    Reason,
    RecoverInfo,
    Request,
    RequestPayload,
    Status,
    StatusPayload,
    Transaction,
    parse_message,
    to_content,
)

USER = "Dp5nyDG2fjpVy99TtJrKCTsXoeFieTJNeYr2wz6TFT3h"
CONTENT_KEYS = ("request_content", "status_content", "credit_content", "debit_content")


@pytest.mark.parametrize("key", CONTENT_KEYS)
def test_vector_content_round_trips_byte_for_byte(vectors: dict[str, Any], key: str) -> None:
    content = vectors["nostr"][key]
    assert to_content(parse_message(content)) == content


@pytest.mark.parametrize("name", ["request", "credit", "debit", "status"])
def test_vector_event_content_round_trips(vectors: dict[str, Any], name: str) -> None:
    content = vectors["nostr"]["events"][name]["content"]
    assert to_content(parse_message(content)) == content


def test_request_vector_parses_to_the_typed_fields(vectors: dict[str, Any]) -> None:
    message = parse_message(vectors["nostr"]["request_content"])
    assert isinstance(message, Request)
    assert message.to_status is DeviceStatus.WORKING
    assert message.reason is Reason.USER_REQUEST
    assert message.initial_request == "0" * 64
    assert message.payload.nonce == 7
    assert message.payload.user == USER
    recover = message.payload.recover
    recover_vector = vectors["balance_payment"]["recover"]
    assert recover.signature.hex() == recover_vector["signature_hex"]
    assert recover.payload.hex() == recover_vector["payload_hex"]
    assert recover.deadline == recover_vector["deadline"]
    assert message.payload.recover_info == recover_vector["recover_info_json"]
    assert recover.to_json() == recover_vector["recover_info_json"]


def test_status_answers_a_request_with_its_payload_fields_reordered(
    vectors: dict[str, Any],
) -> None:
    request = parse_message(vectors["nostr"]["request_content"])
    assert isinstance(request, Request)
    status = Status(
        DeviceStatus.WORKING,
        Reason.USER_REQUEST,
        vectors["nostr"]["events"]["request"]["id"],
        StatusPayload.answering(request.payload).to_json(),
    )
    assert to_content(status) == vectors["nostr"]["status_content"]


def test_transaction_builds_the_vector_bytes(vectors: dict[str, Any]) -> None:
    assert to_content(Transaction(USER, 5_000_000)) == vectors["nostr"]["credit_content"]
    assert to_content(Transaction(USER, -1234)) == vectors["nostr"]["debit_content"]


def test_non_ascii_text_is_written_raw_as_serde_does() -> None:
    status = Status(DeviceStatus.AVAILABLE, Reason.LOCK_FAILED, "ab" * 32, "solde insuffisant é ✓")
    content = to_content(status)
    assert "é ✓" in content
    assert parse_message(content) == status


def test_non_canonical_but_valid_json_still_parses() -> None:
    spaced = f'{{ "Transaction" : {{ "tokens" : 5, "user" : "{USER}" }} }}'
    assert parse_message(spaced) == Transaction(USER, 5)


def transaction(user: Any = USER, tokens: Any = 5) -> str:
    return json.dumps({"Transaction": {"user": user, "tokens": tokens}})


def request(**changes: Any) -> str:
    recover = {"signature": [1] * 64, "payload": [2] * 64, "deadline": 1767225600}
    payload = {"recover_info": json.dumps(recover), "nonce": 7, "user": USER}
    body = {
        "to_status": "Working",
        "reason": "UserRequest",
        "initial_request": "0" * 64,
        "payload": json.dumps(payload),
    }
    for key, value in changes.items():
        if key.startswith("recover_"):
            recover[key.removeprefix("recover_")] = value
            payload["recover_info"] = json.dumps(recover)
            body["payload"] = json.dumps(payload)
        elif key.startswith("payload_"):
            payload[key.removeprefix("payload_")] = value
            body["payload"] = json.dumps(payload)
        else:
            body[key] = value
    return json.dumps({"Request": body})


BAD_INPUTS = [
    ("not json", "content: not valid JSON"),
    ("[]", "exactly one variant"),
    ('{"Transaction": {}, "Status": {}}', "exactly one variant"),
    ('{"Payment": {"user": "x"}}', "unknown variant 'Payment'"),
    (f'{{"Transaction": {{"user": "{USER}"}}}}', "missing field 'tokens'"),
    (f'{{"Transaction": {{"user": "{USER}", "tokens": 1, "memo": 2}}}}', "unknown field 'memo'"),
    (
        f'{{"Transaction": {{"user": "{USER}", "tokens": 1, "tokens": 2}}}}',
        "duplicate field 'tokens'",
    ),
    (transaction(tokens="5"), "Transaction.tokens: must be an integer, got str"),
    (transaction(tokens=5.0), "Transaction.tokens: must be an integer, got float"),
    (transaction(tokens=True), "Transaction.tokens: must be an integer, got bool"),
    (transaction(tokens=2**63), "outside"),
    (transaction(tokens=-(2**63) - 1), "outside"),
    (transaction(tokens=0), "must be non-zero"),
    (f'{{"Transaction": {{"user": "{USER}", "tokens": NaN}}}}', "NaN is not valid JSON"),
    (transaction(user="not-base58-0OIl"), "is not a 32-byte base58 Solana public key"),
    (transaction(user="1111"), "is not a 32-byte base58 Solana public key"),
    (transaction(user=7), "Transaction.user: must be a string"),
    (request(to_status="Busy"), "unknown variant 'Busy'"),
    (request(reason=3), "Request.reason: must be a string, got int"),
    (request(initial_request="00"), "is not 64 lowercase hex characters"),
    (request(initial_request="G" * 64), "is not 64 lowercase hex characters"),
    (request(payload={"nonce": 1}), "payload: must be a JSON string, got dict"),
    (request(payload="{nope"), "payload: not valid JSON"),
    (request(payload_nonce=-1), "payload.nonce: -1 is outside"),
    (request(payload_nonce=2**64), "payload.nonce"),
    (request(payload_user="abc"), "payload.user"),
    (request(payload_recover_info={"deadline": 1}), "payload.recover_info: must be a string"),
    (request(payload_recover_info="[1, 2]"), "recover_info: must be a JSON object"),
    (request(recover_signature=[1] * 63), "exactly 64 bytes, got 63"),
    (request(recover_payload=[1] * 65), "exactly 64 bytes, got 65"),
    (request(recover_signature=[256] + [0] * 63), "recover_info.signature[0]: 256 is outside"),
    (request(recover_deadline="soon"), "recover_info.deadline: must be an integer"),
    # nesting orjson reads (up to 1024 levels) but cannot write back (over 254)
    ("[" * 300 + "]" * 300, "exactly one variant"),
    ('{"Transaction": ' + "[" * 300 + "]" * 300 + "}", "Transaction: must be a JSON object"),
    (request(payload="[" * 300 + "]" * 300), "payload: must be a JSON object"),
    # int() refuses more than 4,300 digits with a plain ValueError: it once stopped every node
    ('{"Transaction": {"user": "x", "tokens": ' + "9" * 4301 + "}}", "not valid JSON"),
    (request(payload='{"nonce": ' + "1" * 5000 + "}"), "payload: not valid JSON"),
    (request(payload_recover_info='{"deadline": ' + "7" * 4400 + "}"), "not valid JSON"),
]


@pytest.mark.parametrize(("content", "expected"), BAD_INPUTS)
def test_bad_input_is_refused_with_a_clear_reason(content: str, expected: str) -> None:
    with pytest.raises(MalformedMessage) as caught:
        parse_message(content)
    assert expected in str(caught.value)


@pytest.mark.parametrize("depth", [255, 600, 1000, 1023])
def test_content_nested_as_deep_as_orjson_reads_is_refused_not_a_crash(depth: int) -> None:
    """Anyone can sign such content (the door's JSON check passes it); folding it must say
    why it is malformed, whatever the interpreter's recursion limit."""
    for content in ("[" * depth + "]" * depth, '{"Transaction":' + "[" * depth + "]" * depth + "}"):
        with pytest.raises(MalformedMessage):
            parse_message(content)


def test_status_payload_can_be_a_failure_text() -> None:
    status = Status(DeviceStatus.AVAILABLE, Reason.LOCK_FAILED, "cd" * 32, "signature expired")
    assert parse_message(to_content(status)) == status


def test_v2_request_payload_keeps_its_namespace_id() -> None:
    payload = RequestPayload(
        RecoverInfo(bytes(64), bytes(64), 5).to_json(), nonce=1, user=USER, namespace_id=3
    )
    assert RequestPayload.parse(payload.to_json()) == payload
    assert '"namespace_id":3' in payload.to_json()


def test_a_v2_recover_info_names_its_payload_extra_data() -> None:
    """balance-payment v2's dApp writes `{"signature", "extra_data", "deadline"}` and its Rust
    SDK requires it: such a Request was refused (missing field 'payload'), and v2 Requests made
    here could not be read by the SDK."""
    info = RecoverInfo(bytes(range(64)), bytes(range(64, 128)), 1_800_000_000)
    v2_dapp = (
        '{"signature":'
        + json.dumps(list(info.signature), separators=(",", ":"))
        + ',"extra_data":'
        + json.dumps(list(info.payload), separators=(",", ":"))
        + ',"deadline":1800000000}'
    )
    assert RecoverInfo.parse(v2_dapp) == info
    assert info.to_json(v2=True) == v2_dapp
    assert RecoverInfo.parse(info.to_json()) == info  # v1 keeps `payload`
    assert '"payload"' in info.to_json() and '"extra_data"' not in info.to_json()
    request = recharge_request(info, 1, USER, namespace_id=3)
    written = json.loads(request.payload.recover_info)
    assert written.keys() == {"signature", "extra_data", "deadline"}
    with pytest.raises(MalformedMessage, match="unknown field"):  # one name or the other
        RecoverInfo.parse(v2_dapp[:-1] + ',"payload":' + json.dumps(list(info.payload)) + "}")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def _message_like(value: Any) -> st.SearchStrategy[str]:
    return st.sampled_from(["Request", "Status", "Transaction"]).map(
        lambda name: json.dumps({name: value})
    )


@given(
    st.one_of(
        st.text(max_size=64),
        _JSON.map(json.dumps),
        _JSON.flatmap(_message_like),
        st.fixed_dictionaries(
            {"recover_info": _JSON.map(json.dumps), "nonce": _JSON, "user": _JSON}
        ).map(lambda payload: request(payload=json.dumps(payload))),
        st.integers(4_290, 4_400).map(lambda n: request(payload='{"nonce":' + "9" * n + "}")),
    )
)
def test_no_content_raises_anything_but_malformed_message(content: str) -> None:
    """Anyone can sign content: whatever it holds, reading it says why it is wrong, or reads it;
    any other exception (a ValueError once) stops every fold at that event."""
    with contextlib.suppress(MalformedMessage):
        parse_message(content)
