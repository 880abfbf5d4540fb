"""The controller's view: recharge Requests seen and what became of them, folded from the store.

A fact projection (see `dsproxy.services.projector.FactProjection`): Request events addressed to
this machine enter as `new`; the controller's facts (Payment, Answered) move them on. Written in
the same transaction as the balances, so the view never runs ahead of or behind the store.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import orjson
from attrs import frozen

from dsproxy.adapters.event_store import NOSTR_TOPIC, StoredRecord
from dsproxy.adapters.projection_db import ProjectionDb
from dsproxy.domain.payment import Answered, Payment
from dsproxy.wire.envelope import DEPHY_KIND, Address

__all__ = ["PaymentRow", "RechargesProjection", "RequestRow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS recharge_requests (
    request_id TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    requester TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    state TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    payment_id TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS recharge_requests_by_state ON recharge_requests (state, position);
CREATE TABLE IF NOT EXISTS payments (
    payment_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    user TEXT NOT NULL,
    nonce INTEGER NOT NULL,
    amount_lamports INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    state TEXT NOT NULL,
    signature TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '',
    accepted_position INTEGER NOT NULL,
    updated_position INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS payments_by_state ON payments (state, accepted_position);
CREATE INDEX IF NOT EXISTS payments_by_nonce ON payments (user, nonce);
"""

_NEW_REQUEST = (
    "INSERT OR IGNORE INTO recharge_requests (request_id, position, requester, created_at, state)"
    " VALUES (?, ?, ?, ?, 'new')"
)
_REQUEST_STATE = (
    "UPDATE recharge_requests SET state = ?, detail = ?, payment_id = COALESCE(?, payment_id)"
    " WHERE request_id = ?"
)
_PAYMENT_ACCEPTED = (
    "INSERT INTO payments (payment_id, request_id, user, nonce, amount_lamports, tokens, state,"
    " accepted_position, updated_position) VALUES (?, ?, ?, ?, ?, ?, 'accepted', ?, ?)"
)
_PAYMENT_STATE = (
    "UPDATE payments SET state = ?, signature = COALESCE(?, signature), attempts = attempts + ?,"
    " detail = ?, updated_position = ? WHERE payment_id = ?"
)


@frozen
class RequestRow:
    request_id: str
    position: int
    requester: str
    created_at: int
    state: str
    detail: str
    payment_id: str | None


@frozen
class PaymentRow:
    payment_id: str
    request_id: str
    user: str
    nonce: int
    amount_lamports: int
    tokens: int
    state: str
    signature: str | None
    attempts: int
    detail: str


