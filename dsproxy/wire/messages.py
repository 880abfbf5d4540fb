"""DePHY messages: the JSON content of kind-1573 events, exactly as serde writes it.

Three levels of JSON: the message (`{"Request": {...}}`), its `payload` (a JSON string), and the
payload's `recover_info` (another JSON string). Parsing is strict, as serde is: unknown variants,
missing or duplicate fields, wrong types and out-of-range integers are refused with a
`MalformedMessage` that names the field. Serializing gives the bytes the Rust, Go and TS peers
write, so `to_content(parse_message(s)) == s` for every message they produce.
"""

from __future__ import annotations

import enum
import functools
import json
import re
from collections.abc import Callable
from typing import Any, TypeAlias

import orjson
from attrs import field, frozen
from solders.pubkey import Pubkey

from dsproxy.errors import MalformedMessage

__all__ = [
    "I64_MAX",
    "I64_MIN",
    "U64_MAX",
    "ZERO_EVENT_ID",
    "DeviceStatus",
    "Message",
    "Reason",
    "RecoverInfo",
    "Request",
    "RequestPayload",
    "Status",
    "StatusPayload",
    "Transaction",
    "parse_message",
    "to_content",
    "validate_event_id",
    "validate_user",
]

I64_MIN = -(2**63)
I64_MAX = 2**63 - 1
U64_MAX = 2**64 - 1
ZERO_EVENT_ID = "0" * 64
_HEX = frozenset("0123456789abcdef")


class DeviceStatus(enum.Enum):
    """The machine state a Request asks for or a Status reports."""

    AVAILABLE = "Available"
    WORKING = "Working"


class Reason(enum.Enum):
    """Why a status changes; serde writes the variant name."""

    USER_REQUEST = "UserRequest"
    ADMIN_REQUEST = "AdminRequest"
    USER_BEHAVIOUR = "UserBehaviour"
    RESET = "Reset"
    LOCK_FAILED = "LockFailed"


# --- field validators: each raises MalformedMessage naming the field -------------------------


def _fail(where: str, problem: str) -> MalformedMessage:
    return MalformedMessage(f"{where}: {problem}")


