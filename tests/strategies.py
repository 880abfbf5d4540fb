"""Hypothesis strategies: users, authors, entries and histories for the ledger."""

from __future__ import annotations

from hypothesis import strategies as st
from solders.keypair import Keypair

from projections import Entry, TrustPolicy

SESSION = "dephy-dsproxy-controller"
MACHINE = "6811f61df33619422f8c7a99e4a1024e8bb0a51831ea1e62478cb695c56e2ab6"
CONTROLLERS = ("c0" * 32, "c1" * 32)
BACKENDS = ("b0" * 32,)
STRANGERS = ("ee" * 32, "ff" * 32)
USERS = tuple(str(Keypair.from_seed(bytes([index]) * 32).pubkey()) for index in range(1, 6))
TOKENS_ABS_MAX = 10**12  # realistic: far below where i64 totals could overflow

POLICY = TrustPolicy(SESSION, MACHINE, CONTROLLERS, BACKENDS)

event_ids = st.binary(min_size=32, max_size=32).map(bytes.hex)


@st.composite
def trusted_entries(draw: st.DrawFn) -> Entry:
    """A credit from a trusted controller or a debit from a trusted backend."""
    credit = draw(st.booleans())
    size = draw(st.integers(1, TOKENS_ABS_MAX))
    return Entry(
        event_id=draw(event_ids),
        author=draw(st.sampled_from(CONTROLLERS if credit else BACKENDS)),
        session=SESSION,
        machine=MACHINE,
        user=draw(st.sampled_from(USERS)),
        tokens=size if credit else -size,
        created_at=draw(st.integers(0, 2**32)),
    )


@st.composite
def untrusted_entries(draw: st.DrawFn) -> Entry:
    """An entry the policy must leave out: wrong author for its sign, session or machine."""
    entry = draw(trusted_entries())
    flaw = draw(st.sampled_from(["stranger", "swapped", "session", "machine"]))
    if flaw == "stranger":
        return Entry(
            entry.event_id,
            draw(st.sampled_from(STRANGERS)),
            SESSION,
            MACHINE,
            entry.user,
            entry.tokens,
            entry.created_at,
        )
    if flaw == "swapped":  # a backend crediting or a controller debiting
        author = BACKENDS[0] if entry.tokens > 0 else CONTROLLERS[0]
        return Entry(
            entry.event_id, author, SESSION, MACHINE, entry.user, entry.tokens, entry.created_at
        )
    if flaw == "session":
        return Entry(
            entry.event_id,
            entry.author,
            SESSION + "-other",
            MACHINE,
            entry.user,
            entry.tokens,
            entry.created_at,
        )
    return Entry(
        entry.event_id, entry.author, SESSION, "00" * 32, entry.user, entry.tokens, entry.created_at
    )


histories = st.lists(trusted_entries(), max_size=40, unique_by=lambda e: e.event_id)
mixed_histories = st.lists(
    st.one_of(trusted_entries(), untrusted_entries()), max_size=40, unique_by=lambda e: e.event_id
)
