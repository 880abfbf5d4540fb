"""The event store on a real SQLite file (eventsourcing's SQLite recorder)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import orjson
import pytest
from eventsourcing.domain import Aggregate, event
from hypothesis import given
from hypothesis import strategies as st

from dsproxy.adapters.event_store import (
    EVENTS_PER_INSERT_MAX,
    NOSTR_TOPIC,
    AsyncEventStore,
    EventStore,
    RecentRecords,
    StoredRecord,
)
from dsproxy.domain.chat_facts import DebitIssued
from dsproxy.errors import DuplicateEvent, StoreError
from dsproxy.wire.envelope import Address
from tests.builders import credit, debit

USER = "Dp5nyDG2fjpVy99TtJrKCTsXoeFieTJNeYr2wz6TFT3h"


class Payment(Aggregate):
    """A stand-in local fact with a lifecycle, as the controller will record."""

    @event("Accepted")
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.confirmed = False

    @event("Confirmed")
    def confirm(self) -> None:
        self.confirmed = True


def test_duplicate_append_is_a_no_op_not_an_error(tmp_path: Path, address: Address) -> None:
    store = EventStore(tmp_path / "events.sqlite")
    events = [credit(address, USER, 10), debit(address, USER, 3)]
    first = store.append_nostr(events)
    again = store.append_nostr([*events, events[0]])
    assert [event_id for _, event_id in first.appended] == [e.id for e in events]
    assert again.appended == ()
    assert again.duplicates == (events[0].id, events[1].id, events[0].id)
    assert store.count_nostr() == 2
    store.close()


def test_duplicates_inside_one_batch_are_stored_once(tmp_path: Path, address: Address) -> None:
    store = EventStore(tmp_path / "events.sqlite")
    event = credit(address, USER, 10)
    outcome = store.append_nostr([event, event, event])
    assert len(outcome.appended) == 1
    assert outcome.duplicates == (event.id, event.id)
    store.close()


_POOL = [credit(Address("dephy-dsproxy-controller", "3a" * 32), USER, n) for n in range(1, 9)]


@given(
    st.lists(st.lists(st.integers(0, len(_POOL) - 1), max_size=12), min_size=1, max_size=4),
    st.booleans(),
)
def test_appends_store_each_event_once_in_order_whatever_repeats(
    batches: list[list[int]], reopen: bool
) -> None:
    """Batches with repeats, inside themselves and of earlier batches: each event is appended
    at its first sighting, at the next position, and every later sighting is a duplicate."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "events.sqlite"
        store = EventStore(path)
        seen: dict[str, int] = {}
        for batch in batches:
            events = [_POOL[index] for index in batch]
            outcome = store.append_nostr(events)
            expected_appended, expected_duplicates = [], []
            for each in events:
                if each.id in seen:
                    expected_duplicates.append(each.id)
                else:
                    seen[each.id] = len(seen) + 1
                    expected_appended.append((seen[each.id], each.id))
            assert outcome.appended == tuple(expected_appended)
            assert outcome.duplicates == tuple(expected_duplicates)
            if reopen:
                store.close()
                store = EventStore(path)
        stored = [
            (record.position, orjson.loads(record.state)["id"]) for record in store.read(0, 100)
        ]
        assert stored == sorted((position, event_id) for event_id, position in seen.items())
        store.close()


def test_a_batch_larger_than_one_insert_keeps_its_order_and_duplicates(
    tmp_path: Path, address: Address
) -> None:
    store = EventStore(tmp_path / "events.sqlite")
    events = [credit(address, USER, n) for n in range(1, EVENTS_PER_INSERT_MAX + 11)]
    store.append_nostr(events[EVENTS_PER_INSERT_MAX - 5 : EVENTS_PER_INSERT_MAX + 5])
    outcome = store.append_nostr([*events, events[0]])
    assert len(outcome.appended) == len(events) - 10
    assert [position for position, _ in outcome.appended] == list(range(11, len(events) + 1))
    assert set(outcome.duplicates) == {e.id for e in events[EVENTS_PER_INSERT_MAX - 5 :][:10]} | {
        events[0].id
    }
    assert len(outcome.duplicates) == 11
    fresh = EventStore(tmp_path / "events.sqlite")
    ids = [orjson.loads(record.state)["id"] for record in fresh.read(10, 5_000)]
    fresh.close()
    assert ids == [e.id for e in events if e.id not in set(outcome.duplicates) - {events[0].id}]
    store.close()


