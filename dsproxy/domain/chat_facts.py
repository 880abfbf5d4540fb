"""A chat's local facts, kept in the event store: its hold and how it ended (settled or
released), and settled charges issued as signed debit events.

A hold lives in the backend's memory while its chat runs; when the chat ends, the hold and its
outcome are recorded together, in one write, before the answer is complete. A crash mid-chat
leaves nothing: the user is never billed for an answer whose delivery we cannot prove.

The store itself enforces "one outcome per hold": a `HoldOutcome`'s id is derived from its hold's
id and its only event is its creation (Settled or Released), so a second outcome for the same
hold collides with the store's unique (id, version) key and is refused.

A Settled fact is the durable record of the charge. The Nostr debit comes after it, recorded in
one write with a `DebitIssued` fact that names the settled holds it covers. The wire format gives
a Transaction no nonce, so equal debits of one user in one second would share an id; a user's
settled charges are therefore issued together, one debit event per batch, each with a distinct
(amount, created_at). A crash between the two writes is finished on start-up: settled holds
without a debit are issued. Never lost, never doubled.
"""

from __future__ import annotations

import uuid
from typing import Any

from eventsourcing.domain import Aggregate

__all__ = ["DebitIssued", "Hold", "HoldOutcome", "debit_fact_id", "outcome_id"]

_OUTCOME_NAMESPACE = uuid.UUID("0d5e7c2a-4b1f-5a63-9c8e-1573a0c0ffee")
_DEBIT_NAMESPACE = uuid.UUID("7f1e2d3c-4b5a-5968-8776-1573deb17000")


def outcome_id(hold_id: uuid.UUID) -> uuid.UUID:
    """The one id any outcome of this hold can have."""
    return uuid.uuid5(_OUTCOME_NAMESPACE, hold_id.hex)


def debit_fact_id(event_id: str) -> uuid.UUID:
    """The one id the issue of this debit event can have."""
    return uuid.uuid5(_DEBIT_NAMESPACE, event_id)


class Hold(Aggregate):
    """Tokens reserved for one chat before the upstream is called."""

    class Taken(Aggregate.Created):
        user: str
        model: str
        tokens: int
        prompt_tokens: int
        completion_tokens_max: int

    def __init__(
        self, user: str, model: str, tokens: int, prompt_tokens: int, completion_tokens_max: int
    ) -> None:
        self.user = user
        self.model = model
        self.tokens = tokens
        self.prompt_tokens = prompt_tokens
        self.completion_tokens_max = completion_tokens_max

    @classmethod
    def take(
        cls,
        chat_id: uuid.UUID,
        user: str,
        model: str,
        tokens: int,
        prompt_tokens: int,
        completion_tokens_max: int,
    ) -> Hold:
        assert tokens > 0, tokens
        return cls._create(
            cls.Taken,
            id=chat_id,
            user=user,
            model=model,
            tokens=tokens,
            prompt_tokens=prompt_tokens,
            completion_tokens_max=completion_tokens_max,
        )


class HoldOutcome(Aggregate):
    """How a hold ended; created once, by exactly one of its two events."""

    class Settled(Aggregate.Created):
        hold_id: uuid.UUID
        user: str
        tokens_charged: int
        prompt_tokens: int
        completion_tokens: int

    class Released(Aggregate.Created):
        hold_id: uuid.UUID
        user: str
        reason: str

    def __init__(self, hold_id: uuid.UUID, user: str, **facts: Any) -> None:
        self.hold_id = hold_id
        self.user = user
        self.facts = facts

    @classmethod
    def settled(
        cls,
        hold_id: uuid.UUID,
        user: str,
        tokens_charged: int,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> HoldOutcome:
        assert tokens_charged > 0, tokens_charged  # a zero charge is a release
        return cls._create(
            cls.Settled,
            id=outcome_id(hold_id),
            hold_id=hold_id,
            user=user,
            tokens_charged=tokens_charged,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )

    @classmethod
    def released(cls, hold_id: uuid.UUID, user: str, reason: str) -> HoldOutcome:
        return cls._create(
            cls.Released, id=outcome_id(hold_id), hold_id=hold_id, user=user, reason=reason
        )


class DebitIssued(Aggregate):
    """A signed debit event covering these settled holds of one user (tokens = their sum)."""

    class Created(Aggregate.Created):
        user: str
        tokens: int
        event_id: str
        event: str  # the signed Nostr event, JSON
        hold_ids: list[str]

    def __init__(
        self, user: str, tokens: int, event_id: str, event: str, hold_ids: list[str]
    ) -> None:
        self.user, self.tokens, self.event_id = user, tokens, event_id
        self.event, self.hold_ids = event, hold_ids

    @classmethod
    def issue(
        cls, user: str, tokens: int, event_id: str, event: str, hold_ids: list[str]
    ) -> DebitIssued:
        assert tokens > 0 and hold_ids, (tokens, hold_ids)
        return cls._create(
            cls.Created,
            id=debit_fact_id(event_id),
            user=user,
            tokens=tokens,
            event_id=event_id,
            event=event,
            hold_ids=hold_ids,
        )
