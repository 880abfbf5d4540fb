"""The node's Nostr identity: a secret key file (hex or nsec), created with mode 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import nostr_sdk

from dsproxy.errors import ConfigError
from dsproxy.wire.event import public_key_of

__all__ = ["create_key_file", "load_secret"]


def load_secret(path: Path | None) -> str:
    """The secret key (hex) in `path`; refuses a file others can read."""
    if path is None:
        raise ConfigError("DSPROXY_NOSTR_KEY_FILE is not set: run `dsproxy keygen FILE` first")
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"DSPROXY_NOSTR_KEY_FILE {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"DSPROXY_NOSTR_KEY_FILE {str(path)!r} does not hold a hex or nsec secret key"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"DSPROXY_NOSTR_KEY_FILE {str(path)!r} is readable by others: chmod 600 it"
        )
    try:
        secret_hex = nostr_sdk.Keys.parse(text).secret_key().to_hex()
    except Exception:  # nostr-sdk raises its own NostrSdkError for any bad key text
        raise ConfigError(
            f"DSPROXY_NOSTR_KEY_FILE {str(path)!r} does not hold a hex or nsec secret key"
        ) from None
    public_key_of(secret_hex)  # checks it is a valid secp256k1 scalar
    return secret_hex


def create_key_file(path: Path) -> str:
    """Write a new secret key to `path` (never overwriting) and return its public key (hex)."""
    secret_hex = nostr_sdk.Keys.generate().secret_key().to_hex()
    try:
        # a directory made for a key is its owner's only: it becomes a data directory too
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.exists():
            raise ConfigError(f"{str(path)!r} exists already; not overwriting a key") from None
        raise ConfigError(f"cannot create {str(path)!r}: a parent is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot create {str(path)!r}: {exc.strerror or exc}") from None
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secret_hex + "\n")
    return public_key_of(secret_hex)
