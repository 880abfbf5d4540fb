"""check_eligible against a direct statement of the program's rules, on arbitrary inputs."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from solders.keypair import Keypair

from dsproxy.domain.eligibility import (
    VAULT_RENT_EXEMPT_LAMPORTS,
    Eligible,
    Ineligible,
    IneligibleReason,
    OnChainUser,
    check_eligible,
)
from dsproxy.wire.recover import sign_recover

USER = Keypair.from_seed(bytes([7] * 32))
OTHER = Keypair.from_seed(bytes([8] * 32))
NOW = 1_800_000_000

lamports = st.integers(min_value=0, max_value=10**10)


@given(
    signed_nonce=st.integers(0, 3),
    onchain_nonce=st.integers(0, 3),
    by_user=st.booleans(),
    deadline_offset=st.integers(-5, 5),
    margin=st.integers(0, 3),
    vault=lamports,
    locked=lamports,
    amount=st.integers(min_value=1, max_value=10**10),
    payload=st.binary(min_size=64, max_size=64),
)
def test_eligible_exactly_when_every_rule_holds(
    signed_nonce: int,
    onchain_nonce: int,
    by_user: bool,
    deadline_offset: int,
    margin: int,
    vault: int,
    locked: int,
    amount: int,
    payload: bytes,
) -> None:
    info = sign_recover(USER if by_user else OTHER, payload, signed_nonce, NOW + deadline_offset)
    decision = check_eligible(
        info,
        user=str(USER.pubkey()),
        request_nonce=signed_nonce,
        onchain=OnChainUser(onchain_nonce, locked, vault),
        amount=amount,
        now=NOW,
        deadline_margin_s=margin,
    )
    left = vault - amount
    rules = {
        IneligibleReason.NONCE_MISMATCH: signed_nonce == onchain_nonce,
        IneligibleReason.SIGNATURE_INVALID: by_user,
        IneligibleReason.DEADLINE_PASSED: NOW + margin <= NOW + deadline_offset,
        IneligibleReason.INSUFFICIENT_FREE_BALANCE: vault - locked >= amount,
        IneligibleReason.VAULT_BELOW_RENT: not 0 < left < VAULT_RENT_EXEMPT_LAMPORTS,
    }
    broken = [reason for reason, holds in rules.items() if not holds]
    if broken:
        assert isinstance(decision, Ineligible)
        assert decision.reason is broken[0]  # the first rule the program would trip
    else:
        assert decision == Eligible(
            nonce=onchain_nonce, amount=amount, free_lamports=vault - locked
        )
