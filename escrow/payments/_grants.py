"""Owner-side helpers: fund a deposit, grant a session key, revoke it.

Everything an owner signs can be signed offline, with no node, and relayed by anyone with gas:

    signed = sign_grant_offline(owner, chain_id=..., escrow=..., signer=session.address, token=usdc, ...)
    signed.dump("grant.json")                                   # on the offline machine
    await relay_grant(escrow, relayer, SignedGrant.load("grant.json"))   # anywhere else

Epochs are the owner's version numbers for one session key's grants, and only go up: number every signed
grant and revoke for a key from one increasing counter (1, 2, 3, ... or the signing time in seconds), so the
owner needs no chain state to sign. A grant must be numbered above the key's current epoch (a fresh key's is
0); a revoke through epoch N ends the live grant and refuses forever every grant numbered N or below, in
whatever order a relayer submits them. To revoke, name at least the highest epoch you ever signed a grant with
for that key: a renewal signed earlier and held by someone else then cannot outlive the revoke. Deposits are
relayed the same way with an EIP-3009 `ReceiveWithAuthorization` (to = the escrow) or an EIP-2612 permit.

When the payer is the owner's `AgentAccount` (the money lives in the smart account, not in the owner's EOA),
pass `account=<its address>`: the payer becomes the account, and the owner signs the ERC-7739 nested form
that the account's ERC-1271 `isValidSignature` accepts. The account must be deployed when the file is relayed
(`AgentAccount.deploy`), not when it is signed:

    signed = sign_grant_offline(owner, account=account.address, chain_id=..., escrow=..., signer=key, ...)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from eth_utils.address import to_checksum_address

from x402 import Eip712Domain, Signer, authorization_digest, typed_data_digest
from x402._eip712 import EIP712_DOMAIN_FIELDS, authorization_typed_data
from x402._escrow import REVOKE_FIELDS, GrantMessage, escrow_domain, grant_typed_data, sign_grant, sign_revoke
from x402._types import Eip3009Authorization

from ..accounts._erc7739 import sign_typed_data_as_account
from ..chain._artifacts import EscrowError
from ..chain._rpc import Receipt, TxSender
from ._escrow import AgentEscrow, Erc20

__all__ = [
    "SignedDeposit",
    "SignedGrant",
    "SignedRevoke",
    "deposit",
    "grant",
    "relay_deposit",
    "relay_grant",
    "relay_revoke",
    "revoke",
    "sign_deposit_authorization",
    "sign_deposit_permit",
    "sign_grant_offline",
    "sign_revoke_offline",
]


class _File(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """A signed owner action as a JSON file: made on one machine, relayed from another."""

    chain_id: int
    escrow: str

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


class SignedGrant(_File, frozen=True, kw_only=True):
    grant: GrantMessage
    signature: str


class SignedRevoke(_File, frozen=True, kw_only=True):
    payer: str
    signer: str
    epoch: int
    signature: str


class SignedDeposit(_File, frozen=True, kw_only=True):
    """A relayable deposit: `kind` "authorization" (EIP-3009, `nonce` bytes32 hex) or "permit" (EIP-2612)."""

    kind: str
    payer: str
    token: str
    amount: int
    valid_after: int = 0
    deadline: int  # validBefore (EIP-3009) or the permit deadline
    nonce: str = ""
    signature: str


def _check_epoch(epoch: int) -> None:
    # The contract refuses these too, but only once relayed: an offline file must be usable when signed.
    if not 1 <= epoch <= 2**32 - 1:
        raise EscrowError(f"epoch {epoch} is not in [1, 2**32 - 1]", code="invalid_epoch")


def _check_target(escrow: AgentEscrow, signed: _File, chain_id: int) -> None:
    if signed.escrow.lower() != escrow.address.lower() or signed.chain_id != chain_id:
        raise EscrowError(
            f"signed for escrow {signed.escrow} on chain {signed.chain_id},"
            f" not {escrow.address} on {chain_id}",
            code="signed_file_mismatch",
        )


async def _send(sender: TxSender, to: str, data: bytes) -> Receipt:
    estimate = await sender.rpc.request(
        "eth_estimateGas", [{"from": sender.address, "to": to, "data": "0x" + data.hex()}]
    )
    return await sender.transact(to, data, gas=int(estimate, 16) * 6 // 5 + 10_000)


# ---------------------------------------------------------------------------------------------- grants


def sign_grant_offline(
    owner: Signer,
    *,
    chain_id: int,
    escrow: str,
    signer: str,
    token: str,
    max_per_call: int,
    budget: int,
    valid_until: int,
    valid_after: int = 0,
    payees: Sequence[str] = (),
    epoch: int = 1,
    payer: str | None = None,
    account: str | None = None,
) -> SignedGrant:
    """The owner's `grantWithSig` authorisation (the payer is the owner's address unless given). With
    `account`, the payer is that `AgentAccount` of the owner, which signs through ERC-1271 (ERC-7739).
    `epoch` must be above every epoch the owner signed for `signer` before (grant or revoke)."""
    _check_epoch(epoch)
    if account is not None:
        if payer is not None and payer.lower() != account.lower():
            raise ValueError("with `account`, the payer is that account")
        payer = account
    message = GrantMessage(
        payer=to_checksum_address(payer or owner.address),
        signer=to_checksum_address(signer),
        token=to_checksum_address(token),
        max_per_call=max_per_call,
        budget=budget,
        valid_after=valid_after,
        valid_until=valid_until,
        payees=[to_checksum_address(p) for p in payees],
        epoch=epoch,
    )
    domain = escrow_domain(chain_id, to_checksum_address(escrow))
    if account is None:
        signature = sign_grant(owner, domain, message)
    else:
        signature = sign_typed_data_as_account(
            owner, grant_typed_data(domain, message), chain_id=chain_id, account=account
        )
    return SignedGrant(
        chain_id=chain_id, escrow=to_checksum_address(escrow), grant=message, signature="0x" + signature.hex()
    )


async def relay_grant(escrow: AgentEscrow, relayer: TxSender, signed: SignedGrant) -> Receipt:
    """Submit a signed grant from any account (the relayer pays the gas, gains nothing)."""
    _check_target(escrow, signed, relayer.chain_id)
    g = signed.grant
    data = escrow.abi.encode(
        "grantWithSig",
        g.payer,
        g.signer,
        (g.token, g.max_per_call, g.budget, g.valid_after, g.valid_until),
        list(g.payees),
        g.epoch,
        bytes.fromhex(signed.signature[2:]),
    )
    return await _send(relayer, escrow.address, data)


async def grant(escrow: AgentEscrow, payer: TxSender, message: GrantMessage) -> Receipt:
    """The payer grants directly (`msg.sender` is the payer; `message.payer`/`epoch` are ignored)."""
    params = (message.token, message.max_per_call, message.budget, message.valid_after, message.valid_until)
    return await _send(
        payer, escrow.address, escrow.abi.encode("grant", message.signer, params, list(message.payees))
    )


def sign_revoke_offline(
    owner: Signer, *, chain_id: int, escrow: str, signer: str, epoch: int, account: str | None = None
) -> SignedRevoke:
    """The owner's `revokeWithSig` of `signer` through `epoch` (for the owner's `account`, signed through
    ERC-1271, when given): ends the live grant and refuses every grant numbered `epoch` or below, relayed
    before or after it. Name at least the highest epoch you signed a grant with for `signer`."""
    _check_epoch(epoch)
    escrow = to_checksum_address(escrow)
    signer = to_checksum_address(signer)
    domain = escrow_domain(chain_id, escrow)
    if account is None:
        payer = owner.address
        signature = sign_revoke(owner, domain, payer=payer, signer=signer, epoch=epoch)
    else:
        payer = to_checksum_address(account)
        typed = {
            "types": {"EIP712Domain": list(EIP712_DOMAIN_FIELDS), "Revoke": list(REVOKE_FIELDS)},
            "primaryType": "Revoke",
            "domain": domain.as_dict(),
            "message": {"payer": payer, "signer": signer, "epoch": epoch},
        }
        signature = sign_typed_data_as_account(owner, typed, chain_id=chain_id, account=payer)
    return SignedRevoke(
        chain_id=chain_id,
        escrow=escrow,
        payer=payer,
        signer=signer,
        epoch=epoch,
        signature="0x" + signature.hex(),
    )


async def relay_revoke(escrow: AgentEscrow, relayer: TxSender, signed: SignedRevoke) -> Receipt:
    _check_target(escrow, signed, relayer.chain_id)
    data = escrow.abi.encode(
        "revokeWithSig", signed.payer, signed.signer, signed.epoch, bytes.fromhex(signed.signature[2:])
    )
    return await _send(relayer, escrow.address, data)


async def revoke(escrow: AgentEscrow, payer: TxSender, signer: str, *, epoch: int) -> Receipt:
    """The payer revokes `signer` directly, through `epoch` (see `sign_revoke_offline`)."""
    _check_epoch(epoch)
    return await _send(payer, escrow.address, escrow.abi.encode("revoke", signer, epoch))


# --------------------------------------------------------------------------------------------- deposits


async def deposit(escrow: AgentEscrow, payer: TxSender, token: str, amount: int) -> Receipt:
    """approve + deposit from the payer's own account."""
    erc20 = Erc20(escrow.rpc, token)
    await _send(payer, erc20.address, erc20.approve_calldata(escrow.address, amount))
    return await _send(payer, escrow.address, escrow.abi.encode("deposit", erc20.address, amount))


