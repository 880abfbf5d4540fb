"""Settings: each value validated once at start-up, naming its key and value."""

from __future__ import annotations

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