def test_raw_event_json_is_kept_for_export_and_re_verification(
    tmp_path: Path, address: Address
) -> None:
    store = EventStore(tmp_path / "events.sqlite")
    event = credit(address, USER, 10)
    store.append_nostr([event])
    (record,) = store.read(0, 10)
    assert record.topic == NOSTR_TOPIC
    assert record.state == event.to_json().encode()
    store.close()


def test_facts_and_nostr_events_share_one_order_that_survives_reopening(
    tmp_path: Path, address: Address
) -> None:
    path = tmp_path / "events.sqlite"
    store = EventStore(path)
    store.append_nostr([credit(address, USER, 10)])
    payment = Payment(request_id="ab" * 32)
    payment.confirm()
    fact_positions = store.save(payment)
    store.append_nostr([debit(address, USER, 1)])
    store.close()

    reopened = EventStore(path)
    records = reopened.read(0, 100)
    assert [r.position for r in records] == [1, 2, 3, 4]
    assert fact_positions == [2, 3]
    assert [r.is_nostr for r in records] == [True, False, False, True]
    assert type(records[1].fact).__qualname__ == "Payment.Accepted"
    assert type(records[2].fact).__qualname__ == "Payment.Confirmed"
    loaded = reopened.application.repository.get(payment.id)
    assert loaded.confirmed and loaded.request_id == "ab" * 32
    assert reopened.read(2, 1)[0].position == 3
    reopened.close()


def test_scan_pages_through_everything_in_order(tmp_path: Path, address: Address) -> None:
    store = EventStore(tmp_path / "events.sqlite")
    store.append_nostr([credit(address, USER, n) for n in range(1, 26)])
    positions = [record.position for record in store.scan(page_size=7)]
    assert positions == list(range(1, 26))
    store.close()


@pytest.mark.asyncio
async def test_async_store_serializes_concurrent_appends(tmp_path: Path, address: Address) -> None:
    import asyncio

    store = AsyncEventStore.open(tmp_path / "events.sqlite")
    events = [credit(address, USER, n) for n in range(1, 41)]
    outcomes = await asyncio.gather(*(store.append_nostr([e]) for e in events + events))
    appended = sum(len(o.appended) for o in outcomes)
    duplicates = sum(len(o.duplicates) for o in outcomes)
    assert (appended, duplicates) == (40, 40)
    assert await store.max_position() == 40
    await store.close()


def test_record_writes_events_and_facts_together_or_not_at_all(
    tmp_path: Path, address: Address
) -> None:
    store = EventStore(tmp_path / "events.sqlite")
    payment = Payment(request_id="cd" * 32)
    credit_event = credit(address, USER, 5)
    outcome = store.record([credit_event], payment)
    assert [event_id for _, event_id in outcome.appended] == [credit_event.id]
    assert [r.is_nostr for r in store.read(0, 10)] == [False, True]  # the fact comes first

    stale = store.application.repository.get(payment.id)
    fresh = store.application.repository.get(payment.id)
    fresh.confirm()
    store.save(fresh)
    stale.confirm()  # the same version again: a concurrent change
    with pytest.raises(StoreError, match="could not record"):
        store.record([debit(address, USER, 2)], stale)
    assert store.count_nostr() == 1  # the debit was rolled back with the conflicting fact
    store.close()


