"""The gauges every node's `/metrics` shows, backend or controller: its outbox and its ingest."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from dsproxy.services.node import Node

__all__ = ["NodeGauges"]


class NodeGauges:
    """Outbox backlog and refusals, and ingest lag, on a registry; `refresh` at scrape time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.outbox_backlog = Gauge(
            "dsproxy_outbox_backlog_events",
            "Own events stored, not yet acknowledged",
            registry=registry,
        )
        self.outbox_failed = Gauge(
            "dsproxy_outbox_failed_events",
            "Own events every relay refused for good, never published (`dsproxy outbox`)",
            registry=registry,
        )
        self.ingest_lag = Gauge(
            "dsproxy_ingest_lag_events",
            "Events received but not yet stored, plus stored but not yet projected",
            registry=registry,
        )

    async def refresh(self, node: Node) -> None:
        backlog, failed = await node.outbox_counts()
        self.outbox_backlog.set(backlog)
        self.outbox_failed.set(failed)
        self.ingest_lag.set(await node.ingest_lag())
