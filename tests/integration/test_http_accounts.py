"""Challenge login, API keys, balance and ledger over HTTP; replays, expiry, revocation fail."""

# ruff: noqa: F811 (pytest fixtures are imported by name, then requested by name)

from __future__ import annotations

import asyncio
import datetime

import httpx
import openai
import pytest

from dsproxy.adapters.accounts_db import API_KEYS_ACTIVE_MAX, SESSIONS_PER_USER_MAX
from dsproxy.config import Settings, load_settings
from tests.integration.upstream_fixtures import (  # noqa: F401 (fixtures)
    PUBLIC_URL,
    USER_KEYS,
    WAIT_S_MAX,
    backend_env,
    backend_in_thread,
    backend_settings,
    backend_url,
    balance,
    bearer,
    challenge,
    client,
    create_api_key,
    credit,
    demo_model,
    demo_url,
    login,
    served,
    sign,
    tokenizer,
)

WALLET = USER_KEYS[0]
USER = str(WALLET.pubkey())


async def try_login(
    client: httpx.AsyncClient, message: str, signature: str, path: str = "/v1/auth/login"
) -> httpx.Response:
    body = {"user_pubkey": USER, "message": message, "signature": signature}
    return await client.post(path, json=body)


async def test_a_signed_challenge_gives_a_token_that_works(client: httpx.AsyncClient) -> None:
    message = await challenge(client, WALLET)
    assert PUBLIC_URL in message and USER in message
    response = await try_login(client, message, sign(WALLET, message))
    assert response.status_code == 200
    assert set(response.json()) == {"user", "token", "expire_at"}
    token = response.json()["token"]
    assert (await balance(client, token)) == {
        "user": USER,
        "balance": 0,
        "held": 0,
        "available": 0,
    }


async def test_the_dapp_login_route_also_needs_a_challenge(client: httpx.AsyncClient) -> None:
    unsolicited = f"{PUBLIC_URL} wants you to sign in\nNonce: {'0' * 32}"
    response = await try_login(client, unsolicited, sign(WALLET, unsolicited), "/user/login")
    assert response.status_code == 401
    message = (await client.post("/user/challenge", json={"user_pubkey": USER})).json()["message"]
    response = await try_login(client, message, sign(WALLET, message), "/user/login")
    assert response.status_code == 200
    # the dApp does `new Date(expire_at)`: a number is read as milliseconds (1970, expired),
    # so its route says the time as the Go backend did, in RFC 3339
    expire_at = datetime.datetime.fromisoformat(response.json()["expire_at"])
    week = datetime.timedelta(days=7)  # the default session_ttl_s
    assert expire_at.tzinfo is not None
    ahead = expire_at - datetime.datetime.now(datetime.UTC)
    assert week - datetime.timedelta(minutes=5) < ahead <= week


async def test_a_challenge_cannot_be_replayed(client: httpx.AsyncClient) -> None:
    message = await challenge(client, WALLET)
    signature = sign(WALLET, message)
    assert (await try_login(client, message, signature)).status_code == 200
    replay = await try_login(client, message, signature)
    assert replay.status_code == 401
    assert "already used" in replay.json()["error"]["message"]


async def test_a_failed_attempt_burns_the_challenge(client: httpx.AsyncClient) -> None:
    message = await challenge(client, WALLET)
    wrong = sign(USER_KEYS[1], message)
    assert (await try_login(client, message, wrong)).status_code == 401
    assert (await try_login(client, message, sign(WALLET, message))).status_code == 401


async def test_a_challenge_for_another_server_is_refused(client: httpx.AsyncClient) -> None:
    message = await challenge(client, WALLET)
    forged = message.replace(PUBLIC_URL, "http://evil.test")
    response = await try_login(client, forged, sign(WALLET, forged))
    assert response.status_code == 401


async def test_an_expired_challenge_is_refused(node_env: dict[str, str], demo_url: str) -> None:
    settings = load_settings(backend_env(node_env, demo_url, DSPROXY_CHALLENGE_TTL_S="1"))
    async with served(settings) as http:
        message = await challenge(http, WALLET)
        await asyncio.sleep(2.1)  # past its expiry, whole seconds
        response = await try_login(http, message, sign(WALLET, message))
        assert response.status_code == 401
        assert "expired" in response.json()["error"]["message"]


async def test_without_a_public_url_a_challenge_names_the_port_the_server_has(
    node_env: dict[str, str], demo_url: str
) -> None:
    """On port 0 (any free port) login messages named port 0: no address of this server."""
    settings = load_settings(backend_env(node_env, demo_url, DSPROXY_PUBLIC_URL=""))
    with backend_in_thread(settings) as base:
        async with httpx.AsyncClient(base_url=base, timeout=WAIT_S_MAX) as http:
            message = await challenge(http, WALLET)
            assert message.startswith(f"{base} wants you to sign in"), message
            response = await try_login(http, message, sign(WALLET, message))
            assert response.status_code == 200


async def test_a_client_address_asks_for_so_many_login_challenges_a_minute(
    node_env: dict[str, str], demo_url: str
) -> None:
    """Logins are free and each new wallet's leaves rows on disk: 160 new wallets from one
    client made 9,600 conversations in 16 s. The per-user limits cannot see new wallets."""
    settings = load_settings(backend_env(node_env, demo_url, DSPROXY_CHALLENGES_PER_MINUTE_MAX="3"))
    async with served(settings) as http:
        for index in range(3):
            await challenge(http, USER_KEYS[index])
        refused = await http.post(
            "/user/challenge", json={"user_pubkey": str(USER_KEYS[3].pubkey())}
        )
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) > 0


