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
from urllib.parse import urlsplit

import attrs
from attrs import frozen

from dsproxy.domain.metering import parse_model_aliases, parse_model_numbers, parse_prices
from dsproxy.domain.payment import CRASH_POINTS
from dsproxy.errors import ConfigError, MalformedMessage
from dsproxy.wire.envelope import DEFAULT_SESSION
from dsproxy.wire.messages import validate_user

__all__ = ["CREDIT_TOKENS_MAX", "PROGRAM_ID_V1", "Settings", "http_url", "load_settings"]

PROGRAM_ID_V1 = "GguVKxU88NUe3GLtns7Uaa6a8Pjb9USKq3WD1rjZnPS9"

CREDIT_TOKENS_MAX = 2**53 - 1
"""The largest recharge credit: JavaScript (the dApp) reads integers exactly up to here, and a
balance has room for a thousand of them before it passes what a Transaction can carry."""

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


def _string(raw: Any, key: str) -> str:
    """Text as given: a TOML number, list or table where text belongs is refused, never
    turned into its Python spelling (a session of "['a', 'b']" matches no event)."""
    if not isinstance(raw, str):
        raise ConfigError(f"{key} has {raw!r}: must be text")
    return raw


def _text_list(raw: Any, key: str) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else _string(raw, key).split(",")
    stripped = (_string(item, key).strip() for item in items)
    return tuple(item for item in stripped if item)


def _checked_list(
    check: Callable[[tuple[str, ...], str], object],
) -> Callable[[Any, str], tuple[str, ...]]:
    """A list whose items `check` validates here, where the key names where it came from (the
    environment or the file): later, only the variable's name would be known."""

    def parse(raw: Any, key: str) -> tuple[str, ...]:
        items = _text_list(raw, key)
        check(items, key)
        return items

    return parse


def _url_with(schemes: tuple[str, ...], url: str, key: str, noun: str = "URL") -> str:
    """A URL of one of `schemes` with a host (and a port that is a number, if any)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in schemes or not parts.hostname:
        shown = " or ".join(f"{scheme}://" for scheme in schemes)
        raise ConfigError(f"{key} has {url!r}: not a {shown} {noun}")
    return url


def _relay_urls(raw: Any, key: str) -> tuple[str, ...]:
    """ws:// or wss:// URLs with a host: a node given anything else retried it forever."""
    urls = _text_list(raw, key)
    return tuple(_url_with(("ws", "wss"), url, key, "relay URL") for url in urls)


def http_url(raw: Any, key: str) -> str:
    """An http:// or https:// URL with a host: anything else failed at the first chat."""
    return _url_with(("http", "https"), _text(raw, key), key)


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


def _int_between(low: int, high: int) -> Callable[[Any, str], int]:
    at_least = _int_at_least(low)

    def parse(raw: Any, key: str) -> int:
        value = at_least(raw, key)
        if value > high:
            raise ConfigError(f"{key} has {raw!r}: must be at most {high}")
        return value

    return parse


def _optional_text(raw: Any, key: str) -> str:
    return _string(raw, key).strip()


def _text(raw: Any, key: str) -> str:
    value = _string(raw, key).strip()
    if not value:
        raise ConfigError(f"{key} is empty")
    return value


def _optional_path(raw: Any, key: str) -> Path | None:
    text = _optional_text(os.fspath(raw) if isinstance(raw, os.PathLike) else raw, key)
    return Path(text).expanduser() if text else None


def _path(raw: Any, key: str) -> Path:
    path = _optional_path(raw, key)
    if path is None:
        raise ConfigError(f"{key} is empty")
    return path


def _solana_pubkey(raw: Any, key: str) -> str:
    try:
        return validate_user(str(raw).strip(), key)
    except MalformedMessage:
        raise ConfigError(f"{key} has {raw!r}: not a base58 Solana public key") from None


def _max_tokens_param(raw: Any, key: str) -> str:
    value = str(raw).strip()
    if value not in ("max_tokens", "max_completion_tokens"):
        raise ConfigError(f"{key} has {raw!r}: expected max_tokens or max_completion_tokens")
    return value


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


def _crash_points(raw: Any, key: str) -> frozenset[str]:
    names = frozenset(_text_list(raw, key))
    unknown = sorted(names - CRASH_POINTS)
    if unknown:
        raise ConfigError(f"{key} has {unknown[0]!r}: crash points are {sorted(CRASH_POINTS)}")
    return names


