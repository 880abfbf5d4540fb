"""A controller's handler wired to a real store, projection and the local chain over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import pytest
from attrs import frozen
from solders.keypair import Keypair

from dsproxy.adapters.recharges_projection import RechargesProjection
from dsproxy.bootstrap import LedgerNode, open_ledger
from dsproxy.config import Settings
from dsproxy.domain.recharge import recharge_request
from dsproxy.handlers.recharge import RechargeHandler
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.event import NostrEvent, public_key_of
from dsproxy.wire.messages import (
    Reason,
    RecoverInfo,
)
from tests.conftest import CONTROLLER_SECRET
from tests.integration.localchain_fixtures import PAY_LAMPORTS, World, fixed_clock

TOKENS_PER_LAMPORT = 2


def dapp_request(
    address: Address,
    user: Keypair,
    info: RecoverInfo,
    nonce: int,
    *,
    reason: Reason = Reason.USER_REQUEST,
    requester_secret: str | None = None,
    created_at: int | None = None,
    namespace_id: int | None = None,
) -> NostrEvent:
    """A Request built as the dApp builds it, signed by a throw-away Nostr key."""
    request = recharge_request(info, nonce, str(user.pubkey()), namespace_id)
    message = attrs.evolve(request, reason=reason)
    secret = requester_secret or Keypair().secret().hex()
    when = int(fixed_clock()) if created_at is None else created_at
    return seal(message, address, secret, created_at=when)


@frozen
class Controller:
    node: LedgerNode
    handler: RechargeHandler
    world: World

    async def deliver(self, *events: NostrEvent) -> None:
        """What ingest does: append, project, then the controller answers every new Request."""
        await self.node.store.append_nostr(list(events))
        await self.node.projector.catch_up()
        for row in await RechargesProjection.new_requests(self.node.db, 100):
            await self.handler.handle_request(row)

    async def balance(self, user: Keypair) -> int:
        row = await self.node.db.account(str(user.pubkey()))
        return 0 if row is None else row.balance


def controller_settings(settings: Settings) -> Settings:
    return settings.replace(
        trusted_controllers=(public_key_of(CONTROLLER_SECRET),),
        pay_amount_lamports=PAY_LAMPORTS,
        tokens_per_lamport=TOKENS_PER_LAMPORT,
    )


@pytest.fixture(name="controller")
async def controller_fixture(
    world: World, node_settings: Settings, address: Address
) -> AsyncIterator[Controller]:
    settings = controller_settings(node_settings)
    node = await open_ledger(settings)
    handler = RechargeHandler(
        store=node.store,
        projector=node.projector,
        rpc=world.rpc,
        bot=world.keys.bot,
        treasury=world.keys.treasury.pubkey(),
        signer_secret=CONTROLLER_SECRET,
        address=address,
        amount_lamports=PAY_LAMPORTS,
        tokens_per_lamport=TOKENS_PER_LAMPORT,
        admin=public_key_of("ad" * 32),
        clock=fixed_clock,
    )
    try:
        yield Controller(node, handler, world)
    finally:
        await node.aclose()
