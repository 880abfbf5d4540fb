"""The balance-payment flow on the local chain, through the real client over HTTP JSON-RPC.

Every failure must raise its typed error and move no lamports (the preflight refuses it, so
not even the fee is charged); a resend of the same signed transaction must never pay twice.
"""

from __future__ import annotations

import httpx
import pytest
from solana.rpc.async_api import AsyncClient
from solana.rpc.commitment import Confirmed
from solders.hash import Hash
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.system_program import TransferParams, transfer

from dsproxy.adapters.balance_payment import BalancePayment, LockAccount, UserAccount
from dsproxy.adapters.solana_rpc import BalancePaymentRpc, SignedTransaction, TransactionState
from dsproxy.domain.eligibility import Eligible, IneligibleReason, check_eligible
from dsproxy.errors import (
    AnchorConstraint,
    PaymentInsufficientFunds,
    PaymentUnauthorized,
    ProgramError,
    RpcError,
    SignatureExpired,
    SignatureFormatInvalid,
    SignatureMismatch,
    TransactionExpired,
    TransactionFailed,
)
from dsproxy.localchain import LocalChainServer
from dsproxy.localchain.chain import BLOCKHASH_VALID_SLOTS, LAMPORTS_PER_SIGNATURE
from dsproxy.wire.messages import RecoverInfo
from tests.integration.localchain_fixtures import (  # noqa: F401 (fixtures)
    CHAIN_NOW,
    DEPOSIT_LAMPORTS,
    PAY_LAMPORTS,
    World,
    chain_fixture,
    chain_server_fixture,
    not_a_curve_point,
    parties_fixture,
    world_fixture,
)


async def test_register_deposit_authorize_pay_credits_treasury_and_increments_nonce(
    world: World,
) -> None:
    before = world.balances()
    onchain = await world.onchain()
    assert (onchain.nonce, onchain.vault_lamports, onchain.locked_lamports) == (
        0,
        DEPOSIT_LAMPORTS,
        0,
    )
    info = world.authorize(onchain.nonce)
    user = str(world.keys.user.pubkey())
    decision = check_eligible(
        info, user=user, request_nonce=0, onchain=onchain, amount=PAY_LAMPORTS, now=CHAIN_NOW
    )
    assert decision == Eligible(nonce=0, amount=PAY_LAMPORTS, free_lamports=DEPOSIT_LAMPORTS)

    signature = await world.pay(info)

    status = await world.rpc.transaction_status(signature)
    assert status.state is TransactionState.SUCCEEDED
    after = world.balances()
    assert after["vault"] == before["vault"] - PAY_LAMPORTS
    assert after["treasury"] == before["treasury"] + PAY_LAMPORTS
    assert after["bot"] == before["bot"] - LAMPORTS_PER_SIGNATURE  # bot = payer: the fee only
    assert after["user"] == before["user"]
    assert (await world.onchain()).nonce == 1

    await world.pay(world.authorize(1))
    assert (await world.onchain()).nonce == 2
    assert world.balances()["treasury"] == before["treasury"] + 2 * PAY_LAMPORTS


async def test_separate_payer_pays_the_fee_and_bot_pays_nothing(world: World) -> None:
    payer = Keypair()
    world.chain.airdrop(payer.pubkey(), 10_000_000)
    before = world.balances()
    await world.pay(world.authorize(0), payer=payer)
    assert world.balances()["bot"] == before["bot"]
    assert world.chain.get_balance(payer.pubkey()) == 10_000_000 - 2 * LAMPORTS_PER_SIGNATURE


async def test_deadline_equal_to_chain_time_still_pays(world: World) -> None:
    await world.pay(world.authorize(0, deadline=CHAIN_NOW))  # the program fails only now > deadline
    assert (await world.onchain()).nonce == 1


def _tamper_payload(info: RecoverInfo) -> RecoverInfo:
    payload = bytes([info.payload[0] ^ 1]) + info.payload[1:]
    return RecoverInfo(signature=info.signature, payload=payload, deadline=info.deadline)


