"""History paging: the pure `next_until` rule, and a LocalRelay whose queries stop at 500
(while the node asks for more)."""

from __future__ import annotations

import asyncio
import itertools

from hypothesis import given
from hypothesis import strategies as st

from dsproxy.adapters.relay import RelayConnection, fetch_history, next_until
from dsproxy.wire.envelope import Address
from tests.conftest import CONTROLLER_SECRET
from tests.integration.relay_fixtures import credits, fetch_ids, local_relay, publish

__all__ = ["local_relay"]


def simulate(
    created_ats: list[int], asked: int, relay_cap: int, inclusive: bool
) -> tuple[set[int], int]:
    """Page a relay holding these events (by index) as our fetch does; count the queries.
    The relay answers at most `relay_cap` events a query, whatever the `limit` asked."""
    seen: set[int] = set()
    until: int | None = None
    queries = most_returned = 0
    while True:
        queries += 1
        matching = [
            index
            for index, at in enumerate(created_ats)
            if until is None or (at <= until if inclusive else at < until)
        ]
        page = sorted(matching, key=lambda index: -created_ats[index])[: min(asked, relay_cap)]
        fresh = [index for index in page if index not in seen]
        seen.update(fresh)
        most_returned = max(most_returned, len(page))
        following = next_until(
            [created_ats[i] for i in page],
            until,
            0,
            returned=len(page),
            fresh=len(fresh),
            most_returned=most_returned,
        )
        if following is None:
            return seen, queries
        until = following


@given(
    st.lists(st.integers(0, 40), max_size=300),
    st.integers(2, 50),
    st.integers(2, 60),
    st.booleans(),
)
def test_paging_ends_and_misses_nothing_unless_a_second_overflows(
    created_ats: list[int], asked: int, relay_cap: int, inclusive: bool
) -> None:
    """Whether `until` is inclusive or exclusive, and whether the relay answers as many as
    asked or fewer (its own cap, unknown to us), paging ends, and it returns every event
    whenever no two adjacent seconds together hold as many as one answer."""
    seen, queries = simulate(created_ats, asked, relay_cap, inclusive)
    assert queries <= len(created_ats) + 45
    per_second = [created_ats.count(second) for second in range(42)]
    answer = min(asked, relay_cap)
    if all(a + b < answer for a, b in itertools.pairwise(per_second)):
        assert seen == set(range(len(created_ats)))


def test_a_short_answer_ends_paging_only_once_the_relay_has_shown_it_could_send_more() -> None:
    """A relay that caps at 300 while we ask 5,000: the first short answer is not the end."""
    created_ats = [second for second in range(100) for _ in range(10)]  # 1,000 events
    seen, queries = simulate(created_ats, asked=5_000, relay_cap=300, inclusive=False)
    assert seen == set(range(1_000))
    assert queries >= 4
    seen, queries = simulate(created_ats, asked=5_000, relay_cap=10_000, inclusive=False)
    assert seen == set(range(1_000))
    assert queries == 2  # the whole history, then one answer that holds nothing new


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
