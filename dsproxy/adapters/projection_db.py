"""The balance projection in SQLite (aiosqlite): accounts, postings, ignored events, position.

Every batch writes its rows and the store position it has applied in one transaction, so a
restart resumes exactly where the last commit stopped. The trust policy the tables were folded
under is recorded too: under another policy they are stale and must be rebuilt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
from attrs import frozen

from dsproxy.adapters.sqlite_file import open_sqlite
from dsproxy.errors import StoreError
from projections import Account, Entry, Ignored, TrustPolicy

__all__ = [
    "AccountRow",
    "PostingRow",
    "ProjectionDb",
    "ProjectionMoved",
    "policy_fingerprint",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS accounts (
    user TEXT PRIMARY KEY,
    credited INTEGER NOT NULL,
    debited INTEGER NOT NULL,
    balance INTEGER NOT NULL,
    entries INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS postings (
    position INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    user TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    author TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ignored (
    position INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS replaced_events (
    replacement_id TEXT PRIMARY KEY,
    event_id TEXT NOT NULL
) WITHOUT ROWID;
"""
_INDEXES = "CREATE INDEX IF NOT EXISTS postings_by_user ON postings (user, position);"
_UPSERT_ACCOUNT = (
    "INSERT INTO accounts (user, credited, debited, balance, entries) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (user) DO UPDATE SET credited = excluded.credited, debited = excluded.debited, "
    "balance = excluded.balance, entries = excluded.entries"
)
_PARAMS_PER_QUERY_MAX = 500


def policy_fingerprint(
    policy: TrustPolicy, schemas: Sequence[str] = (), content_bytes_max: int = 65_536
) -> str:
    """A stable digest of what the tables were folded under: the trust policy, the extra
    schemas, and the content limit (an entry over it is left out of the fold)."""
    parts: list[object] = [
        policy.session,
        policy.machine,
        sorted(policy.controllers),
        sorted(policy.backends),
        sorted(schemas),
    ]
    if content_bytes_max != 65_536:  # the default leaves the digest of earlier versions as it was
        parts.append(content_bytes_max)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


class ProjectionMoved(StoreError):
    """The projection's position changed under a writer: fold again from where it is now."""


@frozen
class AccountRow:
    user: str
    credited: int
    debited: int
    balance: int
    entries: int


@frozen
class PostingRow:
    position: int
    event_id: str
    user: str
    tokens: int
    author: str
    created_at: int


