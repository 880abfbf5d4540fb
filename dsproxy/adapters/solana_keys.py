"""Solana keypair files in the Solana CLI format (a JSON array of 64 byte values)."""

from __future__ import annotations

import json
from pathlib import Path

from solders.keypair import Keypair

from dsproxy.errors import BadInput

__all__ = ["load_keypair"]


def load_keypair(path: Path) -> Keypair:
    """Read a Solana CLI keypair file; a bad file is a clear BadInput naming it."""
    path = path.expanduser()
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"keypair file {str(path)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise BadInput(f"keypair file {str(path)!r} is not readable JSON: {exc}") from None
    if (
        not isinstance(values, list)
        or len(values) != 64
        or not all(type(v) is int and 0 <= v <= 255 for v in values)
    ):
        raise BadInput(f"keypair file {str(path)!r} must hold a JSON list of 64 bytes")
    try:
        return Keypair.from_bytes(bytes(values))
    except ValueError as exc:
        raise BadInput(f"keypair file {str(path)!r} is not a valid ed25519 keypair") from exc
