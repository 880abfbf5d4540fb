"""A recharge's lifecycle as local facts (eventsourcing aggregates), recorded before each step.

The Payment's id is derived from (user, on-chain nonce): the chain's own single-use unit, so a
second Request carrying the same signed nonce cannot even create a second payment. Each fact
is recorded before the step it enables (the signature before the first send), so a restart
after a crash at any point finishes the work instead of repeating it.

    Accepted -> Submitted -> Credited          (Status Working, Transaction, Status Available)
                   |  \\-> Expired -> Submitted (the blockhash ran out unprocessed: re-sign)
                   \\-> Failed                  (Status LockFailed)
"""

from __future__ import annotations

import uuid
from typing import Any

from eventsourcing.domain import Aggregate, event

__all__ = ["CRASH_POINTS", "Answered", "Payment", "PaymentState", "answer_id", "payment_id"]

# Where a test may have the controller killed (DSPROXY_CRASH_AT): after the payment is
# accepted, after its transaction is sent, after it is confirmed (each before the next fact).
CRASH_POINTS = frozenset({"accepted", "submitted", "confirmed"})

_NAMESPACE = uuid.UUID("0f3c1a6e-2b8d-5e47-9c1d-1573d5b0a9e1")


def payment_id(user: str, nonce: int, attempt: int = 0) -> uuid.UUID:
    """The payment a signed (user, nonce) makes; `attempt` counts the ones that failed before
    it (the chain's nonce moves only when a payment lands, so the user signs that nonce again)."""
    suffix = f":{attempt}" if attempt else ""
    return uuid.uuid5(_NAMESPACE, f"payment:{user}:{nonce}{suffix}")


def answer_id(request_id: str) -> uuid.UUID:
    """The one answer a Request event can ever get without a payment."""
    return uuid.uuid5(_NAMESPACE, f"answer:{request_id}")


class PaymentState:
    ACCEPTED = "accepted"
    SUBMITTED = "submitted"
    EXPIRED = "expired"
    CREDITED = "credited"
    FAILED = "failed"
    UNFINISHED = (ACCEPTED, SUBMITTED, EXPIRED)


class Payment(Aggregate):
    """One paid (or failed) recharge."""

    @event("Accepted")
    def __init__(
        self,
        user: str,
        nonce: int,
        request_id: str,
        request_content: str,
        amount_lamports: int,
        tokens: int,
    ) -> None:
        self.user = user
        self.nonce = nonce
        self.request_id = request_id
        self.request_content = request_content
        self.amount_lamports = amount_lamports
        self.tokens = tokens
        self.state = PaymentState.ACCEPTED
        self.signature: str | None = None  # the newest transaction's
        self.signatures: list[str] = []  # every transaction's, oldest first
        self.transaction: bytes | None = None
        self.last_valid_block_height: int | None = None
        self.attempts = 0
        self.event_ids: list[str] = []
        self.detail = ""
        self.expired_at: int | None = None

    @classmethod
    def accept(cls, *, attempt: int = 0, **fields: Any) -> Payment:
        """A new payment for (user, nonce) after `attempt` failed ones (`fields`: __init__'s)."""
        payment_uuid = payment_id(fields["user"], fields["nonce"], attempt)
        return cls._create(cls.Accepted, id=payment_uuid, **fields)

    @event("Submitted")
    def submit(self, signature: str, transaction: bytes, last_valid_block_height: int) -> None:
        assert self.state in (PaymentState.ACCEPTED, PaymentState.EXPIRED), self.state
        self.state = PaymentState.SUBMITTED
        self.signature = signature
        self.signatures.append(signature)
        self.transaction = transaction
        self.last_valid_block_height = last_valid_block_height
        self.attempts += 1

    @event("Expired")
    def expire(self, detail: str, at: int | None = None) -> None:
        """`at` (unix seconds) is when it was found expired (None in payments stored before)."""
        assert self.state == PaymentState.SUBMITTED, self.state
        self.state = PaymentState.EXPIRED
        self.detail = detail
        self.expired_at = at

    @event("Credited")
    def credit(self, event_ids: list[str]) -> None:
        # from Expired too: an RPC node that lagged called expired what had landed
        assert self.state in (PaymentState.SUBMITTED, PaymentState.EXPIRED), self.state
        self.state = PaymentState.CREDITED
        self.event_ids = event_ids

    @event("Failed")
    def fail(self, reason: str, detail: str, event_ids: list[str]) -> None:
        assert self.state in PaymentState.UNFINISHED, self.state
        self.state = PaymentState.FAILED
        self.detail = f"{reason}: {detail}"
        self.event_ids = event_ids


class Answered(Aggregate):
    """A Request refused before any payment, with the LockFailed status that says why."""

    @staticmethod
    def create_id(request_id: str, **_: object) -> uuid.UUID:
        return answer_id(request_id)

    @event("Refused")
    def __init__(self, request_id: str, reason: str, detail: str, status_event_id: str) -> None:
        self.request_id = request_id
        self.reason = reason
        self.detail = detail
        self.status_event_id = status_event_id
