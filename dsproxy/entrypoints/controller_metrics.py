"""`GET /metrics` of a controller (Prometheus), on `controller_metrics_port` when it is set.

What an operator watches: Requests by state (a growing `new` is a controller falling behind),
payments by state, work retried and why (an RPC node away, an account it cannot read), the
outbox's backlog (credits not yet published) and the ingest's lag. Gauges are read from the
projection when scraped, on the controller's own event loop (aiohttp), never from a thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from dsproxy.adapters.listening import bind_port
from dsproxy.entrypoints.node_metrics import NodeGauges
from dsproxy.services.node import Node

__all__ = ["ControllerMetrics", "serve_metrics"]

REQUEST_STATES = ("new", "accepted", "paid", "refused", "failed")
PAYMENT_STATES = ("accepted", "submitted", "expired", "credited", "failed")


class ControllerMetrics:
    """The controller's metrics, on their own registry."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Gauge(
            "dsproxy_controller_requests", "Recharge Requests by state", ["state"], registry=r
        )
        self.payments = Gauge(
            "dsproxy_controller_payments", "Payments by state", ["state"], registry=r
        )
        self.retries = Counter(
            "dsproxy_controller_retries",
            "Work (a Request, a payment) that failed and waits to be tried again, by error",
            ["error"],
            registry=r,
        )
        self.node_gauges = NodeGauges(r)

    def retried(self, error: str) -> None:
        self.retries.labels(error=error).inc()

    async def refresh(self) -> None:
        db = self.node.ledger.db
        for table, gauge, states in (
            ("recharge_requests", self.requests, REQUEST_STATES),
            ("payments", self.payments, PAYMENT_STATES),
        ):
            counts = dict.fromkeys(states, 0)
            rows = await db.fetch_all(f"SELECT state, COUNT(*) FROM {table} GROUP BY state")
            counts.update({str(state): int(count) for state, count in rows})
            for state, count in counts.items():
                gauge.labels(state=state).set(count)
        await self.node_gauges.refresh(self.node)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@contextlib.asynccontextmanager
async def serve_metrics(metrics: ControllerMetrics, host: str, port: int) -> AsyncIterator[int]:
    """Serve `GET /metrics` while the block runs; yields the port (`port` 0: any free one)."""
    sock = bind_port(host, port, hint="pick another with DSPROXY_CONTROLLER_METRICS_PORT")

    async def scrape(request: web.Request) -> web.Response:
        await metrics.refresh()
        response = web.Response(body=metrics.render())
        response.headers["content-type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield int(sock.getsockname()[1])
    finally:
        await runner.cleanup()
        sock.close()
