"""Where a verified Nostr event becomes a ledger Entry, or is left out with a reason."""

from __future__ import annotations

from dsproxy.errors import MalformedMessage
from dsproxy.wire.envelope import DEPHY_KIND
from dsproxy.wire.event import NostrEvent
from dsproxy.wire.messages import Transaction, parse_message
from projections import Entry, Ignored

__all__ = ["entry_from_event"]


def entry_from_event(event: NostrEvent, content_bytes_max: int = 65_536) -> Entry | Ignored:
    """Read a Transaction out of an event; the trust policy judges the Entry afterwards."""
    if event.kind != DEPHY_KIND:
        return Ignored(event.id, f"kind {event.kind} is not {DEPHY_KIND}")
    session, machine = event.tag("s"), event.tag("p")
    if session is None or machine is None:
        return Ignored(event.id, "missing the 's' or 'p' tag")
    if len(event.content.encode()) > content_bytes_max:
        return Ignored(event.id, f"content over {content_bytes_max} bytes")
    try:
        message = parse_message(event.content)
    except MalformedMessage as exc:
        return Ignored(event.id, f"malformed content: {exc}")
    if not isinstance(message, Transaction):
        return Ignored(event.id, f"a {type(message).__name__}, not a Transaction")
    return Entry(
        event_id=event.id,
        author=event.pubkey,
        session=session,
        machine=machine,
        user=message.user,
        tokens=message.tokens,
        created_at=event.created_at,
    )
