"""The controller's handler against a real store and the local chain: pay once, credit once."""

from __future__ import annotations

import asyncio
import json

import pytest
from solders.account import Account
from solders.keypair import Keypair
from solders.message import Message
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction as SolanaTransaction

from dsproxy.adapters.recharges_projection import RechargesProjection
from dsproxy.adapters.solana_rpc import BalancePaymentRpc
from dsproxy.errors import RpcError, TransactionFailed
from dsproxy.handlers.recharge import LANDED_LOOKUP_GRACE_S
from dsproxy.localchain.chain import BLOCKHASH_VALID_SLOTS
from dsproxy.services.controller import ControllerLoop
from dsproxy.wire.envelope import Address
from dsproxy.wire.event import load_stored_event, public_key_of, sign_event
from dsproxy.wire.messages import Reason, Status, Transaction, parse_message
from dsproxy.wire.recover import sign_recover
from tests.conftest import CONTROLLER_SECRET
from tests.integration.localchain_fixtures import (
    CHAIN_NOW,
    DEPOSIT_LAMPORTS,
    PAY_LAMPORTS,
    chain_fixture,  # noqa: F401
    chain_server_fixture,  # noqa: F401
    parties_fixture,  # noqa: F401
    world_fixture,  # noqa: F401
)
from tests.integration.recharge_fixtures import (
    TOKENS_PER_LAMPORT,
    Controller,
    controller_fixture,  # noqa: F401
    dapp_request,
)

CREDIT = PAY_LAMPORTS * TOKENS_PER_LAMPORT
CONTROLLER_PUBKEY = public_key_of(CONTROLLER_SECRET)


async def controller_messages(controller: Controller) -> list[tuple[str, object]]:
    """Every event the controller signed, in store order, as (event id, message)."""
    found = []
    for record in await controller.node.store.read(0, 1000):
        if record.is_nostr:
            event = load_stored_event(record.state)
            if event.pubkey == CONTROLLER_PUBKEY:
                found.append((event.id, parse_message(event.content)))
    return found


async def test_a_dapp_request_is_paid_once_and_credited_once(
    controller: Controller, address: Address
) -> None:
    world = controller.world
    before = world.balances()
    request = dapp_request(address, world.keys.user, world.authorize(0), 0)
    await controller.deliver(request)
    await controller.deliver(request)  # re-delivered: nothing more happens

    after = world.balances()
    assert after["treasury"] - before["treasury"] == PAY_LAMPORTS
    assert before["vault"] - after["vault"] == PAY_LAMPORTS
    assert (await world.onchain()).nonce == 1
    assert await controller.balance(world.keys.user) == CREDIT

    messages = await controller_messages(controller)
    kinds = [type(m).__name__ for _, m in messages]
    assert kinds == ["Status", "Transaction", "Status"]
    working, credit, available = (m for _, m in messages)
    assert isinstance(working, Status) and working.status.value == "Working"
    assert working.initial_request == request.id
    assert credit == Transaction(str(world.keys.user.pubkey()), CREDIT)
    assert isinstance(available, Status) and available.reason is Reason.USER_BEHAVIOUR
    row = await RechargesProjection.request(controller.node.db, request.id)
    assert row is not None and row.state == "paid"
    (payment,) = await RechargesProjection.recent_payments(controller.node.db, 10)
    assert payment.state == "credited" and payment.signature and payment.attempts == 1


