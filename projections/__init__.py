"""The pure ledger: no I/O, no clock, no SQL. Import from here, not from the modules."""

from projections.entries import Entry, Ignored
from projections.holds import Hold, Holds, available, release, reserve, settle
from projections.ledger import Account, Folded, Ledger, fold
from projections.trust import TrustPolicy

__all__ = [
    "Account",
    "Entry",
    "Folded",
    "Hold",
    "Holds",
    "Ignored",
    "Ledger",
    "TrustPolicy",
    "available",
    "fold",
    "release",
    "reserve",
    "settle",
]