def _bad_point_signature(info: RecoverInfo) -> RecoverInfo:
    signature = not_a_curve_point() + info.signature[32:]
    return RecoverInfo(signature=signature, payload=info.payload, deadline=info.deadline)


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("expired deadline", SignatureExpired),
        ("signed for the next nonce", SignatureMismatch),
        ("signature by another key", SignatureMismatch),
        ("tampered payload", SignatureMismatch),
        ("signature R is not a curve point", SignatureFormatInvalid),
        ("more than the free balance", PaymentInsufficientFunds),
        ("wrong bot", PaymentUnauthorized),
        ("wrong treasury", AnchorConstraint),
    ],
)
async def test_each_refused_payment_raises_its_typed_error_and_moves_no_lamports(
    world: World, case: str, error: type[ProgramError]
) -> None:
    impostor = Keypair()
    world.chain.airdrop(impostor.pubkey(), 10_000_000)
    info, amount, overrides = world.authorize(0), PAY_LAMPORTS, {}
    if case == "expired deadline":
        info = world.authorize(0, deadline=CHAIN_NOW - 1)
    elif case == "signed for the next nonce":
        info = world.authorize(1)
    elif case == "signature by another key":
        info = world.authorize(0, by=impostor)
    elif case == "tampered payload":
        info = _tamper_payload(info)
    elif case == "signature R is not a curve point":
        info = _bad_point_signature(info)
    elif case == "more than the free balance":
        amount = DEPOSIT_LAMPORTS + 1
    elif case == "wrong bot":
        overrides = {"bot": impostor}
    elif case == "wrong treasury":
        overrides = {"treasury": impostor.pubkey()}
    before = world.balances()

    with pytest.raises(error) as raised:
        await world.pay(info, amount, **overrides)

    assert raised.value.code == error.code if error is not AnchorConstraint else 2003
    assert world.balances() == before
    assert (await world.onchain()).nonce == 0


async def test_replayed_signature_is_refused_after_it_paid_once(world: World) -> None:
    info = world.authorize(0)
    await world.pay(info)
    before = world.balances()
    with pytest.raises(SignatureMismatch, match="on-chain nonce"):
        await world.pay(info)  # the nonce moved on: the old signature no longer verifies
    assert world.balances() == before


async def test_payment_that_would_leave_the_vault_below_rent_fails_whole(world: World) -> None:
    before = world.balances()
    with pytest.raises(TransactionFailed, match="rent"):
        await world.pay(world.authorize(0), DEPOSIT_LAMPORTS - 1)
    assert world.balances() == before


async def test_unregistered_user_cannot_be_charged(world: World) -> None:
    stranger = Keypair()
    info = world.authorize(0, by=stranger)
    with pytest.raises(AnchorConstraint) as raised:
        await world.pay(info, user=stranger.pubkey())
    assert raised.value.name == "AccountNotInitialized"


async def _signed_pay(world: World, info: RecoverInfo) -> SignedTransaction:
    treasury = (await world.rpc.fetch_settings()).treasury
    instruction = world.rpc.program.pay(
        user=world.keys.user.pubkey(),
        recover_info=info,
        amount=PAY_LAMPORTS,
        bot=world.keys.bot.pubkey(),
        treasury=treasury,
    )
    return await world.rpc.sign([instruction], payer=world.keys.bot, signers=[])


async def test_resending_the_same_signed_transaction_never_pays_twice(world: World) -> None:
    before = world.balances()
    signed = await _signed_pay(world, world.authorize(0))

    first = await world.rpc.submit(signed)
    second = await world.rpc.submit(signed)  # as after a crash: the same bytes again
    world.chain.send_transaction(signed.raw, skip_preflight=True)

    assert first == second == signed.signature
    after = world.balances()
    assert after["treasury"] == before["treasury"] + PAY_LAMPORTS
    assert after["vault"] == before["vault"] - PAY_LAMPORTS
    assert after["bot"] == before["bot"] - LAMPORTS_PER_SIGNATURE
    assert (await world.onchain()).nonce == 1


async def test_signature_is_known_before_sending_and_reconciles_after(world: World) -> None:
    recorded: list[SignedTransaction] = []

    async def record(signed: SignedTransaction) -> None:
        recorded.append(signed)
        status = await world.rpc.transaction_status(signed.signature)
        assert status.state is TransactionState.NOT_FOUND

    signature = await world.pay(world.authorize(0), on_signed=record)

    assert [signed.signature for signed in recorded] == [signature]
    assert (await world.rpc.transaction_status(signature)).state is TransactionState.SUCCEEDED


async def test_a_landed_failure_reads_back_as_failed_with_its_typed_error(world: World) -> None:
    signed = await _signed_pay(world, world.authorize(0, deadline=CHAIN_NOW - 1))
    before = world.balances()
    world.chain.send_transaction(signed.raw, skip_preflight=True)  # no preflight: it lands

    status = await world.rpc.transaction_status(signed.signature)

    assert status.state is TransactionState.FAILED
    assert isinstance(status.error, SignatureExpired)
    after = world.balances()
    assert after["bot"] == before["bot"] - LAMPORTS_PER_SIGNATURE  # the fee, nothing else
    assert {k: v for k, v in after.items() if k != "bot"} == {
        k: v for k, v in before.items() if k != "bot"
    }


async def test_expired_blockhash_raises_transaction_expired_and_moves_nothing(
    world: World,
) -> None:
    signed = await _signed_pay(world, world.authorize(0))
    world.chain.advance_slots(BLOCKHASH_VALID_SLOTS + 1)
    before = world.balances()

    with pytest.raises(TransactionExpired):
        await world.rpc.submit(signed)

    assert world.balances() == before
    assert (await world.rpc.transaction_status(signed.signature)).state is (
        TransactionState.NOT_FOUND
    )