@pytest.mark.parametrize("user", ["not-base58!", "", 42])
async def test_a_bad_user_key_is_refused(client: httpx.AsyncClient, user: object) -> None:
    response = await client.post("/v1/auth/challenge", json={"user_pubkey": user})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "user_pubkey"


async def test_api_keys_are_created_listed_and_revoked(
    client: httpx.AsyncClient, backend_url: str
) -> None:
    session = await login(client, WALLET)
    created = await create_api_key(client, session, "laptop")
    assert created["key"].startswith("dsk-")
    listed = (await client.get("/v1/api-keys", headers=bearer(session))).json()["data"]
    assert [(k["id"], k["name"], k["revoked_at"]) for k in listed] == [
        (created["id"], "laptop", None)
    ]
    assert "key" not in listed[0]  # shown once, stored only hashed
    async with openai.AsyncOpenAI(
        base_url=backend_url + "/v1", api_key=created["key"], max_retries=0
    ) as sdk:
        assert (await sdk.models.list()).data
        revoked = await client.delete(f"/v1/api-keys/{created['id']}", headers=bearer(session))
        assert revoked.status_code == 200
        with pytest.raises(openai.AuthenticationError):
            await sdk.models.list()
    again = await client.delete(f"/v1/api-keys/{created['id']}", headers=bearer(session))
    assert again.status_code == 404


async def test_an_api_key_cannot_manage_keys_or_revoke_anothers(
    client: httpx.AsyncClient,
) -> None:
    session = await login(client, WALLET)
    key = (await create_api_key(client, session))["key"]
    response = await client.post("/v1/api-keys", json={"name": "x"}, headers=bearer(key))
    assert response.status_code == 401
    other_session = await login(client, USER_KEYS[1])
    other_key = await create_api_key(client, other_session)
    response = await client.delete(f"/v1/api-keys/{other_key['id']}", headers=bearer(session))
    assert response.status_code == 404
    models = await client.get("/v1/models", headers=bearer(other_key["key"]))
    assert models.status_code == 200


async def test_logging_out_ends_that_login_only(client: httpx.AsyncClient) -> None:
    """A login used once (cached as a bearer) stops working at logout; the user's other login
    and API keys go on working, and an API key cannot log anyone out."""
    session, other = await login(client, WALLET), await login(client, WALLET)
    key = (await create_api_key(client, session))["key"]
    assert (await client.get("/v1/balance", headers=bearer(session))).status_code == 200
    refused = await client.post("/v1/auth/logout", headers=bearer(key))
    assert refused.status_code == 401
    response = await client.post("/v1/auth/logout", headers=bearer(session))
    assert response.status_code == 200
    assert response.json() == {"user": USER, "logged_out": True}
    after = await client.get("/v1/balance", headers=bearer(session))
    assert after.status_code == 401
    assert after.json()["error"]["type"] == "authentication_error"
    assert (await client.post("/v1/auth/logout", headers=bearer(session))).status_code == 401
    for still in (other, key):
        assert (await client.get("/v1/balance", headers=bearer(still))).status_code == 200


async def test_a_user_has_a_bounded_number_of_keys_and_logins(
    client: httpx.AsyncClient,
) -> None:
    """A fresh wallet with no balance made 1,000 keys and 200 live logins: both are bounded, a
    login past the bound ends one that expires first, and a key past it is refused until one is
    revoked."""
    sessions = [await login(client, WALLET) for _ in range(SESSIONS_PER_USER_MAX + 2)]
    works = [
        (await client.get("/v1/balance", headers=bearer(token))).status_code for token in sessions
    ]
    # logins of one second expire together: which of them ended is not said, only how many
    assert works.count(200) == SESSIONS_PER_USER_MAX and works[-1] == 200
    session = sessions[-1]
    keys = [await create_api_key(client, session, f"k{n}") for n in range(API_KEYS_ACTIVE_MAX)]
    refused = await client.post("/v1/api-keys", json={"name": "one more"}, headers=bearer(session))
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "api_key_limit_reached"
    revoked = await client.delete(f"/v1/api-keys/{keys[0]['id']}", headers=bearer(session))
    assert revoked.status_code == 200
    assert (await create_api_key(client, session, "again"))["key"].startswith("dsk-")
    assert (await client.get("/v1/models", headers=bearer(keys[1]["key"]))).status_code == 200


async def test_user_and_transactions_show_the_ledger(
    client: httpx.AsyncClient, backend_settings: Settings
) -> None:
    session = await login(client, WALLET)
    await credit(client, backend_settings, session, USER, 500)
    user = (await client.get("/user", headers=bearer(session))).json()
    assert user["public_key"] == USER and user["tokens"] == 500
    assert user["tokens_consumed"] == 0
    ledger = (await client.get("/v1/transactions", headers=bearer(session))).json()
    assert [(entry["tokens"], len(entry["event_id"])) for entry in ledger["data"]] == [(500, 64)]
    # "²" is a digit to str.isdigit, not to int(); nor are 4,301 digits (a 500, once)
    for limit in ("0", "1001", "%C2%B2", "x", "1" * 4301):
        bad = await client.get(f"/v1/transactions?limit={limit}", headers=bearer(session))
        assert (bad.status_code, bad.json()["error"]["param"]) == (400, "limit")


async def test_transactions_show_the_newest_entries(
    client: httpx.AsyncClient, backend_settings: Settings
) -> None:
    """They once showed the oldest `limit`: past 1,000 entries the newest were out of reach."""
    session = await login(client, WALLET)
    for tokens in (1, 2, 3, 4):
        await credit(client, backend_settings, session, USER, tokens)
    ledger = await client.get("/v1/transactions?limit=2", headers=bearer(session))
    assert [entry["tokens"] for entry in ledger.json()["data"]] == [3, 4]