def sign_deposit_authorization(
    owner: Signer,
    token_domain: Eip712Domain,
    *,
    escrow: str,
    amount: int,
    valid_before: int,
    valid_after: int = 0,
    account: str | None = None,
) -> SignedDeposit:
    """An EIP-3009 `ReceiveWithAuthorization` to the escrow: only the escrow can redeem it (into the owner's
    deposit), so a copy seen in the mempool is worth nothing to anyone else. With `account`, the tokens and
    the deposit are that `AgentAccount`'s, authorised through ERC-1271 (the token takes contract signers)."""
    nonce = "0x" + os.urandom(32).hex()
    escrow = to_checksum_address(escrow)
    payer = owner.address if account is None else to_checksum_address(account)
    auth = Eip3009Authorization(
        from_=payer,
        to=escrow,
        value=str(amount),
        valid_after=str(valid_after),
        valid_before=str(valid_before),
        nonce=nonce,
    )
    if account is None:
        signature = owner.sign_hash(authorization_digest(token_domain, auth, "ReceiveWithAuthorization"))
    else:
        typed = authorization_typed_data(token_domain, auth, "ReceiveWithAuthorization")
        signature = sign_typed_data_as_account(owner, typed, chain_id=token_domain.chain_id, account=payer)
    return SignedDeposit(
        chain_id=token_domain.chain_id,
        escrow=escrow,
        kind="authorization",
        payer=payer,
        token=token_domain.verifying_contract,
        amount=amount,
        valid_after=valid_after,
        deadline=valid_before,
        nonce=nonce,
        signature="0x" + signature.hex(),
    )


