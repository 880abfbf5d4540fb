"""Fixtures: a LocalChain served over real HTTP JSON-RPC, and the real client pointed at it.

Import the `*_fixture` functions in a test module; pytest knows them by their `name`.
The chain's clock is fixed so that deadlines are exact, not racy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from attrs import frozen
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from dsproxy.adapters.balance_payment import BalancePayment
from dsproxy.adapters.solana_rpc import BalancePaymentRpc
from dsproxy.domain.eligibility import OnChainUser
from dsproxy.localchain import LocalChain, LocalChainServer
from dsproxy.wire.messages import RecoverInfo
from dsproxy.wire.recover import new_payload, sign_recover

CHAIN_NOW = 1_800_000_000
DEPOSIT_LAMPORTS = 20_000_000
PAY_LAMPORTS = 5_000_000
WALLET_LAMPORTS = 1_000_000_000


@frozen
class Parties:
    """The keys of one test world: the program's authority, bot and treasury, and a user."""

    authority: Keypair
    bot: Keypair
    treasury: Keypair
    user: Keypair


@frozen
class World:
    chain: LocalChain
    server: LocalChainServer
    rpc: BalancePaymentRpc
    keys: Parties

    def authorize(
        self, nonce: int, *, deadline: int | None = None, by: Keypair | None = None
    ) -> RecoverInfo:
        """What the user's wallet signs for one payment (deadline 10 minutes ahead)."""
        deadline = CHAIN_NOW + 600 if deadline is None else deadline
        return sign_recover(by or self.keys.user, new_payload(), nonce, deadline)

    def balances(self) -> dict[str, int]:
        """Every balance a payment could move, to assert that a failure moved none."""
        program = self.rpc.program
        user = self.keys.user.pubkey()
        return {
            "vault": self.chain.get_balance(program.vault_pda(user)[0]),
            "treasury": self.chain.get_balance(self.keys.treasury.pubkey()),
            "user": self.chain.get_balance(user),
            "bot": self.chain.get_balance(self.keys.bot.pubkey()),
        }

    async def onchain(self) -> OnChainUser:
        state = await self.rpc.fetch_onchain_user(self.keys.user.pubkey())
        assert state is not None
        return state

    async def pay(self, info: RecoverInfo, amount: int = PAY_LAMPORTS, **overrides: Any) -> str:
        arguments = {"user": self.keys.user.pubkey(), "bot": self.keys.bot, **overrides}
        return await self.rpc.pay(recover_info=info, amount=amount, **arguments)


def fixed_clock() -> float:
    return CHAIN_NOW


@pytest.fixture(name="parties")
def parties_fixture() -> Parties:
    return Parties(Keypair(), Keypair(), Keypair(), Keypair())


@pytest.fixture(name="chain")
def chain_fixture(parties: Parties) -> LocalChain:
    """A chain with GLOBAL initialized and the bot and the user funded."""
    chain = LocalChain(BalancePayment(), clock=fixed_clock)
    chain.initialize_global(
        authority=parties.authority.pubkey(),
        bot=parties.bot.pubkey(),
        treasury=parties.treasury.pubkey(),
    )
    chain.airdrop(parties.bot.pubkey(), WALLET_LAMPORTS)
    chain.airdrop(parties.user.pubkey(), WALLET_LAMPORTS)
    return chain


@pytest.fixture(name="chain_server")
def chain_server_fixture(chain: LocalChain) -> Iterator[LocalChainServer]:
    """The chain's JSON-RPC on a free port of 127.0.0.1, served from a thread."""
    server = LocalChainServer(chain)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(name="world")
async def world_fixture(
    chain: LocalChain, chain_server: LocalChainServer, parties: Parties
) -> AsyncIterator[World]:
    """A registered user with DEPOSIT_LAMPORTS in the vault, and the client to pay from it."""
    async with BalancePaymentRpc.connect(
        chain_server.url, chain.program, poll_interval_s=0.005, resend_interval_s=0.05
    ) as rpc:
        await rpc.register(parties.user)
        await rpc.deposit(parties.user, DEPOSIT_LAMPORTS)
        yield World(chain, chain_server, rpc, parties)


def not_a_curve_point() -> bytes:
    """32 bytes that do not decode to an ed25519 point (for SignatureFormatInvalid)."""
    for y in range(2, 1000):
        candidate = y.to_bytes(32, "little")
        if not Pubkey.from_bytes(candidate).is_on_curve():
            return candidate
    raise AssertionError("no non-point found")
