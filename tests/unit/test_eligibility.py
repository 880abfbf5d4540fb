"""check_eligible decides as the program would, naming the reason when it refuses."""

from __future__ import annotations

import pytest
from solders.keypair import Keypair

from dsproxy.domain.eligibility import (
    VAULT_RENT_EXEMPT_LAMPORTS,
    Eligible,
    Ineligible,
    IneligibleReason,
    OnChainUser,
    check_eligible,
)
from dsproxy.wire.recover import new_payload, sign_recover

NOW = 1_800_000_000
USER = Keypair.from_seed(bytes(range(32)))
AMOUNT = 5_000_000


def _check(
    *,
    nonce: int = 3,
    request_nonce: int = 3,
    deadline: int = NOW + 60,
    signer: Keypair = USER,
    vault: int = 20_000_000,
    locked: int = 0,
    amount: int = AMOUNT,
    margin: int = 0,
    registered: bool = True,
) -> Eligible | Ineligible:
    info = sign_recover(signer, new_payload(), request_nonce, deadline)
    onchain = OnChainUser(nonce, locked, vault) if registered else None
    return check_eligible(
        info,
        user=str(USER.pubkey()),
        request_nonce=request_nonce,
        onchain=onchain,
        amount=amount,
        now=NOW,
        deadline_margin_s=margin,
    )


def test_a_valid_request_is_eligible_with_its_free_balance() -> None:
    assert _check(locked=1_000_000) == Eligible(nonce=3, amount=AMOUNT, free_lamports=19_000_000)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"registered": False}, IneligibleReason.NOT_REGISTERED),
        ({"request_nonce": 2}, IneligibleReason.NONCE_MISMATCH),
        ({"signer": Keypair.from_seed(bytes(32))}, IneligibleReason.SIGNATURE_INVALID),
        ({"deadline": NOW - 1}, IneligibleReason.DEADLINE_PASSED),
        ({"deadline": NOW + 5, "margin": 10}, IneligibleReason.DEADLINE_PASSED),
        ({"vault": AMOUNT - 1}, IneligibleReason.INSUFFICIENT_FREE_BALANCE),
        ({"vault": 20_000_000, "locked": 16_000_000}, IneligibleReason.INSUFFICIENT_FREE_BALANCE),
        ({"vault": AMOUNT + 1}, IneligibleReason.VAULT_BELOW_RENT),
    ],
)
def test_each_failing_rule_is_refused_with_its_reason(
    changes: dict[str, object], reason: IneligibleReason
) -> None:
    decision = _check(**changes)  # type: ignore[arg-type]
    assert isinstance(decision, Ineligible)
    assert decision.reason is reason
    assert decision.detail


def test_deadline_equal_to_now_is_still_eligible_as_on_chain() -> None:
    assert isinstance(_check(deadline=NOW), Eligible)


def test_emptying_the_vault_exactly_is_eligible() -> None:
    assert isinstance(_check(vault=AMOUNT), Eligible)
    assert isinstance(_check(vault=AMOUNT + VAULT_RENT_EXEMPT_LAMPORTS), Eligible)