_PERMIT_FIELDS = [
    {"name": "owner", "type": "address"},
    {"name": "spender", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "nonce", "type": "uint256"},
    {"name": "deadline", "type": "uint256"},
]


def sign_deposit_permit(
    owner: Signer, token_domain: Eip712Domain, *, escrow: str, amount: int, permit_nonce: int, deadline: int
) -> SignedDeposit:
    """An EIP-2612 permit for the escrow (`permit_nonce` is the token's `nonces(owner)`: 0 for a new key)."""
    escrow = to_checksum_address(escrow)
    typed = {
        "types": {"EIP712Domain": list(EIP712_DOMAIN_FIELDS), "Permit": _PERMIT_FIELDS},
        "primaryType": "Permit",
        "domain": token_domain.as_dict(),
        "message": {
            "owner": owner.address,
            "spender": escrow,
            "value": amount,
            "nonce": permit_nonce,
            "deadline": deadline,
        },
    }
    digest = typed_data_digest(typed)
    return SignedDeposit(
        chain_id=token_domain.chain_id,
        escrow=escrow,
        kind="permit",
        payer=owner.address,
        token=token_domain.verifying_contract,
        amount=amount,
        deadline=deadline,
        signature="0x" + owner.sign_hash(digest).hex(),
    )


async def relay_deposit(escrow: AgentEscrow, relayer: TxSender, signed: SignedDeposit) -> Receipt:
    _check_target(escrow, signed, relayer.chain_id)
    sig = bytes.fromhex(signed.signature[2:])
    if signed.kind == "authorization":
        data = escrow.abi.encode(
            "depositWithAuthorization",
            signed.payer,
            signed.token,
            signed.amount,
            signed.valid_after,
            signed.deadline,
            bytes.fromhex(signed.nonce[2:]),
            sig,
        )
    elif signed.kind == "permit":
        data = escrow.abi.encode(
            "depositWithPermit",
            signed.payer,
            signed.token,
            signed.amount,
            signed.deadline,
            sig[64],
            sig[:32],
            sig[32:64],
        )
    else:
        raise EscrowError(f"unknown deposit kind {signed.kind!r}", code="signed_file_invalid")
    return await _send(relayer, escrow.address, data)
