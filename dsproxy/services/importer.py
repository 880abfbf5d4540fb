"""Bulk import of Nostr events from JSON Lines: verify each line, append in batches, report."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from attrs import define, field, frozen

from dsproxy.adapters.event_store import AppendOutcome, AsyncEventStore
from dsproxy.errors import BadInput
from dsproxy.services.ingest import Refusal, admit
from dsproxy.wire.envelope import Address
from dsproxy.wire.event import NostrEvent

__all__ = ["ImportReport", "LineRefused", "import_jsonl"]

LINE_BYTES_MAX = 1_048_576


@frozen
class LineRefused:
    """A line that was not stored, and why."""

    line: int
    reason: str


@define
class ImportReport:
    accepted: int = 0
    duplicates: int = 0
    refused: list[LineRefused] = field(factory=list)


def _read_lines(path: Path, batch_lines: int) -> Iterator[list[tuple[int, bytes]]]:
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise BadInput(f"cannot read {str(path)!r}: {exc.strerror}") from None
    with handle:
        batch: list[tuple[int, bytes]] = []
        for number, line in enumerate(handle, start=1):
            if line.strip():
                batch.append((number, line))
            if len(batch) >= batch_lines:
                yield batch
                batch = []
        if batch:
            yield batch


def _verify_lines(
    lines: list[tuple[int, bytes]], address: Address, content_bytes_max: int
) -> tuple[list[tuple[int, NostrEvent]], list[LineRefused]]:
    """Put each line through the door live events go through (id, signature, session, size,
    JSON), so a ledger rebuilt from a file holds what ingest would have; pure, so it can run on
    a worker thread."""
    good: list[tuple[int, NostrEvent]] = []
    refused: list[LineRefused] = []
    for number, line in lines:
        if len(line) > LINE_BYTES_MAX:
            refused.append(LineRefused(number, f"line is over {LINE_BYTES_MAX} bytes"))
            continue
        verdict = admit(line, address, content_bytes_max)
        if isinstance(verdict, Refusal):
            refused.append(LineRefused(number, verdict.reason))
        else:
            good.append((number, verdict))
    return good, refused


async def import_jsonl(
    path: Path,
    store: AsyncEventStore,
    address: Address,
    *,
    content_bytes_max: int,
    batch_lines: int = 5_000,
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Append every valid event of the file; nothing already stored is touched or lost.

    Lines are verified on two worker threads (libsecp256k1 releases the GIL) while the store's
    writer thread appends the previous batch.
    """
    report = ImportReport()
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="verify") as verifiers:

        async def verify(lines: list[tuple[int, bytes]]) -> tuple[list, list]:
            half = len(lines) // 2
            first, second = await asyncio.gather(
                loop.run_in_executor(
                    verifiers, _verify_lines, lines[:half], address, content_bytes_max
                ),
                loop.run_in_executor(
                    verifiers, _verify_lines, lines[half:], address, content_bytes_max
                ),
            )
            return first[0] + second[0], first[1] + second[1]

        pending_append: asyncio.Task[AppendOutcome] | None = None
        pending_lines = 0
        for lines in _read_lines(path, batch_lines):
            good, refused = await verify(lines)
            report.refused.extend(refused)
            if pending_append is not None:
                outcome = await pending_append
                report.accepted += len(outcome.appended)
                report.duplicates += len(outcome.duplicates)
                if progress:
                    progress(pending_lines)
            pending_append = asyncio.create_task(store.append_nostr([e for _, e in good]))  # noqa: RUF006 (awaited below)
            pending_lines = len(lines)
        if pending_append is not None:
            outcome = await pending_append
            report.accepted += len(outcome.appended)
            report.duplicates += len(outcome.duplicates)
            if progress:
                progress(pending_lines)
    return report
