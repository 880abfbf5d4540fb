"""Start-up recovery of what a crash interrupted: a settled charge is issued and appended exactly
once, an issued debit is appended exactly once, a hold with no recorded outcome is released."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsproxy.adapters.holds_projection import open_holds
from dsproxy.bootstrap import fact_projections, trust_policy
from dsproxy.config import Settings, load_settings
from dsproxy.domain.chat_facts import DebitIssued, HoldOutcome
from dsproxy.domain.metering import Usage
from dsproxy.entrypoints.http_api import close_backend, open_backend
from dsproxy.errors import ConfigError, StoreError
from dsproxy.services.projector import Projector, open_projection
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.messages import Transaction
from tests.conftest import BACKEND_SECRET
from tests.integration.upstream_fixtures import (
    USER_KEYS,
    append_credit,
    backend_env,
    read_debits,
)

USER = str(USER_KEYS[0].pubkey())


def settings_for(node_env: dict[str, str]) -> Settings:
    return load_settings(backend_env(node_env, "http://127.0.0.1:9/v1"))


async def test_a_hold_left_open_by_a_crash_is_released(node_env: dict[str, str]) -> None:
    settings = settings_for(node_env)
    append_credit(settings, USER, 100)
    backend = await open_backend(settings)
    await backend.meter.take_hold(USER, "deepseek-chat", 10, 50)
    assert (await backend.meter.view(USER)).held == 60
    await close_backend(backend)  # as if killed mid-chat: no outcome recorded

    backend = await open_backend(settings)
    try:
        view = await backend.meter.view(USER)
        assert (view.balance, view.held) == (100, 0)
    finally:
        await close_backend(backend)
    assert read_debits(settings, USER) == []


async def reopen_and_check(settings: Settings, balance: int) -> None:
    backend = await open_backend(settings)
    try:
        await backend.meter.drain()
        view = await backend.meter.view(USER)
        assert (view.balance, view.held) == (balance, 0)
    finally:
        await close_backend(backend)


async def test_a_charge_settled_but_not_issued_is_issued_once(node_env: dict[str, str]) -> None:
    settings = settings_for(node_env)
    append_credit(settings, USER, 100)
    backend = await open_backend(settings)
    hold = await backend.meter.take_hold(USER, "deepseek-chat", 10, 50)
    await backend.meter.store.save(HoldOutcome.settled(hold.chat_id, USER, 25, 10, 15))
    await close_backend(backend)  # the crash comes before the debit is issued

    for _ in range(2):  # restarting twice must not issue it twice
        await reopen_and_check(settings, 75)
    assert [tokens for _, tokens in read_debits(settings, USER)] == [-25]


async def test_a_debit_issued_but_not_appended_is_appended_once(
    node_env: dict[str, str],
) -> None:
    settings = settings_for(node_env)
    append_credit(settings, USER, 100)
    backend = await open_backend(settings)
    first = await backend.meter.take_hold(USER, "deepseek-chat", 10, 20)
    second = await backend.meter.take_hold(USER, "deepseek-chat", 10, 20)
    address = Address(settings.session, settings.require_machine())
    debit = seal(Transaction(USER, -40), address, BACKEND_SECRET)
    await backend.meter.store.save(
        HoldOutcome.settled(first.chat_id, USER, 25, 10, 15),
        HoldOutcome.settled(second.chat_id, USER, 15, 10, 5),
        DebitIssued.issue(
            USER, 40, debit.id, debit.to_json(), [first.chat_id.hex, second.chat_id.hex]
        ),
    )
    await close_backend(backend)  # the crash comes before the debit is appended

    for _ in range(2):
        await reopen_and_check(settings, 60)
    assert read_debits(settings, USER) == [(debit.id, -40)]


async def test_settling_twice_is_refused_by_the_store(node_env: dict[str, str]) -> None:
    settings = settings_for(node_env)
    append_credit(settings, USER, 100)
    backend = await open_backend(settings)
    try:
        hold = await backend.meter.take_hold(USER, "deepseek-chat", 10, 50)
        charge = await backend.meter.settle(hold, Usage(10, 5))
        assert charge.tokens_charged == 15
        await backend.meter.drain()
        with pytest.raises(StoreError):  # the store's unique key: one outcome per hold
            await backend.meter.release(hold, "a second outcome")
        view = await backend.meter.view(USER)
        assert (view.balance, view.held) == (85, 0)
    finally:
        await close_backend(backend)


async def test_every_issued_charge_is_settled_whatever_the_projector_page_size(
    node_env: dict[str, str], tmp_path: Path
) -> None:
    """A debit's DebitIssued fact and its event are folded in separate pages when the page is
    one record: the hold must still end `settled`, never left for recovery to redo."""
    settings = settings_for(node_env)
    append_credit(settings, USER, 100)
    backend = await open_backend(settings)
    try:
        for completion in (5, 7):
            hold = await backend.meter.take_hold(USER, "deepseek-chat", 10, 20)
            await backend.meter.settle(hold, Usage(10, completion))
        await backend.meter.drain()
        store = backend.node.ledger.store
        extensions = fact_projections(settings)
        policy = trust_policy(settings)
        db = await open_projection(store, tmp_path / "paged.sqlite", policy, extensions=extensions)
        try:
            await Projector(store, db, policy, page_size=1, extensions=extensions).catch_up()
            assert await open_holds(db) == []
            assert (await db.account(USER)).balance == 100 - 15 - 17  # type: ignore[union-attr]
        finally:
            await db.close()
    finally:
        await close_backend(backend)


async def test_a_backend_whose_own_key_is_not_trusted_refuses_to_start(
    node_env: dict[str, str],
) -> None:
    """Its debits would be folded as untrusted: no balance would ever drop."""
    settings = settings_for(node_env).replace(trusted_backends=())
    with pytest.raises(ConfigError, match="not in DSPROXY_TRUSTED_BACKENDS"):
        await open_backend(settings)
    assert not (settings.data_dir / "backend.sqlite").exists()  # nothing opened


async def test_the_seconds_debits_took_are_forgotten_once_no_relay_would_take_them(
    node_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each (user, amount) pair's `created_at`s were kept for good, and past 100,000 pairs every
    debit rebuilt the whole table on the event loop (a long-running backend slowed 3.6x)."""
    import time
    import types

    from dsproxy.handlers import chat

    clock = [1_800_000_000.0]
    fake_time = types.SimpleNamespace(
        time=lambda: clock[0], perf_counter=time.perf_counter, monotonic=time.monotonic
    )
    monkeypatch.setattr(chat, "time", fake_time)
    settings = settings_for(node_env)
    backend = await open_backend(settings)
    try:
        for tokens in range(1, 301):  # a new amount every 2 s, for 10 minutes
            assert await backend.meter._record_debit(USER, tokens, [f"c{tokens}"]) is not None
            clock[0] += 2
        remembered = backend.meter._debit_seconds
        assert len(remembered) <= 3 * chat.DEBIT_SKEW_S, len(remembered)  # the last minute's
        assert (USER, 1) not in remembered and (USER, 300) in remembered
    finally:
        await close_backend(backend)


async def test_a_users_prompts_are_counted_one_at_a_time(node_env: dict[str, str]) -> None:
    """One user's four megabyte prompts at once held the shared counting thread, and every
    other user's long prompt waited behind all four."""
    import asyncio

    backend = await open_backend(settings_for(node_env))
    try:
        chats, order = backend.chats, []
        released = {name: asyncio.Event() for name in "abc"}

        async def turn(user: str, name: str) -> None:
            async with chats.counting_turn(user):
                order.append(f"{name} counts")
                await released[name].wait()

        async def settle() -> None:
            for _ in range(5):
                await asyncio.sleep(0)

        tasks = [
            asyncio.create_task(turn(USER, "a")),
            asyncio.create_task(turn(USER, "b")),
            asyncio.create_task(turn(str(USER_KEYS[1].pubkey()), "c")),
        ]
        await settle()
        assert order == ["a counts", "c counts"]  # b waits for a; another user does not
        released["a"].set()
        await settle()
        assert order[-1] == "b counts"
        released["b"].set()
        released["c"].set()
        await asyncio.gather(*tasks)
        assert chats._counting_turns == {}  # nothing kept for users who left
    finally:
        await close_backend(backend)
