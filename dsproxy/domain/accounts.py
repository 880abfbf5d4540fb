"""Accounts: login by a server-issued challenge, bearer tokens and API keys. Pure decisions.

The old backend accepted any signed message, so one leaked signature logged anyone in forever.
Here the server issues a challenge that names this server and the user's key, expires, and is
consumed by the first login attempt (good or bad), so a signature cannot be replayed, reused
elsewhere, or brute-forced. Tokens and keys are random and only their sha256 is stored.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets

import base58
from attrs import frozen
from solders.pubkey import Pubkey
from solders.signature import Signature

__all__ = [
    "API_KEY_PREFIX",
    "SESSION_PREFIX",
    "Challenge",
    "LoginGranted",
    "LoginRefused",
    "challenge_text",
    "decide_login",
    "decode_signature",
    "hash_secret",
    "issue_challenge",
    "new_secret",
    "nonce_of",
    "signature_valid",
]

API_KEY_PREFIX = "dsk-"
SESSION_PREFIX = "dss-"
_NONCE = re.compile(r"^Nonce: ([0-9a-f]{32})$", re.MULTILINE)


@frozen
class Challenge:
    """A login challenge as the server issued it."""

    server: str
    user: str
    nonce: str
    issued_at: int
    expires_at: int


@frozen
class LoginGranted:
    user: str


@frozen
class LoginRefused:
    reason: str


def issue_challenge(server: str, user: str, nonce: str, now: int, ttl_s: int) -> Challenge:
    assert re.fullmatch(r"[0-9a-f]{32}", nonce), nonce
    return Challenge(server, user, nonce, now, now + ttl_s)


def challenge_text(challenge: Challenge) -> str:
    """The exact text the wallet signs (in the spirit of Sign-In With Solana)."""
    return (
        f"{challenge.server} wants you to sign in to dsproxy with your Solana account:\n"
        f"{challenge.user}\n\n"
        f"URI: {challenge.server}\n"
        f"Nonce: {challenge.nonce}\n"
        f"Issued At: {challenge.issued_at}\n"
        f"Expiration Time: {challenge.expires_at}"
    )


def nonce_of(message: str) -> str | None:
    """The nonce a signed message claims, to look its challenge up."""
    found = _NONCE.search(message)
    return found.group(1) if found else None


def decode_signature(text: str) -> bytes | None:
    """A 64-byte ed25519 signature given as base64 (the dApp) or base58 (wallet tools)."""
    try:
        raw = base64.b64decode(text, validate=True)
        if len(raw) == 64:
            return raw
    except (binascii.Error, ValueError):
        pass
    try:
        raw = base58.b58decode(text)
    except ValueError:
        return None
    return raw if len(raw) == 64 else None


def signature_valid(user: str, message: bytes, signature: bytes) -> bool:
    """True if `signature` is the ed25519 signature of `message` by the Solana key `user`."""
    try:
        return Signature.from_bytes(signature).verify(Pubkey.from_string(user), message)
    except ValueError:
        return False


def decide_login(
    challenge: Challenge | None,
    *,
    server: str,
    user: str,
    message: str,
    signature: bytes | None,
    now: int,
) -> LoginGranted | LoginRefused:
    """Grant a login only for the unused, unexpired challenge this server issued to `user`."""
    if challenge is None:
        return LoginRefused("unknown or already used challenge: ask for a new one")
    if challenge.user != user:
        return LoginRefused("the challenge was issued to another key")
    if challenge.server != server:
        return LoginRefused("the challenge was issued by another server")
    if now > challenge.expires_at:
        return LoginRefused("the challenge has expired: ask for a new one")
    if message != challenge_text(challenge):
        return LoginRefused("the signed message is not the challenge that was issued")
    if signature is None or not signature_valid(user, message.encode(), signature):
        return LoginRefused("the signature does not verify for this key and challenge")
    return LoginGranted(user)


def new_secret(prefix: str) -> str:
    """A fresh bearer secret (256 random bits)."""
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """What is stored instead of a secret: its sha256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()
