"""The accounts file's bearer lookups: remembered briefly, never past a session's expiry or a
revoke made through this process; a revoke made elsewhere takes effect within the cache time."""

from __future__ import annotations

from pathlib import Path

from dsproxy.adapters.accounts_db import BEARER_CACHED_S, AccountsDb

USER = "8fL4sZ7rYbQ2vN6mK3xW9tH5pJ1cD4eF7gA2hB6kM9n"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_remembered_session_still_expires(tmp_path: Path) -> None:
    accounts = await AccountsDb.open(tmp_path / "backend.sqlite", Clock())
    try:
        await accounts.add_session("session-hash", USER, expires_at=2_000, now=1_000)
        assert await accounts.user_for("session-hash", now=1_999) == USER
        assert await accounts.user_for("session-hash", now=2_001) is None
    finally:
        await accounts.close()


async def test_revoked_keys_stop_here_at_once_and_elsewhere_within_the_cache_time(
    tmp_path: Path,
) -> None:
    clock = Clock()
    here = await AccountsDb.open(tmp_path / "backend.sqlite", clock)
    elsewhere = await AccountsDb.open(tmp_path / "backend.sqlite", clock)
    try:
        first = await here.add_api_key(USER, "first-hash", "sdk", now=1_000)
        second = await here.add_api_key(USER, "second-hash", "sdk", now=1_000)
        for key_hash in ("first-hash", "second-hash"):
            assert await here.user_for(key_hash, now=1_000) == USER

        assert await here.revoke_api_key(USER, first.id, now=1_001)
        assert await here.user_for("first-hash", now=1_001) is None
        assert await here.user_for("second-hash", now=1_001) == USER

        assert await elsewhere.revoke_api_key(USER, second.id, now=1_002)
        assert await here.user_for("second-hash", now=1_002) == USER  # remembered
        clock.now += BEARER_CACHED_S + 1
        assert await here.user_for("second-hash", now=1_020) is None
    finally:
        await here.close()
        await elsewhere.close()
