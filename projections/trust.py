"""Who may move balances: credits only from controllers, debits only from backends we trust."""

from __future__ import annotations

from attrs import field, frozen

from projections.entries import Entry

__all__ = ["TrustPolicy"]


@frozen
class TrustPolicy:
    """The configured session, machine and author keys (x-only hex) an Entry must match."""

    session: str
    machine: str
    controllers: frozenset[str] = field(converter=frozenset, factory=frozenset)
    backends: frozenset[str] = field(converter=frozenset, factory=frozenset)

    def refusal(self, entry: Entry) -> str | None:
        """Why this entry may not move a balance, or None when it may."""
        if entry.session != self.session:
            return f"session {entry.session!r} is not {self.session!r}"
        if entry.machine != self.machine:
            return f"machine {entry.machine} is not {self.machine}"
        if entry.tokens > 0 and entry.author not in self.controllers:
            return f"credit from {entry.author}, which is not a trusted controller"
        if entry.tokens < 0 and entry.author not in self.backends:
            return f"debit from {entry.author}, which is not a trusted backend"
        if entry.tokens == 0:
            return "a Transaction of zero tokens moves nothing"
        return None
