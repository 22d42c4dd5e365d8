"""Relayed MPP session channels: `openWithAuthorization` / `topUpWithAuthorization` on AgentChannels.

The payer signs an EIP-3009 `ReceiveWithAuthorization` of its tokens to the channels contract whose nonce is
the channel's own terms (draft-evm-session-00: `keccak256(abi.encode(from, payee, token, salt,
authorizedSigner))` for an open, `keccak256(abi.encode(channelId, additionalDeposit, from, topUpSalt))` for a
top-up); anyone relays it and pays the gas. The contract recomputes that nonce, so the signature opens this
one channel and no other; the token's EIP-712 domain binds it to one chain and `to` to one contract, and only
that contract can redeem it (`receive`, not `transfer`).

    signed = sign_channel_open(owner, usdc_domain, channels=..., payee=..., deposit=..., salt=...,
                               authorized_signer=key.address, valid_before=..., account=account.address)
    signed.dump("channel-open.json")                             # the owner's offline machine
    await relay_channel_open(relayer, SignedChannelOpen.load("channel-open.json"))   # anyone, anywhere

With `account`, the payer is that `AgentAccount` and its owner signs the ERC-7739 nested form the account's
ERC-1271 accepts: everything is known in advance (the channel id is computed, not read), so the owner signs
the open and its top-ups offline and never again. `AuthorizationChannelOpener` does the same on demand for a
payer whose key is at hand (an EOA with no gas).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address

from x402 import Eip712Domain, Signer, authorization_digest
from x402._eip712 import authorization_typed_data
from x402._keccak import keccak256
from x402._session import DepositAuthorization, channel_id
from x402._types import Eip3009Authorization

from ..accounts._erc7739 import sign_typed_data_as_account
from ..chain._abi import ContractAbi
from ..chain._artifacts import EscrowError
from ..chain._rpc import Receipt, TxSender
from ._escrow import escrow_artifact

__all__ = [
    "AuthorizationChannelOpener",
    "PresignedChannelOpener",
    "SignedChannelOpen",
    "SignedChannelTopUp",
    "relay_channel_open",
    "relay_channel_top_up",
    "sign_channel_open",
    "sign_channel_top_up",
]


class _Signed(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    chain_id: int
    channels: str  # the AgentChannels contract
    token: str
    payer: str  # EIP-3009 `from`
    amount: int
    valid_after: int
    valid_before: int
    nonce: str
    signature: str
    channel_id: str

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=2)

    def dump(self, path: str | Path) -> None:
        target = Path(path)
        partial = target.with_name(target.name + ".tmp")
        partial.write_bytes(self.to_json() + b"\n")
        partial.replace(target)

    @classmethod
    def load(cls, path: str | Path) -> Any:
        try:
            return msgspec.json.decode(Path(path).read_bytes(), type=cls)
        except (OSError, msgspec.DecodeError) as exc:
            raise EscrowError(
                f"cannot read {cls.__name__} from {path}: {exc}", code="signed_file_invalid"
            ) from None


class SignedChannelOpen(_Signed, frozen=True, kw_only=True):
    """A relayable `openWithAuthorization`: the channel (`channel_id`) and the payer's signature."""

    payee: str
    salt: str
    authorized_signer: str

    def deposit(self) -> DepositAuthorization:
        """This open as a server-submitted deposit (the gateway relays it when its challenge says
        `feePayer: true`)."""
        return DepositAuthorization(
            kind="open",
            payer=self.payer,
            to=self.channels,
            value=self.amount,
            valid_after=self.valid_after,
            valid_before=self.valid_before,
            nonce=self.nonce,
            signature=self.signature,
            salt=self.salt,
            authorized_signer=self.authorized_signer,
        )


