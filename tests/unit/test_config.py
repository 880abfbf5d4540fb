"""Settings: each value validated once at start-up, naming its key and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsproxy.config import load_settings
from dsproxy.errors import ConfigError


@pytest.mark.parametrize(
    "relays", ["notaurl", "http://relay.example", "ws://", "ws://relay:99999", "wss://[::1"]
)
def test_a_relay_that_is_not_a_websocket_url_is_refused_at_start_up(relays: str) -> None:
    """A node given one ran, warning that it could not connect, forever."""
    with pytest.raises(ConfigError) as refused:
        load_settings({"DSPROXY_RELAYS": f"wss://relay.example,{relays}"})
    assert str(refused.value) == f"DSPROXY_RELAYS has {relays!r}: not a ws:// or wss:// relay URL"


def test_relays_are_ws_or_wss_urls_with_a_host() -> None:
    settings = load_settings({"DSPROXY_RELAYS": " wss://relay.example , ws://[::1]:7000/ ,"})
    assert settings.relays == ("wss://relay.example", "ws://[::1]:7000/")


@pytest.mark.parametrize(
    "name", ["DSPROXY_UPSTREAM_URL", "DSPROXY_SOLANA_RPC_URL", "DSPROXY_PUBLIC_URL"]
)
@pytest.mark.parametrize(
    "url", ["http://[::1", "ftp://model.example", "model.example/v1", "http://"]
)
def test_an_http_url_that_is_not_one_is_refused_at_start_up(name: str, url: str) -> None:
    """`dsproxy demo --upstream 'http://[::1'` was an httpx.InvalidURL traceback; others failed
    at the first chat or payment."""
    with pytest.raises(ConfigError) as refused:
        load_settings({name: url})
    assert str(refused.value) == f"{name} has {url!r}: not a http:// or https:// URL"


def test_http_urls_with_a_host_are_taken() -> None:
    settings = load_settings({"DSPROXY_UPSTREAM_URL": "http://[::1]:9000/v1"})
    assert settings.upstream_url == "http://[::1]:9000/v1"


def test_a_public_url_is_optional_and_kept_without_its_trailing_slash() -> None:
    assert load_settings({}).public_url == ""
    assert load_settings({"DSPROXY_PUBLIC_URL": "https://chat.example/"}).public_url == (
        "https://chat.example"
    )


def test_a_backoff_that_would_start_above_its_ceiling_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"relay_retry_ms_min \(5000\) is more than"):
        load_settings({"DSPROXY_RELAY_RETRY_MS_MIN": "5000", "DSPROXY_RELAY_RETRY_MS_MAX": "100"})


def test_a_bad_price_window_or_alias_names_where_it_came_from(tmp_path: Path) -> None:
    """From the file, the error named DSPROXY_PRICES, a variable nobody had set."""
    config = tmp_path / "dsproxy.toml"
    for line, key in (
        ('prices = ["deepseek-chat=abc"]', "prices"),
        ('context_windows = ["deepseek-chat=0"]', "context_windows"),
        ('model_aliases = ["nick=no-such-model"]', "model_aliases"),
    ):
        config.write_text(line + "\n")
        with pytest.raises(ConfigError) as refused:
            load_settings({}, config_file=config)
        assert str(refused.value).startswith(f"{config}:{key} has "), refused.value
    with pytest.raises(ConfigError, match=r"^DSPROXY_PRICES has"):
        load_settings({"DSPROXY_PRICES": "deepseek-chat=1"})
