"""The balance-payment Anchor program's encoding: ids, PDAs, instructions, accounts, error codes.

Pure: no I/O. Instruction data is `sha256("global:<name>")[:8]` then borsh arguments; account
data is `sha256("account:<Name>")[:8]` then borsh fields. Account metas follow the program's
`#[derive(Accounts)]` structs field by field, since Anchor reads them by position.

v1 (GguVKx...) keeps bot and treasury in GLOBAL; v2 (8Pna6C...) moves them to a NAMESPACE
account, adds `namespace_id` to pay and lock, and renumbers the custom errors.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from attrs import field, frozen
from solders.instruction import AccountMeta, Instruction
from solders.pubkey import Pubkey

from dsproxy.errors import AccountDataInvalid
from dsproxy.wire.messages import RecoverInfo

__all__ = [
    "ANCHOR_ERRORS",
    "PROGRAM_ERRORS_V1",
    "PROGRAM_ERRORS_V2",
    "PROGRAM_ID_V1",
    "PROGRAM_ID_V2",
    "SYSTEM_PROGRAM_ID",
    "BalancePayment",
    "GlobalAccount",
    "LockAccount",
    "NamespaceAccount",
    "UserAccount",
    "account_discriminator",
    "encode_pay_data",
    "error_name",
    "instruction_discriminator",
]

PROGRAM_ID_V1 = Pubkey.from_string("GguVKxU88NUe3GLtns7Uaa6a8Pjb9USKq3WD1rjZnPS9")
PROGRAM_ID_V2 = Pubkey.from_string("8Pna6CZRquk83XT6ecisT9TYVfN3hY299GH2yEJk73dL")
SYSTEM_PROGRAM_ID = Pubkey.from_string("11111111111111111111111111111111")

PROGRAM_ERRORS_V1: dict[int, str] = {
    6000: "Unauthorized",
    6001: "InsufficientFunds",
    6002: "SignatureFormatInvalid",
    6003: "SignatureRecoveryFailed",
    6004: "SignatureMismatch",
    6005: "SignatureExpired",
}
PROGRAM_ERRORS_V2: dict[int, str] = {
    6000: "NameTooShort",
    6001: "NoUpdateFields",
    6002: "InvalidPubkey",
    6003: "Unauthorized",
    6004: "InsufficientFunds",
    6005: "SignatureFormatInvalid",
    6006: "SignatureRecoveryFailed",
    6007: "SignatureMismatch",
    6008: "SignatureExpired",
}
# The Anchor framework's own codes that these instructions can produce.
ANCHOR_ERRORS: dict[int, str] = {
    100: "InstructionMissing",
    101: "InstructionFallbackNotFound",
    102: "InstructionDidNotDeserialize",
    2000: "ConstraintMut",
    2001: "ConstraintHasOne",
    2002: "ConstraintSigner",
    2003: "ConstraintRaw",
    2004: "ConstraintOwner",
    2006: "ConstraintSeeds",
    3001: "AccountDiscriminatorNotFound",
    3002: "AccountDiscriminatorMismatch",
    3003: "AccountDidNotDeserialize",
    3005: "AccountNotEnoughKeys",
    3006: "AccountNotMutable",
    3007: "AccountOwnedByWrongProgram",
    3008: "InvalidProgramId",
    3010: "AccountNotSigner",
    3012: "AccountNotInitialized",
}


def error_name(code: int, version: int = 1) -> str | None:
    """The program's (or Anchor's) name for a custom error code, or None if unknown."""
    table = PROGRAM_ERRORS_V1 if version == 1 else PROGRAM_ERRORS_V2
    return table.get(code) or ANCHOR_ERRORS.get(code)


def instruction_discriminator(name: str) -> bytes:
    """Anchor's instruction tag: sha256("global:<snake_name>")[:8]."""
    return hashlib.sha256(f"global:{name}".encode()).digest()[:8]