@frozen
class RechargesProjection:
    """Requests for this machine and the payments made for them."""

    address: Address
    schema: str = _SCHEMA

    def changes(self, records: Sequence[StoredRecord]) -> list[tuple[str, list[tuple[Any, ...]]]]:
        """One statement per record, in store order, so later facts see earlier rows."""
        statements: list[tuple[str, list[tuple[Any, ...]]]] = []
        for record in records:
            if record.topic == NOSTR_TOPIC:
                row = self._request_row(record)
                if row is not None:
                    statements.append((_NEW_REQUEST, [row]))
            elif record.fact is not None:
                statements.extend(self._fact_changes(record))
        return statements

    def _request_row(self, record: StoredRecord) -> tuple[Any, ...] | None:
        if b'"Request' not in record.state:  # cheap test before parsing any JSON
            return None
        event = orjson.loads(record.state)
        tags = event["tags"]
        if (
            event["kind"] != DEPHY_KIND
            or not _is_request(event["content"])
            or next((t[1] for t in tags if len(t) >= 2 and t[0] == "s"), None)
            != self.address.session
            or next((t[1] for t in tags if len(t) >= 2 and t[0] == "p"), None)
            != self.address.machine
        ):
            return None
        if not 0 <= event["created_at"] < 2**63:  # stored before the door refused it
            return None
        return (event["id"], record.position, event["pubkey"], event["created_at"])

    def _fact_changes(self, record: StoredRecord) -> list[tuple[str, list[tuple[Any, ...]]]]:
        fact, position = record.fact, record.position
        if isinstance(fact, Answered.Refused):
            detail = f"{fact.reason}: {fact.detail}"
            return [(_REQUEST_STATE, [("refused", detail, None, fact.request_id)])]
        if isinstance(fact, Payment.Accepted):
            payment = str(fact.originator_id)
            row = (payment, fact.request_id, fact.user, fact.nonce, fact.amount_lamports,
                   fact.tokens, position, position)  # fmt: skip
            return [
                (_PAYMENT_ACCEPTED, [row]),
                (_REQUEST_STATE, [("accepted", "", payment, fact.request_id)]),
            ]
        payment = str(fact.originator_id)
        if isinstance(fact, Payment.Submitted):
            return [(_PAYMENT_STATE, [("submitted", fact.signature, 1, "", position, payment)])]
        if isinstance(fact, Payment.Expired):
            return [(_PAYMENT_STATE, [("expired", None, 0, fact.detail, position, payment)])]
        if isinstance(fact, Payment.Credited):
            return [
                (_PAYMENT_STATE, [("credited", None, 0, "", position, payment)]),
                (
                    "UPDATE recharge_requests SET state = 'paid' WHERE payment_id = ?",
                    [(payment,)],
                ),
            ]
        if isinstance(fact, Payment.Failed):
            detail = f"{fact.reason}: {fact.detail}"
            return [
                (_PAYMENT_STATE, [("failed", None, 0, detail, position, payment)]),
                (
                    "UPDATE recharge_requests SET state = 'failed', detail = ? "
                    "WHERE payment_id = ?",
                    [(detail, payment)],
                ),
            ]
        return []

    # --- reads ------------------------------------------------------------------------------

    @staticmethod
    async def new_requests(
        db: ProjectionDb,
        limit: int,
        *,
        leaving_out: Collection[str] = (),
        only: Collection[str] | None = None,
    ) -> list[RequestRow]:
        """Unanswered Requests, the oldest first: none of `leaving_out`, and (if given) only
        those of `only`."""
        query = (
            "SELECT request_id, position, requester, created_at, state, detail, payment_id "
            "FROM recharge_requests WHERE state = 'new' "
            "AND request_id NOT IN (SELECT value FROM json_each(?))"
        )
        params: list[Any] = [orjson.dumps(list(leaving_out)).decode()]
        if only is not None:
            query += " AND request_id IN (SELECT value FROM json_each(?))"
            params.append(orjson.dumps(list(only)).decode())
        rows = await db.fetch_all(query + " ORDER BY position LIMIT ?", (*params, limit))
        return [RequestRow(*row) for row in rows]

    @staticmethod
    async def unfinished_payments(db: ProjectionDb) -> list[PaymentRow]:
        rows = await db.fetch_all(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments "
            "WHERE state IN ('accepted', 'submitted', 'expired') ORDER BY accepted_position"
        )
        return [PaymentRow(*row) for row in rows]

    @staticmethod
    async def payment(db: ProjectionDb, payment_uuid: str) -> PaymentRow | None:
        rows = await db.fetch_all(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE payment_id = ?", (payment_uuid,)
        )
        return PaymentRow(*rows[0]) if rows else None

    @staticmethod
    async def payments_for(db: ProjectionDb, user: str, nonce: int) -> list[PaymentRow]:
        """Every payment made for a signed (user, nonce), the first first."""
        rows = await db.fetch_all(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE user = ? AND nonce = ? "
            "ORDER BY accepted_position",
            (user, nonce),
        )
        return [PaymentRow(*row) for row in rows]

    @staticmethod
    async def recent_payments(db: ProjectionDb, limit: int) -> list[PaymentRow]:
        rows = await db.fetch_all(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments ORDER BY updated_position DESC LIMIT ?",
            (limit,),
        )
        return [PaymentRow(*row) for row in rows]

    @staticmethod
    async def request(db: ProjectionDb, request_id: str) -> RequestRow | None:
        rows = await db.fetch_all(
            "SELECT request_id, position, requester, created_at, state, detail, payment_id "
            "FROM recharge_requests WHERE request_id = ?",
            (request_id,),
        )
        return RequestRow(*rows[0]) if rows else None


def _is_request(content: str) -> bool:
    """Content whose one variant is Request (malformed inside or not: the handler says why)."""
    try:
        message = orjson.loads(content)
    except orjson.JSONDecodeError:
        return False
    return type(message) is dict and list(message) == ["Request"]


_PAYMENT_COLUMNS = (
    "payment_id, request_id, user, nonce, amount_lamports, tokens, state, signature, attempts,"
    " detail"
)
