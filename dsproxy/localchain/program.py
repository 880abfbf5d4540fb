"""The balance-payment program (v1) re-stated in Python, rule for rule, for the local chain.

No build of the Anchor program is available here, so the local chain runs this instead. It
follows the upstream source: Anchor's two phases (deserialize every account in field order:
owner, discriminator, Signer; then each field's constraints in order: mut, has_one, raw,
seeds), then the instruction body. Errors are what the real program returns: its custom codes
6000-6005, Anchor's 1xx/2xxx/3xxx codes, the system program's codes for its transfers, or a
panic for arithmetic overflow (the program is built with overflow checks).

`execute` mutates a working copy of the accounts; the chain commits it only if every
instruction of the transaction succeeds.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

from attrs import define, frozen
from solders.pubkey import Pubkey
from solders.signature import Signature

from dsproxy.adapters.balance_payment import (
    ANCHOR_ERRORS,
    SYSTEM_PROGRAM_ID,
    BalancePayment,
    GlobalAccount,
    LockAccount,
    UserAccount,
    account_discriminator,
    instruction_discriminator,
)
from dsproxy.errors import AccountDataInvalid
from dsproxy.wire.messages import RecoverInfo
from dsproxy.wire.recover import is_curve_point, recover_digest

__all__ = ["AccountState", "InstructionFailed", "Invocation", "execute"]

# The v1 program's #[msg(...)] texts, which Anchor logs with the code.
_PROGRAM_MESSAGES = {
    6000: ("Unauthorized", "Unauthorized access."),
    6001: ("InsufficientFunds", "Insufficient funds."),
    6002: ("SignatureFormatInvalid", "The signature format or recovery ID is incorrect."),
    6003: ("SignatureRecoveryFailed", "Failed to recover public key from signature."),
    6004: ("SignatureMismatch", "The recovered public key does not match the user's public key."),
    6005: ("SignatureExpired", "The signature is expired."),
}
_UNAUTHORIZED, _INSUFFICIENT_FUNDS = 6000, 6001
_SIGNATURE_FORMAT_INVALID, _SIGNATURE_MISMATCH, _SIGNATURE_EXPIRED = 6002, 6004, 6005
_CONSTRAINT_MUT, _CONSTRAINT_RAW, _CONSTRAINT_SEEDS = 2000, 2003, 2006
# System program errors (SystemError as custom codes) for its CPIs.
_ACCOUNT_ALREADY_IN_USE, _RESULT_WITH_NEGATIVE_LAMPORTS = 0, 1


@define
class AccountState:
    """One account as the runtime sees it; a missing account is 0 lamports owned by System."""

    lamports: int
    data: bytes
    owner: Pubkey
    executable: bool = False

    @classmethod
    def empty(cls) -> AccountState:
        return cls(0, b"", SYSTEM_PROGRAM_ID)


class InstructionFailed(Exception):
    """The instruction's error, in RPC JSON form: {"Custom": code} or a fieldless name."""

    def __init__(self, error: Any, log: str) -> None:
        super().__init__(log)
        self.error = error
        self.log = log


@frozen
class Invocation:
    """One instruction with its accounts resolved: (key, is_signer, is_writable) in order."""

    metas: Sequence[tuple[Pubkey, bool, bool]]
    data: bytes
    now: int
    rent_exempt_lamports: Callable[[int], int]


def _custom(code: int) -> InstructionFailed:
    name, message = _PROGRAM_MESSAGES.get(code) or (ANCHOR_ERRORS.get(code, "Unknown"), "")
    return InstructionFailed(
        {"Custom": code},
        f"Program log: AnchorError occurred. Error Code: {name}. Error Number: {code}. "
        f"Error Message: {message or name}.",
    )


def _system_error(code: int, log: str) -> InstructionFailed:
    return InstructionFailed({"Custom": code}, f"Program log: {log}")


