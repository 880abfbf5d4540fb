"""Metering: hold sizes, lowered completion limits, exact debits, prices, context trimming."""

from __future__ import annotations

from fractions import Fraction

import pytest

from dsproxy.domain.metering import (
    HoldTaken,
    Price,
    Refused,
    Usage,
    UserView,
    cost,
    debit_for,
    decide_hold,
    parse_model_numbers,
    parse_prices,
    trim_to_window,
)
from dsproxy.errors import ConfigError, RateLimited
from dsproxy.handlers.chat import UserLimits

USER = "uY46ibBrA5pEsx4z8iiQ6BpNeBuMR6weo4u2ubREB9q"


def test_cost_rounds_up_priced_usage() -> None:
    price = Price(Fraction(1, 2), Fraction(3, 2))
    assert cost(price, 3, 1) == 3  # 1.5 + 1.5
    assert cost(price, 1, 1) == 2  # 0.5 + 1.5
    assert cost(price, 1, 0) == 1  # 0.5 rounds up


def test_hold_is_prompt_plus_max_tokens_when_affordable() -> None:
    decision = decide_hold(UserView(USER, balance=1_000, held=0), 30, 100)
    assert decision == HoldTaken(USER, 130, 30, 100)


def test_hold_lowers_max_tokens_to_what_is_available() -> None:
    decision = decide_hold(UserView(USER, balance=100, held=40), 30, 100)
    assert decision == HoldTaken(USER, 60, 30, 30)


def test_hold_lowered_under_prices_never_exceeds_available() -> None:
    price = Price(2, 3)
    decision = decide_hold(UserView(USER, balance=50, held=0), 10, 100, price)
    assert isinstance(decision, HoldTaken)
    assert decision.completion_tokens_max == 10  # 20 + 3 * 10 = 50
    assert decision.tokens == 50


def test_hold_refused_when_not_one_completion_token_fits() -> None:
    decision = decide_hold(UserView(USER, balance=30, held=0), 30, 100)
    assert decision == Refused("insufficient_balance", tokens_available=30, tokens_needed=31)


def test_hold_refused_for_negative_balance() -> None:
    decision = decide_hold(UserView(USER, balance=-5, held=0), 1, 1)
    assert isinstance(decision, Refused)
    assert decision.tokens_available == 0


def test_debit_is_exact_usage_capped_by_the_hold() -> None:
    assert debit_for(Price(), Usage(10, 5), hold_tokens=100) == 15
    assert debit_for(Price(), Usage(90, 50), hold_tokens=100) == 100


def test_trim_keeps_newest_messages_that_fit() -> None:
    assert trim_to_window([5, 5, 5], 100) == 0
    assert trim_to_window([5, 5, 5], 10) == 1
    assert trim_to_window([5, 5, 5], 5) == 2
    assert trim_to_window([5, 5, 50], 10) is None


def test_parse_prices_accepts_decimals_and_fractions() -> None:
    prices = parse_prices(["deepseek-chat=1:2", "deepseek-reasoner=0.5:3/2"])
    assert prices["deepseek-chat"] == Price(1, 2)
    assert prices["deepseek-reasoner"] == Price(Fraction(1, 2), Fraction(3, 2))


@pytest.mark.parametrize("item", ["deepseek-chat", "m=1", "m=a:b", "m=1:0", "m=-1:1", "=1:1"])
def test_parse_prices_names_the_bad_item(item: str) -> None:
    with pytest.raises(ConfigError, match="DSPROXY_PRICES"):
        parse_prices([item])


def test_parse_model_numbers_refuses_small_values() -> None:
    assert parse_model_numbers(["m=4096"], "K") == {"m": 4096}
    with pytest.raises(ConfigError, match="K has"):
        parse_model_numbers(["m=0"], "K")


def test_user_limits_forget_users_idle_for_a_minute() -> None:
    """Logins are free: the per-minute table must not keep every user who ever asked, only
    about twice those of the last minute."""
    now = [0.0]
    limits = UserLimits(per_minute_max=10, concurrent_max=10, clock=lambda: now[0])
    largest = 0
    for minute in range(10):  # 3,000 new users a minute, 30,000 in all
        now[0] = minute * 61.0
        for index in range(3_000):
            limits.admit(f"user-{minute}-{index}").done()
            largest = max(largest, limits.users_remembered)
    assert largest <= 2 * 3_000 + 1
    now[0] += 61.0
    for _ in range(10):
        limits.admit("busy").done()
    for index in range(5_000):  # the table doubles past its size: sweeps happen meanwhile
        limits.admit(f"crowd-{index}").done()
    with pytest.raises(RateLimited):  # the busy user's minute survived them
        limits.admit("busy")


def test_a_quick_request_counts_against_the_minute_but_not_the_requests_running() -> None:
    """Making a conversation was refused (429 "at once") while the user's chats streamed."""
    from dsproxy.errors import RateLimited

    now = [0.0]
    limits = UserLimits(per_minute_max=4, concurrent_max=2, clock=lambda: now[0])
    running = [limits.admit("u"), limits.admit("u")]
    with pytest.raises(RateLimited, match="at once"):
        limits.admit("u")
    limits.count("u")
    limits.count("u")  # the minute's fourth
    with pytest.raises(RateLimited, match="a minute"):
        limits.count("u")
    for ticket in running:
        ticket.done()
    now[0] = 61.0
    limits.count("u")
