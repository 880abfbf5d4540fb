"""Examples of the ledger fold that properties do not pin down."""

from __future__ import annotations

from projections import Entry, Ledger, fold
from tests.strategies import BACKENDS, CONTROLLERS, MACHINE, POLICY, SESSION, USERS

I64_MAX = 2**63 - 1


def entry(event: str, tokens: int, author: str | None = None) -> Entry:
    author = author or (CONTROLLERS[0] if tokens > 0 else BACKENDS[0])
    return Entry(event * 64, author, SESSION, MACHINE, USERS[0], tokens)


def test_debit_past_zero_is_applied_because_usage_is_a_fact() -> None:
    folded = fold([entry("a", 10), entry("b", -25)], Ledger(POLICY))
    assert folded.ledger.balance(USERS[0]) == -15


def test_credit_that_would_overflow_i64_is_left_out_with_a_reason() -> None:
    folded = fold([entry("a", I64_MAX), entry("b", 1)], Ledger(POLICY))
    assert folded.ledger.balance(USERS[0]) == I64_MAX
    assert [(i.event_id, i.reason) for i in folded.ignored] == [
        ("b" * 64, "totals would exceed the i64 range")
    ]


def test_each_refusal_names_its_reason() -> None:
    stranger = "ee" * 32
    cases = [
        (entry("a", 5, author=stranger), "not a trusted controller"),
        (entry("b", -5, author=CONTROLLERS[0]), "not a trusted backend"),
        (Entry("c" * 64, CONTROLLERS[0], "other", MACHINE, USERS[0], 5), "session"),
        (Entry("d" * 64, CONTROLLERS[0], SESSION, "00" * 32, USERS[0], 5), "machine"),
    ]
    folded = fold([case for case, _ in cases], Ledger(POLICY))
    assert folded.applied == ()
    for (case, expected), ignored in zip(cases, folded.ignored, strict=True):
        assert ignored.event_id == case.event_id
        assert expected in ignored.reason
