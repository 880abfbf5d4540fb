"""May the bot take this payment? The program's own checks, done off-chain before paying.

Checking first means a doomed `pay` is never sent (it would burn the fee and, worse, tell us
nothing we could not know). The order follows the program: the signature is checked against
the ON-CHAIN nonce (so a Request's nonce must equal it), then the deadline (`now > deadline`
fails on chain), then the vault's free balance (`vault - locked >= amount`). One rule the
program does not state but the runtime enforces: a vault left with fewer lamports than rent
exemption (but more than zero) fails the whole transaction.
"""

from __future__ import annotations

import enum

from attrs import frozen

from dsproxy.wire.messages import RecoverInfo
from dsproxy.wire.recover import SIGN_MESSAGE_PREFIX_V1, verify_recover

__all__ = [
    "VAULT_RENT_EXEMPT_LAMPORTS",
    "Eligible",
    "Ineligible",
    "IneligibleReason",
    "OnChainUser",
    "check_eligible",
]

# Rent exemption of a 0-byte system account (the vault) at the default rent.
VAULT_RENT_EXEMPT_LAMPORTS = 890_880


class IneligibleReason(enum.Enum):
    """Why a payment would fail; each maps to the program error it avoids."""

    NOT_REGISTERED = "not_registered"  # no USER account: Anchor AccountNotInitialized
    NONCE_MISMATCH = "nonce_mismatch"  # stale or replayed signature: SignatureMismatch
    SIGNATURE_INVALID = "signature_invalid"  # another key, tampered payload: SignatureMismatch
    DEADLINE_PASSED = "deadline_passed"  # SignatureExpired
    INSUFFICIENT_FREE_BALANCE = "insufficient_free_balance"  # InsufficientFunds
    VAULT_BELOW_RENT = "vault_below_rent"  # runtime InsufficientFundsForRent


@frozen
class OnChainUser:
    """What the chain says about a user right now."""

    nonce: int
    locked_lamports: int
    vault_lamports: int

    @property
    def free_lamports(self) -> int:
        return self.vault_lamports - self.locked_lamports


@frozen
class Eligible:
    """The payment should succeed if the chain does not change before it lands."""

    nonce: int
    amount: int
    free_lamports: int


@frozen
class Ineligible:
    """The payment would fail; `detail` says why in words a user can act on."""

    reason: IneligibleReason
    detail: str


def check_eligible(
    recover_info: RecoverInfo,
    *,
    user: str,
    request_nonce: int,
    onchain: OnChainUser | None,
    amount: int,
    now: int,
    deadline_margin_s: int = 0,
    vault_rent_exempt_lamports: int = VAULT_RENT_EXEMPT_LAMPORTS,
    namespace_id: int | None = None,
    prefix: bytes = SIGN_MESSAGE_PREFIX_V1,
) -> Eligible | Ineligible:
    """Decide as the program would; `deadline_margin_s` leaves time for the transaction to land."""
    assert amount > 0 and deadline_margin_s >= 0, (amount, deadline_margin_s)
    if onchain is None:
        return Ineligible(IneligibleReason.NOT_REGISTERED, f"user {user} has not registered")
    if request_nonce != onchain.nonce:
        return Ineligible(
            IneligibleReason.NONCE_MISMATCH,
            f"signed for nonce {request_nonce}, the chain expects {onchain.nonce}",
        )
    if not verify_recover(
        recover_info, user, onchain.nonce, namespace_id=namespace_id, prefix=prefix
    ):
        return Ineligible(
            IneligibleReason.SIGNATURE_INVALID,
            f"not a signature by {user} over this payload, nonce and deadline",
        )
    if now + deadline_margin_s > recover_info.deadline:
        return Ineligible(
            IneligibleReason.DEADLINE_PASSED,
            f"deadline {recover_info.deadline} is before now {now} + margin {deadline_margin_s}s",
        )
    if onchain.free_lamports < amount:
        return Ineligible(
            IneligibleReason.INSUFFICIENT_FREE_BALANCE,
            f"vault has {onchain.free_lamports} free lamports, the payment needs {amount}",
        )
    left = onchain.vault_lamports - amount
    if 0 < left < vault_rent_exempt_lamports:
        return Ineligible(
            IneligibleReason.VAULT_BELOW_RENT,
            f"the vault would keep {left} lamports, below rent exemption "
            f"({vault_rent_exempt_lamports}); pay all or leave at least that much",
        )
    return Eligible(nonce=onchain.nonce, amount=amount, free_lamports=onchain.free_lamports)
