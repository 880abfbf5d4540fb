"""Signed kind-1573 events for tests, from the fixed keys in conftest."""

from __future__ import annotations

import itertools

from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.event import NostrEvent
from dsproxy.wire.messages import Transaction
from tests.conftest import BACKEND_SECRET, CONTROLLER_SECRET

_clock = itertools.count(1_767_225_600)


def credit(address: Address, user: str, tokens: int, secret: str = CONTROLLER_SECRET) -> NostrEvent:
    """A controller's credit (distinct created_at, so each call is a distinct event)."""
    return seal(Transaction(user, tokens), address, secret, created_at=next(_clock))


def debit(address: Address, user: str, tokens: int, secret: str = BACKEND_SECRET) -> NostrEvent:
    """A backend's debit of `tokens` (a positive number)."""
    return seal(Transaction(user, -tokens), address, secret, created_at=next(_clock))