async def test_writes_queued_together_commit_together_and_fail_alone(
    tmp_path: Path, address: Address
) -> None:
    """While another connection holds the write lock, writes queue up behind the first; they
    are then committed in one transaction, each on its own terms: a duplicate with
    `new_only` and a conflicting fact fail alone, the rest are recorded in order."""
    import asyncio
    import sqlite3

    path = tmp_path / "events.sqlite"
    store = AsyncEventStore.open(path)
    taken = credit(address, USER, 1)
    await store.record([taken])
    payment = Payment(request_id="ef" * 32)
    await store.record([], payment)
    stale = await store.aggregate(payment.id)
    fresh = await store.aggregate(payment.id)
    fresh.confirm()
    stale.confirm()

    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the store's next commit waits for this lock
    before = credit(address, USER, 2)
    first = asyncio.ensure_future(store.record([before]))
    await asyncio.sleep(0.2)  # the store thread is now inside that commit, waiting
    good = [credit(address, USER, n) for n in (3, 4, 5)]
    queued = asyncio.gather(
        store.record([good[0]]),
        store.record([debit(address, USER, 1), taken], new_only=True),
        store.record([good[1]], fresh),
        store.record([debit(address, USER, 2)], stale),
        store.record([good[2]]),
        return_exceptions=True,
    )
    await asyncio.sleep(0.1)
    blocker.execute("COMMIT")
    blocker.close()
    await first
    outcomes = await queued

    assert [type(outcome).__name__ for outcome in outcomes] == [
        "AppendOutcome",
        "DuplicateEvent",
        "AppendOutcome",
        "StoreError",
        "AppendOutcome",
    ]
    records = await store.read(0, 100)
    stored = [orjson.loads(r.state)["id"] for r in records if r.is_nostr]
    assert stored == [taken.id, before.id, good[0].id, good[1].id, good[2].id]
    assert (await store.aggregate(payment.id)).confirmed
    await store.close()


async def test_more_writes_than_one_commit_takes_all_land_in_order(
    tmp_path: Path, address: Address
) -> None:
    """Writes queued while the file is locked are committed in batches of at most
    WRITES_PER_COMMIT_MAX, one submitted call each, and a read asked for meanwhile is answered
    between them: every write lands, in the order it was recorded."""
    import asyncio
    import sqlite3

    from dsproxy.adapters.event_store import WRITES_PER_COMMIT_MAX

    path = tmp_path / "events.sqlite"
    store = AsyncEventStore.open(path)
    await store.record([credit(address, USER, 1)])
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    first = asyncio.ensure_future(store.record([credit(address, USER, 2)]))
    await asyncio.sleep(0.2)  # the store thread waits for the lock inside that commit
    events = [credit(address, USER, n) for n in range(3, 3 + 2 * WRITES_PER_COMMIT_MAX + 5)]
    queued = asyncio.gather(*(store.record([event]) for event in events))
    read = asyncio.ensure_future(store.max_position())
    await asyncio.sleep(0.05)
    blocker.execute("COMMIT")
    blocker.close()
    await first
    outcomes = await queued
    assert 2 <= await read <= 2 + len(events)
    assert [outcome.appended[0][1] for outcome in outcomes] == [event.id for event in events]
    positions = [outcome.appended[0][0] for outcome in outcomes]
    assert positions == list(range(3, 3 + len(events)))
    await store.close()


async def test_writes_queued_before_a_close_are_all_recorded(
    tmp_path: Path, address: Address
) -> None:
    """Past one batch, the next was submitted behind the close and failed on a closed store."""
    import asyncio

    from dsproxy.adapters.event_store import WRITES_PER_COMMIT_MAX

    path = tmp_path / "events.sqlite"
    store = AsyncEventStore.open(path)
    events = [credit(address, USER, n) for n in range(1, WRITES_PER_COMMIT_MAX + 45)]
    writes = [asyncio.ensure_future(store.record([event])) for event in events]
    await asyncio.sleep(0)  # all queued, the first commit submitted
    await store.close()
    outcomes = await asyncio.gather(*writes, return_exceptions=True)
    assert [type(outcome).__name__ for outcome in outcomes] == ["AppendOutcome"] * len(events)
    reopened = EventStore(path)
    assert reopened.count_nostr() == len(events)
    reopened.close()


async def test_a_write_whose_caller_gave_up_is_still_recorded(
    tmp_path: Path, address: Address
) -> None:
    import asyncio

    store = AsyncEventStore.open(tmp_path / "events.sqlite")
    abandoned = credit(address, USER, 7)
    waiting = asyncio.ensure_future(store.record([abandoned]))
    await asyncio.sleep(0)
    waiting.cancel()
    await store.record([credit(address, USER, 8)])  # committed after the abandoned one
    assert await store.contains(abandoned.id)
    await store.close()