def account_discriminator(name: str) -> bytes:
    """Anchor's account tag: sha256("account:<CamelName>")[:8]."""
    return hashlib.sha256(f"account:{name}".encode()).digest()[:8]


def _u64(value: int, name: str) -> bytes:
    if type(value) is not int or not 0 <= value < 2**64:
        raise ValueError(f"{name} must be a u64, got {value!r}")
    return struct.pack("<Q", value)


def _recover_info_bytes(info: RecoverInfo) -> bytes:
    """Borsh of ED25519RecoverInfo: signature[64] || payload[64] || deadline i64."""
    assert len(info.signature) == 64 and len(info.payload) == 64, info  # RecoverInfo.parse checks
    return info.signature + info.payload + struct.pack("<q", info.deadline)


def encode_pay_data(info: RecoverInfo, amount: int, namespace_id: int | None = None) -> bytes:
    """`pay` instruction data: 152 bytes for v1, v2 puts namespace_id u64 first."""
    namespace = b"" if namespace_id is None else _u64(namespace_id, "namespace_id")
    return (
        instruction_discriminator("pay")
        + namespace
        + _recover_info_bytes(info)
        + _u64(amount, "amount")
    )


# --- accounts ---------------------------------------------------------------------------------


def _body(data: bytes, name: str, size: int) -> bytes:
    """Check the discriminator and the length, and return the fields' bytes."""
    expected = account_discriminator(name)
    if len(data) < 8 or data[:8] != expected:
        raise AccountDataInvalid(
            f"not a {name}: discriminator {data[:8].hex() or 'missing'}, expected {expected.hex()}"
        )
    if len(data) < 8 + size:
        raise AccountDataInvalid(f"{name} data has {len(data)} bytes, expected {8 + size}")
    return data[8:]


def _key(raw: bytes) -> Pubkey:
    return Pubkey.from_bytes(raw)


@frozen
class GlobalAccount:
    """v1 GLOBAL: who may change settings, which bot may pay, where payments go."""

    authority: Pubkey
    bot: Pubkey
    treasury: Pubkey

    SIZE = 96

    @classmethod
    def decode(cls, data: bytes) -> GlobalAccount:
        body = _body(data, "GlobalAccount", cls.SIZE)
        return cls(_key(body[0:32]), _key(body[32:64]), _key(body[64:96]))

    def encode(self) -> bytes:
        return (
            account_discriminator("GlobalAccount")
            + bytes(self.authority)
            + bytes(self.bot)
            + bytes(self.treasury)
        )


@frozen
class UserAccount:
    """USER: the nonce the next signature must cover, lamports locked, and the vault's address."""

    nonce: int
    locked_amount: int
    vault: Pubkey

    SIZE = 48

    @classmethod
    def decode(cls, data: bytes) -> UserAccount:
        body = _body(data, "UserAccount", cls.SIZE)
        nonce, locked = struct.unpack_from("<QQ", body)
        return cls(nonce, locked, _key(body[16:48]))

    def encode(self) -> bytes:
        return (
            account_discriminator("UserAccount")
            + struct.pack("<QQ", self.nonce, self.locked_amount)
            + bytes(self.vault)
        )


@frozen
class LockAccount:
    """LOCK: lamports held for one signature until `settle` (v2 also records the namespace)."""

    amount: int
    namespace_id: int | None = None

    @classmethod
    def decode(cls, data: bytes, version: int = 1) -> LockAccount:
        if version == 1:
            return cls(struct.unpack_from("<Q", _body(data, "LockAccount", 8))[0])
        namespace_id, amount = struct.unpack_from("<QQ", _body(data, "LockAccount", 16))
        return cls(amount, namespace_id)

    def encode(self) -> bytes:
        namespace = b"" if self.namespace_id is None else struct.pack("<Q", self.namespace_id)
        return account_discriminator("LockAccount") + namespace + struct.pack("<Q", self.amount)


