"""One user's tokens in flight, as the backend that meters them sees them. Pure.

A chat first reserves a hold; afterwards the hold is either released or settled into a charge.
A charge is recorded at once but reaches the ledger later: first it waits to be signed into a
debit event (`unissued`), then that event waits in the store, at a known position, until the
projection has folded it (`issued`). Until then the ledger balance does not show it, so the book
subtracts it itself. Nothing here awaits, so a decision made on a book can never interleave with
another chat's.

The ledger balance a book carries is true at the projection's position `folded_to`, which the
caller passes in: an issued debit stored at or before it is already in that balance (or was
refused by the ledger) and is no longer subtracted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from attrs import evolve, field, frozen

__all__ = ["Book", "available", "fold_into", "issue", "release", "reserve", "settle"]


def available(balance: int, held: int) -> int:
    """What a user may still reserve; never negative, even if debits took the balance below 0."""
    return max(0, balance - held)


@frozen
class Book:
    """A user's ledger balance and what the ledger does not show yet."""

    balance: int = 0  # the projection's balance
    holds: Mapping[str, int] = field(factory=dict)  # chat id -> tokens reserved
    unissued: Mapping[str, int] = field(factory=dict)  # chat id -> tokens charged, not signed
    issued: tuple[tuple[int, int], ...] = ()  # (store position, tokens) of stored debit events

    @property
    def held(self) -> int:
        return sum(self.holds.values())

    def charged_unfolded(self, folded_to: int) -> int:
        """Tokens charged that the projection's balance does not include yet."""
        unfolded = sum(tokens for position, tokens in self.issued if position > folded_to)
        return sum(self.unissued.values()) + unfolded

    def spendable(self, folded_to: int) -> int:
        """The balance once every recorded charge is folded: what holds are taken against."""
        return self.balance - self.charged_unfolded(folded_to)

    def available(self, folded_to: int) -> int:
        return available(self.spendable(folded_to), self.held)

    @property
    def idle(self) -> bool:
        """Nothing in flight: the book can be forgotten and read back from the projection."""
        return not (self.holds or self.unissued or self.issued)


def reserve(book: Book, chat_id: str, tokens: int, folded_to: int) -> Book:
    """Add a hold; the caller decided it fits (`decide_hold`), so this only asserts it."""
    assert chat_id not in book.holds, chat_id
    assert 0 < tokens <= book.available(folded_to), (book, tokens)
    return evolve(book, holds={**book.holds, chat_id: tokens})


def release(book: Book, chat_id: str) -> Book:
    """Close a hold with no charge; a hold no longer open is left as it is."""
    if chat_id not in book.holds:
        return book
    holds = dict(book.holds)
    del holds[chat_id]
    return evolve(book, holds=holds)


def settle(book: Book, chat_id: str, tokens_charged: int) -> Book:
    """Close a hold with a charge of at most its size; the charge waits to be issued."""
    assert 0 < tokens_charged <= book.holds.get(chat_id, tokens_charged), (book, tokens_charged)
    assert chat_id not in book.unissued, chat_id
    return evolve(release(book, chat_id), unissued={**book.unissued, chat_id: tokens_charged})


def issue(book: Book, chat_ids: Iterable[str], position: int) -> Book:
    """These charges were signed into one debit event, now stored at `position`."""
    unissued = dict(book.unissued)
    tokens = sum(unissued.pop(chat_id) for chat_id in chat_ids)
    return evolve(book, unissued=unissued, issued=(*book.issued, (position, tokens)))


def fold_into(book: Book, balance: int | None, folded_to: int) -> Book:
    """The projection folded up to `folded_to` (with this user's new balance, if it changed):
    debits stored up to there are in the balance now and leave the book."""
    issued = tuple(item for item in book.issued if item[0] > folded_to)
    if balance is None and issued == book.issued:
        return book
    return evolve(book, balance=book.balance if balance is None else balance, issued=issued)
