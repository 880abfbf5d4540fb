"""Account routes: challenge login with a Solana wallet, API keys, balance and ledger.

POST /v1/auth/challenge {user_pubkey}                 -> {message, nonce, expires_at}
POST /v1/auth/login {user_pubkey, message, signature} -> {user, token, expire_at}
POST /v1/auth/logout                                  (ends the login token it is sent with)
GET|POST /v1/api-keys, DELETE /v1/api-keys/{id}       (needs a login token)
GET /v1/balance, GET /v1/transactions
POST /user/challenge, POST /user/login, GET /user     (the dApp's names)
"""

from __future__ import annotations

import datetime
import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dsproxy.adapters.accounts_db import API_KEYS_ACTIVE_MAX
from dsproxy.domain.accounts import (
    API_KEY_PREFIX,
    SESSION_PREFIX,
    LoginRefused,
    challenge_text,
    decide_login,
    decode_signature,
    hash_secret,
    issue_challenge,
    new_secret,
    nonce_of,
)
from dsproxy.entrypoints.http_api import (
    Backend,
    authenticate,
    json_response,
    now_s,
    query_limit,
    read_json,
)
from dsproxy.errors import AuthenticationFailed, InvalidParameter, MalformedMessage, NotFound
from dsproxy.wire.messages import validate_user

__all__ = ["routes"]

API_KEY_NAME_CHARS_MAX = 100
TRANSACTIONS_LIMIT_MAX = 1_000


def _text_field(body: Any, name: str, chars_max: int = 4_096) -> str:
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value or len(value) > chars_max:
        raise InvalidParameter(f"{name} must be a non-empty string", param=name)
    return value


def _user_field(body: Any) -> str:
    try:
        return validate_user(_text_field(body, "user_pubkey", 64), "user_pubkey")
    except MalformedMessage as exc:
        raise InvalidParameter(str(exc), param="user_pubkey") from None


def routes(backend: Backend) -> list[Route]:
    settings = backend.settings

    async def challenge(request: Request) -> Response:
        if backend.client_limits is not None:
            client = request.client.host if request.client is not None else "unknown"
            backend.client_limits.count(client)
        user = _user_field(await read_json(request, 4_096))
        now = now_s()
        issued = issue_challenge(
            backend.server, user, secrets.token_hex(16), now, settings.challenge_ttl_s
        )
        await backend.accounts.add_challenge(issued, now)
        text = challenge_text(issued)
        return json_response(
            {"message": text, "nonce": issued.nonce, "expires_at": issued.expires_at}
        )

    async def login(request: Request) -> Response:
        """`expire_at` in seconds; on the dApp's route an RFC 3339 time, as the Go backend
        wrote it (the dApp reads a number as milliseconds: a login expired in 1970)."""
        body = await read_json(request, 16_384)
        user = _user_field(body)
        message = _text_field(body, "message")
        signature = decode_signature(_text_field(body, "signature", 200))
        nonce = nonce_of(message)
        taken = await backend.accounts.take_challenge(nonce) if nonce else None
        now = now_s()
        decision = decide_login(
            taken, server=backend.server, user=user, message=message, signature=signature, now=now
        )
        if isinstance(decision, LoginRefused):
            raise AuthenticationFailed(f"login refused: {decision.reason}")
        token = new_secret(SESSION_PREFIX)
        expire_at = now + settings.session_ttl_s
        await backend.accounts.add_session(hash_secret(token), user, expire_at, now)
        if request.url.path.startswith("/user/"):
            shown = datetime.datetime.fromtimestamp(expire_at, datetime.UTC).isoformat()
            return json_response({"user": user, "token": token, "expire_at": shown})
        return json_response({"user": user, "token": token, "expire_at": expire_at})

    async def logout(request: Request) -> Response:
        user = await authenticate(request, backend, session_only=True)
        token = request.headers["authorization"].partition(" ")[2].strip()
        await backend.accounts.end_session(hash_secret(token))
        return json_response({"user": user, "logged_out": True})

    async def list_keys(request: Request) -> Response:
        user = await authenticate(request, backend, session_only=True)
        keys = await backend.accounts.api_keys(user)
        data = [
            {"id": k.id, "name": k.name, "created_at": k.created_at, "revoked_at": k.revoked_at}
            for k in keys
        ]
        return json_response({"object": "list", "data": data})

    async def create_key(request: Request) -> Response:
        user = await authenticate(request, backend, session_only=True)
        body = await read_json(request, 4_096)
        name = body.get("name", "") if isinstance(body, dict) else None
        if not isinstance(name, str) or len(name) > API_KEY_NAME_CHARS_MAX:
            raise InvalidParameter(
                f"name must be a string of at most {API_KEY_NAME_CHARS_MAX} characters",
                param="name",
            )
        key = new_secret(API_KEY_PREFIX)
        row = await backend.accounts.add_api_key(user, hash_secret(key), name, now_s())
        if row is None:
            raise InvalidParameter(
                f"a user may have at most {API_KEYS_ACTIVE_MAX} active API keys: revoke one first",
                param="name",
                code="api_key_limit_reached",
            )
        shown_once = {"id": row.id, "name": row.name, "key": key, "created_at": row.created_at}
        return json_response(shown_once, 201)

    async def revoke_key(request: Request) -> Response:
        user = await authenticate(request, backend, session_only=True)
        key_id = request.path_params["key_id"]
        if not await backend.accounts.revoke_api_key(user, key_id, now_s()):
            raise NotFound(f"no active API key {key_id!r}")
        return json_response({"id": key_id, "revoked": True})

    async def balance(request: Request) -> Response:
        user = await authenticate(request, backend)
        view = await backend.meter.view(user)
        return json_response(
            {
                "user": user,
                "balance": view.balance,
                "held": view.held,
                "available": view.tokens_available,
            }
        )

    async def transactions(request: Request) -> Response:
        user = await authenticate(request, backend)
        limit = query_limit(request, 100, TRANSACTIONS_LIMIT_MAX)
        postings = await backend.node.ledger.db.postings(user, limit)
        data = [
            {
                "event_id": p.event_id,
                "tokens": p.tokens,
                "author": p.author,
                "created_at": p.created_at,
                "position": p.position,
            }
            for p in postings
        ]
        return json_response({"object": "list", "user": user, "data": data})

    async def dapp_user(request: Request) -> Response:
        user = await authenticate(request, backend)
        account = await backend.node.ledger.db.account(user)
        row = await backend.accounts.user(user)
        view = await backend.meter.view(user)
        # charges the ledger does not show yet are consumed already
        unfolded = await backend.meter.charged_unfolded(user)
        return json_response(
            {
                "id": user,
                "public_key": user,
                "tokens": view.tokens_available,
                "tokens_consumed": (account.debited if account else 0) + unfolded,
                "created_at": row.created_at if row else None,
                "updated_at": row.updated_at if row else None,
            }
        )

    return [
        Route("/v1/auth/challenge", challenge, methods=["POST"]),
        Route("/v1/auth/login", login, methods=["POST"]),
        Route("/v1/auth/logout", logout, methods=["POST"]),
        Route("/user/challenge", challenge, methods=["POST"]),
        Route("/user/login", login, methods=["POST"]),
        Route("/user", dapp_user, methods=["GET"]),
        Route("/v1/api-keys", list_keys, methods=["GET"]),
        Route("/v1/api-keys", create_key, methods=["POST"]),
        Route("/v1/api-keys/{key_id}", revoke_key, methods=["DELETE"]),
        Route("/v1/balance", balance, methods=["GET"]),
        Route("/v1/transactions", transactions, methods=["GET"]),
    ]
