"""The program encoding against the wire vectors, byte for byte, and the account layouts."""

from __future__ import annotations

from typing import Any

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from dsproxy.adapters.balance_payment import (
    PROGRAM_ID_V1,
    PROGRAM_ID_V2,
    SYSTEM_PROGRAM_ID,
    BalancePayment,
    GlobalAccount,
    LockAccount,
    UserAccount,
    account_discriminator,
    encode_pay_data,
    error_name,
    instruction_discriminator,
)
from dsproxy.errors import AccountDataInvalid
from dsproxy.wire.messages import RecoverInfo


@pytest.fixture
def bp(vectors: dict[str, Any]) -> dict[str, Any]:
    return vectors["balance_payment"]


def _key(text: str) -> Pubkey:
    return Pubkey.from_string(text)


def test_program_id_is_the_vectors(bp: dict[str, Any]) -> None:
    assert str(PROGRAM_ID_V1) == bp["program_id"]
    assert str(BalancePayment().program_id) == bp["program_id"]


def test_vector_user_key_comes_from_the_seed(bp: dict[str, Any]) -> None:
    user = Keypair.from_seed(bytes.fromhex(bp["user_seed_hex"]))
    assert str(user.pubkey()) == bp["user_pubkey"]


@pytest.mark.parametrize("name", ["GLOBAL", "USER", "VAULT", "LOCK_nonce_7"])
def test_pdas_and_bumps_match_the_vectors(bp: dict[str, Any], name: str) -> None:
    program, user = BalancePayment(), _key(bp["user_pubkey"])
    found = {
        "GLOBAL": program.global_pda,
        "USER": lambda: program.user_pda(user),
        "VAULT": lambda: program.vault_pda(user),
        "LOCK_nonce_7": lambda: program.lock_pda(user, 7),
    }[name]()
    assert (str(found[0]), found[1]) == (bp["pda"][name]["address"], bp["pda"][name]["bump"])


def test_pay_instruction_data_is_the_vectors_152_bytes(bp: dict[str, Any]) -> None:
    info = RecoverInfo.parse(bp["recover"]["recover_info_json"])
    instruction = BalancePayment().pay(
        user=_key(bp["user_pubkey"]),
        recover_info=info,
        amount=bp["pay_instruction"]["amount"],
        bot=_key(bp["bot_pubkey"]),
        treasury=_key(bp["treasury_pubkey"]),
    )
    assert bytes(instruction.data).hex() == bp["pay_instruction"]["data_hex"]
    assert len(instruction.data) == bp["pay_instruction"]["data_len"] == 152
    assert list(instruction_discriminator("pay")) == bp["pay_instruction"]["discriminator"]


def test_pay_accounts_are_in_the_programs_order_with_its_flags(bp: dict[str, Any]) -> None:
    program, user = BalancePayment(), _key(bp["user_pubkey"])
    bot, treasury, payer = _key(bp["bot_pubkey"]), _key(bp["treasury_pubkey"]), Pubkey.new_unique()
    info = RecoverInfo.parse(bp["recover"]["recover_info_json"])
    instruction = program.pay(
        user=user, recover_info=info, amount=1, bot=bot, treasury=treasury, payer=payer
    )
    metas = [(m.pubkey, m.is_signer, m.is_writable) for m in instruction.accounts]
    assert metas == [
        (program.global_pda()[0], False, False),
        (program.user_pda(user)[0], False, True),
        (user, False, True),
        (treasury, False, True),
        (program.vault_pda(user)[0], False, True),
        (bot, True, False),
        (payer, True, True),
        (SYSTEM_PROGRAM_ID, False, False),
    ]
    assert len(metas) == len(bp["pay_instruction"]["accounts_in_order"])


def test_bot_is_the_payer_by_default(bp: dict[str, Any]) -> None:
    info = RecoverInfo.parse(bp["recover"]["recover_info_json"])
    bot = _key(bp["bot_pubkey"])
    instruction = BalancePayment().pay(
        user=_key(bp["user_pubkey"]), recover_info=info, amount=1, bot=bot, treasury=bot
    )
    assert instruction.accounts[6].pubkey == bot


