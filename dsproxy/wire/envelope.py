"""The DePHY envelope: kind 1573, tags `["s", session]` then `["p", machine]`, signed content."""

from __future__ import annotations

import time

from attrs import frozen

from dsproxy.wire.event import NostrEvent, sign_event
from dsproxy.wire.messages import Message, to_content

__all__ = ["DEFAULT_SESSION", "DEPHY_KIND", "Address", "seal"]

DEPHY_KIND = 1573
DEFAULT_SESSION = "dephy-dsproxy-controller"


@frozen
class Address:
    """Which conversation an event belongs to: the session and the machine's x-only pubkey."""

    session: str
    machine: str

    def matches(self, event: NostrEvent) -> bool:
        return (
            event.kind == DEPHY_KIND
            and event.tag("s") == self.session
            and event.tag("p") == self.machine
        )


def seal(
    message: Message, address: Address, secret_hex: str, created_at: int | None = None
) -> NostrEvent:
    """Sign a message into a kind-1573 event with the tags in the order peers expect."""
    return sign_event(
        secret_hex,
        DEPHY_KIND,
        (("s", address.session), ("p", address.machine)),
        to_content(message),
        int(time.time()) if created_at is None else created_at,
    )