def _int_in(value: Any, where: str, low: int, high: int) -> int:
    if type(value) is not int:  # bool is an int subclass; serde refuses it, and floats
        raise _fail(where, f"must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise _fail(where, f"{value} is outside [{low}, {high}]")
    return value


def _string(value: Any, where: str) -> str:
    if type(value) is not str:
        raise _fail(where, f"must be a string, got {type(value).__name__}")
    return value


def _byte_array_64(value: Any, where: str) -> bytes:
    if type(value) is not list or len(value) != 64:
        size = len(value) if type(value) is list else type(value).__name__
        raise _fail(where, f"must be an array of exactly 64 bytes, got {size}")
    for index, item in enumerate(value):
        _int_in(item, f"{where}[{index}]", 0, 255)
    return bytes(value)


def validate_user(value: Any, where: str = "user") -> str:
    """A Solana public key: base58 text of exactly 32 bytes, in canonical form."""
    text = _string(value, where)
    # 32 bytes are 32 to 44 base58 characters; the length check keeps junk out of the cache
    if not 32 <= len(text) <= 44 or not _is_canonical_pubkey(text):
        raise _fail(where, f"{text[:64]!r} is not a 32-byte base58 Solana public key")
    return text


@functools.lru_cache(maxsize=65_536)
def _is_canonical_pubkey(text: str) -> bool:
    """Cached: a ledger names the same users again and again, and base58 decoding is slow."""
    try:
        return str(Pubkey.from_string(text)) == text
    except ValueError:
        return False


def validate_event_id(value: Any, where: str = "initial_request") -> str:
    """A Nostr event id: 64 lowercase hex characters."""
    text = _string(value, where)
    if len(text) != 64 or not _HEX.issuperset(text):
        raise _fail(where, f"{text!r} is not 64 lowercase hex characters")
    return text


def _enum(kind: type[enum.Enum], value: Any, where: str) -> Any:
    text = _string(value, where)
    try:
        return kind(text)
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise _fail(where, f"unknown variant {text!r}, expected one of {allowed}") from None


# --- strict JSON ------------------------------------------------------------------------------


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _fail("json", f"duplicate field {duplicate!r}")
    return result


def _reject_constant(name: str) -> Any:
    raise _fail("json", f"{name} is not valid JSON")


def _loads(text: Any, where: str) -> Any:
    if type(text) is not str:
        raise _fail(where, f"must be a JSON string, got {type(text).__name__}")
    # Fast path: text that orjson writes back unchanged is compact JSON with no duplicate
    # keys and no NaN, which is all our peers produce. Anything else takes the strict path.
    # orjson reads 1024 levels of nesting but writes only 254: anyone can sign content in
    # between, and it must be refused here, never crash whoever folds the log.
    try:
        value = orjson.loads(text)
        if orjson.dumps(value) == text.encode():
            return value
    except (orjson.JSONDecodeError, orjson.JSONEncodeError, UnicodeEncodeError):
        pass
    try:
        return json.loads(
            text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as exc:
        raise _fail(where, f"not valid JSON ({exc.msg} at char {exc.pos})") from None
    except RecursionError:
        raise _fail(where, "nested too deeply") from None
    except MalformedMessage as exc:
        raise _fail(where, str(exc)) from None
    except ValueError as exc:  # an integer of over 4,300 digits: once, it stopped every fold
        raise _fail(where, f"not valid JSON ({exc})") from None


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _fields(obj: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> Any:
    if type(obj) is not dict:
        raise _fail(where, f"must be a JSON object, got {type(obj).__name__}")
    if len(obj) == len(required) and all(name in obj for name in required):
        return obj
    missing = [name for name in required if name not in obj]
    if missing:
        raise _fail(where, f"missing field {missing[0]!r}")
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
        raise _fail(where, f"unknown field {unknown[0]!r}")
    return obj


# --- the nested payloads ----------------------------------------------------------------------


@frozen
class RecoverInfo:
    """The user's wallet signature over (payload, nonce, deadline): the third level of JSON."""

    signature: bytes = field(repr=lambda b: b.hex())
    payload: bytes = field(repr=lambda b: b.hex())
    deadline: int

    @classmethod
    def parse(cls, text: Any) -> RecoverInfo:
        """balance-payment v2 calls the payload `extra_data` (its dApp and SDK write that)."""
        obj = _loads(text, "recover_info")
        name = "extra_data" if isinstance(obj, dict) and "extra_data" in obj else "payload"
        obj = _fields(obj, "recover_info", ("signature", name, "deadline"))
        return cls(
            signature=_byte_array_64(obj["signature"], "recover_info.signature"),
            payload=_byte_array_64(obj[name], f"recover_info.{name}"),
            deadline=_int_in(obj["deadline"], "recover_info.deadline", I64_MIN, I64_MAX),
        )

    def to_json(self, *, v2: bool = False) -> str:
        """As v1's dApp writes it; `v2`: as v2's (`extra_data`), which its SDK requires."""
        return _dumps(
            {
                "signature": list(self.signature),
                "extra_data" if v2 else "payload": list(self.payload),
                "deadline": self.deadline,
            }
        )


@frozen
class RequestPayload:
    """A recharge Request's payload; recover_info stays the verbatim string the dApp sent."""

    recover_info: str
    nonce: int
    user: str
    namespace_id: int | None = None  # balance-payment v2 only

    @classmethod
    def parse(cls, text: Any) -> RequestPayload:
        obj = _fields(
            _loads(text, "payload"), "payload", ("recover_info", "nonce", "user"), ("namespace_id",)
        )
        recover_info = _string(obj["recover_info"], "payload.recover_info")
        RecoverInfo.parse(recover_info)
        namespace_id = obj.get("namespace_id")
        return cls(
            recover_info=recover_info,
            nonce=_int_in(obj["nonce"], "payload.nonce", 0, U64_MAX),
            user=validate_user(obj["user"], "payload.user"),
            namespace_id=None
            if namespace_id is None
            else _int_in(namespace_id, "payload.namespace_id", 0, U64_MAX),
        )

    @property
    def recover(self) -> RecoverInfo:
        return RecoverInfo.parse(self.recover_info)

    def to_json(self) -> str:
        obj: dict[str, Any] = {
            "recover_info": self.recover_info,
            "nonce": self.nonce,
            "user": self.user,
        }
        if self.namespace_id is not None:
            obj["namespace_id"] = self.namespace_id
        return _dumps(obj)


@frozen
class StatusPayload:
    """The payload of a successful Status: the Request's fields in the controller's order."""

    user: str
    nonce: int
    recover_info: str
    namespace_id: int | None = None

    @classmethod
    def parse(cls, text: Any) -> StatusPayload:
        obj = _fields(
            _loads(text, "payload"), "payload", ("user", "nonce", "recover_info"), ("namespace_id",)
        )
        namespace_id = obj.get("namespace_id")
        return cls(
            user=validate_user(obj["user"], "payload.user"),
            nonce=_int_in(obj["nonce"], "payload.nonce", 0, U64_MAX),
            recover_info=_string(obj["recover_info"], "payload.recover_info"),
            namespace_id=None
            if namespace_id is None
            else _int_in(namespace_id, "payload.namespace_id", 0, U64_MAX),
        )

    @classmethod
    def answering(cls, request: RequestPayload) -> StatusPayload:
        return cls(request.user, request.nonce, request.recover_info, request.namespace_id)

    def to_json(self) -> str:
        obj: dict[str, Any] = {
            "user": self.user,
            "nonce": self.nonce,
            "recover_info": self.recover_info,
        }
        if self.namespace_id is not None:
            obj["namespace_id"] = self.namespace_id
        return _dumps(obj)


# --- the three messages -----------------------------------------------------------------------


@frozen
class Request:
    """A user (or admin) asks the machine to change state; a recharge is Working/UserRequest."""

    to_status: DeviceStatus
    reason: Reason
    initial_request: str
    payload: RequestPayload

    def to_obj(self) -> dict[str, Any]:
        return {
            "Request": {
                "to_status": self.to_status.value,
                "reason": self.reason.value,
                "initial_request": self.initial_request,
                "payload": self.payload.to_json(),
            }
        }


@frozen
class Status:
    """The controller reports the machine's state; payload is a StatusPayload or a failure text."""

    status: DeviceStatus
    reason: Reason
    initial_request: str
    payload: str

    def to_obj(self) -> dict[str, Any]:
        return {
            "Status": {
                "status": self.status.value,
                "reason": self.reason.value,
                "initial_request": self.initial_request,
                "payload": self.payload,
            }
        }


@frozen
class Transaction:
    """A balance change: tokens > 0 is a controller's credit, tokens < 0 a backend's debit."""

    user: str
    tokens: int

    def to_obj(self) -> dict[str, Any]:
        return {"Transaction": {"user": self.user, "tokens": self.tokens}}


Message: TypeAlias = Request | Status | Transaction


def _parse_request(body: Any) -> Request:
    obj = _fields(body, "Request", ("to_status", "reason", "initial_request", "payload"))
    return Request(
        to_status=_enum(DeviceStatus, obj["to_status"], "Request.to_status"),
        reason=_enum(Reason, obj["reason"], "Request.reason"),
        initial_request=validate_event_id(obj["initial_request"], "Request.initial_request"),
        payload=RequestPayload.parse(obj["payload"]),
    )


def _parse_status(body: Any) -> Status:
    obj = _fields(body, "Status", ("status", "reason", "initial_request", "payload"))
    return Status(
        status=_enum(DeviceStatus, obj["status"], "Status.status"),
        reason=_enum(Reason, obj["reason"], "Status.reason"),
        initial_request=validate_event_id(obj["initial_request"], "Status.initial_request"),
        payload=_string(obj["payload"], "Status.payload"),
    )


def _parse_transaction(body: Any) -> Transaction:
    obj = _fields(body, "Transaction", ("user", "tokens"))
    tokens = _int_in(obj["tokens"], "Transaction.tokens", I64_MIN, I64_MAX)
    if tokens == 0:
        raise _fail("Transaction.tokens", "must be non-zero")
    return Transaction(user=validate_user(obj["user"], "Transaction.user"), tokens=tokens)


_PARSERS: dict[str, Callable[[Any], Message]] = {
    "Request": _parse_request,
    "Status": _parse_status,
    "Transaction": _parse_transaction,
}


# A Transaction exactly as serde writes it: what every peer produces, and most of any history.
_CANONICAL_TRANSACTION = re.compile(
    r'\{"Transaction":\{"user":"([1-9A-HJ-NP-Za-km-z]{32,44})","tokens":(-?[1-9][0-9]{0,18})\}\}'
)


def parse_message(content: str) -> Message:
    """Parse event content into a message, or raise MalformedMessage naming what is wrong."""
    canonical = _CANONICAL_TRANSACTION.fullmatch(content) if type(content) is str else None
    if canonical is not None:  # the fast path of replays; the same checks as the full one
        return _parse_transaction({"user": canonical[1], "tokens": int(canonical[2])})
    outer = _loads(content, "content")
    if type(outer) is not dict or len(outer) != 1:
        raise _fail("content", "must be an object with exactly one variant key")
    ((variant, body),) = outer.items()
    parser = _PARSERS.get(variant)
    if parser is None:
        raise _fail(
            "content", f"unknown variant {variant!r}, expected Request, Status or Transaction"
        )
    return parser(body)


def to_content(message: Message) -> str:
    """Serialize a message to event content, byte for byte as serde_json writes it."""
    return _dumps(message.to_obj())
