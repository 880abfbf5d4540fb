"""A local Solana stand-in for development and tests: LiteSVM plus the balance-payment rules.

Production points at a real cluster; this package is never used there.
"""

from dsproxy.localchain.chain import LocalChain, RpcFailure, TransactionRecord
from dsproxy.localchain.server import LocalChainServer

__all__ = ["LocalChain", "LocalChainServer", "RpcFailure", "TransactionRecord"]
