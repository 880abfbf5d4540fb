"""The balance-payment program over Solana JSON-RPC (solana-py's AsyncClient).

Sending is at-least-once on the wire and at-most-once on chain: a transaction is signed once,
its signature known before the first send (`on_signed`, for the caller to record), and the SAME
bytes are resent until it is confirmed or its blockhash expires. The chain drops a duplicate
signature, so a resend can never pay twice; after a crash, `transaction_status` tells whether
a recorded signature landed before anything new is built.

Every foreign error is translated here into our PaymentError tree: program codes into typed
ProgramErrors, RPC and transport failures into RpcError.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from attrs import frozen
from solana.exceptions import SolanaRpcException
from solana.rpc.async_api import AsyncClient
from solana.rpc.core import RPCException, RPCNoResultException
from solana.rpc.models import TxOpts
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import Transaction
from solders.transaction_status import (
    InstructionErrorBorshIO,
    InstructionErrorCustom,
    InstructionErrorFieldless,
    TransactionErrorDuplicateInstruction,
    TransactionErrorFieldless,
    TransactionErrorInstructionError,
    TransactionErrorInsufficientFundsForRent,
)

from dsproxy.adapters.balance_payment import (
    ANCHOR_ERRORS,
    BalancePayment,
    GlobalAccount,
    NamespaceAccount,
    UserAccount,
    error_name,
)
from dsproxy.domain.eligibility import OnChainUser
from dsproxy.errors import (
    AnchorConstraint,
    ConfirmationTimeout,
    PaymentError,
    PaymentInsufficientFunds,
    PaymentUnauthorized,
    ProgramError,
    RpcError,
    SignatureExpired,
    SignatureFormatInvalid,
    SignatureMismatch,
    SignatureRecoveryFailed,
    TransactionExpired,
    TransactionFailed,
)
from dsproxy.wire.messages import RecoverInfo

__all__ = [
    "BalancePaymentRpc",
    "ProgramSettings",
    "SignedTransaction",
    "TransactionState",
    "TransactionStatus",
    "error_from_json",
    "transaction_error_json",
]

log = logging.getLogger(__name__)

_COMMITMENT_RANK = {"processed": 0, "confirmed": 1, "finalized": 2}
_PROGRAM_ERRORS: dict[str, tuple[type[ProgramError], str]] = {
    "Unauthorized": (PaymentUnauthorized, "the bot is not the one the program is configured with"),
    "InsufficientFunds": (PaymentInsufficientFunds, "the vault's free balance is too small"),
    "SignatureFormatInvalid": (
        SignatureFormatInvalid,
        "the user key or the signature is not a valid ed25519 point",
    ),
    "SignatureRecoveryFailed": (SignatureRecoveryFailed, "the signature could not be recovered"),
    "SignatureMismatch": (
        SignatureMismatch,
        "not the user's signature over this payload, the on-chain nonce and the deadline",
    ),
    "SignatureExpired": (SignatureExpired, "the chain's clock is past the signed deadline"),
}


# --- errors: solders objects -> RPC JSON -> our exceptions ------------------------------------


def _variant(value: Any) -> str:
    return str(value).rsplit(".", 1)[-1]


def transaction_error_json(error: Any) -> Any:
    """A solders TransactionError as the RPC's JSON (`{"InstructionError": [0, {"Custom": 1}]}`)."""
    if error is None:
        return None
    if isinstance(error, TransactionErrorFieldless):
        return _variant(error)
    if isinstance(error, TransactionErrorInstructionError):
        inner = error.err
        value: Any
        if isinstance(inner, InstructionErrorCustom):
            value = {"Custom": inner.code}
        elif isinstance(inner, InstructionErrorFieldless):
            value = _variant(inner)
        elif isinstance(inner, InstructionErrorBorshIO):
            value = {"BorshIoError": inner.value}
        else:
            value = str(inner)
        return {"InstructionError": [error.index, value]}
    if isinstance(error, TransactionErrorInsufficientFundsForRent):
        return {"InsufficientFundsForRent": {"account_index": error.account_index}}
    if isinstance(error, TransactionErrorDuplicateInstruction):
        return {"DuplicateInstruction": error.index}
    return str(error)


