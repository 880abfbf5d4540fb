"""Settings: read once at start-up from a TOML file and `DSPROXY_*` variables, then frozen.

Precedence: environment variable, then the config file (`DSPROXY_CONFIG` or `--config`), then
the default. Every value is validated here, and a bad one names its key and value.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
from attrs import frozen

from dsproxy.errors import ConfigError, MalformedMessage
from dsproxy.wire.envelope import DEFAULT_SESSION
from dsproxy.wire.messages import validate_user

__all__ = ["PROGRAM_ID_V1", "Settings", "load_settings"]

PROGRAM_ID_V1 = "GguVKxU88NUe3GLtns7Uaa6a8Pjb9USKq3WD1rjZnPS9"
_HEX = frozenset("0123456789abcdef")


def _hex_key(raw: str, key: str) -> str:
    value = raw.strip().lower()
    if len(value) != 64 or not _HEX.issuperset(value):
        raise ConfigError(f"{key} has {raw!r}: not a 64-char hex public key")
    return value


def _hex_keys(raw: Any, key: str) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else str(raw).split(",")
    return tuple(sorted({_hex_key(str(item), key) for item in items if str(item).strip()}))


def _optional_hex_key(raw: Any, key: str) -> str | None:
    return _hex_key(str(raw), key) if str(raw).strip() else None


def _text_list(raw: Any, key: str) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else str(raw).split(",")
    return tuple(str(item).strip() for item in items if str(item).strip())


def _int_at_least(low: int) -> Callable[[Any, str], int]:
    def parse(raw: Any, key: str) -> int:
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise ConfigError(f"{key} has {raw!r}: not an integer") from None
        if value < low:
            raise ConfigError(f"{key} has {raw!r}: must be at least {low}")
        return value

    return parse


def _text(raw: Any, key: str) -> str:
    value = str(raw).strip()
    if not value:
        raise ConfigError(f"{key} is empty")
    return value


def _optional_path(raw: Any, key: str) -> Path | None:
    return Path(str(raw)).expanduser() if str(raw).strip() else None


def _path(raw: Any, key: str) -> Path:
    return Path(_text(raw, key)).expanduser()


def _solana_pubkey(raw: Any, key: str) -> str:
    try:
        return validate_user(str(raw).strip(), key)
    except MalformedMessage:
        raise ConfigError(f"{key} has {raw!r}: not a base58 Solana public key") from None


def _commitment(raw: Any, key: str) -> str:
    value = str(raw).strip()
    if value not in ("processed", "confirmed", "finalized"):
        raise ConfigError(f"{key} has {raw!r}: expected processed, confirmed or finalized")
    return value


def _program_version(raw: Any, key: str) -> int:
    value = _int_at_least(1)(raw, key)
    if value not in (1, 2):
        raise ConfigError(f"{key} has {raw!r}: the balance-payment program has versions 1 and 2")
    return value


# name -> (parser, default). The env variable is DSPROXY_<NAME>; the TOML key is <name>.
_FIELDS: dict[str, tuple[Callable[[Any, str], Any], Any]] = {
    "data_dir": (_path, "./data"),
    "session": (_text, DEFAULT_SESSION),
    "machine_pubkey": (_optional_hex_key, ""),
    "trusted_controllers": (_hex_keys, ""),
    "trusted_backends": (_hex_keys, ""),
    "admin_pubkey": (_optional_hex_key, ""),
    "relays": (_text_list, ""),
    "nostr_key_file": (_optional_path, ""),
    "solana_rpc_url": (_text, "http://127.0.0.1:8899"),
    "solana_commitment": (_commitment, "confirmed"),
    "program_id": (_solana_pubkey, PROGRAM_ID_V1),
    "program_version": (_program_version, 1),
    "namespace_id": (_int_at_least(0), 0),
    "bot_keypair_file": (_optional_path, ""),
    "payer_keypair_file": (_optional_path, ""),
    "pay_amount_lamports": (_int_at_least(1), 5_000_000),
    "tokens_per_lamport": (_int_at_least(1), 1),
    "content_bytes_max": (_int_at_least(256), 65_536),
    "events_per_page_max": (_int_at_least(1), 500),
}


@frozen
class Settings:
    """Validated configuration; build it with `load_settings`, never at import time."""

    data_dir: Path
    session: str
    machine_pubkey: str | None
    trusted_controllers: tuple[str, ...]
    trusted_backends: tuple[str, ...]
    admin_pubkey: str | None
    relays: tuple[str, ...]
    nostr_key_file: Path | None
    solana_rpc_url: str
    solana_commitment: str
    program_id: str
    program_version: int
    namespace_id: int
    bot_keypair_file: Path | None
    payer_keypair_file: Path | None
    pay_amount_lamports: int
    tokens_per_lamport: int
    content_bytes_max: int
    events_per_page_max: int

    @property
    def events_path(self) -> Path:
        return self.data_dir / "events.sqlite"

    @property
    def projection_path(self) -> Path:
        return self.data_dir / "projection.sqlite"

    def require_machine(self) -> str:
        if self.machine_pubkey is None:
            raise ConfigError(
                "DSPROXY_MACHINE_PUBKEY is not set: the x-only hex key of the machine"
            )
        return self.machine_pubkey

    def replace(self, **changes: Any) -> Settings:
        return attrs.evolve(self, **changes)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            table = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    unknown = sorted(set(table) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"config file {str(path)!r} has unknown key {unknown[0]!r}")
    return table


def load_settings(
    environ: Mapping[str, str] | None = None, config_file: Path | None = None, **overrides: Any
) -> Settings:
    """Build Settings from overrides, the environment and the config file, validating each."""
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get("DSPROXY_CONFIG"):
        config_file = Path(environ["DSPROXY_CONFIG"])
    table = _read_file(config_file) if config_file else {}
    values: dict[str, Any] = {}
    for name, (parse, default) in _FIELDS.items():
        env_key = f"DSPROXY_{name.upper()}"
        if overrides.get(name) is not None:
            raw, key = overrides[name], f"--{name.replace('_', '-')}"
        elif env_key in environ:
            raw, key = environ[env_key], env_key
        elif name in table:
            raw, key = table[name], f"{config_file}:{name}"
        else:
            raw, key = default, env_key
        values[name] = parse(raw, key)
    return Settings(**values)