async def failure_of(controller: Controller, request_id: str) -> str:
    messages = await controller_messages(controller)
    (status,) = [m for _, m in messages if isinstance(m, Status)]
    assert status.reason is Reason.LOCK_FAILED and status.initial_request == request_id
    assert not any(isinstance(m, Transaction) for _, m in messages)
    return status.payload


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("expired", "deadline_passed"),
        ("wrong_nonce", "nonce_mismatch"),
        ("foreign_signature", "signature_invalid"),
        ("tampered_payload", "signature_invalid"),
        ("insufficient_funds", "insufficient_free_balance"),
        ("admin_reason", "admin_only"),
        ("other_namespace", "not_for_this_machine"),
    ],
)
async def test_bad_requests_get_lock_failed_and_spend_nothing(
    controller: Controller, address: Address, case: str, expected: str
) -> None:
    world = controller.world
    user = world.keys.user
    info = world.authorize(0)
    nonce, reason = 0, Reason.USER_REQUEST
    if case == "expired":
        info = world.authorize(0, deadline=CHAIN_NOW - 1)
    elif case == "wrong_nonce":
        info, nonce = world.authorize(1), 1
    elif case == "foreign_signature":
        info = world.authorize(0, by=Keypair())
    elif case == "tampered_payload":
        info = type(info)(info.signature, bytes([1]) + info.payload[1:], info.deadline)
    elif case == "insufficient_funds":
        controller.handler.amount_lamports = DEPOSIT_LAMPORTS + 1
    elif case == "admin_reason":
        reason = Reason.ADMIN_REQUEST
    before = world.balances()
    namespace = 7 if case == "other_namespace" else None  # this chain is balance-payment v1
    request = dapp_request(address, user, info, nonce, reason=reason, namespace_id=namespace)
    await controller.deliver(request)

    assert world.balances() == before
    assert (await world.onchain()).nonce == 0
    assert await controller.balance(user) == 0
    assert (await failure_of(controller, request.id)).startswith(expected)
    row = await RechargesProjection.request(controller.node.db, request.id)
    assert row is not None and row.state == "refused" and row.detail.startswith(expected)


async def test_a_user_whose_address_anyone_sent_lamports_to_is_still_not_registered(
    controller: Controller, address: Address
) -> None:
    """A System transfer to the USER address of a key that never registered leaves an empty
    account the System program owns there (possible on any cluster): that is no USER account.
    Each Request naming that key once failed before it was answered and was retried for ever."""
    world = controller.world
    stranger, sender = Keypair(), Keypair()
    world.chain.airdrop(sender.pubkey(), 10**9)
    user_address = world.rpc.program.user_pda(stranger.pubkey())[0]
    blockhash, _ = world.chain.latest_blockhash()
    params = TransferParams(from_pubkey=sender.pubkey(), to_pubkey=user_address, lamports=890_880)
    message = Message([transfer(params)], sender.pubkey())
    world.chain.send_transaction(bytes(SolanaTransaction([sender], message, blockhash)))
    assert world.chain.get_balance(user_address) == 890_880

    assert await world.rpc.fetch_user(stranger.pubkey()) is None
    request = dapp_request(address, stranger, world.authorize(0, by=stranger), 0)
    await controller.deliver(request)
    assert (await failure_of(controller, request.id)).startswith("not_registered")


async def test_requests_that_keep_failing_do_not_hold_back_other_users(
    controller: Controller, address: Address
) -> None:
    """64 Requests naming a user whose USER account the controller cannot read (here written
    by another build of the program) fail on every try. They once filled the controller's
    window of new Requests for good: a paying user's later Request was never answered."""
    world = controller.world
    unreadable = Keypair()
    world.chain.put_account(
        world.rpc.program.user_pda(unreadable.pubkey())[0],
        Account(10**7, b"not a USER account", world.rpc.program.program_id),
    )
    failing = [
        dapp_request(address, unreadable, world.authorize(0, by=unreadable), 0) for _ in range(64)
    ]
    good = dapp_request(address, world.keys.user, world.authorize(0), 0)
    await controller.node.store.append_nostr([*failing, good])
    await controller.node.projector.catch_up()
    now = [0.0]
    retried: list[str] = []  # what the controller's metrics count
    loop = ControllerLoop(
        controller.handler, concurrency_max=16, clock=lambda: now[0], on_retry=retried.append
    )
    for _ in range(3):
        await loop.schedule()
        await loop.settle()
        now[0] += 3600  # every retry is due again at the next pass
    row = await RechargesProjection.request(controller.node.db, good.id)
    assert row is not None and row.state == "paid"
    assert await controller.balance(world.keys.user) == CREDIT
    assert set(retried) == {"AccountDataInvalid"} and len(retried) >= len(failing)
    for event in failing[:3]:  # they are still tried: the chain or a fix may mend them
        row = await RechargesProjection.request(controller.node.db, event.id)
        assert row is not None and row.state == "new"


