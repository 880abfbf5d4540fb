"""Our exception tree; foreign errors are translated into it at the adapter that meets them.

DsproxyError
├── ConfigError              bad configuration, named key and value (start-up refuses)
├── BadInput                 the caller sent something wrong; nothing was changed (HTTP 400)
│   ├── MalformedMessage     a DePHY message that does not parse or validate
│   └── InvalidEvent         a Nostr event whose id or signature does not verify
├── InsufficientTokens       not enough available balance (HTTP 402)
├── StoreError               the event store or projection could not be read or written
├── UpstreamError            the model server failed (HTTP 502)
│   └── UpstreamTimeout      ... by not answering in time (HTTP 504)
└── PaymentError             a Solana payment (balance-payment program) failed or is unknown
    ├── AccountDataInvalid   an account's bytes are not the layout the program writes
    ├── ProgramError         the transaction ran and the program refused it (`code`)
    │   ├── PaymentUnauthorized       6000: the bot (or authority) is not the configured one
    │   ├── PaymentInsufficientFunds  6001: vault - locked < amount
    │   ├── SignatureFormatInvalid    6002: signature or key is not a valid curve point
    │   ├── SignatureRecoveryFailed   6003
    │   ├── SignatureMismatch         6004: not signed by the user over the on-chain nonce
    │   ├── SignatureExpired          6005: the chain's clock is past the deadline
    │   └── AnchorConstraint          Anchor's own checks (2xxx/3xxx), e.g. a wrong treasury
    ├── TransactionFailed    the transaction failed for another reason (fees, rent, runtime)
    ├── TransactionExpired   its blockhash expired unprocessed: safe to build a new one
    └── RpcError             the RPC node failed, refused the request or was unreachable
        └── ConfirmationTimeout  not confirmed in time: check the signature before resending
"""

from __future__ import annotations

__all__ = [
    "AccountDataInvalid",
    "AnchorConstraint",
    "BadInput",
    "ConfigError",
    "ConfirmationTimeout",
    "DsproxyError",
    "InsufficientTokens",
    "InvalidEvent",
    "MalformedMessage",
    "PaymentError",
    "PaymentInsufficientFunds",
    "PaymentUnauthorized",
    "ProgramError",
    "RpcError",
    "SignatureExpired",
    "SignatureFormatInvalid",
    "SignatureMismatch",
    "SignatureRecoveryFailed",
    "StoreError",
    "TransactionExpired",
    "TransactionFailed",
    "UpstreamError",
    "UpstreamTimeout",
]


class DsproxyError(Exception):
    """Root of every error dsproxy raises on purpose."""


class ConfigError(DsproxyError):
    """A configuration value is missing or invalid."""


class BadInput(DsproxyError):
    """Input from outside is wrong; the operation changed nothing."""


class MalformedMessage(BadInput):
    """A DePHY message (event content) that does not follow the wire protocol."""


class InvalidEvent(BadInput):
    """A Nostr event that is not well formed or whose id or signature does not verify."""


class InsufficientTokens(DsproxyError):
    """The user's available balance does not cover the request."""

    def __init__(self, message: str, *, tokens_available: int, tokens_needed: int) -> None:
        super().__init__(message)
        self.tokens_available = tokens_available
        self.tokens_needed = tokens_needed


class StoreError(DsproxyError):
    """The event store or a projection database failed."""


class UpstreamError(DsproxyError):
    """The upstream model server failed or answered with an error."""


class UpstreamTimeout(UpstreamError):
    """The upstream model server did not answer in time."""


# --- Solana payments ---------------------------------------------------------------------------


class PaymentError(DsproxyError):
    """A payment on the balance-payment program failed, or its outcome is not known yet."""


class AccountDataInvalid(PaymentError):
    """An account's data does not have the program's discriminator or layout."""


class ProgramError(PaymentError):
    """The program refused the transaction with an error code; nothing but the fee moved."""

    code: int = -1
    name: str = "ProgramError"

    def __init__(
        self, message: str, *, code: int | None = None, instruction_index: int = 0
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.instruction_index = instruction_index


class PaymentUnauthorized(ProgramError):
    """6000 Unauthorized: the signing bot is not the program's configured bot."""

    code, name = 6000, "Unauthorized"


class PaymentInsufficientFunds(ProgramError):
    """6001 InsufficientFunds: the vault's free balance (lamports - locked) is below the amount."""

    code, name = 6001, "InsufficientFunds"


class SignatureFormatInvalid(ProgramError):
    """6002 SignatureFormatInvalid: the user key or the signature's R is not a curve point."""

    code, name = 6002, "SignatureFormatInvalid"


class SignatureRecoveryFailed(ProgramError):
    """6003 SignatureRecoveryFailed (declared by the program, not raised by v1's pay)."""

    code, name = 6003, "SignatureRecoveryFailed"


class SignatureMismatch(ProgramError):
    """6004 SignatureMismatch: not the user's signature over (payload, on-chain nonce, deadline)."""

    code, name = 6004, "SignatureMismatch"


class SignatureExpired(ProgramError):
    """6005 SignatureExpired: the chain's clock is past the signed deadline."""

    code, name = 6005, "SignatureExpired"


class AnchorConstraint(ProgramError):
    """An Anchor framework check failed (2xxx constraints, 3xxx accounts), e.g. wrong treasury."""

    def __init__(self, message: str, *, code: int, name: str, instruction_index: int = 0) -> None:
        super().__init__(message, code=code, instruction_index=instruction_index)
        self.name = name


class TransactionFailed(PaymentError):
    """The transaction failed outside the program's own checks (fees, rent, the runtime)."""

    def __init__(self, message: str, *, error: object = None) -> None:
        super().__init__(message)
        self.error = error


class TransactionExpired(PaymentError):
    """The blockhash expired and the transaction did not land: it never will, rebuild it."""


class RpcError(PaymentError):
    """The Solana RPC node failed, refused the request or could not be reached."""


class ConfirmationTimeout(RpcError):
    """No confirmation in time; the transaction may still land, so check its signature first."""

    def __init__(self, message: str, *, signature: str) -> None:
        super().__init__(message)
        self.signature = signature