class SignedChannelTopUp(_Signed, frozen=True, kw_only=True):
    """A relayable `topUpWithAuthorization` of `channel_id` by `amount`."""

    top_up_salt: str

    def deposit(self) -> DepositAuthorization:
        return DepositAuthorization(
            kind="topUp",
            payer=self.payer,
            to=self.channels,
            value=self.amount,
            valid_after=self.valid_after,
            valid_before=self.valid_before,
            nonce=self.nonce,
            signature=self.signature,
            salt=self.top_up_salt,
        )


def _sign(payer: Signer, domain: Eip712Domain, auth: Eip3009Authorization, account: str | None) -> str:
    if account is None:
        return "0x" + payer.sign_hash(authorization_digest(domain, auth, "ReceiveWithAuthorization")).hex()
    typed = authorization_typed_data(domain, auth, "ReceiveWithAuthorization")
    return "0x" + sign_typed_data_as_account(payer, typed, chain_id=domain.chain_id, account=account).hex()


def _bytes32(value: str) -> bytes:
    raw = bytes.fromhex(value[2:])
    if len(raw) != 32:
        raise ValueError(f"not a bytes32: {value!r}")
    return raw


def sign_channel_open(
    payer: Signer,
    token_domain: Eip712Domain,
    *,
    channels: str,
    payee: str,
    deposit: int,
    salt: str,
    authorized_signer: str,
    valid_before: int,
    valid_after: int = 0,
    account: str | None = None,
) -> SignedChannelOpen:
    """The payer's authorization to open one channel (no node needed). `account`: the payer is that
    `AgentAccount` and `payer` is its owner key (ERC-7739)."""
    if deposit <= 0:
        raise ValueError("a channel deposit must be positive")
    channels, payee = to_checksum_address(channels), to_checksum_address(payee)
    token, signer = (
        to_checksum_address(token_domain.verifying_contract),
        to_checksum_address(authorized_signer),
    )
    source = payer.address if account is None else to_checksum_address(account)
    words = abi_encode(
        ["address", "address", "address", "bytes32", "address"],
        [source, payee, token, _bytes32(salt), signer],
    )
    nonce = "0x" + keccak256(words).hex()
    auth = Eip3009Authorization(
        from_=source,
        to=channels,
        value=str(deposit),
        valid_after=str(valid_after),
        valid_before=str(valid_before),
        nonce=nonce,
    )
    cid = channel_id(
        payer=source,
        payee=payee,
        token=token,
        salt=salt,
        authorized_signer=signer,
        escrow=channels,
        chain_id=token_domain.chain_id,
    )
    return SignedChannelOpen(
        chain_id=token_domain.chain_id,
        channels=channels,
        token=token,
        payer=source,
        amount=deposit,
        valid_after=valid_after,
        valid_before=valid_before,
        nonce=nonce,
        signature=_sign(payer, token_domain, auth, account),
        channel_id=cid,
        payee=payee,
        salt=salt.lower(),
        authorized_signer=signer,
    )


def sign_channel_top_up(
    payer: Signer,
    token_domain: Eip712Domain,
    *,
    channels: str,
    channel: str,
    amount: int,
    valid_before: int,
    valid_after: int = 0,
    top_up_salt: str | None = None,
    account: str | None = None,
) -> SignedChannelTopUp:
    """The payer's authorization to add `amount` to `channel` (its id is known before the channel opens)."""
    if amount <= 0:
        raise ValueError("a top-up must be positive")
    channels = to_checksum_address(channels)
    source = payer.address if account is None else to_checksum_address(account)
    salt = top_up_salt or "0x" + os.urandom(32).hex()
    words = abi_encode(
        ["bytes32", "uint128", "address", "bytes32"], [_bytes32(channel), amount, source, _bytes32(salt)]
    )
    nonce = "0x" + keccak256(words).hex()
    auth = Eip3009Authorization(
        from_=source,
        to=channels,
        value=str(amount),
        valid_after=str(valid_after),
        valid_before=str(valid_before),
        nonce=nonce,
    )
    return SignedChannelTopUp(
        chain_id=token_domain.chain_id,
        channels=channels,
        token=to_checksum_address(token_domain.verifying_contract),
        payer=source,
        amount=amount,
        valid_after=valid_after,
        valid_before=valid_before,
        nonce=nonce,
        signature=_sign(payer, token_domain, auth, account),
        channel_id=channel.lower(),
        top_up_salt=salt.lower(),
    )


