"""Our exception tree; foreign errors are translated into it at the adapter that meets them.

DsproxyError
├── ConfigError              bad configuration, named key and value (start-up refuses)
├── BadInput                 the caller sent something wrong; nothing was changed (HTTP 400)
│   ├── MalformedMessage     a DePHY message that does not parse or validate
│   ├── InvalidEvent         a Nostr event whose id or signature does not verify
│   ├── InvalidParameter     one named request parameter is wrong (`param`, `code`)
│   └── ContextTooLong       the prompt does not fit the model's context window
├── InsufficientTokens       not enough available balance (HTTP 402)
├── StoreError               the event store or projection could not be read or written
├── UpstreamError            the model server failed (HTTP 502)
│   ├── UpstreamTimeout      ... by not answering in time (HTTP 504)
│   ├── UpstreamRejected     ... because it refused the request itself (HTTP 400, passed on)
│   ├── UpstreamUnauthorized ... because it refused the operator's key (401/403 -> HTTP 502)
│   ├── UpstreamQuotaExhausted ... because the operator's account is empty (402 -> HTTP 503)
│   ├── UpstreamRateLimited  ... because it rate-limits the operator (429 -> HTTP 429)
│   └── UpstreamCut          ... by ending a stream before it was complete
├── AuthenticationFailed     no, a wrong, expired, replayed or revoked credential (HTTP 401)
├── NotFound                 no such resource for this user; others' look the same (HTTP 404)
├── RateLimited              a per-user limit on requests or concurrency (HTTP 429)
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
    "AuthenticationFailed",
    "BadInput",
    "ConfigError",
    "ConfirmationTimeout",
    "ContextTooLong",
    "DsproxyError",
    "InsufficientTokens",
    "InvalidEvent",
    "InvalidParameter",
    "MalformedMessage",
    "NotFound",
    "PaymentError",
    "PaymentInsufficientFunds",
    "PaymentUnauthorized",
    "ProgramError",
    "RateLimited",
    "RpcError",
    "SignatureExpired",
    "SignatureFormatInvalid",
    "SignatureMismatch",
    "SignatureRecoveryFailed",
    "StoreError",
    "TransactionExpired",
    "TransactionFailed",
    "UpstreamCut",
    "UpstreamError",
    "UpstreamQuotaExhausted",
    "UpstreamRateLimited",
    "UpstreamRejected",
    "UpstreamTimeout",
    "UpstreamUnauthorized",
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


class DuplicateEvent(StoreError):
    """An event that had to be new is already stored (same id): nothing was written."""


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


# --- the backend's HTTP API ---------------------------------------------------------------------


class UpstreamRejected(UpstreamError):
    """The model server refused the request as invalid (its 400/404/422): the caller's to fix."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class UpstreamUnauthorized(UpstreamError):
    """The model server refused the operator's API key (401/403): the operator's to fix."""


class UpstreamQuotaExhausted(UpstreamError):
    """The operator's account at the model server has run out (402)."""


class UpstreamRateLimited(UpstreamError):
    """The model server rate-limits the operator (429); retrying later may work."""

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # as the model server said, passed on to the client


class UpstreamCut(UpstreamError):
    """A streamed answer ended without its end marker (connection lost, malformed chunk)."""


class AuthenticationFailed(DsproxyError):
    """No credential, or a wrong, expired, replayed or revoked one."""


class ClientGone(DsproxyError):
    """The client closed its connection before its answer: a chat still waiting for the model
    is cancelled and charged nothing (one already being settled keeps its charge)."""


class NotFound(DsproxyError):
    """The resource does not exist for this user (another user's is reported the same way)."""


class RateLimited(DsproxyError):
    """A per-user limit (requests per minute, concurrent requests) refused the request."""

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ContextTooLong(BadInput):
    """The prompt alone does not fit the model's context window; nothing was charged."""


class InvalidParameter(BadInput):
    """One request parameter is wrong; `param` names it and `code` is the OpenAI error code."""

    def __init__(self, message: str, *, param: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code