class _Context:
    """The accounts of one instruction and Anchor-style checks over them."""

    def __init__(
        self,
        program: BalancePayment,
        invocation: Invocation,
        accounts: MutableMapping[Pubkey, AccountState],
    ) -> None:
        self.program = program
        self.invocation = invocation
        self.accounts = accounts
        self.signers = {key for key, signer, _ in invocation.metas if signer}
        self.writable = {key for key, _, writable in invocation.metas if writable}

    def take(self, count: int) -> list[Pubkey]:
        if len(self.invocation.metas) < count:
            raise _custom(3005)  # AccountNotEnoughKeys
        return [key for key, _, _ in self.invocation.metas[:count]]

    def state(self, key: Pubkey) -> AccountState:
        if key not in self.accounts:
            self.accounts[key] = AccountState.empty()
        return self.accounts[key]

    def load(self, key: Pubkey, kind: type[Any]) -> Any:
        """Account<'info, T>: initialized, owned by the program, right discriminator."""
        state = self.state(key)
        if state.lamports == 0 and state.owner == SYSTEM_PROGRAM_ID:
            raise _custom(3012)  # AccountNotInitialized
        if state.owner != self.program.program_id:
            raise _custom(3007)  # AccountOwnedByWrongProgram
        if len(state.data) < 8:
            raise _custom(3001)  # AccountDiscriminatorNotFound
        if state.data[:8] != account_discriminator(kind.__name__):
            raise _custom(3002)  # AccountDiscriminatorMismatch
        try:
            return kind.decode(state.data)
        except AccountDataInvalid:
            raise _custom(3003) from None  # AccountDidNotDeserialize

    def signer(self, key: Pubkey) -> None:
        if key not in self.signers:
            raise _custom(3010)  # AccountNotSigner

    def system_program(self, key: Pubkey) -> None:
        if key != SYSTEM_PROGRAM_ID:
            raise _custom(3008)  # InvalidProgramId

    def mut(self, key: Pubkey) -> None:
        if key not in self.writable:
            raise _custom(_CONSTRAINT_MUT)

    def require(self, condition: bool, code: int) -> None:
        if not condition:
            raise _custom(code)

    def seeds(self, key: Pubkey, seeds: list[bytes]) -> None:
        expected, _ = Pubkey.find_program_address(seeds, self.program.program_id)
        self.require(key == expected, _CONSTRAINT_SEEDS)

    def data_is_empty(self, key: Pubkey) -> None:
        self.require(len(self.state(key).data) == 0, _CONSTRAINT_RAW)

    def init(self, key: Pubkey, seeds: list[bytes], space: int, payer: Pubkey) -> None:
        """`#[account(init, payer, space, seeds)]`: create a program account at the PDA."""
        self.seeds(key, seeds)
        state = self.state(key)
        rent = self.invocation.rent_exempt_lamports(space)
        if state.owner != SYSTEM_PROGRAM_ID or state.data:
            raise _system_error(_ACCOUNT_ALREADY_IN_USE, f"Allocate: account {key} already in use")
        self.transfer(payer, key, max(0, rent - state.lamports))
        state.data = bytes(space)
        state.owner = self.program.program_id

    def transfer(self, source: Pubkey, destination: Pubkey, amount: int) -> None:
        """The System program's Transfer, as the program's CPIs call it."""
        origin = self.state(source)
        if origin.data:
            raise InstructionFailed("InvalidArgument", "Transfer: `from` must not carry data")
        if origin.lamports < amount:
            raise _system_error(
                _RESULT_WITH_NEGATIVE_LAMPORTS,
                f"Transfer: insufficient lamports {origin.lamports}, need {amount}",
            )
        origin.lamports -= amount
        self.state(destination).lamports += amount

    def write(self, key: Pubkey, data: bytes) -> None:
        state = self.state(key)
        assert len(data) <= len(state.data) or not state.data, (key, len(data))  # fixed layouts
        state.data = data

    def free_lamports(self, vault: Pubkey, user_account: UserAccount) -> int:
        free = self.state(vault).lamports - user_account.locked_amount
        if free < 0:  # u64 underflow: the program is built with overflow-checks = true
            raise InstructionFailed("ProgramFailedToComplete", "Program panicked: overflow")
        return free

    def verify(self, info: RecoverInfo, nonce: int, user: Pubkey) -> None:
        """ED25519RecoverInfo::verify: format, then signature, then deadline."""
        if not (is_curve_point(bytes(user)) and is_curve_point(info.signature[:32])):
            raise _custom(_SIGNATURE_FORMAT_INVALID)
        digest = recover_digest(info.payload, nonce, info.deadline)
        if not Signature.from_bytes(info.signature).verify(user, digest):
            raise _custom(_SIGNATURE_MISMATCH)
        if self.invocation.now > info.deadline:
            raise _custom(_SIGNATURE_EXPIRED)