@pytest.mark.parametrize("name", ["register", "deposit", "withdraw"])
def test_user_instructions_have_the_users_accounts_and_args(name: str) -> None:
    program, user = BalancePayment(), Pubkey.new_unique()
    build = getattr(program, name)
    instruction = build(user) if name == "register" else build(user, 1_500_000)
    args = b"" if name == "register" else (1_500_000).to_bytes(8, "little")
    assert bytes(instruction.data) == instruction_discriminator(name) + args
    metas = [(m.pubkey, m.is_signer, m.is_writable) for m in instruction.accounts]
    moves = name != "register"
    assert metas == [
        (program.user_pda(user)[0], False, True),
        (user, True, moves),
        (program.vault_pda(user)[0], False, moves),
        (user, True, True),
        (SYSTEM_PROGRAM_ID, False, False),
    ]


def test_account_discriminators_match_the_vectors(bp: dict[str, Any]) -> None:
    layout = bp["accounts_layout"]
    assert list(account_discriminator("GlobalAccount")) == layout["GlobalAccount_discriminator"]
    assert list(account_discriminator("UserAccount")) == layout["UserAccount_discriminator"]


def test_accounts_round_trip_through_their_layouts() -> None:
    keys = [Pubkey.new_unique() for _ in range(3)]
    global_account = GlobalAccount(*keys)
    user_account = UserAccount(nonce=7, locked_amount=11, vault=keys[0])
    assert len(global_account.encode()) == 8 + 96 and len(user_account.encode()) == 8 + 48
    assert GlobalAccount.decode(global_account.encode()) == global_account
    assert UserAccount.decode(user_account.encode()) == user_account
    assert LockAccount.decode(LockAccount(5).encode()) == LockAccount(5)
    assert LockAccount.decode(LockAccount(5, 3).encode(), version=2) == LockAccount(5, 3)


def test_decoding_the_wrong_account_type_names_the_discriminators() -> None:
    data = UserAccount(0, 0, Pubkey.new_unique()).encode()
    with pytest.raises(AccountDataInvalid, match="not a GlobalAccount: discriminator d3218810"):
        GlobalAccount.decode(data)
    with pytest.raises(AccountDataInvalid, match="missing"):
        UserAccount.decode(b"")
    with pytest.raises(AccountDataInvalid, match="expected 56"):
        UserAccount.decode(data[:40])


def test_v2_pay_puts_the_namespace_first_in_data_and_accounts(bp: dict[str, Any]) -> None:
    program = BalancePayment(PROGRAM_ID_V2, version=2, namespace_id=3)
    info = RecoverInfo.parse(bp["recover"]["recover_info_json"])
    user, bot = Pubkey.new_unique(), Pubkey.new_unique()
    instruction = program.pay(user=user, recover_info=info, amount=9, bot=bot, treasury=bot)
    assert bytes(instruction.data) == encode_pay_data(info, 9, namespace_id=3)
    assert bytes(instruction.data)[8:16] == (3).to_bytes(8, "little")
    assert len(instruction.data) == 160
    assert instruction.accounts[0].pubkey == program.namespace_pda()[0]


def test_error_codes_follow_the_program_version() -> None:
    assert [error_name(code) for code in range(6000, 6006)] == [
        "Unauthorized",
        "InsufficientFunds",
        "SignatureFormatInvalid",
        "SignatureRecoveryFailed",
        "SignatureMismatch",
        "SignatureExpired",
    ]
    assert error_name(6003, version=2) == "Unauthorized"
    assert error_name(2003) == "ConstraintRaw"
    assert error_name(42) is None


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="version"):
        BalancePayment(version=3)
    with pytest.raises(ValueError, match="u64"):
        BalancePayment().lock_pda(Pubkey.new_unique(), -1)
    with pytest.raises(ValueError, match="u64"):
        BalancePayment().deposit(Pubkey.new_unique(), 2**64)
