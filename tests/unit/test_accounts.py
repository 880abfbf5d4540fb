"""Login decisions: only the unused, unexpired challenge this server issued, signed by the user."""

from __future__ import annotations

import base64

import base58
from solders.keypair import Keypair

from dsproxy.domain.accounts import (
    API_KEY_PREFIX,
    LoginGranted,
    LoginRefused,
    challenge_text,
    decide_login,
    decode_signature,
    hash_secret,
    issue_challenge,
    new_secret,
    nonce_of,
)

SERVER = "https://proxy.example"
NOW = 1_800_000_000
WALLET = Keypair.from_seed(bytes([7]) * 32)
USER = str(WALLET.pubkey())
CHALLENGE = issue_challenge(SERVER, USER, "ab" * 16, NOW, 300)
MESSAGE = challenge_text(CHALLENGE)
SIGNATURE = bytes(WALLET.sign_message(MESSAGE.encode()))


def login(**changes: object) -> LoginGranted | LoginRefused:
    arguments: dict[str, object] = {
        "server": SERVER,
        "user": USER,
        "message": MESSAGE,
        "signature": SIGNATURE,
        "now": NOW + 10,
    }
    arguments.update(changes)
    challenge = arguments.pop("challenge", CHALLENGE)
    return decide_login(challenge, **arguments)  # type: ignore[arg-type]


def test_signed_challenge_logs_in() -> None:
    assert login() == LoginGranted(USER)


def test_challenge_text_names_server_user_and_nonce() -> None:
    assert SERVER in MESSAGE and USER in MESSAGE
    assert nonce_of(MESSAGE) == CHALLENGE.nonce


def test_used_or_unknown_challenge_is_refused() -> None:
    assert isinstance(login(challenge=None), LoginRefused)


def test_expired_challenge_is_refused() -> None:
    refused = login(now=CHALLENGE.expires_at + 1)
    assert isinstance(refused, LoginRefused) and "expired" in refused.reason


def test_challenge_of_another_server_is_refused() -> None:
    refused = login(server="https://elsewhere.example")
    assert isinstance(refused, LoginRefused) and "another server" in refused.reason


def test_challenge_of_another_user_is_refused() -> None:
    other = Keypair.from_seed(bytes([8]) * 32)
    message = MESSAGE
    signature = bytes(other.sign_message(message.encode()))
    refused = login(user=str(other.pubkey()), signature=signature)
    assert isinstance(refused, LoginRefused) and "another key" in refused.reason


def test_altered_message_is_refused() -> None:
    altered = MESSAGE.replace("Issued At", "Issued at")
    signature = bytes(WALLET.sign_message(altered.encode()))
    assert isinstance(login(message=altered, signature=signature), LoginRefused)


def test_wrong_or_missing_signature_is_refused() -> None:
    other = Keypair.from_seed(bytes([9]) * 32)
    assert isinstance(login(signature=bytes(other.sign_message(MESSAGE.encode()))), LoginRefused)
    assert isinstance(login(signature=None), LoginRefused)


def test_signatures_decode_from_base64_and_base58() -> None:
    assert decode_signature(base64.b64encode(SIGNATURE).decode()) == SIGNATURE
    assert decode_signature(base58.b58encode(SIGNATURE).decode()) == SIGNATURE
    assert decode_signature("not a signature") is None
    assert decode_signature(base64.b64encode(b"short").decode()) is None


def test_secrets_are_random_and_stored_hashed() -> None:
    first, second = new_secret(API_KEY_PREFIX), new_secret(API_KEY_PREFIX)
    assert first != second and first.startswith(API_KEY_PREFIX)
    assert hash_secret(first) != first and len(hash_secret(first)) == 64