def _parse_recover_and_amount(args: bytes) -> tuple[RecoverInfo, int]:
    if len(args) < 144:
        raise _custom(102)  # InstructionDidNotDeserialize
    deadline, amount = struct.unpack_from("<qQ", args, 128)
    return RecoverInfo(signature=args[:64], payload=args[64:128], deadline=deadline), amount


def _parse_u64s(args: bytes, count: int) -> tuple[int, ...]:
    if len(args) < 8 * count:
        raise _custom(102)
    return struct.unpack_from(f"<{count}Q", args)


def _initialize(ctx: _Context, _args: bytes) -> None:
    global_key, authority, treasury, bot, payer, system = ctx.take(6)
    ctx.signer(payer)
    ctx.system_program(system)
    ctx.init(global_key, [b"GLOBAL"], 8 + GlobalAccount.SIZE, payer)
    ctx.data_is_empty(authority)
    ctx.data_is_empty(treasury)
    ctx.data_is_empty(bot)
    ctx.mut(payer)
    ctx.write(global_key, GlobalAccount(authority, bot, treasury).encode())


def _register(ctx: _Context, _args: bytes) -> None:
    user_account_key, user, vault, payer, system = ctx.take(5)
    ctx.signer(payer)  # Signer fields deserialize before the init field is created
    ctx.signer(user)
    ctx.system_program(system)
    ctx.init(user_account_key, [b"USER", bytes(user)], 8 + UserAccount.SIZE, payer)
    ctx.data_is_empty(vault)
    ctx.seeds(vault, [b"VAULT", bytes(user)])
    ctx.mut(payer)
    ctx.write(user_account_key, UserAccount(0, 0, vault).encode())


def _user_transfer_accounts(ctx: _Context) -> tuple[UserAccount, Pubkey, Pubkey]:
    user_account_key, user, vault, payer, system = ctx.take(5)
    user_account = ctx.load(user_account_key, UserAccount)
    ctx.signer(user)
    ctx.signer(payer)
    ctx.system_program(system)
    ctx.mut(user_account_key)
    ctx.seeds(user_account_key, [b"USER", bytes(user)])
    ctx.mut(user)
    ctx.mut(vault)
    ctx.seeds(vault, [b"VAULT", bytes(user)])
    ctx.mut(payer)
    return user_account, user, vault


def _deposit(ctx: _Context, args: bytes) -> None:
    (amount,) = _parse_u64s(args, 1)
    _, user, vault = _user_transfer_accounts(ctx)
    ctx.transfer(user, vault, amount)


def _withdraw(ctx: _Context, args: bytes) -> None:
    (amount,) = _parse_u64s(args, 1)
    user_account, user, vault = _user_transfer_accounts(ctx)
    ctx.require(ctx.free_lamports(vault, user_account) >= amount, _INSUFFICIENT_FUNDS)
    ctx.transfer(vault, user, amount)


def _bot_accounts(
    ctx: _Context, global_key: Pubkey, bot: Pubkey, payer: Pubkey, system: Pubkey
) -> GlobalAccount:
    """The GLOBAL/bot/payer/system fields that lock, settle and pay share."""
    global_account = ctx.load(global_key, GlobalAccount)
    ctx.signer(bot)
    ctx.signer(payer)
    ctx.system_program(system)
    ctx.require(global_account.bot == bot, _UNAUTHORIZED)  # has_one = bot @ Unauthorized
    ctx.seeds(global_key, [b"GLOBAL"])
    return global_account


def _pay(ctx: _Context, args: bytes) -> None:
    info, amount = _parse_recover_and_amount(args)
    global_key, user_account_key, user, treasury, vault, bot, payer, system = ctx.take(8)
    global_account = _bot_accounts(ctx, global_key, bot, payer, system)
    user_account = ctx.load(user_account_key, UserAccount)
    ctx.mut(user_account_key)
    ctx.seeds(user_account_key, [b"USER", bytes(user)])
    ctx.mut(user)
    ctx.mut(treasury)
    ctx.require(treasury == global_account.treasury, _CONSTRAINT_RAW)
    ctx.mut(vault)
    ctx.seeds(vault, [b"VAULT", bytes(user)])
    ctx.mut(payer)

    ctx.verify(info, user_account.nonce, user)
    ctx.require(ctx.free_lamports(vault, user_account) >= amount, _INSUFFICIENT_FUNDS)
    ctx.transfer(vault, treasury, amount)
    ctx.write(
        user_account_key,
        UserAccount(
            user_account.nonce + 1, user_account.locked_amount, user_account.vault
        ).encode(),
    )