# name -> (parser, default). The env variable is DSPROXY_<NAME>; the TOML key is <name>.
_FIELDS: dict[str, tuple[Callable[[Any, str], Any], Any]] = {
    "data_dir": (_path, "./data"),
    "session": (_text, DEFAULT_SESSION),
    "machine_pubkey": (_optional_hex_key, ""),
    "trusted_controllers": (_hex_keys, ""),
    "trusted_backends": (_hex_keys, ""),
    "admin_pubkey": (_optional_hex_key, ""),
    "relays": (_relay_urls, ""),
    "nostr_key_file": (_optional_path, ""),
    "solana_rpc_url": (http_url, "http://127.0.0.1:8899"),
    "solana_commitment": (_commitment, "confirmed"),
    "program_id": (_solana_pubkey, PROGRAM_ID_V1),
    "program_version": (_program_version, 1),
    "namespace_id": (_int_at_least(0), 0),
    "bot_keypair_file": (_optional_path, ""),
    "payer_keypair_file": (_optional_path, ""),
    "pay_amount_lamports": (_int_at_least(1), 5_000_000),
    "tokens_per_lamport": (_int_at_least(1), 1),
    "deadline_margin_s": (_int_at_least(0), 5),
    "request_stale_s": (_int_at_least(0), 3_600),
    "controller_concurrency_max": (_int_at_least(1), 16),
    "controller_metrics_port": (_int_at_least(0), 0),
    "crash_at": (_crash_points, ""),
    "upstream_url": (http_url, "https://api.deepseek.com"),
    "upstream_api_key": (_optional_text, ""),
    "upstream_api_key_file": (_optional_path, ""),
    "upstream_timeout_s": (_int_at_least(1), 600),
    "upstream_connections_max": (_int_at_least(1), 256),
    "upstream_max_tokens_param": (_max_tokens_param, "max_tokens"),
    "http_host": (_text, "127.0.0.1"),
    "http_port": (_int_between(0, 65_535), 8080),
    "shutdown_grace_s": (_int_between(0, 3_600), 25),
    "public_url": (
        lambda raw, key: http_url(raw, key).rstrip("/") if _optional_text(raw, key) else "",
        "",
    ),
    "models": (_text_list, "deepseek-chat,deepseek-reasoner"),
    "model_aliases": (_text_list, ""),
    "prices": (_checked_list(parse_prices), ""),
    "context_windows": (_checked_list(parse_model_numbers), ""),
    "context_window_tokens": (_int_at_least(16), 65_536),
    "completion_tokens_max": (_int_at_least(1), 8_192),
    "requests_per_minute_max": (_int_at_least(1), 60),
    "concurrent_requests_max": (_int_at_least(1), 4),
    "challenge_ttl_s": (_int_at_least(1), 300),
    "challenges_per_minute_max": (_int_at_least(1), 30),
    "session_ttl_s": (_int_at_least(60), 604_800),
    "request_bytes_max": (_int_at_least(1024), 1_048_576),
    "conversation_messages_max": (_int_at_least(1), 200),
    "content_bytes_max": (_int_at_least(256), 65_536),
    "history_overlap_s": (_int_at_least(0), 300),
    "history_reread_s": (_int_at_least(1), 300),
    "ingest_queue_len_max": (_int_at_least(1), 10_000),
    "ingest_batch_events_max": (_int_at_least(1), 2_000),
    "relay_timeout_s": (_int_at_least(1), 10),
    "relay_retry_ms_min": (_int_at_least(1), 200),
    "relay_retry_ms_max": (_int_at_least(1), 30_000),
    "publish_rejections_max": (_int_at_least(1), 20),
    "publish_failed_retry_s": (_int_at_least(1), 300),
    "events_per_page_max": (_int_at_least(1), 5_000),
    "store_lock_timeout_s": (_int_at_least(1), 30),
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
    deadline_margin_s: int
    request_stale_s: int
    controller_concurrency_max: int
    controller_metrics_port: int
    crash_at: frozenset[str]
    upstream_url: str
    upstream_api_key: str = attrs.field(repr=False)  # a secret: never in logs
    upstream_api_key_file: Path | None
    upstream_timeout_s: int
    upstream_connections_max: int
    upstream_max_tokens_param: str
    http_host: str
    http_port: int
    shutdown_grace_s: int
    public_url: str
    models: tuple[str, ...]
    model_aliases: tuple[str, ...]
    prices: tuple[str, ...]
    context_windows: tuple[str, ...]
    context_window_tokens: int
    completion_tokens_max: int
    requests_per_minute_max: int
    concurrent_requests_max: int
    challenge_ttl_s: int
    challenges_per_minute_max: int
    session_ttl_s: int
    request_bytes_max: int
    conversation_messages_max: int
    content_bytes_max: int
    history_overlap_s: int
    history_reread_s: int
    ingest_queue_len_max: int
    ingest_batch_events_max: int
    relay_timeout_s: int
    relay_retry_ms_min: int
    relay_retry_ms_max: int
    publish_rejections_max: int
    publish_failed_retry_s: int
    events_per_page_max: int
    store_lock_timeout_s: int

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
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc.strerror or exc}") from None
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
    keys: dict[str, str] = {}
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
        keys[name] = key
    parse_model_aliases(values["model_aliases"], values["models"], keys["model_aliases"])
    if values["relay_retry_ms_min"] > values["relay_retry_ms_max"]:
        raise ConfigError(
            f"relay_retry_ms_min ({values['relay_retry_ms_min']}) is more than relay_retry_ms_max "
            f"({values['relay_retry_ms_max']}): the backoff starts at the first and stops at the "
            "second"
        )
    credit = values["pay_amount_lamports"] * values["tokens_per_lamport"]
    if credit > CREDIT_TOKENS_MAX:  # past 2^63 every node would refuse a credit, or the sum of
        # a user's credits, and the user would pay for nothing; past 2^53 the dApp misreads it
        raise ConfigError(
            f"pay_amount_lamports x tokens_per_lamport is {credit}: "
            f"a recharge may credit at most {CREDIT_TOKENS_MAX} tokens (2^53 - 1)"
        )
    return Settings(**values)