@frozen
class NamespaceAccount:
    """v2 NAMESPACE: a named tenant with its own bot, treasury and signing prefix."""

    id: int
    name: str
    authority: Pubkey
    bot: Pubkey
    treasury: Pubkey
    created_at: int
    updated_at: int

    @classmethod
    def decode(cls, data: bytes) -> NamespaceAccount:
        body = _body(data, "NamespaceAccount", 12)
        (namespace_id, name_len) = struct.unpack_from("<QI", body)
        end = 12 + name_len
        if name_len > 50 or len(body) < end + 96 + 16:
            raise AccountDataInvalid(f"NamespaceAccount name length {name_len} is invalid")
        try:
            name = body[12:end].decode()
        except UnicodeDecodeError:
            raise AccountDataInvalid("NamespaceAccount name is not UTF-8") from None
        keys = body[end : end + 96]
        created_at, updated_at = struct.unpack_from("<qq", body, end + 96)
        return cls(
            namespace_id,
            name,
            _key(keys[0:32]),
            _key(keys[32:64]),
            _key(keys[64:96]),
            created_at,
            updated_at,
        )


# --- addresses and instructions ---------------------------------------------------------------


def _meta(pubkey: Pubkey, *, signer: bool = False, writable: bool = False) -> AccountMeta:
    return AccountMeta(pubkey, is_signer=signer, is_writable=writable)