def error_from_json(error: Any, *, version: int = 1, action: str = "transaction") -> PaymentError:
    """Our exception for a transaction error in RPC JSON form."""
    if isinstance(error, dict) and "InstructionError" in error:
        index, inner = error["InstructionError"]
        if isinstance(inner, dict) and "Custom" in inner:
            return _custom_error(int(inner["Custom"]), index, version, action)
        return TransactionFailed(
            f"{action} failed: instruction {index} returned {inner}", error=error
        )
    if error in ("AccountNotFound", "InsufficientFundsForFee"):
        return TransactionFailed(
            f"{action} failed: the fee payer has too few lamports for the fee ({error})",
            error=error,
        )
    if error == "BlockhashNotFound":
        return TransactionExpired(f"{action}: its blockhash is unknown or expired")
    if isinstance(error, dict) and "InsufficientFundsForRent" in error:
        index = error["InsufficientFundsForRent"].get("account_index")
        return TransactionFailed(
            f"{action} failed: account {index} would be left below rent exemption "
            "(leave 0 or at least the rent-exempt minimum)",
            error=error,
        )
    return TransactionFailed(f"{action} failed: {error}", error=error)


def _custom_error(code: int, index: int, version: int, action: str) -> ProgramError:
    name = error_name(code, version)
    if name in _PROGRAM_ERRORS:
        kind, hint = _PROGRAM_ERRORS[name]
        return kind(
            f"{action} refused by the program: {name} ({code}): {hint}",
            code=code,
            instruction_index=index,
        )
    if code in ANCHOR_ERRORS:
        hints = {
            2003: " (is the treasury the program's?)",
            3012: " (an account it needs does not exist: is the wallet registered? "
            "`dsproxy wallet register`)",
        }
        hint = hints.get(code, "")
        return AnchorConstraint(
            f"{action} refused by Anchor: {ANCHOR_ERRORS[code]} ({code}){hint}",
            code=code,
            name=ANCHOR_ERRORS[code],
            instruction_index=index,
        )
    # the System program's 0 is "account already in use": what creating an account twice says
    hint = " (account already in use: registered already?)" if code == 0 else ""
    return ProgramError(
        f"{action} failed: instruction {index} custom program error {code}{hint}",
        code=code,
        instruction_index=index,
    )


def _rpc_message(exc: BaseException) -> str:
    if isinstance(exc, RPCException) and exc.args:
        detail = exc.args[0]
        return str(getattr(detail, "message", detail))
    if isinstance(exc, SolanaRpcException) and exc.__cause__ is not None:
        # solana-py says only "<class 'httpx.ConnectError'> raised in ..."; the cause says why
        cause = exc.__cause__
        return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
    return str(exc) or type(exc).__name__


_TRANSPORT_ERRORS = (
    SolanaRpcException,
    RPCException,
    RPCNoResultException,
    OSError,
    asyncio.TimeoutError,
)


# --- values ----------------------------------------------------------------------------------


@frozen
class SignedTransaction:
    """A signed transaction to send, and resend, until its blockhash expires."""

    raw: bytes
    signature: str
    last_valid_block_height: int


class TransactionState(enum.Enum):
    """Where a signature stands at the client's commitment."""

    NOT_FOUND = "not_found"  # never landed (yet): resend it while its blockhash is valid
    PENDING = "pending"  # landed, below the commitment
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # landed with an error: the fee was paid, nothing else moved


@frozen
class TransactionStatus:
    """The outcome of a signature, for reconciliation after a crash."""

    state: TransactionState
    slot: int | None = None
    error: PaymentError | None = None


@frozen
class ProgramSettings:
    """Who may pay (bot) and where payments go (treasury), from GLOBAL or the namespace."""

    bot: Pubkey
    treasury: Pubkey
    sign_prefix: bytes | None = None  # v2 only: the namespace's signing prefix


# --- the client ------------------------------------------------------------------------------