def _lock(ctx: _Context, args: bytes) -> None:
    info, amount = _parse_recover_and_amount(args)
    global_key, user_account_key, user, lock_key, vault, bot, payer, system = ctx.take(8)
    _bot_accounts(ctx, global_key, bot, payer, system)
    user_account = ctx.load(user_account_key, UserAccount)
    nonce = struct.pack("<Q", user_account.nonce)
    ctx.init(lock_key, [b"LOCK", bytes(user), nonce], 8 + 8, payer)
    ctx.mut(user_account_key)
    ctx.seeds(user_account_key, [b"USER", bytes(user)])
    ctx.mut(user)
    ctx.seeds(vault, [b"VAULT", bytes(user)])
    ctx.mut(payer)

    ctx.verify(info, user_account.nonce, user)
    ctx.require(ctx.free_lamports(vault, user_account) >= amount, _INSUFFICIENT_FUNDS)
    locked = user_account.locked_amount + amount
    if locked >= 2**64:
        raise InstructionFailed("ProgramFailedToComplete", "Program panicked: overflow")
    ctx.write(
        user_account_key, UserAccount(user_account.nonce + 1, locked, user_account.vault).encode()
    )
    ctx.write(lock_key, LockAccount(amount).encode())


def _settle(ctx: _Context, args: bytes) -> None:
    nonce, amount = _parse_u64s(args, 2)
    global_key, user_account_key, user, treasury, lock_key, vault, bot, payer, system = ctx.take(9)
    global_account = _bot_accounts(ctx, global_key, bot, payer, system)
    user_account = ctx.load(user_account_key, UserAccount)
    lock_account = ctx.load(lock_key, LockAccount)
    ctx.mut(user_account_key)
    ctx.seeds(user_account_key, [b"USER", bytes(user)])
    ctx.mut(user)
    ctx.mut(treasury)
    ctx.require(treasury == global_account.treasury, _CONSTRAINT_RAW)
    ctx.mut(lock_key)
    ctx.seeds(lock_key, [b"LOCK", bytes(user), struct.pack("<Q", nonce)])
    ctx.mut(vault)
    ctx.seeds(vault, [b"VAULT", bytes(user)])
    ctx.mut(payer)

    ctx.require(lock_account.amount >= amount, _INSUFFICIENT_FUNDS)
    if user_account.locked_amount < lock_account.amount:
        raise InstructionFailed("ProgramFailedToComplete", "Program panicked: overflow")
    ctx.write(
        user_account_key,
        UserAccount(
            user_account.nonce,
            user_account.locked_amount - lock_account.amount,
            user_account.vault,
        ).encode(),
    )
    ctx.transfer(vault, treasury, amount)
    lock_state = ctx.state(lock_key)  # close: rent back to the payer, then an empty System account
    rent = ctx.invocation.rent_exempt_lamports(len(lock_state.data))
    lock_state.lamports -= rent
    ctx.state(payer).lamports += rent
    lock_state.owner = SYSTEM_PROGRAM_ID
    lock_state.data = b""


_HANDLERS: dict[bytes, tuple[str, Callable[[_Context, bytes], None]]] = {
    instruction_discriminator(name): (name, handler)
    for name, handler in (
        ("initialize", _initialize),
        ("register", _register),
        ("deposit", _deposit),
        ("withdraw", _withdraw),
        ("pay", _pay),
        ("lock", _lock),
        ("settle", _settle),
    )
}


def execute(
    program: BalancePayment,
    invocation: Invocation,
    accounts: MutableMapping[Pubkey, AccountState],
) -> list[str]:
    """Run one instruction on `accounts` (a working copy); return its log lines or raise."""
    assert program.version == 1, program  # the local chain implements v1 only
    data = invocation.data
    if len(data) < 8:
        raise _custom(100)  # InstructionMissing
    entry = _HANDLERS.get(data[:8])
    if entry is None:
        raise _custom(101)  # InstructionFallbackNotFound
    name, handler = entry
    handler(_Context(program, invocation, accounts), data[8:])
    return [f"Program log: Instruction: {name[0].upper()}{name[1:]}"]
