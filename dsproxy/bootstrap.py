"""The one place that builds concrete adapters from Settings and wires them together."""

from __future__ import annotations

from contextlib import AbstractContextManager

from attrs import define
from solders.pubkey import Pubkey

from dsproxy.adapters.balance_payment import BalancePayment
from dsproxy.adapters.data_dir_lock import while_no_other_process_runs
from dsproxy.adapters.event_store import AsyncEventStore
from dsproxy.adapters.holds_projection import HoldsProjection
from dsproxy.adapters.node_keys import load_secret
from dsproxy.adapters.projection_db import ProjectionDb
from dsproxy.adapters.recharges_projection import RechargesProjection
from dsproxy.config import Settings
from dsproxy.errors import ConfigError
from dsproxy.services.outbox import OutboxProjection
from dsproxy.services.projector import FactProjection, Projector, open_projection
from dsproxy.wire.envelope import Address
from dsproxy.wire.event import public_key_of
from projections import TrustPolicy

__all__ = [
    "LedgerNode",
    "address",
    "fact_projections",
    "open_ledger",
    "own_pubkey",
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


def own_pubkey(settings: Settings) -> str | None:
    """The node's public key, when it has a key file (a node without one only ingests)."""
    if settings.nostr_key_file is None:
        return None
    return public_key_of(load_secret(settings.nostr_key_file))


def fact_projections(settings: Settings) -> list[FactProjection]:
    """Every fact projection of a data directory, whatever role opens it.

    One list for all entry points: the projection records which schemas it was built with,
    and a command that opened it with another list would rebuild it from the store.
    """
    projections: list[FactProjection] = [RechargesProjection(address(settings))]
    author = own_pubkey(settings)
    if author is not None:
        projections += [HoldsProjection(author), OutboxProjection(author)]
    return projections


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


def _no_rebuild(settings: Settings) -> AbstractContextManager[object]:
    raise ConfigError(
        f"the projection in {settings.data_dir} was built under other settings (trusted keys, "
        "node key, content limit) than this command's: give it the service's configuration "
        "(--config), or rebuild it under these with `dsproxy replay`"
    )


async def open_ledger(settings: Settings, *, rebuild: bool = True) -> LedgerNode:
    """Open the event store and the projection (with every fact projection) under the policy.

    A projection built under other settings is rebuilt (a service given new trusted keys), or
    with `rebuild=False` (a command that only reads) refused: a forgotten `--config` must not
    read as balance 0, nor rewrite the file."""
    policy = trust_policy(settings)
    extensions = fact_projections(settings)
    store = AsyncEventStore.open(settings.events_path, settings.store_lock_timeout_s)
    what = (
        "the projection was built under other settings (trusted keys, node key, content limit) "
        "than this command's, and its rebuild"
    )
    try:
        db = await open_projection(
            store,
            settings.projection_path,
            policy,
            settings.content_bytes_max,
            extensions,
            exclusive=lambda: (
                while_no_other_process_runs(settings.data_dir, what)
                if rebuild
                else _no_rebuild(settings)
            ),
        )
    except BaseException:
        await store.close()
        raise
    projector = Projector(
        store, db, policy, content_bytes_max=settings.content_bytes_max, extensions=extensions
    )
    return LedgerNode(settings, store, db, projector)
