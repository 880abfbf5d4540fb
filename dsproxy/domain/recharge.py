"""What the controller does with a Request event: pure decisions, no chain, no clock of its own.

`screen` checks everything that can be checked without the chain (envelope, message, reason,
deadline). The chain-dependent checks are `dsproxy.domain.eligibility.check_eligible`. The
messages the controller signs afterwards are built here too, so their order and fields are in
one place: Status{Working} -> Transaction{+tokens} -> Status{Available, UserBehaviour} on
success, Status{Available, LockFailed} with a reason on failure.
"""

from __future__ import annotations

import enum

from attrs import frozen

from dsproxy.errors import MalformedMessage
from dsproxy.wire.envelope import Address
from dsproxy.wire.event import NostrEvent
from dsproxy.wire.messages import (
    ZERO_EVENT_ID,
    DeviceStatus,
    Reason,
    RecoverInfo,
    Request,
    RequestPayload,
    Status,
    StatusPayload,
    Transaction,
    parse_message,
)

__all__ = [
    "Recharge",
    "RefusalReason",
    "Refused",
    "failure_status",
    "recharge_request",
    "screen",
    "success_messages",
    "tokens_for",
]


class RefusalReason(enum.Enum):
    """Why a Request is not paid; the value is what the user reads in the LockFailed status."""

    NOT_FOR_THIS_MACHINE = "not_for_this_machine"
    MALFORMED = "malformed"
    NOT_A_RECHARGE = "not_a_recharge"
    ADMIN_ONLY = "admin_only"
    DEADLINE_PASSED = "deadline_passed"
    NONCE_ALREADY_USED = "nonce_already_used"
    NOT_REGISTERED = "not_registered"
    NONCE_MISMATCH = "nonce_mismatch"
    SIGNATURE_INVALID = "signature_invalid"
    INSUFFICIENT_FREE_BALANCE = "insufficient_free_balance"
    VAULT_BELOW_RENT = "vault_below_rent"
    PAYMENT_FAILED = "payment_failed"


@frozen
class Recharge:
    """A Request worth checking against the chain."""

    request_id: str
    requester: str
    reason: Reason
    payload: RequestPayload
    recover: RecoverInfo

    @property
    def user(self) -> str:
        return self.payload.user

    @property
    def nonce(self) -> int:
        return self.payload.nonce


@frozen
class Refused:
    """A Request that will not be paid, and the words that tell the user why."""

    request_id: str
    reason: RefusalReason
    detail: str
    user: str | None = None


def screen(
    event: NostrEvent,
    address: Address,
    *,
    admin: str | None,
    now: int,
    deadline_margin_s: int,
    namespace_id: int | None = None,
) -> Recharge | Refused | None:
    """Decide on a Request event without the chain; None means it is not a Request at all.

    `namespace_id` is the namespace this controller pays in (balance-payment v2; None for v1).
    The chain checks the user's signature over that namespace, so a Request signed for another
    one (or for none) could only fail there."""
    if not address.matches(event):
        return Refused(event.id, RefusalReason.NOT_FOR_THIS_MACHINE, "wrong kind, session or p tag")
    try:
        message = parse_message(event.content)
    except MalformedMessage as exc:
        if '"Request"' not in event.content[:16]:
            return None
        return Refused(event.id, RefusalReason.MALFORMED, str(exc))
    if not isinstance(message, Request):
        return None
    user = message.payload.user
    if message.to_status is not DeviceStatus.WORKING:
        return Refused(event.id, RefusalReason.NOT_A_RECHARGE, "a recharge asks for Working", user)
    if message.reason is not Reason.USER_REQUEST and event.pubkey != admin:
        return Refused(
            event.id,
            RefusalReason.ADMIN_ONLY,
            f"reason {message.reason.value} is reserved for the admin key",
            user,
        )
    if message.payload.namespace_id != namespace_id:
        return Refused(
            event.id,
            RefusalReason.NOT_FOR_THIS_MACHINE,
            f"signed for {_namespace(message.payload.namespace_id)}; "
            f"this machine is paid in {_namespace(namespace_id)}",
            user,
        )
    recover = message.payload.recover
    if now + deadline_margin_s > recover.deadline:
        return Refused(
            event.id,
            RefusalReason.DEADLINE_PASSED,
            f"the signature's deadline {recover.deadline} has passed (now {now})",
            user,
        )
    return Recharge(event.id, event.pubkey, message.reason, message.payload, recover)


def _namespace(namespace_id: int | None) -> str:
    return (
        "no namespace (balance-payment v1)" if namespace_id is None else f"namespace {namespace_id}"
    )


def recharge_request(
    info: RecoverInfo, nonce: int, user: str, namespace_id: int | None = None
) -> Request:
    """The Request the dApp sends for a recharge: Working, UserRequest, no initial request."""
    return Request(
        to_status=DeviceStatus.WORKING,
        reason=Reason.USER_REQUEST,
        initial_request=ZERO_EVENT_ID,
        payload=RequestPayload(
            info.to_json(v2=namespace_id is not None),
            nonce=nonce,
            user=user,
            namespace_id=namespace_id,
        ),
    )


def tokens_for(amount_lamports: int, tokens_per_lamport: int) -> int:
    """Tokens a payment buys."""
    return amount_lamports * tokens_per_lamport


def success_messages(recharge: Recharge, tokens: int) -> tuple[Status, Transaction, Status]:
    """The three messages of a paid recharge, in the order the dApp expects them."""
    payload = StatusPayload.answering(recharge.payload).to_json()
    return (
        Status(DeviceStatus.WORKING, recharge.reason, recharge.request_id, payload),
        Transaction(recharge.user, tokens),
        Status(DeviceStatus.AVAILABLE, Reason.USER_BEHAVIOUR, recharge.request_id, payload),
    )


def failure_status(refused: Refused) -> Status:
    """The LockFailed status that tells the user why nothing was paid."""
    return Status(
        DeviceStatus.AVAILABLE,
        Reason.LOCK_FAILED,
        refused.request_id,
        f"{refused.reason.value}: {refused.detail}",
    )