class BalancePaymentRpc:
    """The program's instructions and accounts over one AsyncClient."""

    def __init__(
        self,
        client: AsyncClient,
        program: BalancePayment,
        *,
        commitment: str = "confirmed",
        poll_interval_s: float = 0.25,
        resend_interval_s: float = 2.0,
        confirm_timeout_s: float = 90.0,
    ) -> None:
        if commitment not in _COMMITMENT_RANK:
            raise ValueError(f"commitment {commitment!r}: expected processed/confirmed/finalized")
        self._client = client
        self.url = str(getattr(client._provider, "endpoint_uri", "the RPC node"))  # for errors
        self.program = program
        self.commitment = commitment
        self._poll_interval_s = poll_interval_s
        self._resend_interval_s = resend_interval_s
        self._confirm_timeout_s = confirm_timeout_s

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        rpc_url: str,
        program: BalancePayment,
        *,
        commitment: str = "confirmed",
        request_timeout_s: float = 10.0,
        **options: float,
    ) -> AsyncIterator[BalancePaymentRpc]:
        """Open an AsyncClient on `rpc_url` for the duration of the block."""
        client = AsyncClient(rpc_url, commitment=commitment, timeout=request_timeout_s)  # type: ignore[arg-type]
        try:
            yield cls(client, program, commitment=commitment, **options)
        finally:
            await client.close()

    async def _call(self, what: str, request: Awaitable[Any]) -> Any:
        try:
            return await request
        except _TRANSPORT_ERRORS as exc:
            raise RpcError(f"Solana RPC {what} at {self.url} failed: {_rpc_message(exc)}") from exc

    # --- reads ----------------------------------------------------------------------------------

    async def fetch_program_data(self, pubkey: Pubkey) -> bytes | None:
        """The data of one of the program's accounts; None if the program has none there.

        Anyone can send lamports to an address the program has not created yet: that account
        is the System program's, with no data, and is no account of the program's."""
        response = await self._call(
            "getAccountInfo",
            self._client.get_account_info(pubkey, self.commitment),  # type: ignore[arg-type]
        )
        account = response.value
        if account is None or account.owner != self.program.program_id:
            return None
        return bytes(account.data)

    async def fetch_balance(self, pubkey: Pubkey) -> int:
        response = await self._call(
            "getBalance",
            self._client.get_balance(pubkey, self.commitment),  # type: ignore[arg-type]
        )
        return int(response.value)

    async def fetch_settings(self) -> ProgramSettings:
        """The bot and treasury the program will accept (v1 GLOBAL, v2 the namespace)."""
        if self.program.version == 1:
            address = self.program.global_pda()[0]
            data = await self.fetch_program_data(address)
            if data is None:
                raise PaymentError(f"the program's GLOBAL account {address} does not exist")
            settings = GlobalAccount.decode(data)
            return ProgramSettings(settings.bot, settings.treasury)
        address = self.program.namespace_pda()[0]
        data = await self.fetch_program_data(address)
        if data is None:
            raise PaymentError(f"namespace {self.program.namespace_id} ({address}) does not exist")
        namespace = NamespaceAccount.decode(data)
        prefix = f"DePHY vending machine/{namespace.name}:\n".encode()
        return ProgramSettings(namespace.bot, namespace.treasury, prefix)

    async def fetch_user(self, user: Pubkey) -> UserAccount | None:
        data = await self.fetch_program_data(self.program.user_pda(user)[0])
        return None if data is None else UserAccount.decode(data)

    async def fetch_onchain_user(self, user: Pubkey) -> OnChainUser | None:
        """Nonce, locked and vault lamports: the inputs of `check_eligible`."""
        account = await self.fetch_user(user)
        if account is None:
            return None
        vault_lamports = await self.fetch_balance(account.vault)
        return OnChainUser(account.nonce, account.locked_amount, vault_lamports)

    async def block_height(self) -> int:
        response = await self._call(
            "getBlockHeight",
            self._client.get_block_height(self.commitment),  # type: ignore[arg-type]
        )
        return int(response.value)

    async def transaction_status(self, signature: str) -> TransactionStatus:
        """Did this signature land, and how? Check it before resending after a restart."""
        response = await self._call(
            "getSignatureStatuses",
            self._client.get_signature_statuses(
                [Signature.from_string(signature)], search_transaction_history=True
            ),
        )
        status = response.value[0]
        if status is None:
            return TransactionStatus(TransactionState.NOT_FOUND)
        rank = -1 if status.confirmation_status is None else int(status.confirmation_status)
        if status.confirmation_status is None and status.confirmations is None:
            rank = _COMMITMENT_RANK["finalized"]  # rooted: older nodes omit the field
        if rank < _COMMITMENT_RANK[self.commitment]:
            return TransactionStatus(TransactionState.PENDING, status.slot)
        if status.err is None:
            return TransactionStatus(TransactionState.SUCCEEDED, status.slot)
        error = error_from_json(transaction_error_json(status.err), version=self.program.version)
        return TransactionStatus(TransactionState.FAILED, status.slot, error)

    # --- writes ---------------------------------------------------------------------------------

    async def sign(
        self, instructions: Sequence[Instruction], *, payer: Keypair, signers: Sequence[Keypair]
    ) -> SignedTransaction:
        """Build a legacy transaction on the latest blockhash and sign it once."""
        response = await self._call(
            "getLatestBlockhash",
            self._client.get_latest_blockhash(self.commitment),  # type: ignore[arg-type]
        )
        unique = {bytes(k.pubkey()): k for k in [payer, *signers]}
        message = Message(list(instructions), payer.pubkey())
        tx = Transaction(list(unique.values()), message, response.value.blockhash)
        return SignedTransaction(
            bytes(tx), str(tx.signatures[0]), int(response.value.last_valid_block_height)
        )

    async def _send(self, signed: SignedTransaction, *, preflight: bool, action: str) -> None:
        """One sendTransaction; a preflight refusal means nothing landed and nothing moved."""
        opts = TxOpts(
            skip_confirmation=True,
            skip_preflight=not preflight,
            preflight_commitment=self.commitment,  # type: ignore[arg-type]
        )
        try:
            await self._client.send_raw_transaction(signed.raw, opts)
        except RPCException as exc:
            data = getattr(exc.args[0] if exc.args else None, "data", None)
            error = transaction_error_json(getattr(data, "err", None))
            if error in ("AlreadyProcessed", "BlockhashNotFound"):
                return  # landed earlier / not yet known here: the status loop decides
            if error is not None:
                raise error_from_json(error, version=self.program.version, action=action) from exc
            raise RpcError(f"{action}: sendTransaction failed: {_rpc_message(exc)}") from exc
        except _TRANSPORT_ERRORS as exc:
            if preflight:
                raise RpcError(f"{action}: sendTransaction failed: {_rpc_message(exc)}") from exc
            log.warning("%s: resend of %s failed: %s", action, signed.signature, exc)

    async def send(self, signed: SignedTransaction, *, action: str = "transaction") -> None:
        """Send once, with preflight; `submit` or `transaction_status` tells what became of it."""
        await self._send(signed, preflight=True, action=action)

    async def submit(self, signed: SignedTransaction, *, action: str = "transaction") -> str:
        """Send, resend the same bytes, and wait for the commitment; return the signature."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._confirm_timeout_s
        await self._send(signed, preflight=True, action=action)
        next_send_at = loop.time() + self._resend_interval_s
        while True:
            status = await self.transaction_status(signed.signature)
            if status.state is TransactionState.SUCCEEDED:
                return signed.signature
            if status.state is TransactionState.FAILED:
                assert status.error is not None, status
                raise status.error
            if status.state is TransactionState.NOT_FOUND:
                if await self.block_height() > signed.last_valid_block_height:
                    if (await self.transaction_status(signed.signature)).state is (
                        TransactionState.NOT_FOUND
                    ):
                        raise TransactionExpired(
                            f"{action} {signed.signature} expired unprocessed at block height "
                            f"{signed.last_valid_block_height}: it can no longer land"
                        )
                    continue
                if loop.time() >= next_send_at:
                    await self._send(signed, preflight=False, action=action)
                    next_send_at = loop.time() + self._resend_interval_s
            if loop.time() >= give_up_at:
                raise ConfirmationTimeout(
                    f"{action} {signed.signature} not {self.commitment} after "
                    f"{self._confirm_timeout_s:.0f}s; check its status before resending",
                    signature=signed.signature,
                )
            await asyncio.sleep(self._poll_interval_s)

    async def pay(
        self,
        *,
        user: Pubkey,
        recover_info: RecoverInfo,
        amount: int,
        bot: Keypair,
        payer: Keypair | None = None,
        treasury: Pubkey | None = None,
        on_signed: Callable[[SignedTransaction], Awaitable[None]] | None = None,
    ) -> str:
        """Take `amount` lamports from the user's vault to the treasury; return the signature.

        `on_signed` runs after signing and before the first send, so that the caller can
        record the signature (and the bytes) and reconcile after a crash.
        """
        if amount <= 0:
            raise ValueError(f"amount must be positive, got {amount}")
        if treasury is None:
            treasury = (await self.fetch_settings()).treasury
        payer = payer or bot
        instruction = self.program.pay(
            user=user,
            recover_info=recover_info,
            amount=amount,
            bot=bot.pubkey(),
            treasury=treasury,
            payer=payer.pubkey(),
        )
        signed = await self.sign([instruction], payer=payer, signers=[bot])
        if on_signed is not None:
            await on_signed(signed)
        return await self.submit(signed, action="pay")

    async def _user_instruction(
        self, action: str, instruction: Instruction, user: Keypair, payer: Keypair | None
    ) -> str:
        signed = await self.sign([instruction], payer=payer or user, signers=[user])
        return await self.submit(signed, action=action)

    async def register(self, user: Keypair, payer: Keypair | None = None) -> str:
        """Create the user's USER account (needed once before deposit and pay)."""
        instruction = self.program.register(user.pubkey(), payer and payer.pubkey())
        return await self._user_instruction("register", instruction, user, payer)

    async def deposit(self, user: Keypair, amount: int, payer: Keypair | None = None) -> str:
        """Move `amount` lamports from the user's wallet into their vault."""
        instruction = self.program.deposit(user.pubkey(), amount, payer and payer.pubkey())
        return await self._user_instruction("deposit", instruction, user, payer)

    async def withdraw(self, user: Keypair, amount: int, payer: Keypair | None = None) -> str:
        """Move `amount` free lamports from the vault back to the user's wallet."""
        instruction = self.program.withdraw(user.pubkey(), amount, payer and payer.pubkey())
        return await self._user_instruction("withdraw", instruction, user, payer)
