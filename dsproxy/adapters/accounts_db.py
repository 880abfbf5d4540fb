"""The backend's own tables (aiosqlite, `backend.sqlite` in the data dir): login challenges,
sessions, API keys, and the dApp's conversations. Balances are not here: they are the ledger's.

Secrets are stored only as sha256 hashes. A challenge is deleted by the statement that reads it,
so two logins racing with one signature cannot both get it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite
from attrs import frozen

from dsproxy.adapters.sqlite_file import open_sqlite
from dsproxy.domain.accounts import Challenge
from dsproxy.errors import StoreError

__all__ = ["AccountsDb", "ApiKeyRow", "ConversationRow", "MessageRow", "UserRow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user TEXT PRIMARY KEY, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS challenges (
    nonce TEXT PRIMARY KEY, server TEXT NOT NULL, user TEXT NOT NULL,
    issued_at INTEGER NOT NULL, expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS challenges_by_expiry ON challenges (expires_at);
CREATE INDEX IF NOT EXISTS challenges_by_age ON challenges (issued_at, nonce);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY, user TEXT NOT NULL, expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at);
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (user, expires_at);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
    created_at INTEGER NOT NULL, revoked_at INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS api_keys_by_user ON api_keys (user);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, title TEXT NOT NULL, model TEXT NOT NULL,
    created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS conversations_by_user ON conversations (user, updated_at);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL, role TEXT NOT NULL,
    content TEXT NOT NULL, tokens_charged INTEGER NOT NULL, created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, id);
"""
CHALLENGES_MAX = 100_000  # outstanding; expired ones are pruned, then the oldest make room
SESSIONS_PER_USER_MAX = 20  # live logins of one user; past it, a new one ends the first to expire
API_KEYS_ACTIVE_MAX = 100  # a user's unrevoked keys
API_KEYS_REVOKED_KEPT = 100  # a user's newest revoked keys, listed; older ones are deleted
CONVERSATIONS_PER_USER_MAX = 10_000  # creating one is free: a user cannot fill the disk with them


@frozen
class UserRow:
    user: str
    created_at: int
    updated_at: int


@frozen
class ApiKeyRow:
    id: str
    name: str
    created_at: int
    revoked_at: int | None


@frozen
class ConversationRow:
    id: str
    user: str
    title: str
    model: str
    created_at: int
    updated_at: int


@frozen
class MessageRow:
    id: int
    conversation_id: str
    role: str
    content: str
    tokens_charged: int
    created_at: int


BEARERS_CACHED_MAX = 10_000
BEARER_CACHED_S = 10  # how long a key revoked by another process may still work here


