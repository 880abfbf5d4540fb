"""Metering: what a chat may reserve, and what it is charged afterwards. Pure.

A hold is the prompt estimate plus the completion limit, priced. If the user cannot afford the
whole completion limit the limit is lowered until the hold fits what is available, and the
lowered limit is what the upstream is asked for, so the upstream can never produce more than the
hold pays for. The debit is the upstream's exact usage, priced and rounded up, never above the
hold (if a model reports more than it was allowed, the operator absorbs the difference).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from attrs import field, frozen

from dsproxy.errors import ConfigError
from projections import available

__all__ = [
    "UNIT_PRICE",
    "HoldTaken",
    "ModelCatalog",
    "Price",
    "Refused",
    "Usage",
    "UserView",
    "cost",
    "debit_for",
    "decide_hold",
    "parse_model_numbers",
    "parse_prices",
    "trim_to_window",
]


def _rate(value: Fraction | int | str) -> Fraction:
    return Fraction(value)


@frozen
class Price:
    """Tokens charged per prompt token and per completion token of one model."""

    input_rate: Fraction = field(default=Fraction(1), converter=_rate)
    output_rate: Fraction = field(default=Fraction(1), converter=_rate)

    def __attrs_post_init__(self) -> None:
        assert self.input_rate >= 0 and self.output_rate > 0, self


UNIT_PRICE = Price()


@frozen
class ModelCatalog:
    """The models this backend sells, their prices, context windows and completion cap."""

    models: tuple[str, ...]
    prices: Mapping[str, Price] = field(factory=dict)
    context_windows: Mapping[str, int] = field(factory=dict)
    context_window_default: int = 65_536
    completion_tokens_max: int = 8_192
    aliases: Mapping[str, str] = field(factory=dict)  # another name -> a model sold

    def sold(self, name: Any) -> str | None:
        """The model sold under this name (a model's own, or an alias of it); None if none."""
        if not isinstance(name, str):
            return None
        return name if name in self.models else self.aliases.get(name)

    def price(self, model: str) -> Price:
        return self.prices.get(model, UNIT_PRICE)

    def context_window(self, model: str) -> int:
        return self.context_windows.get(model, self.context_window_default)


@frozen
class Usage:
    """Tokens the model read and wrote for one chat."""

    prompt_tokens: int
    completion_tokens: int


@frozen
class UserView:
    """What the projection says about a user when a chat asks for a hold."""

    user: str
    balance: int
    held: int

    @property
    def tokens_available(self) -> int:
        return available(self.balance, self.held)


@frozen
class HoldTaken:
    """The decision to reserve `tokens`, asking the upstream for at most `completion_tokens_max`."""

    user: str
    tokens: int
    prompt_tokens: int
    completion_tokens_max: int


@frozen
class Refused:
    """Not even one completion token is affordable."""

    reason: str
    tokens_available: int
    tokens_needed: int


def cost(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """Tokens charged for a usage: prompt x input rate + completion x output rate, rounded up."""
    assert prompt_tokens >= 0 and completion_tokens >= 0, (prompt_tokens, completion_tokens)
    # exact, in integers (Fraction arithmetic costs microseconds on every chat)
    into, outo = price.input_rate, price.output_rate
    numerator = (
        prompt_tokens * into.numerator * outo.denominator
        + completion_tokens * outo.numerator * into.denominator
    )
    return -(-numerator // (into.denominator * outo.denominator))


def decide_hold(
    view: UserView, prompt_tokens: int, max_tokens: int, price: Price = UNIT_PRICE
) -> HoldTaken | Refused:
    """Reserve the prompt and the completion limit, lowering the limit to what is available."""
    assert prompt_tokens >= 0 and max_tokens >= 1, (prompt_tokens, max_tokens)
    tokens_available = view.tokens_available
    needed = cost(price, prompt_tokens, max_tokens)
    if needed <= tokens_available:
        return HoldTaken(view.user, needed, prompt_tokens, max_tokens)
    # ceil(p*in + m*out) <= available  <=>  m <= (available - p*in) / out, as available is whole
    spare = tokens_available - prompt_tokens * price.input_rate
    affordable = math.floor(spare / price.output_rate)
    if affordable < 1:
        return Refused("insufficient_balance", tokens_available, cost(price, prompt_tokens, 1))
    return HoldTaken(view.user, cost(price, prompt_tokens, affordable), prompt_tokens, affordable)


def debit_for(price: Price, usage: Usage, hold_tokens: int) -> int:
    """The exact charge for a usage, never more than the hold that paid for it."""
    return min(cost(price, usage.prompt_tokens, usage.completion_tokens), hold_tokens)


def trim_to_window(message_tokens: Sequence[int], budget_tokens: int) -> int | None:
    """Index of the oldest message to keep so the newest ones fit the budget; None if even the
    newest does not fit (the caller says so: never a silent failure)."""
    total = 0
    for index in range(len(message_tokens) - 1, -1, -1):
        total += message_tokens[index]
        if total > budget_tokens:
            return None if index == len(message_tokens) - 1 else index + 1
    return 0


def _split_pair(item: str, key: str) -> tuple[str, str]:
    model, sep, value = item.partition("=")
    if not sep or not model.strip() or not value.strip():
        raise ConfigError(f"{key} has {item!r}: expected MODEL=VALUE")
    return model.strip(), value.strip()


def parse_prices(items: Sequence[str], key: str = "DSPROXY_PRICES") -> Mapping[str, Price]:
    """`MODEL=INPUT:OUTPUT` rates (decimals or fractions), e.g. `deepseek-reasoner=2:8`."""
    prices: dict[str, Price] = {}
    for item in items:
        model, value = _split_pair(item, key)
        rates = value.split(":")
        try:
            input_rate, output_rate = (Fraction(rate.strip()) for rate in rates)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"{key} has {item!r}: expected MODEL=INPUT:OUTPUT") from None
        if input_rate < 0 or output_rate <= 0:
            raise ConfigError(f"{key} has {item!r}: rates must be >= 0 (input), > 0 (output)")
        prices[model] = Price(input_rate, output_rate)
    return prices


def parse_model_aliases(
    items: Sequence[str], models: Sequence[str], key: str = "DSPROXY_MODEL_ALIASES"
) -> Mapping[str, str]:
    """`NAME=MODEL` pairs: chats asking for NAME get MODEL (the published dApp asks for the
    names of the provider the Go backend used, e.g. `deepseek/deepseek-v3/community`)."""
    aliases: dict[str, str] = {}
    for item in items:
        name, model = _split_pair(item, key)
        if model not in models:
            raise ConfigError(f"{key} has {item!r}: {model!r} is not one of the models sold")
        if name in models:
            raise ConfigError(f"{key} has {item!r}: {name!r} is a model sold, not another name")
        aliases[name] = model
    return aliases


def parse_model_numbers(items: Sequence[str], key: str, low: int = 1) -> Mapping[str, int]:
    """`MODEL=N` integers, e.g. context windows in tokens."""
    numbers: dict[str, int] = {}
    for item in items:
        model, value = _split_pair(item, key)
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{key} has {item!r}: {value!r} is not an integer") from None
        if number < low:
            raise ConfigError(f"{key} has {item!r}: must be at least {low}")
        numbers[model] = number
    return numbers