async def test_a_forged_request_is_answered_without_asking_the_chain(
    controller: Controller, address: Address
) -> None:
    """Anyone can publish Requests, and a bad signature costs nothing to make: each one cost two
    RPC calls before its signature was checked (and, with the chain away, was retried for ever)."""
    world = controller.world
    forged = dapp_request(address, world.keys.user, world.authorize(0, by=Keypair()), 0)
    async with BalancePaymentRpc.connect("http://127.0.0.1:9", world.rpc.program) as away:
        controller.handler.rpc = away  # nothing answers there: any RPC call would fail
        await controller.deliver(forged)
    assert (await failure_of(controller, forged.id)).startswith("signature_invalid")
    assert not controller.handler._user_locks  # one lock per user, forgotten once unused


async def test_replayed_signature_in_a_new_request_is_refused(
    controller: Controller, address: Address
) -> None:
    world = controller.world
    info = world.authorize(0)
    first = dapp_request(address, world.keys.user, info, 0)
    await controller.deliver(first)
    replay = dapp_request(address, world.keys.user, info, 0)  # same signature, new event
    before = world.balances()
    await controller.deliver(replay)
    assert world.balances() == before
    assert await controller.balance(world.keys.user) == CREDIT
    row = await RechargesProjection.request(controller.node.db, replay.id)
    assert row is not None and row.state == "refused"
    assert row.detail.startswith("nonce_already_used")


async def test_a_payment_an_rpc_node_called_expired_but_that_landed_is_credited(
    controller: Controller, address: Address
) -> None:
    """Behind a load balancer a node that lags reports the landed transaction not found, until
    past its blockhash: the payment was declared expired, the moved nonce then made it fail,
    and the user paid for nothing."""
    world = controller.world
    world.chain.statuses_lag = True
    request = dapp_request(address, world.keys.user, world.authorize(0), 0)
    landed = world.chain.transactions_landed()
    delivery = asyncio.create_task(controller.deliver(request))
    while world.chain.transactions_landed() == landed:  # noqa: ASYNC110 (the chain has no event)
        await asyncio.sleep(0.01)  # until the pay has landed, which no node reports
    world.chain.advance_slots(BLOCKHASH_VALID_SLOTS + 1)
    with pytest.raises(RpcError, match="looking for it again later"):
        await delivery  # the controller's loop resumes it later
    assert (await world.onchain()).nonce == 1
    assert await controller.balance(world.keys.user) == 0

    # however long the node lags (or forgets, without transaction history): never failed, as
    # once after five minutes, leaving the user paid and never credited
    clock = controller.handler.clock
    controller.handler.clock = lambda: clock() + LANDED_LOOKUP_GRACE_S + 3_600
    (unfinished,) = await RechargesProjection.unfinished_payments(controller.node.db)
    with pytest.raises(RpcError, match="looking for it again later"):
        await controller.handler.resume(unfinished.payment_id, unfinished.user)
    row = await RechargesProjection.request(controller.node.db, request.id)
    assert row is not None and row.state != "refused", row

    world.chain.statuses_lag = False  # the node caught up
    (unfinished,) = await RechargesProjection.unfinished_payments(controller.node.db)
    before = world.balances()
    await controller.handler.resume(unfinished.payment_id, unfinished.user)
    assert await controller.balance(world.keys.user) == CREDIT
    assert world.balances() == before  # credited, not paid again
    row = await RechargesProjection.request(controller.node.db, request.id)
    assert row is not None and row.state == "paid", row


