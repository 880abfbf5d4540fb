"""The recover signature: what a user's wallet signs so that the bot may take one payment.

message = payload(64) || nonce u64 LE || deadline i64 LE            (v1, 80 bytes)
message = extra_data(64) || namespace_id u64 LE || nonce || deadline (v2, 88 bytes)
digest  = prefix || base58(keccak256(message))

The prefix is `DePHY vending machine/Example:\\n` for v1 and `DePHY vending machine/<name>:\\n`
for a v2 namespace. Keccak-256 is the original Keccak (as Solana's `keccak::hash`), which is not
hashlib's SHA3-256. The wallet signs the digest with ed25519 (`signMessage`); the program checks
it against the nonce stored on chain, so each signature pays at most once.
"""

from __future__ import annotations

import struct
import uuid

import base58
from Crypto.Hash import keccak
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature

from dsproxy.errors import MalformedMessage
from dsproxy.wire.messages import I64_MAX, I64_MIN, U64_MAX, RecoverInfo

__all__ = [
    "PAYLOAD_LEN",
    "SIGN_MESSAGE_PREFIX_V1",
    "is_curve_point",
    "keccak256",
    "new_payload",
    "recover_digest",
    "recover_message",
    "sign_message_prefix",
    "sign_recover",
    "verify_recover",
]

PAYLOAD_LEN = 64
SIGN_MESSAGE_PREFIX_V1 = b"DePHY vending machine/Example:\n"


def sign_message_prefix(namespace_name: str) -> bytes:
    """The v2 prefix for a namespace; v1 is the fixed `Example` one."""
    return f"DePHY vending machine/{namespace_name}:\n".encode()


def keccak256(data: bytes) -> bytes:
    """Original Keccak-256 (Ethereum/Solana), not SHA3-256."""
    return keccak.new(digest_bits=256, data=data).digest()


def _check_int(value: int, name: str, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise MalformedMessage(f"recover {name}: {value!r} is outside [{low}, {high}]")


def recover_message(
    payload: bytes, nonce: int, deadline: int, *, namespace_id: int | None = None
) -> bytes:
    """The bytes the digest hashes; namespace_id only for the v2 program."""
    if len(payload) != PAYLOAD_LEN:
        raise MalformedMessage(f"recover payload must be 64 bytes, got {len(payload)}")
    _check_int(nonce, "nonce", 0, U64_MAX)
    _check_int(deadline, "deadline", I64_MIN, I64_MAX)
    namespace = b""
    if namespace_id is not None:
        _check_int(namespace_id, "namespace_id", 0, U64_MAX)
        namespace = struct.pack("<Q", namespace_id)
    return bytes(payload) + namespace + struct.pack("<Qq", nonce, deadline)


def recover_digest(
    payload: bytes,
    nonce: int,
    deadline: int,
    *,
    namespace_id: int | None = None,
    prefix: bytes = SIGN_MESSAGE_PREFIX_V1,
) -> bytes:
    """What the wallet signs: prefix + base58 text of the message's Keccak-256."""
    message = recover_message(payload, nonce, deadline, namespace_id=namespace_id)
    return prefix + base58.b58encode(keccak256(message))


def sign_recover(
    keypair: Keypair,
    payload: bytes,
    nonce: int,
    deadline: int,
    *,
    namespace_id: int | None = None,
    prefix: bytes = SIGN_MESSAGE_PREFIX_V1,
) -> RecoverInfo:
    """Sign as the dApp's wallet does; `RecoverInfo.to_json()` gives the dApp's bytes."""
    digest = recover_digest(payload, nonce, deadline, namespace_id=namespace_id, prefix=prefix)
    signature = keypair.sign_message(digest)
    return RecoverInfo(signature=bytes(signature), payload=bytes(payload), deadline=deadline)


def verify_recover(
    info: RecoverInfo,
    user: Pubkey | str,
    nonce: int,
    *,
    namespace_id: int | None = None,
    prefix: bytes = SIGN_MESSAGE_PREFIX_V1,
) -> bool:
    """True when `user` signed (payload, nonce, deadline); the deadline is not checked here."""
    key = user if isinstance(user, Pubkey) else Pubkey.from_string(user)
    digest = recover_digest(
        info.payload, nonce, info.deadline, namespace_id=namespace_id, prefix=prefix
    )
    return Signature.from_bytes(info.signature).verify(key, digest)


def new_payload() -> bytes:
    """A fresh payload as the dApp makes one: a random UUID's 16 bytes, zero-padded to 64."""
    return uuid.uuid4().bytes + bytes(PAYLOAD_LEN - 16)


# --- ed25519 point validation (the program's SignatureFormatInvalid rule) ---------------------

_P = 2**255 - 19
_D = (-121665 * pow(121666, _P - 2, _P)) % _P


def is_curve_point(encoded: bytes) -> bool:
    """True if 32 bytes decompress to an Edwards point, as curve25519-dalek's `decompress`.

    The program answers SignatureFormatInvalid when the user's key or the signature's R is not
    a point, and SignatureMismatch when both are points but the equation fails.
    """
    if len(encoded) != 32:
        return False
    y = int.from_bytes(encoded, "little") & ((1 << 255) - 1)
    y %= _P
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    # x^2 = u / v has a root iff (u/v)^((p-1)/2) is 0 or 1 (Euler's criterion).
    x2 = u * pow(v, _P - 2, _P) % _P
    return x2 == 0 or pow(x2, (_P - 1) // 2, _P) == 1
