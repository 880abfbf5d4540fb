"""Properties of the pure ledger fold (projections/)."""

from __future__ import annotations

from collections import defaultdict

from hypothesis import given
from hypothesis import strategies as st

from projections import Entry, Ledger, fold
from tests.strategies import POLICY, histories, mixed_histories, untrusted_entries

EMPTY = Ledger(POLICY)


def balances(ledger: Ledger) -> dict[str, int]:
    return {user: account.balance for user, account in ledger.accounts.items()}


@given(history=histories, data=st.data())
def test_order_of_distinct_events_does_not_matter(
    history: list[Entry], data: st.DataObject
) -> None:
    """Relays deliver in any order; any permutation folds to the same accounts."""
    shuffled = data.draw(st.permutations(history))
    assert fold(shuffled, EMPTY).ledger.accounts == fold(history, EMPTY).ledger.accounts


@given(history=histories, data=st.data())
def test_duplicates_count_once(history: list[Entry], data: st.DataObject) -> None:
    """Re-delivered events (any number of copies, anywhere) change nothing."""
    repeats = data.draw(st.lists(st.sampled_from(history), max_size=20)) if history else []
    folded = fold(history + repeats, EMPTY)
    assert folded.ledger.accounts == fold(history, EMPTY).ledger.accounts
    assert len(folded.applied) == len(history)
    assert [i.reason for i in folded.ignored] == ["duplicate event"] * len(repeats)


@given(history=mixed_histories, split=st.integers(0, 40))
def test_incremental_application_equals_full_replay(history: list[Entry], split: int) -> None:
    """The projector folds page by page; that must equal one fold of everything."""
    first = fold(history[:split], EMPTY).ledger
    incremental = fold(history[split:], first).ledger
    assert incremental == fold(history, EMPTY).ledger


@given(history=mixed_histories, bad=st.lists(untrusted_entries(), max_size=10))
def test_untrusted_entries_never_change_a_balance(history: list[Entry], bad: list[Entry]) -> None:
    """Only configured controllers credit and configured backends debit, here and only here."""
    known = {entry.event_id for entry in history}
    bad = [entry for entry in bad if entry.event_id not in known]
    with_bad = fold(history + bad, EMPTY)
    assert with_bad.ledger.accounts == fold(history, EMPTY).ledger.accounts
    ignored_ids = {item.event_id for item in with_bad.ignored}
    assert {entry.event_id for entry in bad} <= ignored_ids
    assert all(item.reason for item in with_bad.ignored)


@given(history=mixed_histories)
def test_balance_is_credited_minus_debited_for_every_user(history: list[Entry]) -> None:
    """Each account's totals are exactly the sums of the applied credits and debits."""
    folded = fold(history, EMPTY)
    credited: dict[str, int] = defaultdict(int)
    debited: dict[str, int] = defaultdict(int)
    for entry in folded.applied:
        if entry.tokens > 0:
            credited[entry.user] += entry.tokens
        else:
            debited[entry.user] -= entry.tokens
    for user, account in folded.ledger.accounts.items():
        assert account.credited == credited[user]
        assert account.debited == debited[user]
        assert account.balance == credited[user] - debited[user]
        assert account.entries == sum(1 for e in folded.applied if e.user == user)


@given(history=mixed_histories)
def test_fold_leaves_its_input_ledger_alone(history: list[Entry]) -> None:
    before = fold(history[:3], EMPTY).ledger
    snapshot = dict(before.accounts)
    fold(history, before)
    assert dict(before.accounts) == snapshot
