"""History paging: the pure `HistoryPager` against model relays of every kind, and a LocalRelay
whose queries stop at 500 (while the node asks for more)."""

from __future__ import annotations

import asyncio
import itertools

from attrs import frozen
from hypothesis import given
from hypothesis import strategies as st

from dsproxy.adapters.relay import HistoryPager, RelayConnection, _Page, fetch_history
from dsproxy.wire.envelope import Address
from tests.conftest import CONTROLLER_SECRET
from tests.integration.relay_fixtures import credits, fetch_ids, local_relay, publish

__all__ = ["local_relay"]

QUERIES_MAX = 2_000


@frozen
class ModelRelay:
    """Stored events (index -> created_at), answered newest first as a relay would: at most
    `cap` a query, `until` inclusive or not (or ignored), and optionally with one event
    published during the first query mixed into its answer, or each answer's first event sent
    twice."""

    created_ats: list[int]
    cap: int
    inclusive: bool = True
    ignores_until: bool = False
    leaks_a_new_event: bool = False
    repeats_first: bool = False

    def answer(self, query: dict, number: int) -> list[dict]:
        until = None if self.ignores_until else query.get("until")
        matching = [
            index
            for index, at in enumerate(self.created_ats)
            if at >= query["since"]
            and (until is None or (at <= until if self.inclusive else at < until))
        ]
        newest = sorted(matching, key=lambda index: (-self.created_ats[index], index))
        page = [{"id": str(i), "created_at": self.created_ats[i]} for i in newest]
        page = page[: min(query["limit"], self.cap)]
        if self.repeats_first and page:
            page.insert(1, page[0])
        if self.leaks_a_new_event and number == 1:
            page.append({"id": "live", "created_at": max(self.created_ats, default=0) + 1})
        return page


def page_through(relay: ModelRelay, asked: int) -> tuple[set[str], int]:
    """Run the pager against a model relay, as `fetch_history` does; ids got and queries."""
    pager = HistoryPager(0, asked)
    got: set[str] = set()
    for number in range(1, QUERIES_MAX + 1):
        answer = relay.answer(pager.query(Address("s", "p" * 64)), number)
        for start in range(0, len(answer), 7):  # in parts, as chunks stream in
            got.update(str(obj["id"]) for obj in pager.take(answer[start : start + 7]))
        if not pager.answered():
            return got, number
    raise AssertionError("paging did not end")


@given(
    st.lists(st.integers(0, 40), max_size=300),
    st.integers(2, 50),
    st.integers(2, 60),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_paging_ends_and_misses_nothing_unless_a_second_overflows(
    created_ats: list[int],
    asked: int,
    cap: int,
    inclusive: bool,
    leaks: bool,
    repeats: bool,
) -> None:
    """Whether `until` is inclusive or exclusive, whether the relay answers as many as asked or
    fewer (its own cap, unknown to us), and even when an answer carries an extra event or one
    twice, paging ends, and it returns every event whenever no two adjacent seconds together
    hold as many as one answer."""
    relay = ModelRelay(created_ats, cap, inclusive, False, leaks, repeats)
    got, queries = page_through(relay, asked)
    assert queries <= len(created_ats) + 45
    per_second = [created_ats.count(second) for second in range(42)]
    answer = min(asked, cap)
    if all(a + b < answer for a, b in itertools.pairwise(per_second)):
        assert got >= {str(index) for index in range(len(created_ats))}


@given(st.lists(st.integers(0, 40), max_size=300), st.integers(2, 50), st.integers(2, 60))
def test_paging_ends_even_against_a_relay_that_ignores_until(
    created_ats: list[int], asked: int, cap: int
) -> None:
    """A relay that answers the same newest events whatever `until` says cannot be paged past
    its first answer, but paging still ends."""
    got, queries = page_through(ModelRelay(created_ats, cap, ignores_until=True), asked)
    assert queries <= 45 and len(got) <= min(asked, cap)


def test_paging_ends_against_a_relay_that_makes_up_new_events_at_each_until() -> None:
    """Junk with new ids at the asked `until` kept the query where it was, answer after answer,
    and remembered every id: memory grew without end and the history never finished."""
    made_up = itertools.count()
    pager = HistoryPager(1_990, 500)
    queries = overflows = 0
    while True:
        queries += 1
        assert queries <= 4 * 12, "paging did not end"
        until = pager.query(Address("s", "p" * 64)).get("until", 2_000)
        pager.take([{"id": f"junk-{next(made_up)}", "created_at": until} for _ in range(500)])
        assert len(pager._seen) <= 4 * 500  # the answers of two seconds at most
        if not pager.answered():
            break
        overflows += pager.overflowed
    assert overflows >= 10  # each second given up on is said to be


def test_a_short_answer_ends_paging_only_once_the_relay_has_shown_it_could_send_more() -> None:
    """A relay that caps at 300 while we ask 5,000: the first short answer is not the end."""
    created_ats = [second for second in range(100) for _ in range(10)]  # 1,000 events
    everything = {str(index) for index in range(1_000)}
    got, queries = page_through(ModelRelay(created_ats, 300, inclusive=False), 5_000)
    assert got == everything and queries >= 4
    got, queries = page_through(ModelRelay(created_ats, 10_000, inclusive=False), 5_000)
    assert got == everything
    assert queries == 2  # the whole history, then one answer that holds nothing new


def test_an_extra_event_in_the_first_answer_does_not_end_paging_early() -> None:
    """One event published during the first query makes it one longer than the relay's cap:
    the full answers after it still page on."""
    created_ats = [second for second in range(200) for _ in range(10)]  # 2,000 events
    relay = ModelRelay(created_ats, 500, inclusive=False, leaks_a_new_event=True)
    got, _ = page_through(relay, 500)
    assert got == {str(index) for index in range(2_000)} | {"live"}


async def test_history_beyond_one_query_comes_back_whole(
    local_relay: str, address: Address
) -> None:
    """1,200 events, 100 to a second, from a relay that answers at most 500 per query."""
    events = credits(CONTROLLER_SECRET, address, 1_200, per_second=100)
    await publish(local_relay, events)
    assert await fetch_ids(local_relay, address) == {event.id for event in events}


async def test_a_slow_reader_still_gets_every_event_once(
    local_relay: str, address: Address
) -> None:
    """Chunks go to the reader while a page streams in; a reader that takes its time (the
    page's EOSE comes meanwhile) still gets the rest of the page, and every later page."""
    events = credits(CONTROLLER_SECRET, address, 1_200, per_second=100)
    await publish(local_relay, events)
    connection = RelayConnection(local_relay)
    await connection.open()
    received: list[str] = []
    try:
        async for page in fetch_history(connection, address, 0, 5_000):
            received += [str(obj["id"]) for obj in page.events]
            await asyncio.sleep(0.05)
    finally:
        await connection.close()
    assert len(received) == len(set(received)) == len(events)
    assert set(received) == {event.id for event in events}


def test_events_after_a_pages_eose_are_left_to_the_live_subscription() -> None:
    """A query stays open after its EOSE until its CLOSE is sent (later still while the reader
    is slow): events the relay sends on it meanwhile are live, not part of the answer. Counted,
    they made the first answer look longer than the relay's cap, and the next full answer of
    known events then ended paging with older history unread."""
    page = _Page(chunk_len=256)
    page.add({"id": "a"})
    page.end()
    page.add({"id": "live"})
    assert page.take() == [{"id": "a"}]
