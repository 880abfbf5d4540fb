"""What the ledger consumes: verified Transaction events, and the events it leaves out."""

from __future__ import annotations

from attrs import frozen

__all__ = ["Entry", "Ignored"]


@frozen
class Entry:
    """A signed `Transaction{user, tokens}` event: tokens > 0 credits, tokens < 0 debits."""

    event_id: str
    author: str
    session: str
    machine: str
    user: str
    tokens: int
    created_at: int = 0

    @property
    def is_credit(self) -> bool:
        return self.tokens > 0


@frozen
class Ignored:
    """An event kept for audit that moves no balance, and why."""

    event_id: str
    reason: str