@frozen
class BalancePayment:
    """One deployment of the program: its id, version (1 or 2) and, for v2, the namespace."""

    program_id: Pubkey = PROGRAM_ID_V1
    version: int = field(default=1)
    namespace_id: int = 0

    @version.validator
    def _check_version(self, _attribute: object, value: int) -> None:
        if value not in (1, 2):
            raise ValueError(f"balance-payment version must be 1 or 2, got {value!r}")

    def _find(self, seeds: Sequence[bytes]) -> tuple[Pubkey, int]:
        return Pubkey.find_program_address(list(seeds), self.program_id)

    def global_pda(self) -> tuple[Pubkey, int]:
        return self._find([b"GLOBAL"])

    def user_pda(self, user: Pubkey) -> tuple[Pubkey, int]:
        return self._find([b"USER", bytes(user)])

    def vault_pda(self, user: Pubkey) -> tuple[Pubkey, int]:
        return self._find([b"VAULT", bytes(user)])

    def lock_pda(self, user: Pubkey, nonce: int) -> tuple[Pubkey, int]:
        return self._find([b"LOCK", bytes(user), _u64(nonce, "nonce")])

    def namespace_pda(self, namespace_id: int | None = None) -> tuple[Pubkey, int]:
        namespace = self.namespace_id if namespace_id is None else namespace_id
        return self._find([b"NAMESPACE", _u64(namespace, "namespace_id")])

    def _settings_account(self) -> Pubkey:
        """Where bot and treasury live: GLOBAL (v1) or the namespace (v2)."""
        return self.global_pda()[0] if self.version == 1 else self.namespace_pda()[0]

    def _instruction(self, name: str, args: bytes, metas: list[AccountMeta]) -> Instruction:
        return Instruction(self.program_id, instruction_discriminator(name) + args, metas)

    def initialize(
        self, *, authority: Pubkey, bot: Pubkey, treasury: Pubkey, payer: Pubkey
    ) -> Instruction:
        """v1 `initialize`: create GLOBAL; accounts global, authority, treasury, bot, payer."""
        if self.version != 1:
            raise ValueError("initialize with authority/bot/treasury is the v1 instruction")
        return self._instruction(
            "initialize",
            b"",
            [
                _meta(self.global_pda()[0], writable=True),
                _meta(authority),
                _meta(treasury),
                _meta(bot),
                _meta(payer, signer=True, writable=True),
                _meta(SYSTEM_PROGRAM_ID),
            ],
        )

    def register(self, user: Pubkey, payer: Pubkey | None = None) -> Instruction:
        """`register`: create the user's USER account (the user signs; payer pays its rent)."""
        return self._instruction(
            "register",
            b"",
            [
                _meta(self.user_pda(user)[0], writable=True),
                _meta(user, signer=True),
                _meta(self.vault_pda(user)[0]),
                _meta(payer or user, signer=True, writable=True),
                _meta(SYSTEM_PROGRAM_ID),
            ],
        )

    def _user_transfer(
        self, name: str, user: Pubkey, amount: int, payer: Pubkey | None
    ) -> Instruction:
        return self._instruction(
            name,
            _u64(amount, "amount"),
            [
                _meta(self.user_pda(user)[0], writable=True),
                _meta(user, signer=True, writable=True),
                _meta(self.vault_pda(user)[0], writable=True),
                _meta(payer or user, signer=True, writable=True),
                _meta(SYSTEM_PROGRAM_ID),
            ],
        )

    def deposit(self, user: Pubkey, amount: int, payer: Pubkey | None = None) -> Instruction:
        """`deposit(amount)`: move lamports from the user's wallet into their vault."""
        return self._user_transfer("deposit", user, amount, payer)

    def withdraw(self, user: Pubkey, amount: int, payer: Pubkey | None = None) -> Instruction:
        """`withdraw(amount)`: move free vault lamports back to the user (vault - locked)."""
        return self._user_transfer("withdraw", user, amount, payer)

    def _namespace_arg(self) -> bytes:
        return b"" if self.version == 1 else _u64(self.namespace_id, "namespace_id")

    def pay(
        self,
        *,
        user: Pubkey,
        recover_info: RecoverInfo,
        amount: int,
        bot: Pubkey,
        treasury: Pubkey,
        payer: Pubkey | None = None,
    ) -> Instruction:
        """`pay(recover_info, amount)`: vault -> treasury, signed by the bot, nonce += 1."""
        namespace = None if self.version == 1 else self.namespace_id
        return Instruction(
            self.program_id,
            encode_pay_data(recover_info, amount, namespace),
            [
                _meta(self._settings_account()),
                _meta(self.user_pda(user)[0], writable=True),
                _meta(user, writable=True),
                _meta(treasury, writable=True),
                _meta(self.vault_pda(user)[0], writable=True),
                _meta(bot, signer=True),
                _meta(payer or bot, signer=True, writable=True),
                _meta(SYSTEM_PROGRAM_ID),
            ],
        )

    def lock(
        self,
        *,
        user: Pubkey,
        nonce: int,
        recover_info: RecoverInfo,
        amount: int,
        bot: Pubkey,
        payer: Pubkey | None = None,
    ) -> Instruction:
        """`lock(recover_info, amount)`: hold vault lamports in LOCK(user, nonce) for settle."""
        return self._instruction(
            "lock",
            self._namespace_arg() + _recover_info_bytes(recover_info) + _u64(amount, "amount"),
            [
                _meta(self._settings_account()),
                _meta(self.user_pda(user)[0], writable=True),
                _meta(user, writable=True),
                _meta(self.lock_pda(user, nonce)[0], writable=True),
                _meta(self.vault_pda(user)[0]),
                _meta(bot, signer=True),
                _meta(payer or bot, signer=True, writable=True),
                _meta(SYSTEM_PROGRAM_ID),
            ],
        )

    def settle(
        self,
        *,
        user: Pubkey,
        nonce: int,
        amount: int,
        bot: Pubkey,
        treasury: Pubkey,
        payer: Pubkey | None = None,
    ) -> Instruction:
        """`settle(nonce, amount)`: pay up to the locked amount, release the rest, close LOCK."""
        return self._instruction(
            "settle",
            _u64(nonce, "nonce") + _u64(amount, "amount"),
            [
                _meta(self._settings_account()),
                _meta(self.user_pda(user)[0], writable=True),
                _meta(user, writable=True),
                _meta(treasury, writable=True),
                _meta(self.lock_pda(user, nonce)[0], writable=True),
                _meta(self.vault_pda(user)[0], writable=True),
                _meta(bot, signer=True),
                _meta(payer or bot, signer=True, writable=True),
                _meta(SYSTEM_PROGRAM_ID),
            ],
        )
