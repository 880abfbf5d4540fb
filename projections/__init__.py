"""The pure ledger: no I/O, no clock, no SQL. Import from here, not from the modules."""

from projections.entries import Entry, Ignored
from projections.holds import Book, available, fold_into, issue, release, reserve, settle
from projections.ledger import Account, Folded, Ledger, fold
from projections.trust import TrustPolicy

__all__ = [
    "Account",
    "Book",
    "Entry",
    "Folded",
    "Ignored",
    "Ledger",
    "TrustPolicy",
    "available",
    "fold",
    "fold_into",
    "issue",
    "release",
    "reserve",
    "settle",
]
