"""Our verifier and nostr-sdk's `Event.verify()` agree on every event, valid or tampered."""

from __future__ import annotations

import json

import nostr_sdk
from hypothesis import given
from hypothesis import strategies as st

from dsproxy.errors import InvalidEvent
from dsproxy.wire.event import sign_event, verify_event

secrets = st.sampled_from(["11" * 32, "22" * 32, "a7" * 32])
texts = st.text(max_size=60)  # includes control characters, quotes, non-ASCII
tags = st.lists(st.lists(texts, min_size=1, max_size=3), max_size=3)


def sdk_verifies(raw: str) -> bool:
    try:
        return bool(nostr_sdk.Event.from_json(raw).verify())
    except Exception:  # nostr-sdk raises its own error type
        return False


def ours_verifies(raw: str) -> bool:
    try:
        verify_event(raw)
    except InvalidEvent:
        return False
    return True


@given(
    secret=secrets,
    kind=st.integers(0, 65535),
    tags=tags,
    content=texts,
    created_at=st.integers(0, 2**40),
)
def test_events_we_sign_verify_in_both(
    secret: str, kind: int, tags: list[list[str]], content: str, created_at: int
) -> None:
    raw = sign_event(secret, kind, tags, content, created_at).to_json()
    assert ours_verifies(raw)
    assert sdk_verifies(raw)


@given(
    secret=secrets,
    content=texts,
    other=texts,
    field=st.sampled_from(["content", "created_at", "tags", "pubkey", "sig"]),
)
def test_any_tampering_is_refused_by_both(
    secret: str, content: str, other: str, field: str
) -> None:
    obj = sign_event(secret, 1573, [["s", "x"]], content, 1_767_225_600).to_obj()
    tampered = {
        "content": other if other != content else other + ".",
        "created_at": obj["created_at"] + 1,
        "tags": [["s", "y"]],
        "pubkey": sign_event("33" * 32, 1, [], "", 0).pubkey,
        "sig": sign_event(secret, 1573, [["s", "x"]], content + "!", 1).sig,
    }[field]
    raw = json.dumps(dict(obj, **{field: tampered}), ensure_ascii=False)
    assert not ours_verifies(raw)
    assert not sdk_verifies(raw)
