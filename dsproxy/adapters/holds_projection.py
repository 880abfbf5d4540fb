"""The `holds` table: chats' holds projected from their facts, in the balances' transaction.

A recorded hold is `settling` (charged; its debit event is not yet in the store: not yet issued,
`debit_event_id` NULL, or issued and not yet appended), `settled` (the debit event is in the
store, so the balance counts it) or `released`; stores written by earlier versions may also
hold `held` rows (taken, no outcome). Live decisions use the meter's books in memory; this table
is what start-up recovery reads to finish charges a crash interrupted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from attrs import frozen

from dsproxy.adapters.event_store import StoredRecord
from dsproxy.adapters.projection_db import ProjectionDb
from dsproxy.domain.chat_facts import DebitIssued, Hold, HoldOutcome

__all__ = [
    "HOLDS_SCHEMA",
    "HoldsProjection",
    "OpenHoldRow",
    "UnissuedCharge",
    "open_holds",
    "unissued_charges",
]

HOLDS_SCHEMA = """
CREATE TABLE IF NOT EXISTS holds (
    chat_id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    model TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    state TEXT NOT NULL,
    tokens_charged INTEGER NOT NULL DEFAULT 0,
    debit_event_id TEXT,
    debit_event TEXT,
    reason TEXT,
    taken_position INTEGER NOT NULL,
    closed_position INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS holds_by_user_state ON holds (user, state);
CREATE INDEX IF NOT EXISTS holds_by_state ON holds (state);
CREATE INDEX IF NOT EXISTS holds_by_debit ON holds (debit_event_id);
"""

_TAKEN = (
    "INSERT OR IGNORE INTO holds (chat_id, user, model, tokens, state, taken_position) "
    "VALUES (?, ?, ?, ?, 'held', ?)"
)
_SETTLED = (  # a hold recorded with its outcome, or (older stores) taken earlier
    "INSERT INTO holds (chat_id, user, model, tokens, state, tokens_charged, taken_position, "
    "closed_position) VALUES (?, ?, '', ?, 'settling', ?, ?, ?) ON CONFLICT (chat_id) DO UPDATE "
    "SET state = 'settling', tokens_charged = excluded.tokens_charged, "
    "closed_position = excluded.closed_position WHERE state = 'held'"
)
_ISSUED = (
    "UPDATE holds SET debit_event_id = ?, debit_event = ? "
    "WHERE chat_id = ? AND state = 'settling' AND debit_event_id IS NULL"
)
_RELEASED = (
    "INSERT INTO holds (chat_id, user, model, tokens, state, reason, taken_position, "
    "closed_position) VALUES (?, ?, '', 0, 'released', ?, ?, ?) ON CONFLICT (chat_id) DO UPDATE "
    "SET state = 'released', reason = excluded.reason, "
    "closed_position = excluded.closed_position WHERE state = 'held'"
)
_DEBIT_STORED = (
    "UPDATE holds SET state = 'settled', debit_event = NULL "
    "WHERE debit_event_id = ? AND state = 'settling'"
)


class HoldsProjection:
    """A FactProjection for the backend whose key (x-only hex) signs the debits."""

    schema = HOLDS_SCHEMA

    def __init__(self, backend_pubkey: str) -> None:
        self._author = backend_pubkey.encode()

    def changes(self, records: Sequence[StoredRecord]) -> list[tuple[str, list[tuple[Any, ...]]]]:
        """Pure: statements for one page. A hold is always taken, then settled, then issued, then
        its debit stored, so running the statements grouped in that order is safe."""
        taken: list[tuple[Any, ...]] = []
        settled: list[tuple[Any, ...]] = []
        issued: list[tuple[Any, ...]] = []
        released: list[tuple[Any, ...]] = []
        stored: list[tuple[Any, ...]] = []
        for record in records:
            fact = record.fact
            if isinstance(fact, Hold.Taken):
                row = (fact.originator_id.hex, fact.user, fact.model, fact.tokens, record.position)
                taken.append(row)
            elif isinstance(fact, HoldOutcome.Settled):
                hold_id, charged, position = fact.hold_id.hex, fact.tokens_charged, record.position
                settled.append((hold_id, fact.user, charged, charged, position, position))
            elif isinstance(fact, DebitIssued.Created):
                issued += [(fact.event_id, fact.event, hold_id) for hold_id in fact.hold_ids]
            elif isinstance(fact, HoldOutcome.Released):
                hold_id, position = fact.hold_id.hex, record.position
                released.append((hold_id, fact.user, fact.reason, position, position))
            elif record.is_nostr and self._author in record.state:
                event = orjson.loads(record.state)
                if event.get("pubkey") == self._author.decode():
                    stored.append((event["id"],))
        statements = [(_TAKEN, taken), (_SETTLED, settled), (_ISSUED, issued)]
        statements += [(_RELEASED, released), (_DEBIT_STORED, stored)]
        return [(sql, rows) for sql, rows in statements if rows]


@frozen
class OpenHoldRow:
    """A hold not yet closed when the backend starts: what recovery needs to close it."""

    chat_id: str
    user: str
    state: str
    debit_event: str | None


@frozen
class UnissuedCharge:
    """A settled charge whose debit event is not issued yet."""

    chat_id: str
    user: str
    tokens_charged: int


async def unissued_charges(db: ProjectionDb) -> list[UnissuedCharge]:
    rows = await db.fetch_all(
        "SELECT chat_id, user, tokens_charged FROM holds "
        "WHERE state = 'settling' AND debit_event_id IS NULL ORDER BY closed_position"
    )
    return [UnissuedCharge(*row) for row in rows]


async def open_holds(db: ProjectionDb) -> list[OpenHoldRow]:
    rows = await db.fetch_all(
        "SELECT chat_id, user, state, debit_event FROM holds "
        "WHERE state IN ('held', 'settling') ORDER BY taken_position"
    )
    return [OpenHoldRow(*row) for row in rows]
