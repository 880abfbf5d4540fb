"""The ledger: balances as a pure fold over verified Transaction entries."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from attrs import evolve, field, frozen

from projections.entries import Entry, Ignored
from projections.trust import TrustPolicy

__all__ = ["Account", "Folded", "Ledger", "fold"]

_I64_MAX = 2**63 - 1


@frozen
class Account:
    """One user's totals; the balance is derived, never stored apart from them."""

    credited: int = 0
    debited: int = 0
    entries: int = 0

    @property
    def balance(self) -> int:
        return self.credited - self.debited


_EMPTY = Account()


@frozen
class Ledger:
    """Accounts by user and the entry ids already applied, under one trust policy."""

    policy: TrustPolicy
    accounts: Mapping[str, Account] = field(factory=dict)
    seen_ids: frozenset[str] = frozenset()

    def balance(self, user: str) -> int:
        return self.accounts.get(user, Account()).balance


@frozen
class Folded:
    """A fold's result: the new ledger, and what it applied and left out (in input order)."""

    ledger: Ledger
    applied: tuple[Entry, ...]
    ignored: tuple[Ignored, ...]


def fold(entries: Iterable[Entry], ledger: Ledger) -> Folded:
    """Apply entries in order; duplicates count once and untrusted entries are left out.

    Debits are applied even past zero: they are facts of consumption, and the order in which a
    relay delivers a credit and a debit must not change the result. Totals stay within i64, the
    range peers can represent; an entry that would leave it is left out.
    """
    accounts, seen = dict(ledger.accounts), set(ledger.seen_ids)
    applied: list[Entry] = []
    ignored: list[Ignored] = []
    for entry in entries:
        if entry.event_id in seen:
            ignored.append(Ignored(entry.event_id, "duplicate event"))
            continue
        reason = ledger.policy.refusal(entry)
        if reason is not None:
            ignored.append(Ignored(entry.event_id, reason))
            continue
        account = accounts.get(entry.user, _EMPTY)
        credited, debited = account.credited, account.debited
        if entry.tokens > 0:
            credited += entry.tokens
        else:
            debited -= entry.tokens
        if credited > _I64_MAX or debited > _I64_MAX:
            ignored.append(Ignored(entry.event_id, "totals would exceed the i64 range"))
            continue
        seen.add(entry.event_id)
        accounts[entry.user] = Account(credited, debited, account.entries + 1)
        applied.append(entry)
    new_ledger = evolve(ledger, accounts=accounts, seen_ids=frozenset(seen))
    return Folded(new_ledger, tuple(applied), tuple(ignored))
