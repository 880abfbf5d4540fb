"""Holds and hold decisions: concurrent chats can never spend more than the balance."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from dsproxy.domain.metering import (
    HoldTaken,
    Price,
    Refused,
    Usage,
    UserView,
    cost,
    debit_for,
    decide_hold,
)
from projections import Hold, Holds, available, release, reserve, settle

USERS = ("alice", "bob")
rates = st.fractions(min_value=0, max_value=4, max_denominator=8)
prices = st.builds(Price, rates, rates.filter(lambda rate: rate > 0))
views = st.builds(
    UserView,
    st.sampled_from(USERS),
    balance=st.integers(-1_000, 100_000),
    held=st.integers(0, 100_000),
)


@given(views, st.integers(0, 50_000), st.integers(1, 50_000), prices)
def test_a_hold_never_exceeds_what_is_available(
    view: UserView, prompt_tokens: int, max_tokens: int, price: Price
) -> None:
    decision = decide_hold(view, prompt_tokens, max_tokens, price)
    if isinstance(decision, Refused):
        assert cost(price, prompt_tokens, 1) > view.tokens_available
        return
    assert 0 < decision.tokens <= view.tokens_available
    assert 1 <= decision.completion_tokens_max <= max_tokens
    assert decision.tokens == cost(price, prompt_tokens, decision.completion_tokens_max)
    if decision.completion_tokens_max < max_tokens:  # lowered no more than needed
        lowered = decision.completion_tokens_max + 1
        assert cost(price, prompt_tokens, lowered) > view.tokens_available


@given(st.integers(0, 10_000), st.integers(1, 10_000), st.integers(0, 20_000), prices, views)
def test_the_debit_of_any_usage_within_the_hold_limits_fits_the_hold(
    prompt_tokens: int, max_tokens: int, reported_prompt: int, price: Price, view: UserView
) -> None:
    decision = decide_hold(view, prompt_tokens, max_tokens, price)
    if isinstance(decision, HoldTaken):
        usage = Usage(reported_prompt, decision.completion_tokens_max)
        assert 0 <= debit_for(price, usage, decision.tokens) <= decision.tokens


class ConcurrentChats(RuleBasedStateMachine):
    """Chats of two users start, finish, fail and interleave in any order, with credits."""

    chats = Bundle("chats")

    @initialize()
    def start(self) -> None:
        self.balances = dict.fromkeys(USERS, 0)
        self.credited = dict.fromkeys(USERS, 0)
        self.debited = dict.fromkeys(USERS, 0)
        self.holds = Holds()
        self.granted: dict[str, tuple[int, Price]] = {}
        self.next_id = 0

    @rule(user=st.sampled_from(USERS), tokens=st.integers(1, 500))
    def credit(self, user: str, tokens: int) -> None:
        self.balances[user] += tokens
        self.credited[user] += tokens

    @rule(
        target=chats,
        user=st.sampled_from(USERS),
        prompt_tokens=st.integers(0, 200),
        max_tokens=st.integers(1, 300),
        price=prices,
    )
    def start_chat(self, user: str, prompt_tokens: int, max_tokens: int, price: Price) -> str:
        view = UserView(user, self.balances[user], self.holds.held(user))
        decision = decide_hold(view, prompt_tokens, max_tokens, price)
        chat_id = f"chat-{self.next_id}"
        self.next_id += 1
        if isinstance(decision, HoldTaken):
            hold = Hold(chat_id, user, decision.tokens)
            self.holds = reserve(self.holds, hold, self.balances[user])
            self.granted[chat_id] = (decision.completion_tokens_max, price)
        return chat_id

    @rule(
        chat_id=consumes(chats),
        prompt_tokens=st.integers(0, 400),
        completion_share=st.fractions(0, 1),
    )
    def finish_chat(self, chat_id: str, prompt_tokens: int, completion_share: Fraction) -> None:
        hold = self.holds.by_chat.get(chat_id)
        if hold is None:
            return  # refused at start
        completion_max, price = self.granted.pop(chat_id)
        completion = int(completion_max * completion_share)
        charge = debit_for(price, Usage(prompt_tokens, completion), hold.tokens)
        self.holds, debit = settle(self.holds, chat_id, charge)
        self.balances[hold.user] -= debit
        self.debited[hold.user] += debit

    @rule(chat_id=consumes(chats))
    def fail_chat(self, chat_id: str) -> None:
        if chat_id in self.holds.by_chat:
            self.holds = release(self.holds, chat_id)
            del self.granted[chat_id]

    @invariant()
    def never_overspent(self) -> None:
        for user in USERS:
            assert self.balances[user] >= 0
            assert self.holds.held(user) <= self.balances[user]
            assert available(self.balances[user], self.holds.held(user)) >= 0

    @invariant()
    def credits_minus_debits_is_the_balance(self) -> None:
        for user in USERS:
            assert self.credited[user] - self.debited[user] == self.balances[user]


TestConcurrentChats = ConcurrentChats.TestCase