class ProjectionDb:
    """One projection file; open with `await ProjectionDb.open(path)`."""

    def __init__(self, connection: aiosqlite.Connection, path: Path) -> None:
        self._db = connection
        self.path = path

    @classmethod
    async def open(
        cls, path: Path, *, bulk: bool = False, schemas: Sequence[str] = ()
    ) -> ProjectionDb:
        """Open (creating) the file; `schemas` are fact projections' tables (IF NOT EXISTS).

        `bulk` is for a rebuild into a fresh file that replaces the old one only when complete:
        no secondary indexes until `finish_bulk`, and no journal or fsync, since a crash
        discards the file anyway.
        """
        connection = await open_sqlite(
            path, [_SCHEMA, *schemas, *(() if bulk else (_INDEXES,))],
            what="projection", durable=not bulk,
        )  # fmt: skip
        return cls(connection, path)

    async def finish_bulk(self) -> None:
        """Build the indexes and make the file an ordinary durable (WAL) database."""
        await self._db.execute(_INDEXES)
        await self._db.execute("PRAGMA journal_mode=WAL")

    async def close(self) -> None:
        await self._db.close()

    async def _meta(self, key: str) -> str | None:
        async with self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)) as cursor:
            row = await cursor.fetchone()
        return None if row is None else str(row[0])

    async def position(self) -> int:
        """The last store position whose effects are in these tables."""
        value = await self._meta("position")
        return 0 if value is None else int(value)

    async def fingerprint(self) -> str | None:
        return await self._meta("policy")

    async def set_fingerprint(self, fingerprint: str) -> None:
        await self._db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('policy', ?)", (fingerprint,)
        )

    async def load_accounts(self, users: Iterable[str]) -> dict[str, Account]:
        """The current totals of these users (absent users have none)."""
        wanted = list(users)
        accounts: dict[str, Account] = {}
        for start in range(0, len(wanted), _PARAMS_PER_QUERY_MAX):
            chunk = wanted[start : start + _PARAMS_PER_QUERY_MAX]
            query = (
                "SELECT user, credited, debited, entries FROM accounts "
                f"WHERE user IN ({','.join('?' * len(chunk))})"
            )
            async with self._db.execute(query, chunk) as cursor:
                async for user, credited, debited, entries in cursor:
                    accounts[user] = Account(credited, debited, entries)
        return accounts

    async def apply(
        self,
        accounts: dict[str, Account],
        postings: Sequence[tuple[int, Entry]],
        ignored: Sequence[tuple[int, Ignored]],
        position: int,
        extra: Sequence[tuple[str, Sequence[tuple[Any, ...]]]] = (),
        *,
        after: int | None = None,
    ) -> None:
        """Write one batch's changes (and fact projections' `extra` statements with their rows)
        and its position: all or nothing.

        `after` is the position the batch was folded from; if another process moved the
        projection meanwhile, nothing is written and ProjectionMoved says so.
        """
        try:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                if after is not None and (current := await self.position()) != after:
                    raise ProjectionMoved(
                        f"{self.path} is at {current}, not {after}: another process projected it"
                    )
                await self._db.executemany(
                    _UPSERT_ACCOUNT,
                    [
                        (user, a.credited, a.debited, a.balance, a.entries)
                        for user, a in accounts.items()
                    ],
                )
                await self._db.executemany(
                    "INSERT INTO postings VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (pos, e.event_id, e.user, e.tokens, e.author, e.created_at)
                        for pos, e in postings
                    ],
                )
                await self._db.executemany(
                    "INSERT INTO ignored VALUES (?, ?, ?)",
                    [(pos, i.event_id, i.reason) for pos, i in ignored],
                )
                for statement, rows in extra:
                    await self._db.executemany(statement, rows)
                await self._db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('position', ?)",
                    (str(position),),
                )
                await self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # a failed COMMIT (disk full) has rolled back already
                    await self._db.execute("ROLLBACK")
                raise
        except aiosqlite.Error as exc:
            raise StoreError(f"could not write projection batch up to {position}: {exc}") from exc

    async def replaced_events(self) -> dict[str, str]:
        """Our events signed again after relays refused them for their age: new id -> old."""
        async with self._db.execute("SELECT replacement_id, event_id FROM replaced_events") as rows:
            return {str(new): str(old) async for new, old in rows}

    async def account(self, user: str) -> AccountRow | None:
        async with self._db.execute(
            "SELECT user, credited, debited, balance, entries FROM accounts WHERE user = ?", (user,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else AccountRow(*row)

    async def balance_at(self, user: str) -> tuple[int, int]:
        """The user's balance and the position it is true at, read together."""
        async with self._db.execute(
            "SELECT (SELECT balance FROM accounts WHERE user = ?), "
            "(SELECT value FROM meta WHERE key = 'position')",
            (user,),
        ) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0] or 0), int(row[1] or 0)

    async def accounts(self) -> list[AccountRow]:
        async with self._db.execute(
            "SELECT user, credited, debited, balance, entries FROM accounts ORDER BY user"
        ) as cursor:
            return [AccountRow(*row) async for row in cursor]

    async def postings(self, user: str, limit: int = 1000) -> list[PostingRow]:
        """The user's newest `limit` postings, oldest of them first."""
        async with self._db.execute(
            "SELECT * FROM (SELECT position, event_id, user, tokens, author, created_at "
            "FROM postings WHERE user = ? ORDER BY position DESC LIMIT ?) ORDER BY position",
            (user, limit),
        ) as cursor:
            return [PostingRow(*row) async for row in cursor]

    async def ignored(self, limit: int = 1000) -> list[tuple[int, str, str]]:
        async with self._db.execute(
            "SELECT position, event_id, reason FROM ignored ORDER BY position LIMIT ?", (limit,)
        ) as cursor:
            return [(int(p), str(e), str(r)) async for p, e, r in cursor]

    async def fetch_all(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of a read-only query, for fact projections' own tables."""
        async with self._db.execute(query, params) as cursor:
            return [tuple(row) async for row in cursor]

    async def counts(self) -> dict[str, int]:
        """Rows per table, for reports."""
        result = {}
        for table in ("accounts", "postings", "ignored"):
            async with self._db.execute(f"SELECT COUNT(*) FROM {table}") as cursor:
                row = await cursor.fetchone()
            result[table] = int(row[0]) if row else 0
        return result
