"""The accounts file's bearer lookups: remembered briefly, never past a session's expiry or a
revoke made through this process; a revoke made elsewhere takes effect within the cache time."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dsproxy.adapters.accounts_db import API_KEYS_REVOKED_KEPT, BEARER_CACHED_S, AccountsDb
from dsproxy.domain.accounts import Challenge

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


async def test_a_revoke_refused_forgets_no_remembered_key(tmp_path: Path) -> None:
    """Anyone logged in could send every user's requests back to the database by revoking a
    key id that is not theirs: the refused revoke emptied the whole cache."""
    clock = Clock()
    here = await AccountsDb.open(tmp_path / "backend.sqlite", clock)
    elsewhere = await AccountsDb.open(tmp_path / "backend.sqlite", clock)
    try:
        key = await here.add_api_key(USER, "key-hash", "sdk", now=1_000)
        assert await here.user_for("key-hash", now=1_000) == USER
        # revoked by another process: this one still remembers it, which makes it observable
        assert await elsewhere.revoke_api_key(USER, key.id, now=1_001)
        assert not await here.revoke_api_key("someone-else", key.id, now=1_002)
        assert not await here.revoke_api_key(USER, "key_nope", now=1_002)
        assert await here.user_for("key-hash", now=1_003) == USER  # still remembered
    finally:
        await here.close()
        await elsewhere.close()


async def test_a_lookup_racing_a_revoke_does_not_keep_the_key_alive(tmp_path: Path) -> None:
    """A lookup that read the key before the revoke landed used to cache it after the revoke
    had cleared the cache: the revoked key then worked for BEARER_CACHED_S more."""
    accounts = await AccountsDb.open(tmp_path / "backend.sqlite", Clock())
    try:
        key = await accounts.add_api_key(USER, "key-hash", "sdk", now=1_000)
        _, revoked = await asyncio.gather(
            accounts.user_for("key-hash", now=1_001),
            accounts.revoke_api_key(USER, key.id, now=1_001),
        )
        assert revoked
        assert await accounts.user_for("key-hash", now=1_002) is None
    finally:
        await accounts.close()


async def test_a_full_challenge_table_makes_room_instead_of_locking_everyone_out(
    tmp_path: Path,
) -> None:
    """Challenges need no login: refusing new ones once the table was full let anyone stop
    every user from logging in. The oldest make room instead."""
    accounts = await AccountsDb.open(tmp_path / "backend.sqlite", Clock(), challenges_max=3)
    try:
        for index in range(5):
            challenge = Challenge("https://backend", USER, f"nonce-{index}", 1_000 + index, 2_000)
            await accounts.add_challenge(challenge, now=1_000 + index)
        taken = [await accounts.take_challenge(f"nonce-{index}") for index in range(5)]
        assert [challenge is not None for challenge in taken] == [False, False, True, True, True]
    finally:
        await accounts.close()


async def test_revoked_keys_kept_are_the_newest(tmp_path: Path) -> None:
    """Create-and-revoke in a loop made revoked rows (all listed) without end."""
    accounts = await AccountsDb.open(tmp_path / "backend.sqlite", Clock())
    try:
        for n in range(API_KEYS_REVOKED_KEPT + 5):
            key = await accounts.add_api_key(USER, f"hash-{n}", "sdk", now=1_000 + n)
            assert key is not None
            assert await accounts.revoke_api_key(USER, key.id, now=1_000 + n)
        listed = await accounts.api_keys(USER)
        assert len(listed) == API_KEYS_REVOKED_KEPT
        assert min(row.revoked_at or 0 for row in listed) == 1_005
    finally:
        await accounts.close()


async def test_a_login_ended_by_the_cap_on_logins_stops_at_once(tmp_path: Path) -> None:
    """The 21st login ends the one that expires first; it was still accepted from the bearer
    cache for 10 s (logout and revoke already cleared it)."""
    from dsproxy.adapters.accounts_db import SESSIONS_PER_USER_MAX

    accounts = await AccountsDb.open(tmp_path / "backend.sqlite", Clock())
    try:
        for index in range(SESSIONS_PER_USER_MAX):
            await accounts.add_session(f"s{index}", USER, expires_at=5_000 + index, now=1_000)
            assert await accounts.user_for(f"s{index}", now=1_000) == USER  # now remembered
        await accounts.add_session("newest", USER, expires_at=9_000, now=1_000)
        assert await accounts.user_for("s0", now=1_000) is None  # the first to expire ended
        assert await accounts.user_for("s1", now=1_000) == USER
        assert await accounts.user_for("newest", now=1_000) == USER
    finally:
        await accounts.close()
