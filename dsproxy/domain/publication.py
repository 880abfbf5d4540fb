"""Publishing our own events: what a relay's answer means, what to do next, and the fact kept.

A relay answers an EVENT with `OK true`, or `OK false` and a NIP-01 reason such as
`"invalid: bad signature"`. `duplicate:` means the relay has the event already (nostr-relay
answers OK false for it), so it counts as an acknowledgement. Reasons that can never change for
this event (`invalid:`, `blocked:`, `pow:`, `restricted:`, `rejected:`) are permanent: the event is
recorded as failed and the outbox moves on, unless what every relay refuses is the event's age
(`invalid: ... too old`): relays allow `created_at` only so far from their clock (the DePHY
relay about 30 s), and an event kept through a longer outage can never be published as it is.
It is then signed again with a new `created_at` (a `Replacement` fact), which the ledger counts
in its place, never beside it. Anything else is transient: the outbox retries with
backoff, in order. A relay that is down, or says `rate-limited:` (it asks us to come back
later), delays publication for as long as it lasts, and so does one relay refusing for good
while another is down; every other refusal (`error:`, or a relay's own words without a prefix)
is recorded with its reason and counts against a budget, after which the event fails. A failed
event is offered again now and then (the outbox); a relay that takes it then publishes it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence

from attrs import frozen
from eventsourcing.domain import Aggregate, event

__all__ = [
    "Acknowledged",
    "Decision",
    "Failed",
    "Outcome",
    "Publication",
    "RelayAnswer",
    "RelayResult",
    "Replacement",
    "RetryLater",
    "Stale",
    "answer_of",
    "decide_publication",
    "is_permanent",
    "is_stale",
    "retry_delay_ms",
]

PERMANENT_PREFIXES = ("invalid", "blocked", "pow", "restricted", "rejected")
ACKNOWLEDGING_PREFIXES = ("duplicate",)
UNCOUNTED_PREFIXES = ("rate-limited",)  # "later", not "no": like an outage, never gives up
_NIP01_PREFIX = re.compile(r"^([a-z][a-z-]*):", re.IGNORECASE)
# how relays word a `created_at` outside their window (nostr-relay, nostr-rs-relay, strfry)
_STALE_WORDS = re.compile(
    r"too (old|early|far|late)|created.?at|in the (past|future)|timestamp", re.IGNORECASE
)


class RelayAnswer(enum.Enum):
    """How one relay answered one publish attempt."""

    ACCEPTED = "accepted"  # OK true (or duplicate: it has the event)
    REJECTED = "rejected"  # OK false with a machine-readable NIP-01 reason
    UNREACHABLE = "unreachable"  # no answer: not connected, timed out, connection lost


class Outcome(enum.Enum):
    """What a Publication fact records."""

    ACKNOWLEDGED = "acknowledged"
    REJECTED = "rejected"  # a transient rejection: still pending
    FAILED = "failed"  # permanent: the outbox gave up on this event


@frozen
class RelayResult:
    """One relay's answer to one publish attempt, with the relay's own words."""

    relay: str
    answer: RelayAnswer
    reason: str = ""


def _prefix(reason: str) -> str | None:
    match = _NIP01_PREFIX.match(reason.strip())
    return match.group(1).lower() if match else None


def answer_of(relay: str, accepted: bool, reason: str) -> RelayResult:
    """Classify a relay's `OK`: a refusal is a rejection even without a NIP-01 prefix (the
    relay's own words, kept so that `dsproxy outbox` shows them)."""
    if accepted:
        return RelayResult(relay, RelayAnswer.ACCEPTED, reason)
    if _prefix(reason) in ACKNOWLEDGING_PREFIXES:
        return RelayResult(relay, RelayAnswer.ACCEPTED, reason)
    return RelayResult(relay, RelayAnswer.REJECTED, reason or "refused without a reason")


def is_permanent(reason: str) -> bool:
    """True for NIP-01 reasons that will not change however often we retry."""
    return _prefix(reason) in PERMANENT_PREFIXES


def is_stale(reason: str) -> bool:
    """True for a refusal of the event's `created_at` (it is outside the relay's window)."""
    return _prefix(reason) == "invalid" and _STALE_WORDS.search(reason) is not None


@frozen
class Acknowledged:
    relays: tuple[str, ...]


@frozen
class Stale:
    """Every relay refused the event for good, at least one for its age: sign it again."""

    reason: str


@frozen
class Failed:
    reason: str


@frozen
class RetryLater:
    """Try again after a delay; `rejection` is the refusal to record and count (None if the
    relays were unreachable, rate-limiting, or refused for good while others were down)."""

    reason: str
    rejection: str | None


Decision = Acknowledged | Failed | RetryLater | Stale


def _describe(results: Sequence[RelayResult]) -> str:
    return "; ".join(f"{r.relay}: {r.reason or r.answer.value}" for r in results)


def decide_publication(
    results: Sequence[RelayResult],
    relays_total: int,
    rejections_so_far: int = 0,
    rejections_max: int = 20,
) -> Decision:
    """One relay acknowledging is enough; every relay refusing for good is a failure.

    Other refusals count against `rejections_max`; a relay being unreachable or rate-limiting
    never does, so an outage only delays publication.
    """
    assert relays_total >= 1, relays_total
    accepted = tuple(r.relay for r in results if r.answer is RelayAnswer.ACCEPTED)
    if accepted:
        return Acknowledged(accepted)
    rejected = [r for r in results if r.answer is RelayAnswer.REJECTED]
    permanent = [r for r in rejected if is_permanent(r.reason)]
    if permanent and len(permanent) == len(results) == relays_total:
        if any(is_stale(r.reason) for r in permanent):
            return Stale(_describe(permanent))
        return Failed(_describe(permanent))
    # a refusal for good by some relays while others are down waits for those (not counted)
    counted = [
        r
        for r in rejected
        if not is_permanent(r.reason) and _prefix(r.reason) not in UNCOUNTED_PREFIXES
    ]
    if counted and rejections_so_far + 1 >= rejections_max:
        return Failed(f"gave up after {rejections_max} rejections: {_describe(counted)}")
    if counted:
        return RetryLater(_describe(results), _describe(counted))
    return RetryLater(_describe(results) or "no relay configured", None)


def retry_delay_ms(attempt: int, delay_ms_min: int, delay_ms_max: int, spread: float = 1.0) -> int:
    """Exponential backoff, min * 2**attempt capped at max, times `spread` (the caller's jitter)."""
    assert 0 < spread <= 1, spread
    return int(min(delay_ms_min * 2 ** min(attempt, 32), delay_ms_max) * spread)


class Publication(Aggregate):
    """The recorded outcome of publishing one stored event: one aggregate per outcome.

    Never reloaded, so it never grows; the outbox projection folds these facts, in store order,
    into the `outbox` table.
    """

    @event("Recorded")
    def __init__(self, event_id: str, outcome: str, relays: list[str], reason: str) -> None:
        self.event_id = event_id
        self.outcome = outcome
        self.relays = relays
        self.reason = reason

    @classmethod
    def record(
        cls, event_id: str, outcome: Outcome, relays: Sequence[str], reason: str
    ) -> Publication:
        return cls(event_id, outcome.value, list(relays), reason)


class Replacement(Aggregate):
    """One of our events that relays refused for its age, signed again with a new `created_at`
    (`replacement_id`). Recorded in one write with the new event; the ledger counts the new one
    in the old one's place, and the outbox publishes it instead."""

    @event("Recorded")
    def __init__(self, event_id: str, replacement_id: str, reason: str) -> None:
        self.event_id = event_id
        self.replacement_id = replacement_id
        self.reason = reason