class AccountsDb:
    """One connection, autocommit; every write is a single statement or an explicit transaction.

    Bearer secrets that resolved to a user are remembered for a few seconds, so a chat does not
    wait on the database to authenticate; a revoke through this process forgets them at once.
    """

    def __init__(
        self,
        connection: aiosqlite.Connection,
        clock: Any = time.monotonic,
        challenges_max: int = CHALLENGES_MAX,
    ) -> None:
        self._db = connection
        self._clock = clock
        self._challenges_max = challenges_max
        self._bearers: dict[str, tuple[str, int | None, float]] = {}  # user, expiry, until
        self._revocations = 0  # API keys revoked and sessions ended so far

    @classmethod
    async def open(
        cls, path: Path, clock: Any = time.monotonic, challenges_max: int = CHALLENGES_MAX
    ) -> AccountsDb:
        connection = await open_sqlite(path, [_SCHEMA], what="the accounts database")
        return cls(connection, clock, challenges_max)

    async def close(self) -> None:
        await self._db.close()

    async def _write(self, sql: str, params: Sequence[Any] = ()) -> int:
        try:
            cursor = await self._db.execute(sql, params)
        except aiosqlite.Error as exc:
            raise StoreError(f"accounts database: {exc}") from exc
        return cursor.rowcount

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            async with self._db.execute(sql, params) as cursor:
                return [tuple(row) async for row in cursor]
        except aiosqlite.Error as exc:
            raise StoreError(f"accounts database: {exc}") from exc

    # --- login ---------------------------------------------------------------------------------

    async def add_challenge(self, challenge: Challenge, now: int) -> None:
        """Keep at most `challenges_max`: past that, the oldest make room. Refusing new ones
        instead let anyone lock every user out by asking for challenges (no login needed);
        evicting means an attacker must outpace a user's few seconds of signing."""
        await self._write("DELETE FROM challenges WHERE expires_at < ?", (now,))
        count = (await self._rows("SELECT COUNT(*) FROM challenges"))[0][0]
        if count >= self._challenges_max:
            await self._write(
                "DELETE FROM challenges WHERE nonce IN (SELECT nonce FROM challenges "
                "ORDER BY issued_at, nonce LIMIT ?)",
                (count - self._challenges_max + 1,),
            )
        await self._write(
            "INSERT INTO challenges VALUES (?, ?, ?, ?, ?)",
            (
                challenge.nonce,
                challenge.server,
                challenge.user,
                challenge.issued_at,
                challenge.expires_at,
            ),
        )

    async def take_challenge(self, nonce: str) -> Challenge | None:
        """Remove and return a challenge: single use, whatever the login's outcome."""
        rows = await self._rows(
            "DELETE FROM challenges WHERE nonce = ? "
            "RETURNING server, user, nonce, issued_at, expires_at",
            (nonce,),
        )
        return Challenge(*rows[0]) if rows else None

    async def add_session(self, token_hash: str, user: str, expires_at: int, now: int) -> None:
        """Record a login; past SESSIONS_PER_USER_MAX live ones, those that expire first end
        (logins are free: without a bound, one key could fill the table)."""
        await self._write("DELETE FROM sessions WHERE expires_at < ?", (now,))
        await self._write("INSERT INTO sessions VALUES (?, ?, ?)", (token_hash, user, expires_at))
        ended = await self._rows(  # the new one stays, and those of the others that expire last
            "DELETE FROM sessions WHERE user = ? AND token_hash != ? AND token_hash NOT IN "
            "(SELECT token_hash FROM sessions WHERE user = ? AND token_hash != ? "
            "ORDER BY expires_at DESC, token_hash LIMIT ?) RETURNING token_hash",
            (user, token_hash, user, token_hash, SESSIONS_PER_USER_MAX - 1),
        )
        if ended:  # ended here, so at once: not still accepted from the bearer cache
            for (ended_hash,) in ended:
                self._bearers.pop(ended_hash, None)
            self._revocations += 1
        await self._write(
            "INSERT INTO users VALUES (?, ?, ?) ON CONFLICT (user) DO UPDATE SET updated_at = ?",
            (user, now, now, now),
        )

    async def end_session(self, token_hash: str) -> bool:
        """Log out: the session's token stops working at once, here and in the bearer cache."""
        ended = await self._write("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))
        self._bearers.pop(token_hash, None)
        if ended:
            self._revocations += 1  # a lookup that read the session before this must not cache it
        return ended == 1

    async def user_for(self, secret_hash: str, now: int) -> str | None:
        """The user a bearer secret (hashed) belongs to: a live session or an unrevoked key."""
        cached = self._bearers.get(secret_hash)
        if cached is not None:
            user, expires_at, until = cached
            if self._clock() < until and (expires_at is None or now <= expires_at):
                return user
            del self._bearers[secret_hash]
        revocations = self._revocations
        rows = await self._rows(
            "SELECT user, expires_at FROM sessions WHERE token_hash = ? AND expires_at >= ? "
            "UNION ALL SELECT user, NULL FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL",
            (secret_hash, now, secret_hash),
        )
        if not rows:
            return None
        if revocations != self._revocations:  # a key was revoked while we read: do not cache
            return str(rows[0][0])
        if len(self._bearers) >= BEARERS_CACHED_MAX:
            self._bearers.clear()
        user, expires_at = str(rows[0][0]), rows[0][1]
        self._bearers[secret_hash] = (user, expires_at, self._clock() + BEARER_CACHED_S)
        return user

    async def user(self, user: str) -> UserRow | None:
        rows = await self._rows(
            "SELECT user, created_at, updated_at FROM users WHERE user = ?", (user,)
        )
        return UserRow(*rows[0]) if rows else None

    # --- API keys --------------------------------------------------------------------------------

    async def add_api_key(self, user: str, key_hash: str, name: str, now: int) -> ApiKeyRow | None:
        """A new key, or None if the user has API_KEYS_ACTIVE_MAX unrevoked ones already (the
        count and the insert are one statement, so racing requests cannot pass it together)."""
        key_id = "key_" + uuid.uuid4().hex[:16]
        added = await self._write(
            "INSERT INTO api_keys SELECT ?, ?, ?, ?, ?, NULL WHERE (SELECT COUNT(*) FROM api_keys "
            "WHERE user = ? AND revoked_at IS NULL) < ?",
            (key_id, user, key_hash, name, now, user, API_KEYS_ACTIVE_MAX),
        )
        return ApiKeyRow(key_id, name, now, None) if added == 1 else None

    async def api_keys(self, user: str) -> list[ApiKeyRow]:
        rows = await self._rows(
            "SELECT id, name, created_at, revoked_at FROM api_keys WHERE user = ? "
            "ORDER BY created_at, id",
            (user,),
        )
        return [ApiKeyRow(*row) for row in rows]

    async def revoke_api_key(self, user: str, key_id: str, now: int) -> bool:
        """Revoke one of this user's keys; False if it is not theirs or already revoked."""
        changed = await self._write(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND user = ? AND revoked_at IS NULL",
            (now, key_id, user),
        )
        if changed == 1:  # a refused revoke (anyone can send one) keeps everyone's cache
            self._bearers.clear()  # which hash was that key's is not kept: forget them all
            self._revocations += 1  # and a lookup that read before this must not cache it
            await self._write(
                "DELETE FROM api_keys WHERE user = ? AND revoked_at IS NOT NULL AND id NOT IN "
                "(SELECT id FROM api_keys WHERE user = ? AND revoked_at IS NOT NULL "
                "ORDER BY revoked_at DESC, id LIMIT ?)",
                (user, user, API_KEYS_REVOKED_KEPT),
            )
        return changed == 1

    # --- conversations ---------------------------------------------------------------------------

    async def add_conversation(
        self, user: str, title: str, model: str, now: int
    ) -> ConversationRow | None:
        """A new conversation, or None if the user has CONVERSATIONS_PER_USER_MAX already (one
        statement: racing requests cannot pass the count together)."""
        row = ConversationRow(str(uuid.uuid4()), user, title, model, now, now)
        added = await self._write(
            "INSERT INTO conversations SELECT ?, ?, ?, ?, ?, ? "
            "WHERE (SELECT COUNT(*) FROM conversations WHERE user = ?) < ?",
            (
                row.id,
                row.user,
                row.title,
                row.model,
                row.created_at,
                row.updated_at,
                user,
                CONVERSATIONS_PER_USER_MAX,
            ),
        )
        return row if added == 1 else None

    async def conversations(
        self, user: str, limit: int, after: ConversationRow | None = None
    ) -> list[ConversationRow]:
        """The user's conversations, the newest first (as the Go backend listed them); `after`
        one of them: those listed after it (a page of a longer list). The order is by creation,
        which never changes: by last update, a page would repeat one a new message moved up."""
        where, params = "user = ?", [user]
        if after is not None:
            where += " AND (created_at < ? OR (created_at = ? AND id > ?))"
            params += [after.created_at, after.created_at, after.id]
        rows = await self._rows(
            "SELECT id, user, title, model, created_at, updated_at FROM conversations "
            f"WHERE {where} ORDER BY created_at DESC, id LIMIT ?",
            (*params, limit),
        )
        return [ConversationRow(*row) for row in rows]

    async def conversation(self, user: str, conversation_id: str) -> ConversationRow | None:
        """The conversation only if this user owns it: another user's looks like no conversation."""
        rows = await self._rows(
            "SELECT id, user, title, model, created_at, updated_at FROM conversations "
            "WHERE id = ? AND user = ?",
            (conversation_id, user),
        )
        return ConversationRow(*rows[0]) if rows else None

    async def add_message(
        self, conversation_id: str, role: str, content: str, tokens_charged: int, now: int
    ) -> MessageRow:
        rows = await self._rows(
            "INSERT INTO messages (conversation_id, role, content, tokens_charged, created_at) "
            "VALUES (?, ?, ?, ?, ?) RETURNING id",
            (conversation_id, role, content, tokens_charged, now),
        )
        await self._write(
            "UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id)
        )
        return MessageRow(int(rows[0][0]), conversation_id, role, content, tokens_charged, now)

    async def messages(self, conversation_id: str, limit: int) -> list[MessageRow]:
        """The newest `limit` messages, oldest first."""
        rows = await self._rows(
            "SELECT * FROM (SELECT id, conversation_id, role, content, tokens_charged, created_at "
            "FROM messages WHERE conversation_id = ? ORDER BY id DESC LIMIT ?) ORDER BY id",
            (conversation_id, limit),
        )
        return [MessageRow(*row) for row in rows]
