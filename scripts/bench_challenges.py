"""Login challenges against a full table: what an unauthenticated flood of
`POST /v1/auth/challenge` costs the accounts file (every other account query waits behind it).

    python scripts/bench_challenges.py [--outstanding 100000] [--issued 300]

The table is filled to its cap, then challenges are issued one by one (each prunes expired ones,
counts, evicts the oldest, inserts): with the file's indexes, then with them dropped (the
baseline, as the file was before), in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsproxy.adapters.accounts_db import AccountsDb
from dsproxy.domain.accounts import Challenge

INDEXES = ("challenges_by_expiry", "challenges_by_age")


async def issued_per_s(outstanding: int, issued: int, indexed: bool) -> float:
    with tempfile.TemporaryDirectory() as directory:
        accounts = await AccountsDb.open(
            Path(directory) / "backend.sqlite", challenges_max=outstanding
        )
        try:
            rows = [
                (f"old-{i}", "srv", "user", 1_000 + i // 100, 10**9) for i in range(outstanding)
            ]
            await accounts._db.executemany("INSERT INTO challenges VALUES (?, ?, ?, ?, ?)", rows)
            if not indexed:
                for name in INDEXES:
                    await accounts._db.execute(f"DROP INDEX {name}")
            started = time.perf_counter()
            for index in range(issued):
                challenge = Challenge("srv", "user", f"new-{index}", 5_000, 10**9)
                await accounts.add_challenge(challenge, now=2_000)
            return issued / (time.perf_counter() - started)
        finally:
            await accounts.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outstanding", type=int, default=100_000)
    parser.add_argument("--issued", type=int, default=300)
    args = parser.parse_args()
    baseline = await issued_per_s(args.outstanding, args.issued, indexed=False)
    indexed = await issued_per_s(args.outstanding, args.issued, indexed=True)
    print(
        f"{args.outstanding:,} outstanding: {indexed:,.0f} challenges/s with the indexes, "
        f"{baseline:,.0f}/s without, ratio {indexed / baseline:.1f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