def test_a_debit_signed_again_is_a_duplicate_event_though_its_fact_collides_first(
    tmp_path: Path, address: Address
) -> None:
    """A debit's fact takes its id from the event's, and facts are inserted first: recording
    the same signed debit again must still say DuplicateEvent (the issuer then tries another
    second), not fail as a conflict; an unrelated conflict stays a StoreError."""
    store = EventStore(tmp_path / "events.sqlite")
    event = debit(address, USER, 5)
    store.record([event], DebitIssued.issue(USER, 5, event.id, event.to_json(), ["c1"]))
    with pytest.raises(DuplicateEvent):
        store.record(
            [event], DebitIssued.issue(USER, 5, event.id, event.to_json(), ["c2"]), new_only=True
        )
    other = debit(address, USER, 6)
    with pytest.raises(StoreError) as raised:  # the fact of `event` again, with a new event
        store.record(
            [other], DebitIssued.issue(USER, 5, event.id, event.to_json(), ["c3"]), new_only=True
        )
    assert not isinstance(raised.value, DuplicateEvent)
    assert not store.contains(other.id)
    store.close()


def _as_read(records: list[StoredRecord]) -> list[tuple[object, ...]]:
    return [(r.position, r.topic, r.state, r.fact) for r in records]


def test_records_remembered_in_memory_read_as_the_file_has_them(
    tmp_path: Path, address: Address
) -> None:
    """What the store serves from memory equals what a fresh reader of the file sees, across
    rolled-back writes, facts saved outside `record`, and rows another process wrote between."""
    path = tmp_path / "events.sqlite"
    store, other = EventStore(path), EventStore(path)
    taken = credit(address, USER, 1)
    store.record([taken, debit(address, USER, 1)], Payment(request_id="01" * 32))
    other.append_nostr([credit(address, USER, 2)])  # a position this store did not write
    store.append_nostr([taken, credit(address, USER, 3)])  # the duplicate takes no position
    with pytest.raises(DuplicateEvent):
        store.record([credit(address, USER, 4), taken], new_only=True)  # rolled back
    other.append_nostr([credit(address, USER, 7)])  # the position the rolled-back one had
    payment = Payment(request_id="02" * 32)
    store.record([], payment)
    stale = store.application.repository.get(payment.id)
    payment.confirm()
    store.save(payment)  # not through `record`: remembered all the same
    stale.confirm()
    with pytest.raises(StoreError):
        store.record([credit(address, USER, 5)], stale)  # a conflict: nothing written
    store.append_nostr([credit(address, USER, 6), debit(address, USER, 2)])
    fresh = EventStore(path)

    everything = fresh.read(0, 100)
    assert len(everything) == 10
    one_by_one = [record for after in range(10) for record in store.read(after, 1)]
    assert _as_read(one_by_one) == _as_read(everything)
    remembered = [record for record in one_by_one if record.event is not None]
    assert len(remembered) == 5  # every event this store appended came from memory
    for record in remembered:
        assert record.state == record.event.to_json().encode()
    for page_size in (1, 2, 3, 100):
        assert _as_read(list(store.scan(page_size=page_size))) == _as_read(everything)
    for after in range(11):  # runs from memory go on from the file past what it lacks
        assert _as_read(store.read(after, 3)) == _as_read(fresh.read(after, 3))
    remembered_at = {
        position for after in range(10) for position, _ in store.recent.run_after(after, 1)
    }
    assert remembered_at == {1, 2, 3, 5, 7, 8, 9, 10}  # 4 and 6 are the other process's
    for each in (store, other, fresh):
        each.close()


def test_recent_records_keep_to_their_count_and_size() -> None:
    recent = RecentRecords(records_max=3, bytes_max=10)
    for position in range(1, 6):
        recent.add(position, StoredRecord(position, NOSTR_TOPIC, b"abc"))
    assert [position for position, _ in recent.run_after(0, 10)] == []
    assert [position for position, _ in recent.run_after(2, 10)] == [3, 4, 5]
    assert [position for position, _ in recent.run_after(3, 1)] == [4]
    recent.add(5, StoredRecord(5, NOSTR_TOPIC, b"abcd"))  # again: its size counted once
    assert [position for position, _ in recent.run_after(2, 10)] == [3, 4, 5]
    recent.add(6, StoredRecord(6, NOSTR_TOPIC, b"0123456789"))  # alone fills the size
    assert [position for position, _ in recent.run_after(5, 10)] == [6]
    assert recent.run_after(4, 10) == []
