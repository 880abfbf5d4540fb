"""LocalChain: a one-node Solana stand-in that checks transactions for real.

Every transaction is sanitized, its signatures verified, its blockhash checked against the last
150 slots, deduplicated by signature and charged 5000 lamports a signature. Plain transactions
run on LiteSVM; any transaction that calls the balance-payment program runs all its
instructions here, in `program.py`'s rules, on a working copy that is written back into LiteSVM
(`set_account`) only if every instruction succeeds (the fee is charged either way, as on a real
cluster). LiteSVM's accounts are the single source of truth for lamports and data.

A slot passes after each landed transaction and on `advance_slots` (the server can also tick on
a timer). A landed transaction is `confirmed` at once (one node: nothing can fork it away) and
`finalized` 32 slots later. Thread-safe: one lock around every public method.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
from attrs import frozen
from solders.account import Account
from solders.compute_budget import ID as COMPUTE_BUDGET_ID
from solders.hash import Hash
from solders.keypair import Keypair
from solders.litesvm import LiteSVM
from solders.message import Message
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction, VersionedTransaction
from solders.transaction_metadata import FailedTransactionMetadata

from dsproxy.adapters.balance_payment import SYSTEM_PROGRAM_ID, BalancePayment
from dsproxy.adapters.solana_rpc import transaction_error_json
from dsproxy.localchain.program import AccountState, InstructionFailed, Invocation, execute

__all__ = ["LocalChain", "RpcFailure", "Simulation", "TransactionRecord"]

BLOCKHASH_VALID_SLOTS = 150
FINALIZED_AFTER_SLOTS = 32
LAMPORTS_PER_SIGNATURE = 5000
BLOCKHASHES_KEPT = 300
FAUCET_LAMPORTS = 10**15
# Errors found before execution: such a transaction never lands and pays no fee.
_NOT_LANDED = frozenset(
    {
        "AccountNotFound",
        "AlreadyProcessed",
        "BlockhashNotFound",
        "InsufficientFundsForFee",
        "SignatureFailure",
        "SanitizeFailure",
    }
)


class RpcFailure(Exception):
    """A JSON-RPC error the server returns as is: code, message and optional data."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


@frozen
class TransactionRecord:
    """A transaction that landed, successfully or not (err in RPC JSON form)."""

    signature: Signature
    slot: int
    error: Any
    fee: int
    logs: tuple[str, ...]


@frozen
class Simulation:
    """The outcome of running a transaction without keeping its effects."""

    error: Any
    logs: tuple[str, ...]
    landed: bool  # False: rejected before execution (never lands, no fee)
    fee: int = 0
    units_consumed: int = 0


def _error_message(error: Any) -> str:
    """A one-line text like the validator's for an RPC error message."""
    if isinstance(error, dict) and "InstructionError" in error:
        index, inner = error["InstructionError"]
        if isinstance(inner, dict) and "Custom" in inner:
            return (
                f"Error processing Instruction {index}: custom program error: {inner['Custom']:#x}"
            )
        return f"Error processing Instruction {index}: {inner}"
    texts = {
        "BlockhashNotFound": "Blockhash not found",
        "AlreadyProcessed": "This transaction has already been processed",
        "AccountNotFound": ("Attempt to debit an account but found no record of a prior credit."),
        "InsufficientFundsForFee": "Insufficient funds for fee",
    }
    return texts.get(error, str(error)) if isinstance(error, str) else str(error)


def _parse_transaction(raw: bytes) -> Transaction:
    try:
        return Transaction.from_bytes(raw)
    except ValueError:
        pass
    try:
        versioned = VersionedTransaction.from_bytes(raw)
    except ValueError:
        raise RpcFailure(-32602, "invalid transaction: failed to deserialize") from None
    if not isinstance(versioned.message, Message):
        raise RpcFailure(-32602, "invalid transaction: only legacy messages are supported")
    return Transaction.populate(versioned.message, list(versioned.signatures))