async def test_withdraw_returns_only_free_lamports(world: World) -> None:
    wallet = world.balances()["user"]
    await world.rpc.withdraw(world.keys.user, 5_000_000)
    assert world.balances()["user"] == wallet + 5_000_000 - LAMPORTS_PER_SIGNATURE
    with pytest.raises(PaymentInsufficientFunds):
        await world.rpc.withdraw(world.keys.user, DEPOSIT_LAMPORTS)


async def test_locked_lamports_are_not_free_until_settled(world: World) -> None:
    rpc, user, bot = world.rpc, world.keys.user, world.keys.bot
    lock = rpc.program.lock(
        user=user.pubkey(), nonce=0, recover_info=world.authorize(0), amount=12_000_000,
        bot=bot.pubkey(),
    )  # fmt: skip
    await rpc.submit(await rpc.sign([lock], payer=bot, signers=[]))
    assert (await world.onchain()).locked_lamports == 12_000_000
    lock_address = rpc.program.lock_pda(user.pubkey(), 0)[0]
    lock_data = await rpc.fetch_program_data(lock_address)
    assert lock_data is not None and LockAccount.decode(lock_data).amount == 12_000_000
    with pytest.raises(PaymentInsufficientFunds):
        await rpc.withdraw(user, DEPOSIT_LAMPORTS - 12_000_000 + 1)

    settle = rpc.program.settle(
        user=user.pubkey(), nonce=0, amount=7_000_000, bot=bot.pubkey(),
        treasury=world.keys.treasury.pubkey(),
    )  # fmt: skip
    treasury = world.balances()["treasury"]
    await rpc.submit(await rpc.sign([settle], payer=bot, signers=[]))

    assert (await world.onchain()).locked_lamports == 0
    assert world.balances()["treasury"] == treasury + 7_000_000
    assert await rpc.fetch_program_data(lock_address) is None  # closed, rent back to the payer
    user_data = await rpc.fetch_program_data(rpc.program.user_pda(user.pubkey())[0])
    assert user_data is not None and UserAccount.decode(user_data).nonce == 1


async def test_unreachable_rpc_raises_rpc_error() -> None:
    async with BalancePaymentRpc.connect("http://127.0.0.1:9", BalancePayment()) as rpc:
        with pytest.raises(RpcError, match="getAccountInfo"):
            await rpc.fetch_settings()


async def test_eligibility_check_refuses_what_the_chain_would(world: World) -> None:
    onchain = await world.onchain()
    user = str(world.keys.user.pubkey())
    replay = world.authorize(0)
    await world.pay(replay)
    decision = check_eligible(
        replay,
        user=user,
        request_nonce=0,
        onchain=await world.onchain(),
        amount=PAY_LAMPORTS,
        now=CHAIN_NOW,
    )
    assert decision.reason is IneligibleReason.NONCE_MISMATCH  # type: ignore[union-attr]
    assert onchain.nonce == 0


def _transfer_message(target: Pubkey, blockhash: Hash) -> Message:
    payer = Keypair().pubkey()
    params = TransferParams(from_pubkey=payer, to_pubkey=target, lamports=1)
    return Message.new_with_blockhash([transfer(params)], payer, blockhash)


async def test_solana_py_reads_and_airdrops_work_against_the_server(
    chain_server: LocalChainServer,
) -> None:
    target = Keypair().pubkey()
    async with AsyncClient(chain_server.url, commitment=Confirmed) as client:
        assert (await client.get_version()).value.solana_core
        airdrop = (await client.request_airdrop(target, 2_000_000)).value
        await client.confirm_transaction(airdrop, Confirmed, sleep_seconds=0.01)
        assert (await client.get_balance(target)).value == 2_000_000
        rent = (await client.get_minimum_balance_for_rent_exemption(0)).value
        assert rent == 890_880
        latest = (await client.get_latest_blockhash()).value
        fee = (await client.get_fee_for_message(_transfer_message(target, latest.blockhash))).value
        assert fee == LAMPORTS_PER_SIGNATURE
        assert latest.last_valid_block_height == (await client.get_block_height()).value + 150


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("getMinimumBalanceForRentExemption", [2**64]),
        ("requestAirdrop", ["11111111111111111111111111111111", 2**64]),
    ],
)
async def test_numbers_beyond_u64_are_a_json_rpc_error_not_a_crash(
    chain_server: LocalChainServer, method: str, params: list[object]
) -> None:
    """A real node answers -32602; the stand-in once answered HTTP 500 (an OverflowError)."""
    async with httpx.AsyncClient() as http:
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        response = await http.post(chain_server.url, json=body)
    assert response.status_code == 200
    assert response.json()["error"]["code"] == -32602