def _check(relayer: TxSender, signed: _Signed) -> ContractAbi:
    if signed.chain_id != relayer.chain_id:
        raise EscrowError(
            f"signed for chain {signed.chain_id}, relayed on {relayer.chain_id}", code="signed_file_mismatch"
        )
    return ContractAbi(escrow_artifact("AgentChannels").abi)


async def _send(relayer: TxSender, to: str, data: bytes) -> Receipt:
    tx = {"from": relayer.address, "to": to, "data": "0x" + data.hex()}
    estimate = int(await relayer.rpc.request("eth_estimateGas", [tx]), 16)  # a refused one reverts here
    return await relayer.transact(to, data, gas=estimate * 6 // 5 + 10_000)


async def relay_channel_open(relayer: TxSender, signed: SignedChannelOpen) -> Receipt:
    """Send `openWithAuthorization` from `relayer` (who pays the gas and gains nothing)."""
    abi = _check(relayer, signed)
    auth = (
        signed.payee,
        signed.token,
        signed.amount,
        _bytes32(signed.salt),
        signed.authorized_signer,
        signed.payer,
        signed.valid_after,
        signed.valid_before,
        _bytes32(signed.nonce),
    )
    data = abi.encode("openWithAuthorization", auth, bytes.fromhex(signed.signature[2:]))
    return await _send(relayer, signed.channels, data)


async def relay_channel_top_up(relayer: TxSender, signed: SignedChannelTopUp) -> Receipt:
    """Send `topUpWithAuthorization` from `relayer`."""
    abi = _check(relayer, signed)
    auth = (
        _bytes32(signed.channel_id),
        signed.amount,
        signed.payer,
        _bytes32(signed.top_up_salt),
        signed.valid_after,
        signed.valid_before,
        _bytes32(signed.nonce),
    )
    data = abi.encode("topUpWithAuthorization", auth, bytes.fromhex(signed.signature[2:]))
    return await _send(relayer, signed.channels, data)


class AuthorizationChannelOpener:
    """`x402.client_session.ChannelOpener` whose payer sends no transaction: `payer` signs each open and
    top-up as an EIP-3009 authorization, and `relayer` sends it and pays the gas. With `account`, the money
    is that `AgentAccount`'s and `payer` is its owner (ERC-7739); to keep the owner offline, sign the files
    in advance with `sign_channel_open` / `sign_channel_top_up` instead.
    """

    def __init__(
        self,
        relayer: TxSender,
        payer: Signer,
        token_domain: Eip712Domain,
        *,
        account: str | None = None,
        valid_for: int = 600,  # seconds of chain time the authorization may wait for its relayer
    ) -> None:
        self.relayer = relayer
        self.signer = payer
        self.domain = token_domain
        self.account = None if account is None else to_checksum_address(account)
        self.valid_for = valid_for
        self.gas = 0

    @property
    def payer(self) -> str:
        return self.account or self.signer.address

    async def authorize_open(
        self, *, escrow: str, payee: str, token: str, deposit: int, salt: str, signer: str
    ) -> DepositAuthorization | None:
        """The open signed, for a gateway that relays it itself (`feePayer: true`): no transaction here."""
        return (await self._signed_open(escrow, payee, token, deposit, salt, signer)).deposit()

    async def authorize_top_up(
        self, *, escrow: str, channel: str, amount: int
    ) -> DepositAuthorization | None:
        return (await self._signed_top_up(escrow, channel, amount)).deposit()

    async def _signed_open(
        self, escrow: str, payee: str, token: str, deposit: int, salt: str, signer: str
    ) -> SignedChannelOpen:
        if token.lower() != self.domain.verifying_contract.lower():
            raise EscrowError(f"this opener signs for {self.domain.verifying_contract}, not {token}")
        return sign_channel_open(
            self.signer,
            self.domain,
            channels=escrow,
            payee=payee,
            deposit=deposit,
            salt=salt,
            authorized_signer=signer,
            valid_before=await self.relayer.rpc.block_timestamp() + self.valid_for,
            account=self.account,
        )

    async def open(self, *, escrow: str, payee: str, token: str, deposit: int, salt: str, signer: str) -> str:
        signed = await self._signed_open(escrow, payee, token, deposit, salt, signer)
        receipt = await relay_channel_open(self.relayer, signed)
        self.gas += int(receipt.gas_used, 16)
        return receipt.transaction_hash

    async def _signed_top_up(self, escrow: str, channel: str, amount: int) -> SignedChannelTopUp:
        return sign_channel_top_up(
            self.signer,
            self.domain,
            channels=escrow,
            channel=channel,
            amount=amount,
            valid_before=await self.relayer.rpc.block_timestamp() + self.valid_for,
            account=self.account,
        )

    async def top_up(self, *, escrow: str, channel: str, amount: int) -> str:
        signed = await self._signed_top_up(escrow, channel, amount)
        receipt = await relay_channel_top_up(self.relayer, signed)
        self.gas += int(receipt.gas_used, 16)
        return receipt.transaction_hash


class PresignedChannelOpener:
    """`x402.client_session.ChannelOpener` over an owner-signed open (and top-ups) made in advance with
    `sign_channel_open` / `sign_channel_top_up`: the owner's key stays offline. A gateway offering
    `feePayer: true` relays the files itself; otherwise `relayer` (if given) sends them.

    The file fixes the channel (salt, deposit, session key): the `SessionClient` opens that one channel.
    """

    def __init__(
        self,
        opened: SignedChannelOpen,
        top_ups: list[SignedChannelTopUp] | None = None,
        *,
        relayer: TxSender | None = None,
    ) -> None:
        self.opened = opened
        self.top_ups = [t for t in top_ups or [] if t.channel_id == opened.channel_id]
        self.relayer = relayer

    @property
    def payer(self) -> str:
        return self.opened.payer

    def _check(self, escrow: str, payee: str, token: str, signer: str) -> None:
        o = self.opened
        terms = (o.channels, o.payee, o.token, o.authorized_signer)
        if tuple(x.lower() for x in terms) != tuple(x.lower() for x in (escrow, payee, token, signer)):
            raise EscrowError(
                "the signed open is for another escrow, payee, token or session key",
                code="signed_file_mismatch",
            )

    async def authorize_open(
        self, *, escrow: str, payee: str, token: str, deposit: int, salt: str, signer: str
    ) -> DepositAuthorization | None:
        self._check(escrow, payee, token, signer)
        return self.opened.deposit()

    def _next_top_up(self, channel: str, amount: int) -> SignedChannelTopUp:
        for i, signed in enumerate(self.top_ups):
            if signed.channel_id == channel.lower() and signed.amount == amount:
                return self.top_ups.pop(i)
        raise EscrowError(f"no signed top-up of {amount} for {channel}", code="signed_file_missing")

    async def authorize_top_up(
        self, *, escrow: str, channel: str, amount: int
    ) -> DepositAuthorization | None:
        return self._next_top_up(channel, amount).deposit()

    async def open(self, *, escrow: str, payee: str, token: str, deposit: int, salt: str, signer: str) -> str:
        self._check(escrow, payee, token, signer)
        if self.relayer is None:
            raise EscrowError("no relayer to send the signed open", code="no_relayer")
        return (await relay_channel_open(self.relayer, self.opened)).transaction_hash

    async def top_up(self, *, escrow: str, channel: str, amount: int) -> str:
        if self.relayer is None:
            raise EscrowError("no relayer to send the signed top-up", code="no_relayer")
        return (await relay_channel_top_up(self.relayer, self._next_top_up(channel, amount))).transaction_hash