async def test_after_a_failed_payment_the_user_can_sign_the_same_nonce_again(
    controller: Controller, address: Address
) -> None:
    """Only a payment that lands moves the chain's nonce, so after one fails (here the fee
    payer stayed empty until the authorization's deadline) the user's next signature is for the
    same nonce. It was refused as `nonce_already_used` for good: the user could never recharge
    again. And a refusal before sending is not final while bytes sent earlier may land."""
    world = controller.world
    funded_payer, clock = controller.handler.payer, controller.handler.clock
    controller.handler.payer = Keypair()  # empty: the transaction cannot pay its fee
    info = world.authorize(0)
    first = dapp_request(address, world.keys.user, info, 0)
    with pytest.raises(TransactionFailed):  # the controller's loop retries it later...
        await controller.deliver(first)
    (unfinished,) = await RechargesProjection.unfinished_payments(controller.node.db)
    with pytest.raises(RpcError, match="may still land"):  # ...but not while it may land
        await controller.handler.resume(unfinished.payment_id, unfinished.user)
    controller.handler.clock = lambda: info.deadline + 1  # the payer stays empty past it
    world.chain.advance_slots(BLOCKHASH_VALID_SLOTS + 1)  # what was sent can no longer land
    await controller.handler.resume(unfinished.payment_id, unfinished.user)
    row = await RechargesProjection.request(controller.node.db, first.id)
    assert row is not None and row.state == "failed", row
    assert row.detail.startswith("deadline_passed"), row.detail
    assert (await world.onchain()).nonce == 0

    controller.handler.payer, controller.handler.clock = funded_payer, clock
    before = world.balances()
    second = dapp_request(address, world.keys.user, world.authorize(0), 0)
    await controller.deliver(second)
    assert (await world.onchain()).nonce == 1
    assert world.balances()["treasury"] - before["treasury"] == PAY_LAMPORTS
    assert await controller.balance(world.keys.user) == CREDIT
    third = dapp_request(address, world.keys.user, world.authorize(0), 0)  # paid now: refused
    await controller.deliver(third)
    row = await RechargesProjection.request(controller.node.db, third.id)
    assert row is not None and row.detail.startswith("nonce_already_used")
    assert await controller.balance(world.keys.user) == CREDIT


async def test_a_nonce_past_sqlite_integers_is_refused_not_a_crash(
    controller: Controller, address: Address
) -> None:
    """Anyone can send it (no signature is checked before the nonce is looked up): crashing
    the handler left the Request queued forever, and enough of them starved real ones."""
    world = controller.world
    request = dapp_request(address, world.keys.user, world.authorize(0), 2**63)
    before = world.balances()
    await controller.deliver(request)
    row = await RechargesProjection.request(controller.node.db, request.id)
    assert row is not None and row.state == "refused"
    assert row.detail.startswith("nonce_mismatch")
    assert world.balances() == before


async def test_malformed_payload_is_refused_with_the_parse_error(
    controller: Controller, address: Address
) -> None:
    content = json.dumps(
        {
            "Request": {
                "to_status": "Working",
                "reason": "UserRequest",
                "initial_request": "0" * 64,
                "payload": '{"nonce": 0}',
            }
        }
    )
    event = sign_event("42" * 32, 1573, [["s", address.session], ["p", address.machine]],
                       content, CHAIN_NOW)  # fmt: skip
    await controller.deliver(event)
    payload = await failure_of(controller, event.id)
    assert payload.startswith("malformed: payload: missing field 'recover_info'")


async def test_requests_for_another_machine_are_not_answered(
    controller: Controller, address: Address
) -> None:
    world = controller.world
    elsewhere = Address(address.session, "00" * 32)
    await controller.deliver(dapp_request(elsewhere, world.keys.user, world.authorize(0), 0))
    assert await controller_messages(controller) == []
    assert (await world.onchain()).nonce == 0


async def test_ten_users_recharging_at_once_are_all_credited(
    controller: Controller, address: Address
) -> None:
    import asyncio

    world = controller.world
    users = [Keypair() for _ in range(10)]
    for user in users:
        world.chain.airdrop(user.pubkey(), 100_000_000)
        await world.rpc.register(user)
        await world.rpc.deposit(user, DEPOSIT_LAMPORTS)
    requests = [
        dapp_request(address, user, sign_recover(user, bytes(64), 0, CHAIN_NOW + 600), 0)
        for user in users
    ]
    await controller.node.store.append_nostr(requests)
    await controller.node.projector.catch_up()
    rows = await RechargesProjection.new_requests(controller.node.db, 100)
    await asyncio.gather(*(controller.handler.handle_request(row) for row in rows))
    for user in users:
        assert await controller.balance(user) == CREDIT
    assert world.chain.get_balance(world.keys.treasury.pubkey()) >= 10 * PAY_LAMPORTS
