"""The one place that builds concrete adapters from Settings and wires them together."""

from __future__ import annotations

from collections.abc import Sequence

from attrs import define
from solders.pubkey import Pubkey

from dsproxy.adapters.balance_payment import BalancePayment
from dsproxy.adapters.event_store import AsyncEventStore
from dsproxy.adapters.projection_db import ProjectionDb
from dsproxy.config import Settings
from dsproxy.services.projector import FactProjection, Projector, open_projection
from dsproxy.wire.envelope import Address
from projections import TrustPolicy

__all__ = [
    "LedgerNode",
    "address",
    "open_ledger",
    "program_from_settings",
    "trust_policy",
]


def program_from_settings(settings: Settings) -> BalancePayment:
    """The balance-payment deployment the settings name (id, version, namespace)."""
    return BalancePayment(
        Pubkey.from_string(settings.program_id), settings.program_version, settings.namespace_id
    )


def address(settings: Settings) -> Address:
    return Address(session=settings.session, machine=settings.require_machine())


def trust_policy(settings: Settings) -> TrustPolicy:
    return TrustPolicy(
        session=settings.session,
        machine=settings.require_machine(),
        controllers=settings.trusted_controllers,
        backends=settings.trusted_backends,
    )


@define
class LedgerNode:
    """The store, the projection and the projector that keeps one in step with the other."""

    settings: Settings
    store: AsyncEventStore
    db: ProjectionDb
    projector: Projector

    async def aclose(self) -> None:
        await self.db.close()
        await self.store.close()


async def open_ledger(settings: Settings, extensions: Sequence[FactProjection] = ()) -> LedgerNode:
    """Open the event store and the projection (with any fact projections) under the policy."""
    policy = trust_policy(settings)
    store = AsyncEventStore.open(settings.events_path)
    db = await open_projection(
        store, settings.projection_path, policy, settings.content_bytes_max, extensions
    )
    projector = Projector(
        store, db, policy, content_bytes_max=settings.content_bytes_max, extensions=extensions
    )
    return LedgerNode(settings, store, db, projector)
