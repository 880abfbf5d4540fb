"""Properties of the controller's pure screening of Request events."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from solders.keypair import Keypair

from dsproxy.domain.recharge import Recharge, RefusalReason, Refused, screen
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.messages import (
    DeviceStatus,
    Reason,
    RecoverInfo,
    Request,
    RequestPayload,
    Transaction,
)

ADDRESS = Address(
    "dephy-dsproxy-controller", "6811f61df33619422f8c7a99e4a1024e8bb0a51831ea1e62478cb695c56e2ab6"
)
ADMIN_SECRET = "ad" * 32
USER = str(Keypair.from_seed(bytes(32)).pubkey())
NOW = 1_800_000_000


def request_event(reason: Reason, to_status: DeviceStatus, deadline: int, secret: str):
    payload = RequestPayload(RecoverInfo(bytes(64), bytes(64), deadline).to_json(), 3, USER)
    return seal(Request(to_status, reason, "0" * 64, payload), ADDRESS, secret, created_at=NOW)


@given(
    reason=st.sampled_from(Reason),
    to_status=st.sampled_from(DeviceStatus),
    deadline=st.integers(NOW - 100, NOW + 100),
    margin=st.integers(0, 30),
    by_admin=st.booleans(),
)
def test_only_timely_working_requests_with_an_allowed_reason_pass(
    reason: Reason, to_status: DeviceStatus, deadline: int, margin: int, by_admin: bool
) -> None:
    from dsproxy.wire.event import public_key_of

    secret = ADMIN_SECRET if by_admin else "11" * 32
    event = request_event(reason, to_status, deadline, secret)
    decision = screen(event, ADDRESS, admin=public_key_of(ADMIN_SECRET), now=NOW,
                      deadline_margin_s=margin)  # fmt: skip
    allowed = reason is Reason.USER_REQUEST or by_admin
    timely = NOW + margin <= deadline
    if to_status is DeviceStatus.WORKING and allowed and timely:
        assert isinstance(decision, Recharge)
        assert (decision.request_id, decision.user, decision.nonce) == (event.id, USER, 3)
    else:
        assert isinstance(decision, Refused)
        assert decision.request_id == event.id and decision.detail


@given(machine=st.binary(min_size=32, max_size=32).map(bytes.hex))
def test_requests_for_other_machines_are_never_paid(machine: str) -> None:
    payload = RequestPayload(RecoverInfo(bytes(64), bytes(64), NOW + 600).to_json(), 0, USER)
    message = Request(DeviceStatus.WORKING, Reason.USER_REQUEST, "0" * 64, payload)
    event = seal(message, Address(ADDRESS.session, machine), "11" * 32, created_at=NOW)
    decision = screen(event, ADDRESS, admin=None, now=NOW, deadline_margin_s=0)
    if machine == ADDRESS.machine:
        assert isinstance(decision, Recharge)
    else:
        assert isinstance(decision, Refused)
        assert decision.reason is RefusalReason.NOT_FOR_THIS_MACHINE


def test_other_messages_are_not_requests() -> None:
    event = seal(Transaction(USER, 5), ADDRESS, "11" * 32, created_at=NOW)
    assert screen(event, ADDRESS, admin=None, now=NOW, deadline_margin_s=0) is None


@given(
    signed_for=st.none() | st.integers(0, 2**64 - 1),
    paid_in=st.none() | st.integers(0, 2**64 - 1),
)
def test_requests_signed_for_another_namespace_are_never_paid(
    signed_for: int | None, paid_in: int | None
) -> None:
    """The chain checks the signature over the namespace the controller pays in (v2), or none
    (v1): a Request stating another could only fail on chain, after costing a simulation."""
    info = RecoverInfo(bytes(64), bytes(64), NOW + 600).to_json()
    payload = RequestPayload(info, 0, USER, namespace_id=signed_for)
    message = Request(DeviceStatus.WORKING, Reason.USER_REQUEST, "0" * 64, payload)
    event = seal(message, ADDRESS, "11" * 32, created_at=NOW)
    decision = screen(
        event, ADDRESS, admin=None, now=NOW, deadline_margin_s=0, namespace_id=paid_in
    )
    if signed_for == paid_in:
        assert isinstance(decision, Recharge)
        assert decision.payload.namespace_id == paid_in
    else:
        assert isinstance(decision, Refused)
        assert decision.reason is RefusalReason.NOT_FOR_THIS_MACHINE
        assert "namespace" in decision.detail and decision.user == USER
