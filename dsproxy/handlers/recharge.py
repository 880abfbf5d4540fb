"""The controller's command handler: a recharge Request becomes one payment and one credit.

Read the view, decide (dsproxy.domain), record the fact, then take the external step. Every
fact is in the store before the step it enables, so after a crash `resume` finishes a payment
from where its facts say it stopped: a signed transaction is reconciled by its signature and
resent as the same bytes, never rebuilt while it could still land. The events to publish are
recorded in the same transaction as the fact that explains them; the outbox publishes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable

from attrs import define, field
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from dsproxy.adapters.event_store import AsyncEventStore
from dsproxy.adapters.recharges_projection import RechargesProjection, RequestRow
from dsproxy.adapters.solana_rpc import (
    BalancePaymentRpc,
    ProgramSettings,
    SignedTransaction,
    TransactionState,
)
from dsproxy.config import Settings
from dsproxy.domain.eligibility import Ineligible, check_eligible
from dsproxy.domain.payment import Answered, Payment, PaymentState
from dsproxy.domain.recharge import (
    Recharge,
    RefusalReason,
    Refused,
    failure_status,
    screen,
    success_messages,
    tokens_for,
)
from dsproxy.errors import (
    ConfirmationTimeout,
    PaymentError,
    RpcError,
    StoreError,
    TransactionExpired,
)
from dsproxy.services.projector import Projector
from dsproxy.wire.envelope import Address, seal
from dsproxy.wire.event import load_stored_event
from dsproxy.wire.messages import I64_MAX, Request, parse_message
from dsproxy.wire.recover import SIGN_MESSAGE_PREFIX_V1, verify_recover

__all__ = ["RechargeHandler", "build_recharge_handler"]

log = logging.getLogger(__name__)

LANDED_LOOKUP_GRACE_S = 300
"""After this long, an expired payment whose nonce the chain has moved past, none of its
transactions found, is logged as an error (it is looked for again all the same)."""


@define
class _UserLock:
    lock: asyncio.Lock = field(factory=asyncio.Lock)
    users: int = 0


@define
class RechargeHandler:
    """Pays recharge Requests for one machine; one instance per controller process."""

    store: AsyncEventStore
    projector: Projector
    rpc: BalancePaymentRpc
    bot: Keypair
    treasury: Pubkey
    signer_secret: str
    address: Address
    amount_lamports: int
    tokens_per_lamport: int
    admin: str | None = None
    payer: Keypair | None = None
    sign_prefix: bytes = SIGN_MESSAGE_PREFIX_V1
    namespace_id: int | None = None  # balance-payment v2 only
    deadline_margin_s: int = 5
    stale_after_s: int = 3600
    crash_at: frozenset[str] = frozenset()
    clock: Callable[[], float] = time.time
    _user_locks: dict[str, _UserLock] = field(factory=dict, init=False)

    # --- entry points -----------------------------------------------------------------------

    async def handle_request(self, row: RequestRow) -> None:
        """Answer one new Request: refuse it with a reason, or pay and credit it."""
        (record,) = await self.store.read(row.position - 1, 1)
        event = load_stored_event(record.state)
        now = int(self.clock())
        decision = screen(
            event,
            self.address,
            admin=self.admin,
            now=now,
            deadline_margin_s=self.deadline_margin_s,
            namespace_id=self.namespace_id,
        )
        if decision is None:
            decision = Refused(event.id, RefusalReason.MALFORMED, "not a Request")
        if isinstance(decision, Refused):
            await self._refuse(decision, stale=now - event.created_at > self.stale_after_s)
            return
        async with self._lock(decision.user):
            await self._accept(decision, event.content)

    async def resume(self, payment_uuid: str, user: str) -> None:
        """Finish a payment a crash or an outage left unfinished."""
        async with self._lock(user):  # load under the lock: a live handler may be driving it
            payment = await self._load(payment_uuid)
            await self._drive(payment)

    # --- deciding ---------------------------------------------------------------------------

    async def _accept(self, recharge: Recharge, request_content: str) -> None:
        if recharge.nonce > I64_MAX:  # no chain gets there, and no SQLite integer holds it
            detail = f"nonce {recharge.nonce} is beyond any on-chain nonce"
            await self._refuse(
                Refused(recharge.request_id, RefusalReason.NONCE_MISMATCH, detail, recharge.user)
            )
            return
        # a failed payment left the chain's nonce where it was: the user may sign it again
        tried = await RechargesProjection.payments_for(
            self.projector.db, recharge.user, recharge.nonce
        )
        known = next((row for row in tried if row.state != PaymentState.FAILED), None)
        if known is not None:
            await self._refuse(
                Refused(
                    recharge.request_id,
                    RefusalReason.NONCE_ALREADY_USED,
                    f"nonce {recharge.nonce} was already used by request {known.request_id}",
                    recharge.user,
                )
            )
            return
        if not verify_recover(
            recharge.recover,
            recharge.user,
            recharge.nonce,
            namespace_id=recharge.payload.namespace_id,
            prefix=self.sign_prefix,
        ):  # before any RPC call: anyone can publish Requests, a signature costs them nothing
            detail = f"not a signature by {recharge.user} over this payload, nonce and deadline"
            await self._refuse(
                Refused(recharge.request_id, RefusalReason.SIGNATURE_INVALID, detail, recharge.user)
            )
            return
        onchain = await self.rpc.fetch_onchain_user(Pubkey.from_string(recharge.user))
        verdict = check_eligible(
            recharge.recover,
            user=recharge.user,
            request_nonce=recharge.nonce,
            onchain=onchain,
            amount=self.amount_lamports,
            now=int(self.clock()),
            deadline_margin_s=self.deadline_margin_s,
            namespace_id=recharge.payload.namespace_id,
            prefix=self.sign_prefix,
        )
        if isinstance(verdict, Ineligible):
            reason = RefusalReason(verdict.reason.value)
            await self._refuse(Refused(recharge.request_id, reason, verdict.detail, recharge.user))
            return
        payment = Payment.accept(
            user=recharge.user,
            nonce=recharge.nonce,
            request_id=recharge.request_id,
            request_content=request_content,
            amount_lamports=self.amount_lamports,
            tokens=tokens_for(self.amount_lamports, self.tokens_per_lamport),
            attempt=len(tried),
        )
        await self._record([], payment)
        self._crash_point("accepted")
        await self._drive(payment)

    async def _refuse(self, refused: Refused, *, stale: bool = False) -> None:
        """Record the answer; tell the user (LockFailed) unless the Request is long stale."""
        events = [] if stale else [seal(failure_status(refused), self.address, self.signer_secret)]
        answer = Answered(
            request_id=refused.request_id,
            reason=refused.reason.value,
            detail=refused.detail,
            status_event_id=events[0].id if events else "",
        )
        log.info("refused request %s: %s", refused.request_id, refused.detail)
        try:
            await self._record(events, answer)
        except StoreError:
            if await self._answered(refused.request_id):
                return  # answered already (a concurrent delivery): nothing more to say
            raise

    # --- paying -----------------------------------------------------------------------------

    async def _drive(self, payment: Payment) -> None:
        """Move a payment through its states until it is credited or has failed."""
        while payment.state in PaymentState.UNFINISHED:
            needs_signing = payment.state in (PaymentState.ACCEPTED, PaymentState.EXPIRED)
            if needs_signing and not await self._sign_and_send(payment):
                return
            outcome = await self._confirm(payment)
            if outcome is None:
                continue  # expired unprocessed: sign again
            if isinstance(outcome, PaymentError):
                await self._fail(payment, RefusalReason.PAYMENT_FAILED, str(outcome))
                return
            await self._credit_landed(payment)

    async def _sign_and_send(self, payment: Payment) -> bool:
        """Build and sign one transaction, record its signature, then send it."""
        recharge = self._recharge_of(payment)
        if payment.state == PaymentState.EXPIRED:  # the chain may have moved on meanwhile
            onchain = await self.rpc.fetch_onchain_user(Pubkey.from_string(payment.user))
            verdict = check_eligible(
                recharge.recover,
                user=payment.user,
                request_nonce=payment.nonce,
                onchain=onchain,
                amount=payment.amount_lamports,
                now=int(self.clock()),
                deadline_margin_s=self.deadline_margin_s,
                namespace_id=recharge.payload.namespace_id,
                prefix=self.sign_prefix,
            )
            if isinstance(verdict, Ineligible):
                reason = RefusalReason(verdict.reason.value)
                if onchain is None or onchain.nonce <= payment.nonce:
                    await self._fail(payment, reason, verdict.detail)
                elif await self._signature_that_landed(payment):
                    await self._credit_landed(payment)
                else:  # only the bot moves a nonce: never failed (paid, and never credited)
                    raise self._still_looking(payment)
                return False
        instruction = self.rpc.program.pay(
            user=Pubkey.from_string(payment.user),
            recover_info=recharge.recover,
            amount=payment.amount_lamports,
            bot=self.bot.pubkey(),
            treasury=self.treasury,
            payer=(self.payer or self.bot).pubkey(),
        )
        signed = await self.rpc.sign(
            [instruction], payer=self.payer or self.bot, signers=[self.bot]
        )
        payment.submit(signed.signature, signed.raw, signed.last_valid_block_height)
        await self._record([], payment)  # the signature is known before the first send
        await self.rpc.send(signed, action="pay")
        self._crash_point("submitted")
        return True

    async def _confirm(self, payment: Payment) -> PaymentError | bool | None:
        """True when confirmed, the error when it failed on chain, None when it expired."""
        assert payment.signature and payment.transaction and payment.last_valid_block_height
        signed = SignedTransaction(
            payment.transaction, payment.signature, payment.last_valid_block_height
        )
        landed = await self._landed(signed.signature)
        if landed is not None:
            return landed
        try:
            await self.rpc.submit(signed, action="pay")  # the same bytes: never pays twice
        except TransactionExpired as exc:
            payment.expire(str(exc), at=int(self.clock()))
            await self._record([], payment)
            return None
        except ConfirmationTimeout:
            raise  # may still land: stay Submitted, the resume loop looks again later
        except RpcError:
            raise
        except PaymentError as exc:
            return await self._refused_or_pending(signed, exc)
        return True

    async def _signature_that_landed(self, payment: Payment) -> bool:
        """Whether one of the payment's transactions succeeded on chain after all."""
        for signature in reversed(payment.signatures):
            if await self._landed(signature) is True:
                log.warning("payment %s landed after all (%s)", payment.id, signature)
                return True
        return False

    def _still_looking(self, payment: Payment) -> RpcError:
        """An expired payment whose nonce the chain has moved past, none of its transactions
        found: look again later, however long it takes.

        An RPC node behind the one that took a transaction (load-balanced RPC) reports it not
        found until past its blockhash, and one without transaction history forgets it after
        a couple of minutes. Only the bot can move a user's nonce, so the payment most likely
        landed: failing it (as this did after five minutes) left the user paid and never
        credited, for good."""
        detail = f"pay {payment.signature} was found expired, yet the chain's nonce has moved"
        expired_at = payment.expired_at
        if expired_at is not None and self.clock() >= expired_at + LANDED_LOOKUP_GRACE_S:
            log.error(
                "payment %s: %s, and none of its transactions is found after %d s: is the RPC "
                "node keeping transaction history? (looking again later)",
                payment.id,
                detail,
                LANDED_LOOKUP_GRACE_S,
            )
        return RpcError(f"{detail} past it: looking for it again later")

    async def _credit_landed(self, payment: Payment) -> None:
        self._crash_point("confirmed")
        await self._credit(payment)

    async def _landed(self, signature: str) -> PaymentError | bool | None:
        """True if it succeeded, its error if it failed on chain, None if it has not landed."""
        status = await self.rpc.transaction_status(signature)
        if status.state is TransactionState.SUCCEEDED:
            return True
        if status.state is TransactionState.FAILED:
            assert status.error is not None, status
            return status.error
        return None

    async def _refused_or_pending(
        self, signed: SignedTransaction, refusal: PaymentError
    ) -> PaymentError | bool:
        """A failure that landed is final; a preflight refusal is not: bytes sent before it can
        still land until their blockhash expires (the fee payer refilled meanwhile), and a
        payment marked failed that then lands is paid and never credited."""
        landed = await self._landed(signed.signature)
        if landed is not None:
            return landed
        if await self.rpc.block_height() <= signed.last_valid_block_height:
            raise RpcError(
                f"pay {signed.signature} refused ({refusal}), but sent before it may still land:"
                " looking again once its blockhash has expired"
            ) from refusal
        return refusal

    async def _credit(self, payment: Payment) -> None:
        recharge = self._recharge_of(payment)
        working, credit, available = success_messages(recharge, payment.tokens)
        now = int(self.clock())
        # An event id covers content, tags and created_at only: two equal credits to one user
        # in one second would be one event, and one payment would go uncredited. Under the
        # user's lock, move to the next free second.
        credit_event = seal(credit, self.address, self.signer_secret, created_at=now)
        while await self.store.contains(credit_event.id):
            credit_event = seal(
                credit, self.address, self.signer_secret, created_at=credit_event.created_at + 1
            )
        events = [
            seal(working, self.address, self.signer_secret, created_at=now),
            credit_event,
            seal(
                available, self.address, self.signer_secret, created_at=credit_event.created_at + 1
            ),
        ]
        payment.credit([event.id for event in events])
        await self._record(events, payment)
        log.info("credited %d tokens for request %s", payment.tokens, payment.request_id)

    async def _fail(self, payment: Payment, reason: RefusalReason, detail: str) -> None:
        if await self._signature_that_landed(payment):  # a node lagged: it is paid after all
            await self._credit_landed(payment)
        else:
            await self._record_failure(payment, reason, detail)

    async def _record_failure(self, payment: Payment, reason: RefusalReason, detail: str) -> None:
        refused = Refused(payment.request_id, reason, detail, payment.user)
        status = seal(failure_status(refused), self.address, self.signer_secret)
        payment.fail(reason.value, detail, [status.id])
        await self._record([status], payment)
        log.warning("payment for request %s failed: %s", payment.request_id, detail)

    # --- plumbing ---------------------------------------------------------------------------

    async def _record(self, events: list, aggregate: Payment | Answered) -> None:
        await self.store.record(events, aggregate)
        await self.projector.catch_up()

    async def _load(self, payment_uuid: str) -> Payment:
        payment = await self.store.aggregate(uuid.UUID(payment_uuid))
        assert isinstance(payment, Payment), payment
        return payment

    async def _answered(self, request_id: str) -> bool:
        row = await RechargesProjection.request(self.projector.db, request_id)
        return row is not None and row.state != "new"

    def _recharge_of(self, payment: Payment) -> Recharge:
        message = parse_message(payment.request_content)
        assert isinstance(message, Request), payment.request_id  # screened before Accepted
        return Recharge(
            payment.request_id,
            requester="",
            reason=message.reason,
            payload=message.payload,
            recover=message.payload.recover,
        )

    @contextlib.asynccontextmanager
    async def _lock(self, user: str) -> AsyncIterator[None]:
        """One payment at a time per user: the chain's nonce is one sequence per user. A lock
        nobody holds or waits for is forgotten (users are whoever publishes a Request)."""
        entry = self._user_locks.get(user)
        if entry is None:
            entry = self._user_locks[user] = _UserLock()
        entry.users += 1  # holding it or waiting for it
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._user_locks[user]

    def _crash_point(self, name: str) -> None:
        """Die here, as a power cut would, when a test asks for it (DSPROXY_CRASH_AT)."""
        if name in self.crash_at:
            log.warning("crash point %r reached: killing the process", name)
            os.kill(os.getpid(), signal.SIGKILL)


def build_recharge_handler(
    settings: Settings,
    projector: Projector,
    rpc: BalancePaymentRpc,
    program: ProgramSettings,
    *,
    signer_secret: str,
    bot: Keypair,
    payer: Keypair | None = None,
) -> RechargeHandler:
    """The handler a controller runs, from its settings and the program's on-chain settings."""
    return RechargeHandler(
        store=projector.store,
        projector=projector,
        rpc=rpc,
        bot=bot,
        payer=payer,
        treasury=program.treasury,
        signer_secret=signer_secret,
        address=Address(settings.session, settings.require_machine()),
        amount_lamports=settings.pay_amount_lamports,
        tokens_per_lamport=settings.tokens_per_lamport,
        admin=settings.admin_pubkey,
        sign_prefix=program.sign_prefix or SIGN_MESSAGE_PREFIX_V1,
        namespace_id=rpc.program.namespace_id if rpc.program.version == 2 else None,
        deadline_margin_s=settings.deadline_margin_s,
        stale_after_s=settings.request_stale_s,
        crash_at=settings.crash_at,
    )
