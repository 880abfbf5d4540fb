"""Holds: tokens reserved for chats in flight, so concurrent chats can never overspend.

A hold is taken before a chat calls the model and is settled (replaced by the exact debit) or
released afterwards. What a user may still reserve is `available = balance - held`.
"""

from __future__ import annotations

from collections.abc import Mapping

from attrs import evolve, field, frozen

__all__ = ["Hold", "Holds", "available", "release", "reserve", "settle"]


@frozen
class Hold:
    """Tokens reserved for one chat of one user."""

    chat_id: str
    user: str
    tokens: int


@frozen
class Holds:
    """The open holds by chat id."""

    by_chat: Mapping[str, Hold] = field(factory=dict)

    def held(self, user: str) -> int:
        """Tokens this user has reserved in chats still open."""
        return sum(hold.tokens for hold in self.by_chat.values() if hold.user == user)


def available(balance: int, held: int) -> int:
    """What a user may still reserve; never negative, even if debits took the balance below 0."""
    return max(0, balance - held)


def reserve(holds: Holds, hold: Hold, balance: int) -> Holds:
    """Add a hold; the caller decided it fits (`decide_hold`), so this only asserts it."""
    assert hold.chat_id not in holds.by_chat, hold.chat_id
    assert 0 < hold.tokens <= available(balance, holds.held(hold.user)), (hold, balance)
    return evolve(holds, by_chat={**holds.by_chat, hold.chat_id: hold})


def settle(holds: Holds, chat_id: str, tokens_charged: int) -> tuple[Holds, int]:
    """Close a hold with a debit of at most its size; returns the holds and the debit."""
    hold = holds.by_chat[chat_id]
    assert 0 <= tokens_charged <= hold.tokens, (hold, tokens_charged)
    return release(holds, chat_id), tokens_charged


def release(holds: Holds, chat_id: str) -> Holds:
    """Close a hold with no debit (the upstream failed before any output)."""
    remaining = dict(holds.by_chat)
    del remaining[chat_id]
    return evolve(holds, by_chat=remaining)