class LocalChain:
    """A local Solana with the balance-payment program's rules; see the module docstring."""

    def __init__(
        self,
        program: BalancePayment | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.program = program or BalancePayment()
        if self.program.version != 1:
            raise ValueError("the local chain implements the v1 balance-payment program")
        self._clock = clock
        self._time_offset_s = 0
        self._lock = threading.RLock()
        self._svm = LiteSVM().with_blockhash_check(False)  # we keep our own blockhash queue
        self._seed = Keypair().pubkey().__bytes__()
        self._slot = 1
        self._blockhashes: dict[Hash, int] = {self._blockhash_for(1): 1}
        self._history: dict[Signature, TransactionRecord] = {}
        # answer status lookups as an RPC node behind the one that took the transactions does
        # (behind a load balancer): nothing has landed (tests of what a client does then)
        self.statuses_lag = False
        self._faucet = Keypair()
        self._svm.set_account(
            self._faucet.pubkey(), Account(FAUCET_LAMPORTS, b"", SYSTEM_PROGRAM_ID)
        )

    # --- time and blocks -----------------------------------------------------------------------

    def _blockhash_for(self, slot: int) -> Hash:
        return Hash(hashlib.sha256(self._seed + struct.pack("<Q", slot)).digest())

    def _advance_locked(self, slots: int) -> None:
        for _ in range(slots):
            self._slot += 1
            self._blockhashes[self._blockhash_for(self._slot)] = self._slot
        oldest = self._slot - BLOCKHASHES_KEPT
        for blockhash in [h for h, slot in self._blockhashes.items() if slot < oldest]:
            del self._blockhashes[blockhash]

    def advance_slots(self, slots: int = 1) -> int:
        """Let `slots` slots pass (each with a new blockhash); return the new slot."""
        assert slots >= 0, slots
        with self._lock:
            self._advance_locked(slots)
            return self._slot

    def advance_time(self, seconds: int) -> None:
        """Move the chain's clock (what the program compares deadlines with) forward."""
        with self._lock:
            self._time_offset_s += seconds

    def now(self) -> int:
        """The chain's unix time, as `Clock::get()?.unix_timestamp`."""
        return int(self._clock()) + self._time_offset_s

    @property
    def slot(self) -> int:
        with self._lock:
            return self._slot

    def latest_blockhash(self) -> tuple[Hash, int]:
        """The newest blockhash and the last block height at which it is valid."""
        with self._lock:
            return self._blockhash_for(self._slot), self._slot + BLOCKHASH_VALID_SLOTS

    def is_blockhash_valid(self, blockhash: Hash) -> bool:
        with self._lock:
            created = self._blockhashes.get(blockhash)
            return created is not None and self._slot <= created + BLOCKHASH_VALID_SLOTS

    # --- accounts ------------------------------------------------------------------------------

    def get_account(self, pubkey: Pubkey) -> Account | None:
        with self._lock:
            account = self._svm.get_account(pubkey)
            return account if account is not None and account.lamports > 0 else None

    def put_account(self, pubkey: Pubkey, account: Account) -> None:
        """Set an account's state outright, as litesvm's `set_account` does: for tests and
        set-ups that need a state no transaction of this program makes (an account written by
        another build of the program)."""
        with self._lock:
            self._svm.set_account(pubkey, account)

    def get_balance(self, pubkey: Pubkey) -> int:
        account = self.get_account(pubkey)
        return 0 if account is None else account.lamports

    def minimum_balance(self, data_len: int) -> int:
        return self._svm.minimum_balance_for_rent_exemption(data_len)

    def airdrop(self, pubkey: Pubkey, lamports: int) -> Signature:
        """Fund an account from the faucet through a real transfer transaction."""
        with self._lock:
            blockhash, _ = self.latest_blockhash()
            params = TransferParams(
                from_pubkey=self._faucet.pubkey(), to_pubkey=pubkey, lamports=lamports
            )
            message = Message([transfer(params)], self._faucet.pubkey())
            tx = Transaction([self._faucet], message, blockhash)
            return self.send_transaction(bytes(tx))

    def initialize_global(self, *, authority: Pubkey, bot: Pubkey, treasury: Pubkey) -> Signature:
        """Run the program's `initialize` (the faucet pays the rent), as a deployer would."""
        with self._lock:
            instruction = self.program.initialize(
                authority=authority, bot=bot, treasury=treasury, payer=self._faucet.pubkey()
            )
            blockhash, _ = self.latest_blockhash()
            tx = Transaction(
                [self._faucet], Message([instruction], self._faucet.pubkey()), blockhash
            )
            signature = self.send_transaction(bytes(tx))
            record = self._history[signature]
            if record.error is not None:
                raise RuntimeError(f"initialize failed: {record.error} {record.logs}")
            return signature

    # --- transactions --------------------------------------------------------------------------

    def send_transaction(self, raw: bytes, *, skip_preflight: bool = False) -> Signature:
        """sendTransaction: preflight (unless skipped), then land it; return its signature.

        As on a real node, a preflight failure raises RpcFailure and changes nothing; with
        `skip_preflight` a transaction that cannot land (bad signature, unknown blockhash,
        duplicate) is dropped silently and its signature returned.
        """
        tx = _parse_transaction(raw)
        signature = tx.signatures[0]
        with self._lock:
            if not skip_preflight:
                self._verify_signatures(tx)
                simulation = self._run(tx, commit=False)
                if simulation.error is not None:
                    raise RpcFailure(
                        -32002,
                        f"Transaction simulation failed: {_error_message(simulation.error)}",
                        self._simulation_json(simulation),
                    )
            elif not all(tx.verify_with_results()):
                return signature
            self._run(tx, commit=True)
            return signature

    def simulate_transaction(self, raw: bytes, *, sig_verify: bool = False) -> Simulation:
        tx = _parse_transaction(raw)
        with self._lock:
            if sig_verify:
                self._verify_signatures(tx)
            return self._run(tx, commit=False, verify=sig_verify)

    def record(self, signature: Signature) -> TransactionRecord | None:
        with self._lock:
            return self._history.get(signature)

    def signature_status(self, signature: Signature) -> dict[str, Any] | None:
        """getSignatureStatuses' entry for one signature, or None if it never landed."""
        with self._lock:
            record = self._history.get(signature)
            if record is None or self.statuses_lag:
                return None
            age = self._slot - record.slot
            finalized = age >= FINALIZED_AFTER_SLOTS
            return {
                "slot": record.slot,
                "confirmations": None if finalized else age,
                "err": record.error,
                "status": {"Ok": None} if record.error is None else {"Err": record.error},
                "confirmationStatus": "finalized" if finalized else "confirmed",
            }

    def transactions_landed(self) -> int:
        with self._lock:
            return len(self._history)

    @staticmethod
    def _simulation_json(simulation: Simulation) -> dict[str, Any]:
        return {
            "err": simulation.error,
            "logs": list(simulation.logs),
            "accounts": None,
            "unitsConsumed": simulation.units_consumed,
            "returnData": None,
            "innerInstructions": None,
            "replacementBlockhash": None,
        }

    @staticmethod
    def _verify_signatures(tx: Transaction) -> None:
        if not all(tx.verify_with_results()):
            raise RpcFailure(-32003, "Transaction signature verification failure")

    def _precheck(self, tx: Transaction, fee: int, *, verify: bool) -> Any:
        """Errors that stop a transaction before it runs (it never lands, pays nothing)."""
        try:
            tx.sanitize()
        except Exception:  # solders raises its own SanitizeError types
            return "SanitizeFailure"
        if verify and not all(tx.verify_with_results()):
            return "SignatureFailure"
        if not self.is_blockhash_valid(tx.message.recent_blockhash):
            return "BlockhashNotFound"
        if tx.signatures[0] in self._history:
            return "AlreadyProcessed"
        payer = self._svm.get_account(tx.message.account_keys[0])
        if payer is None or payer.lamports == 0:
            return "AccountNotFound"
        left = payer.lamports - fee
        if left < 0 or 0 < left < self.minimum_balance(len(payer.data)):
            return "InsufficientFundsForFee"
        return None

    def _run(self, tx: Transaction, *, commit: bool, verify: bool = True) -> Simulation:
        fee = LAMPORTS_PER_SIGNATURE * tx.message.header.num_required_signatures
        error = self._precheck(tx, fee, verify=verify)
        if error is not None:
            return Simulation(error=error, logs=(), landed=False)
        keys = tx.message.account_keys
        calls_program = any(
            keys[ix.program_id_index] == self.program.program_id for ix in tx.message.instructions
        )
        runner = self._run_with_program if calls_program else self._run_on_litesvm
        simulation = runner(tx, fee, commit=commit)
        if commit and simulation.landed:
            self._history[tx.signatures[0]] = TransactionRecord(
                tx.signatures[0], self._slot, simulation.error, fee, simulation.logs
            )
            self._advance_locked(1)
        return simulation

    def _run_on_litesvm(self, tx: Transaction, fee: int, *, commit: bool) -> Simulation:
        result: Any = (
            self._svm.send_transaction(tx) if commit else self._svm.simulate_transaction(tx)
        )
        if isinstance(result, FailedTransactionMetadata):
            error = transaction_error_json(result.err())
            meta = result.meta()
            landed = not (isinstance(error, str) and error in _NOT_LANDED)
            return Simulation(error, tuple(meta.logs()), landed, fee, meta.compute_units_consumed())
        meta = result if commit else result.meta()
        return Simulation(None, tuple(meta.logs()), True, fee, meta.compute_units_consumed())

    # --- transactions that call the balance-payment program ------------------------------------

    def _writable(self, tx: Transaction, index: int) -> bool:
        message, header = tx.message, tx.message.header
        signed = header.num_required_signatures
        if index < signed:
            writable = index < signed - header.num_readonly_signed_accounts
        else:
            writable = index < len(message.account_keys) - header.num_readonly_unsigned_accounts
        key = message.account_keys[index]
        demoted = message.is_key_called_as_program(index) or key == SYSTEM_PROGRAM_ID
        return writable and not demoted

    def _load(self, key: Pubkey) -> AccountState:
        account = self._svm.get_account(key)
        if account is None:
            return AccountState.empty()
        return AccountState(
            account.lamports, bytes(account.data), account.owner, account.executable
        )

    def _run_with_program(self, tx: Transaction, fee: int, *, commit: bool) -> Simulation:
        message = tx.message
        keys = list(message.account_keys)
        signed = message.header.num_required_signatures
        before = {key: self._load(key) for key in keys}
        working = {key: attrs.evolve(state) for key, state in before.items()}
        working[keys[0]].lamports -= fee
        logs: list[str] = []
        error: Any = None
        for index, instruction in enumerate(message.instructions):
            program_id = keys[instruction.program_id_index]
            metas = [(keys[a], a < signed, self._writable(tx, a)) for a in instruction.accounts]
            logs.append(f"Program {program_id} invoke [1]")
            try:
                logs += self._invoke(program_id, metas, bytes(instruction.data), working)
            except InstructionFailed as failure:
                error = {"InstructionError": [index, failure.error]}
                logs += [failure.log, f"Program {program_id} failed: {_error_message(error)}"]
                break
            logs.append(f"Program {program_id} success")
        if error is None:
            error = self._rent_error(tx, before, working)
        if commit:
            if error is not None:  # all or nothing: only the fee is kept
                payer = before[keys[0]]
                working = {keys[0]: attrs.evolve(payer, lamports=payer.lamports - fee)}
            self._write_back(before, working)
        return Simulation(error, tuple(logs), True, fee)

    def _invoke(
        self,
        program_id: Pubkey,
        metas: list[tuple[Pubkey, bool, bool]],
        data: bytes,
        working: dict[Pubkey, AccountState],
    ) -> list[str]:
        if program_id == self.program.program_id:
            invocation = Invocation(metas, data, self.now(), self.minimum_balance)
            return execute(self.program, invocation, working)
        if program_id == COMPUTE_BUDGET_ID:
            return []
        if program_id == SYSTEM_PROGRAM_ID:
            return self._system_transfer(metas, data, working)
        raise InstructionFailed("UnsupportedProgramId", f"Program {program_id} is not deployed")

    @staticmethod
    def _system_transfer(
        metas: list[tuple[Pubkey, bool, bool]], data: bytes, working: dict[Pubkey, AccountState]
    ) -> list[str]:
        """The System program's Transfer, the one system instruction mixed with pay here."""
        if len(data) != 12 or struct.unpack_from("<I", data)[0] != 2 or len(metas) < 2:
            raise InstructionFailed("InvalidInstructionData", "only System Transfer is supported")
        (lamports,) = struct.unpack_from("<Q", data, 4)
        (source, source_signer, source_writable), (destination, _, destination_writable) = metas[:2]
        if not source_signer:
            raise InstructionFailed("MissingRequiredSignature", "Transfer: `from` must sign")
        if not (source_writable and destination_writable):
            raise InstructionFailed("ReadonlyLamportChange", "Transfer: accounts must be writable")
        origin = working[source]
        if origin.data:
            raise InstructionFailed("InvalidArgument", "Transfer: `from` must not carry data")
        if origin.lamports < lamports:
            raise InstructionFailed(
                {"Custom": 1}, f"Transfer: insufficient lamports {origin.lamports}, need {lamports}"
            )
        origin.lamports -= lamports
        working[destination].lamports += lamports
        return []

    def _rent_error(
        self,
        tx: Transaction,
        before: dict[Pubkey, AccountState],
        after: dict[Pubkey, AccountState],
    ) -> Any:
        """The runtime's rule: no writable account may newly become rent-paying."""
        for index, key in enumerate(tx.message.account_keys):
            if not self._writable(tx, index):
                continue
            post, pre = after[key], before[key]
            if not self._rent_paying(post):
                continue
            unchanged_size = len(pre.data) == len(post.data)
            if self._rent_paying(pre) and unchanged_size and post.lamports <= pre.lamports:
                continue
            return {"InsufficientFundsForRent": {"account_index": index}}
        return None

    def _rent_paying(self, state: AccountState) -> bool:
        return 0 < state.lamports < self.minimum_balance(len(state.data))

    def _write_back(
        self, before: dict[Pubkey, AccountState], after: dict[Pubkey, AccountState]
    ) -> None:
        for key, state in after.items():
            if state != before.get(key):
                self._svm.set_account(
                    key, Account(state.lamports, state.data, state.owner, state.executable)
                )
