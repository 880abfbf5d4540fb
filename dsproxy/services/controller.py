"""The controller loop: answer every new recharge Request and finish every unfinished payment.

It works from the projection, not from live notifications, so Requests that arrived while the
controller was down (ingest fetches them from its checkpoint) are handled after a restart, and
payments a crash interrupted are finished first. Requests of different users run concurrently,
up to a limit; one user's run one at a time (the handler's lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from dsproxy.adapters.recharges_projection import RechargesProjection
from dsproxy.errors import DsproxyError
from dsproxy.handlers.recharge import RechargeHandler

__all__ = ["ControllerLoop"]

log = logging.getLogger(__name__)

_REQUEST = "request "  # the key prefix of a Request's work


class ControllerLoop:
    """Schedules the handler's work; every failure is retried later, never dropped."""

    def __init__(
        self,
        handler: RechargeHandler,
        *,
        concurrency_max: int = 16,
        poll_s: float = 0.5,
        retry_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_retry: Callable[[str], None] = lambda error: None,
    ) -> None:
        """`on_retry(error)`: work failed (its error's class name) and waits to be tried again."""
        self.handler = handler
        self.db = handler.projector.db
        self.poll_s, self.retry_s, self.clock = poll_s, retry_s, clock
        self._on_retry = on_retry
        self._slots = asyncio.Semaphore(concurrency_max)
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._retry_at: dict[str, float] = {}
        self._queue_len_max = concurrency_max * 4

    async def run(self) -> None:
        """Run until cancelled."""
        try:
            while True:
                await self.schedule()
                await self._wait_for_news()
        finally:
            for task in self._inflight.values():
                task.cancel()
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    async def schedule(self) -> int:
        """Start work for what is due now; returns how many tasks were started."""
        started = 0
        for payment in await RechargesProjection.unfinished_payments(self.db):
            started += self._start(
                f"payment {payment.payment_id}",
                lambda p=payment: self.handler.resume(p.payment_id, p.user),
            )
        # Requests never tried come first, then those whose retry is due: Requests that keep
        # failing (anyone can publish them) must not fill the window and hold others back
        tried = [key for key in self._retry_at if key.startswith(_REQUEST)]
        due = [key for key in tried if self._retry_at[key] <= self.clock()]
        untried = await RechargesProjection.new_requests(
            self.db, self._queue_len_max, leaving_out=[key[len(_REQUEST) :] for key in tried]
        )
        retried = (
            await RechargesProjection.new_requests(
                self.db, len(due), only=[key[len(_REQUEST) :] for key in due]
            )
            if due
            else []
        )
        for key in set(due) - {_REQUEST + row.request_id for row in retried}:
            del self._retry_at[key]  # answered meanwhile (by a restart, or another path)
        for row in [*untried, *retried[: self._queue_len_max]]:
            started += self._start(_REQUEST + row.request_id,
                                   lambda r=row: self.handler.handle_request(r))  # fmt: skip
        return started

    async def settle(self) -> None:
        """Wait for every task started so far (tests and a clean stop use it)."""
        while self._inflight:
            await asyncio.gather(*list(self._inflight.values()), return_exceptions=True)

    def _start(self, key: str, work: Callable[[], Coroutine[Any, Any, None]]) -> int:
        if key in self._inflight or self._retry_at.get(key, 0.0) > self.clock():
            return 0
        self._inflight[key] = asyncio.create_task(self._guarded(key, work), name=key)
        return 1

    async def _guarded(self, key: str, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            async with self._slots:
                await work()
            self._retry_at.pop(key, None)
        except DsproxyError as exc:  # the chain or the store is away: try again later
            log.warning("%s: %s; retrying in %.0f s", key, exc, self.retry_s)
            self._retry_at[key] = self.clock() + self.retry_s
            self._on_retry(type(exc).__name__)
        except Exception as exc:  # our bug: keep serving other users, retry this one much later
            log.exception("%s failed unexpectedly; retrying in %.0f s", key, self.retry_s * 10)
            self._retry_at[key] = self.clock() + self.retry_s * 10
            self._on_retry(type(exc).__name__)
        finally:
            self._inflight.pop(key, None)

    async def _wait_for_news(self) -> None:
        fired = self.handler.projector.applied.next()
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # races its timeout, and this loop would never stop
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.poll_s):
                await fired.wait()
