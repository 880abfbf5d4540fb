"""Pure publishing decisions: what relay answers mean and when the outbox gives up."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsproxy.domain.publication import (
    Acknowledged,
    Failed,
    RelayAnswer,
    RelayResult,
    RetryLater,
    Stale,
    answer_of,
    decide_publication,
    is_permanent,
    is_stale,
    retry_delay_ms,
)

RELAYS = ("ws://a", "ws://b", "ws://c")
PERMANENT = ("invalid: bad signature", "blocked: you are banned", "pow: difficulty 20 needed")
TRANSIENT = ("rate-limited: slow down", "error: database is locked", "auth-required: sign in")
UNPREFIXED = ("Event rejected", "unexpected error: Traceback", "")  # a relay's own words


@pytest.mark.parametrize(
    ("accepted", "reason", "answer"),
    [
        (True, "", RelayAnswer.ACCEPTED),
        (False, "duplicate: exists", RelayAnswer.ACCEPTED),
        *[(False, reason, RelayAnswer.REJECTED) for reason in PERMANENT + TRANSIENT],
        *[(False, reason, RelayAnswer.REJECTED) for reason in UNPREFIXED],
    ],
)
def test_answer_of_reads_nip01_prefixes(accepted: bool, reason: str, answer: RelayAnswer) -> None:
    """An `OK false` is a refusal whatever its words (once read as an outage: never recorded,
    never counted, retried forever in front of every later event)."""
    result = answer_of("ws://a", accepted, reason)
    assert result.answer is answer
    assert result.reason or accepted  # a refusal always says something in `dsproxy outbox`


def test_permanent_prefixes_only() -> None:
    assert all(is_permanent(reason) for reason in PERMANENT)
    assert not any(is_permanent(reason) for reason in TRANSIENT + UNPREFIXED)


results = st.lists(
    st.builds(
        answer_of,
        st.sampled_from(RELAYS),
        st.booleans(),
        st.sampled_from(PERMANENT + TRANSIENT + UNPREFIXED + ("duplicate: have it",)),
    ),
    max_size=3,
    unique_by=lambda result: result.relay,
)


@given(results, st.integers(0, 50))
def test_one_acknowledgement_is_enough(answers: list[RelayResult], rejections: int) -> None:
    """Whatever the other relays say, one that has the event settles it."""
    decision = decide_publication(answers, len(RELAYS), rejections, 20)
    has_it = [r.relay for r in answers if r.answer is RelayAnswer.ACCEPTED]
    assert isinstance(decision, Acknowledged) == bool(has_it)
    if has_it:
        assert decision == Acknowledged(tuple(has_it))


@given(results)
def test_an_outage_never_fails(answers: list[RelayResult]) -> None:
    """Unreachable relays only delay publication; they never count against the budget."""
    unreachable = [RelayResult(r.relay, RelayAnswer.UNREACHABLE, "timeout") for r in answers]
    decision = decide_publication(unreachable, len(RELAYS), 10**6, 20)
    assert isinstance(decision, RetryLater)
    assert decision.rejection is None


def test_permanent_rejection_by_every_relay_fails() -> None:
    answers = [answer_of(relay, False, "invalid: bad signature") for relay in RELAYS]
    decision = decide_publication(answers, len(RELAYS))
    assert isinstance(decision, Failed)
    assert "invalid: bad signature" in decision.reason


def test_permanent_rejection_by_one_relay_waits_for_the_others() -> None:
    """One relay refusing for good does not decide while another may still accept, however
    long that one is down (a whitelist relay and an outage must not lose debits)."""
    answers = [
        answer_of("ws://a", False, "restricted: not on the list"),
        RelayResult("ws://b", RelayAnswer.UNREACHABLE, "timeout"),
    ]
    decision = decide_publication(answers, 2, rejections_so_far=10**6, rejections_max=20)
    assert decision == RetryLater("ws://a: restricted: not on the list; ws://b: timeout", None)


@pytest.mark.parametrize("reason", ["error: database is locked", "Event rejected"])
def test_other_rejections_retry_then_give_up(reason: str) -> None:
    answers = [answer_of("ws://a", False, reason)]
    decision = decide_publication(answers, 1, rejections_so_far=3, rejections_max=20)
    assert decision == RetryLater(f"ws://a: {reason}", f"ws://a: {reason}")
    final = decide_publication(answers, 1, rejections_so_far=19, rejections_max=20)
    assert isinstance(final, Failed)
    assert "gave up after 20 rejections" in final.reason


@pytest.mark.parametrize("reason", ["rate-limited: slow down", "Rate-Limited: slow down"])
def test_rate_limiting_only_delays_like_an_outage(reason: str) -> None:
    """`rate-limited:` asks us to come back later: minutes of it must not fail the event."""
    answers = [answer_of("ws://a", False, reason)]
    decision = decide_publication(answers, 1, rejections_so_far=10**6, rejections_max=20)
    assert decision == RetryLater(f"ws://a: {reason}", None)


@given(st.integers(0, 1_000), st.integers(1, 10_000), st.integers(1, 100_000))
def test_backoff_grows_and_is_capped(attempt: int, low: int, extra: int) -> None:
    high = low + extra
    delay = retry_delay_ms(attempt, low, high)
    assert low <= delay <= high
    assert retry_delay_ms(attempt + 1, low, high) >= delay
    assert retry_delay_ms(attempt, low, high, spread=0.5) <= delay


STALE = (
    "invalid: event creation date is too far off from the current time",  # nostr-rs-relay
    "invalid: 1767225600 is too old",  # nostr-relay
    "invalid: created_at too early",  # strfry
)


def test_a_refusal_of_the_events_age_is_told_apart() -> None:
    assert all(is_stale(reason) and is_permanent(reason) for reason in STALE)
    assert not any(is_stale(reason) for reason in PERMANENT + TRANSIENT + UNPREFIXED)


def test_every_relay_refusing_for_good_and_one_for_age_means_sign_again() -> None:
    """Kept through an outage longer than relays' `created_at` window, an event was failed
    for good: a credit the user paid for never reached anyone."""
    answers = [RelayResult("ws://a", RelayAnswer.REJECTED, STALE[0]),
               RelayResult("ws://b", RelayAnswer.REJECTED, "blocked: not here")]  # fmt: skip
    assert isinstance(decide_publication(answers, 2), Stale)
    waiting = [answers[0], RelayResult("ws://b", RelayAnswer.UNREACHABLE, "down")]
    assert isinstance(decide_publication(waiting, 2), RetryLater)
    other = [RelayResult("ws://a", RelayAnswer.REJECTED, "invalid: bad signature")]
    assert isinstance(decide_publication(other, 1), Failed)
