"""Holds and hold decisions: concurrent chats can never spend more than the balance."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given, settings
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
from projections import Book, fold_into, issue, release, reserve, settle

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
    """Chats of two users start, finish and fail in any order while credits arrive, charges are
    issued as debits, the projection folds them at its own pace, announces its folds late, and
    balances are read back (as after another process moved the projection)."""

    chats = Bundle("chats")

    @initialize()
    def start(self) -> None:
        self.books = {user: Book() for user in USERS}
        self.store: list[tuple[str, int]] = []  # (user, tokens) by position - 1
        self.committed = 0  # the projection's position
        self.announced = 0  # the last position the meter was told of
        self.touched: set[str] = set()  # users whose balance changed since the announcement
        self.ledger = dict.fromkeys(USERS, 0)  # the projection's balances
        self.credited = dict.fromkeys(USERS, 0)  # credits committed
        self.charged = dict.fromkeys(USERS, 0)  # every charge settled
        self.granted: dict[str, tuple[str, int, int, Price]] = {}
        self.next_id = 0

    def view(self, user: str) -> UserView:
        book = self.books[user]
        return UserView(user, book.spendable(self.announced), book.held)

    @rule(user=st.sampled_from(USERS), tokens=st.integers(1, 500))
    def credit(self, user: str, tokens: int) -> None:
        self.store.append((user, tokens))

    @rule(
        target=chats,
        user=st.sampled_from(USERS),
        prompt_tokens=st.integers(0, 200),
        max_tokens=st.integers(1, 300),
        price=prices,
    )
    def start_chat(self, user: str, prompt_tokens: int, max_tokens: int, price: Price) -> str:
        decision = decide_hold(self.view(user), prompt_tokens, max_tokens, price)
        chat_id = f"chat-{self.next_id}"
        self.next_id += 1
        if isinstance(decision, HoldTaken):
            self.books[user] = reserve(self.books[user], chat_id, decision.tokens, self.announced)
            self.granted[chat_id] = (user, decision.tokens, decision.completion_tokens_max, price)
        return chat_id

    @rule(
        chat_id=consumes(chats),
        prompt_tokens=st.integers(0, 400),
        completion_share=st.fractions(0, 1),
    )
    def finish_chat(self, chat_id: str, prompt_tokens: int, completion_share: Fraction) -> None:
        if chat_id not in self.granted:
            return  # refused at start
        user, hold_tokens, completion_max, price = self.granted.pop(chat_id)
        completion = int(completion_max * completion_share)
        charge = debit_for(price, Usage(prompt_tokens, completion), hold_tokens)
        if charge == 0:
            self.books[user] = release(self.books[user], chat_id)
            return
        self.books[user] = settle(self.books[user], chat_id, charge)
        self.charged[user] += charge

    @rule(chat_id=consumes(chats))
    def fail_chat(self, chat_id: str) -> None:
        if chat_id in self.granted:
            user = self.granted.pop(chat_id)[0]
            self.books[user] = release(self.books[user], chat_id)

    @rule(user=st.sampled_from(USERS))
    def issue_debit(self, user: str) -> None:
        book = self.books[user]
        if book.unissued:
            self.store.append((user, -sum(book.unissued.values())))
            self.books[user] = issue(book, list(book.unissued), len(self.store))

    @rule(records=st.integers(1, 5))
    def project(self, records: int) -> None:
        """The projector commits the next records; the meter is told later (`announce`)."""
        for user, tokens in self.store[self.committed : self.committed + records]:
            self.ledger[user] += tokens
            if tokens > 0:
                self.credited[user] += tokens
            self.touched.add(user)
        self.committed = min(len(self.store), self.committed + records)

    @rule()
    def announce(self) -> None:
        self.announced = self.committed
        for user in USERS:
            balance = self.ledger[user] if user in self.touched else None
            self.books[user] = fold_into(self.books[user], balance, self.announced)
        self.touched.clear()

    @rule(user=st.sampled_from(USERS))
    def read_back(self, user: str) -> None:
        """A balance read from the projection, possibly ahead of what was announced."""
        self.books[user] = fold_into(self.books[user], self.ledger[user], self.committed)

    @invariant()
    def never_overspent(self) -> None:
        for user in USERS:
            assert self.charged[user] + self.books[user].held <= self.credited[user]

    @invariant()
    def told_everything_the_book_is_exact(self) -> None:
        if self.announced == self.committed and not self.touched:
            for user in USERS:
                assert self.view(user).balance == self.credited[user] - self.charged[user]

    @invariant()
    def folded_debits_leave_the_book(self) -> None:
        for user in USERS:
            assert all(position > self.announced for position, _ in self.books[user].issued)


TestConcurrentChats = ConcurrentChats.TestCase
TestConcurrentChats.settings = settings(max_examples=300, stateful_step_count=60)
