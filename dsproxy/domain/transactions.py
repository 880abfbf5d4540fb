"""Where a verified Nostr event becomes a ledger Entry, or is left out with a reason."""

from __future__ import annotations

from collections.abc import Sequence

from dsproxy.errors import MalformedMessage
from dsproxy.wire.envelope import DEPHY_KIND
from dsproxy.wire.event import NostrEvent
from dsproxy.wire.messages import Transaction, parse_message
from projections import Entry, Ignored

__all__ = ["entry_from_event", "entry_from_parts"]


def entry_from_event(event: NostrEvent, content_bytes_max: int = 65_536) -> Entry | Ignored:
    """Read a Transaction out of an event; the trust policy judges the Entry afterwards."""
    return entry_from_parts(
        event.id,
        event.pubkey,
        event.kind,
        event.tags,
        event.content,
        event.created_at,
        content_bytes_max,
    )


def entry_from_parts(
    event_id: str,
    author: str,
    kind: int,
    tags: Sequence[Sequence[str]],
    content: str,
    created_at: int,
    content_bytes_max: int = 65_536,
) -> Entry | Ignored:
    """The same, from an event's fields (the projector's hot path reads them from JSON)."""
    if kind != DEPHY_KIND:
        return Ignored(event_id, f"kind {kind} is not {DEPHY_KIND}")
    session = machine = None  # the first `s` and the first `p`, in one pass
    for tag in tags:
        if len(tag) >= 2:
            if tag[0] == "s" and session is None:
                session = tag[1]
            elif tag[0] == "p" and machine is None:
                machine = tag[1]
    if session is None or machine is None:
        return Ignored(event_id, "missing the 's' or 'p' tag")
    if len(content) > content_bytes_max or len(content.encode()) > content_bytes_max:
        return Ignored(event_id, f"content over {content_bytes_max} bytes")
    try:
        message = parse_message(content)
    except MalformedMessage as exc:
        return Ignored(event_id, f"malformed content: {exc}")
    if not isinstance(message, Transaction):
        return Ignored(event_id, f"a {type(message).__name__}, not a Transaction")
    return Entry(event_id, author, session, machine, message.user, message.tokens, created_at)
