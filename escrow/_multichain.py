"""One owner signature for many chains: escrow grants and session-key installs (and their revokes) on every
listed chain, from a single offline EIP-712 signature over a Merkle root.

    approval = MultichainApproval()
    for net in (base, arbitrum):
        approval.grant(chain_id=net.chain_id, escrow=net.escrow, payer=owner.address, signer=key,
                       token=net.usdc, max_per_call=2_000, budget=50_000, valid_until=deadline, epoch=1)
        approval.install_session_key(chain_id=net.chain_id, account=net.account, key=key, policy=policy,
                                     deadline=deadline)
    signed = approval.sign(owner)          # offline; `signed.dump("approval.json")`
    await relay_multichain(relayer_on_base, signed)       # anyone, once per chain: each sends its own leaves
    await relay_multichain(relayer_on_arbitrum, signed)

When the money lives in the owner's `AgentAccount` (deployed at the same address on every chain), the
grant's payer is the account: `approval.grant(..., payer=account.address, ...)`, same one owner signature. The
account's ERC-1271 accepts the owner's root signature for `MultichainApproval(root)` and nothing else (see
`AgentAccount.isValidSignature`), and each leaf names the payer, the chain and the escrow.

Each leaf is the single-chain action (`Grant`, `Revoke`, `InstallSessionKey`, `RevokeSessionKey`) bound to its
chain id and contract; the contract recomputes the leaf from `block.chainid` and its own address, so a leaf
(or a payment, grant, install or user operation) signed for one chain is refused on every other. "Revoke
everywhere" is the same thing with revoke leaves: one signature, relayed to each chain.
`docs/schemes/escrow.md` ("Multichain approvals") has the scheme.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from x402 import Signer
from x402._eip712 import EIP712_DOMAIN_FIELDS
from x402._escrow import REVOKE_FIELDS, GrantMessage, escrow_domain, grant_typed_data
from x402._signer import recover_hash

from .accounts._account import AgentAccount, _account_abi
from .accounts._policy import SessionPolicy, install_typed_data, revoke_typed_data
from .chain._artifacts import EscrowError
from .chain._merkle import (
    MerkleTree,
    approval_digest,
    approval_typed_data,
    leaf_hash,
    struct_hash,
    verify_proof,
)
from .chain._rpc import Receipt, RevertError, TxSender
from .payments._escrow import _escrow_abi

__all__ = [
    "EscrowGrantLeaf",
    "EscrowRevokeLeaf",
    "MultichainApproval",
    "MultichainEntry",
    "MultichainError",
    "SessionKeyCancelLeaf",
    "SessionKeyInstallLeaf",
    "SessionKeyRevokeLeaf",
    "SignedMultichainApproval",
    "relay_multichain",
]


class MultichainError(EscrowError):
    """A multichain approval that cannot be built, read or relayed (`code` says which)."""

    code = "multichain_invalid"


class _Leaf(msgspec.Struct, frozen=True, kw_only=True, rename="camel", tag_field="kind"):
    chain_id: int

    @property
    def contract(self) -> str:
        raise NotImplementedError

    def action(self) -> bytes:
        """The EIP-712 struct hash of the single-chain message this leaf carries."""
        raise NotImplementedError

    def leaf(self) -> bytes:
        return leaf_hash(self.chain_id, self.contract, self.action())


class EscrowGrantLeaf(_Leaf, frozen=True, kw_only=True, tag="grant"):
    """`AgentEscrow.grantWithProof`: the `Grant` of `grant.signer` by `grant.payer` on `escrow`."""

    escrow: str
    grant: GrantMessage

    @property
    def contract(self) -> str:
        return self.escrow

    def action(self) -> bytes:
        return struct_hash(grant_typed_data(escrow_domain(self.chain_id, self.escrow), self.grant))


class EscrowRevokeLeaf(_Leaf, frozen=True, kw_only=True, tag="revokeGrant"):
    """`AgentEscrow.revokeWithProof`: ends `signer`'s grant through `epoch` (and every grant below it)."""

    escrow: str
    payer: str
    signer: str
    epoch: int

    @property
    def contract(self) -> str:
        return self.escrow

    def action(self) -> bytes:
        typed = {
            "types": {"EIP712Domain": list(EIP712_DOMAIN_FIELDS), "Revoke": list(REVOKE_FIELDS)},
            "primaryType": "Revoke",
            "domain": escrow_domain(self.chain_id, self.escrow).as_dict(),
            "message": {"payer": self.payer, "signer": self.signer, "epoch": self.epoch},
        }
        return struct_hash(typed)


class SessionKeyInstallLeaf(_Leaf, frozen=True, kw_only=True, tag="installSessionKey"):
    """`AgentAccount.installSessionKeyWithProof`: `key` with `policy` on `account` (single-use nonce)."""

    account: str
    key: str
    policy: SessionPolicy
    nonce: int
    deadline: int

    @property
    def contract(self) -> str:
        return self.account

    def action(self) -> bytes:
        return struct_hash(
            install_typed_data(
                chain_id=self.chain_id,
                account=self.account,
                key=self.key,
                policy=self.policy,
                nonce=self.nonce,
                deadline=self.deadline,
            )
        )


class SessionKeyRevokeLeaf(_Leaf, frozen=True, kw_only=True, tag="revokeSessionKey"):
    """`AgentAccount.revokeSessionKeyWithProof`: removes `key` from `account`."""

    account: str
    key: str
    nonce: int
    deadline: int

    @property
    def contract(self) -> str:
        return self.account

    def action(self) -> bytes:
        return struct_hash(
            revoke_typed_data(
                chain_id=self.chain_id,
                account=self.account,
                key=self.key,
                nonce=self.nonce,
                deadline=self.deadline,
            )
        )


class SessionKeyCancelLeaf(_Leaf, frozen=True, kw_only=True, tag="cancelOwnerApproval"):
    """`AgentAccount.cancelOwnerApprovalWithProof`: burns approval `nonce` on `account`, so that an install
    leaf with that nonce, not yet relayed there, never can be."""

    account: str
    nonce: int

    @property
    def contract(self) -> str:
        return self.account

    def action(self) -> bytes:
        return keccak(abi_encode(["bytes32", "uint256"], [_CANCEL_TYPEHASH, self.nonce]))


_CANCEL_TYPEHASH: Final = keccak(text="CancelOwnerApproval(uint256 nonce)")

Leaf = (
    EscrowGrantLeaf | EscrowRevokeLeaf | SessionKeyInstallLeaf | SessionKeyRevokeLeaf | SessionKeyCancelLeaf
)


class MultichainEntry(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """One chain's action and its Merkle proof (0x-hex sibling hashes, bottom up)."""

    action: Leaf
    proof: tuple[str, ...]


def _hex(value: bytes) -> str:
    return "0x" + value.hex()


def _raw(value: str) -> bytes:
    return bytes.fromhex(value.removeprefix("0x"))


class SignedMultichainApproval(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The owner's one signature (`MultichainApproval(root)`, chainless domain) and every leaf with its proof:
    a file made offline and relayed on each chain (`relay_multichain`)."""

    owner: str
    root: str
    signature: str
    entries: tuple[MultichainEntry, ...]

    def for_chain(self, chain_id: int) -> list[MultichainEntry]:
        return [e for e in self.entries if e.action.chain_id == chain_id]

    @property
    def chain_ids(self) -> list[int]:
        return sorted({e.action.chain_id for e in self.entries})

    def verify(self) -> None:
        """Offline: every leaf is under the root, and the owner signed the root. Raises `MultichainError`."""
        root = _raw(self.root)
        for entry in self.entries:
            if not verify_proof([_raw(p) for p in entry.proof], root, entry.action.leaf()):
                raise MultichainError(
                    f"{type(entry.action).__name__} of chain {entry.action.chain_id} is not under the root",
                    code="multichain_proof_invalid",
                )
        signer = recover_hash(approval_digest(root), _raw(self.signature))
        if signer.lower() != self.owner.lower():
            raise MultichainError(
                f"the root is signed by {signer}, not {self.owner}", code="multichain_signature_invalid"
            )

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=2)

    def dump(self, path: str | Path) -> None:
        target = Path(path)
        partial = target.with_name(target.name + ".tmp")
        partial.write_bytes(self.to_json() + b"\n")
        partial.replace(target)

    @classmethod
    def load(cls, path: str | Path) -> SignedMultichainApproval:
        try:
            return msgspec.json.decode(Path(path).read_bytes(), type=cls)
        except (OSError, msgspec.DecodeError, ValueError) as exc:
            raise MultichainError(f"cannot read {path}: {exc}", code="signed_file_invalid") from None


class MultichainApproval:
    """Collects per-chain actions, then signs them all at once (`sign`): the owner's key signs one EIP-712
    message, offline, whatever the number of chains. Builder methods return `self`."""

    def __init__(self) -> None:
        self.actions: list[Leaf] = []

    def _add(self, action: Leaf) -> MultichainApproval:
        if action.leaf() in {a.leaf() for a in self.actions}:
            raise MultichainError("the same action twice in one approval", code="multichain_duplicate")
        self.actions.append(action)
        return self

    def grant(
        self,
        *,
        chain_id: int,
        escrow: str,
        payer: str,
        signer: str,
        token: str,
        max_per_call: int,
        budget: int,
        valid_until: int,
        valid_after: int = 0,
        payees: Sequence[str] = (),
        epoch: int = 1,
    ) -> MultichainApproval:
        """An `AgentEscrow` grant of `signer` on `chain_id` (same rules as `sign_grant_offline`). `payer` is
        the owner itself (an EOA holding the escrow deposit) or the owner's `AgentAccount` (the account holds
        the deposit): the account's ERC-1271 accepts the owner's root signature for its own grants on every
        chain, and `relay_multichain` sends it in the account's form (`root ++ signature`)."""
        if not 1 <= epoch <= 2**32 - 1:
            raise MultichainError(f"epoch {epoch} is not in [1, 2**32 - 1]", code="invalid_epoch")
        message = GrantMessage(
            payer=to_checksum_address(payer),
            signer=to_checksum_address(signer),
            token=to_checksum_address(token),
            max_per_call=max_per_call,
            budget=budget,
            valid_after=valid_after,
            valid_until=valid_until,
            payees=[to_checksum_address(p) for p in payees],
            epoch=epoch,
        )
        return self._add(
            EscrowGrantLeaf(chain_id=chain_id, escrow=to_checksum_address(escrow), grant=message)
        )

    def revoke_grant(
        self, *, chain_id: int, escrow: str, payer: str, signer: str, epoch: int
    ) -> MultichainApproval:
        """Revoke `signer`'s escrow grant on `chain_id` through `epoch` (the highest epoch you granted)."""
        return self._add(
            EscrowRevokeLeaf(
                chain_id=chain_id,
                escrow=to_checksum_address(escrow),
                payer=to_checksum_address(payer),
                signer=to_checksum_address(signer),
                epoch=epoch,
            )
        )

    def install_session_key(
        self,
        *,
        chain_id: int,
        account: str,
        key: str,
        policy: SessionPolicy,
        deadline: int,
        nonce: int | None = None,
    ) -> MultichainApproval:
        """Install `key` with `policy` on the `AgentAccount` `account` of `chain_id` (relayable until
        `deadline`; `nonce` random by default, single-use on that account)."""
        return self._add(
            SessionKeyInstallLeaf(
                chain_id=chain_id,
                account=to_checksum_address(account),
                key=to_checksum_address(key),
                policy=policy,
                nonce=secrets.randbits(128) if nonce is None else nonce,
                deadline=deadline,
            )
        )

    def revoke_session_key(
        self, *, chain_id: int, account: str, key: str, deadline: int, nonce: int | None = None
    ) -> MultichainApproval:
        """Remove `key` from `account` on `chain_id`."""
        return self._add(
            SessionKeyRevokeLeaf(
                chain_id=chain_id,
                account=to_checksum_address(account),
                key=to_checksum_address(key),
                nonce=secrets.randbits(128) if nonce is None else nonce,
                deadline=deadline,
            )
        )

    def cancel_owner_approval(self, *, chain_id: int, account: str, nonce: int) -> MultichainApproval:
        """Burn approval `nonce` on `account` (an install leaf with it, unrelayed there, never can be)."""
        return self._add(
            SessionKeyCancelLeaf(chain_id=chain_id, account=to_checksum_address(account), nonce=nonce)
        )

    @classmethod
    def revoking(cls, signed: SignedMultichainApproval, *, deadline: int) -> MultichainApproval:
        """ "Revoke everywhere" for an earlier approval: each grant is revoked through its epoch, and each
        install both revoked (where it landed) and cancelled (where it did not); `relay_multichain` sends on
        each chain only the leaves that apply there."""
        approval = cls()
        for entry in signed.entries:
            a = entry.action
            if isinstance(a, EscrowGrantLeaf):
                g = a.grant
                approval.revoke_grant(
                    chain_id=a.chain_id, escrow=a.escrow, payer=g.payer, signer=g.signer, epoch=g.epoch
                )
            elif isinstance(a, SessionKeyInstallLeaf):
                approval.revoke_session_key(
                    chain_id=a.chain_id, account=a.account, key=a.key, deadline=deadline
                )
                approval.cancel_owner_approval(chain_id=a.chain_id, account=a.account, nonce=a.nonce)
        return approval

    def tree(self) -> MerkleTree:
        if not self.actions:
            raise MultichainError("an approval needs at least one action", code="multichain_empty")
        return MerkleTree([a.leaf() for a in self.actions])

    def typed_data(self) -> dict[str, Any]:
        """What the owner's wallet signs (for a wallet that signs typed data itself)."""
        return approval_typed_data(self.tree().root)

    def signed_with(self, owner: str, signature: bytes) -> SignedMultichainApproval:
        """The relayable file, from a signature of `typed_data()` made elsewhere (e.g. a hardware wallet)."""
        tree = self.tree()
        return SignedMultichainApproval(
            owner=to_checksum_address(owner),
            root=_hex(tree.root),
            signature=_hex(signature),
            entries=tuple(
                MultichainEntry(action=a, proof=tuple(_hex(p) for p in tree.proof(i)))
                for i, a in enumerate(self.actions)
            ),
        )

    def sign(self, owner: Signer) -> SignedMultichainApproval:
        """Sign the root with `owner`, offline."""
        return self.signed_with(owner.address, owner.sign_hash(approval_digest(self.tree().root)))


# ---------------------------------------------------------------------------------------------- relaying


def _escrow_payer(action: Leaf) -> str | None:
    if isinstance(action, EscrowGrantLeaf):
        return action.grant.payer
    return action.payer if isinstance(action, EscrowRevokeLeaf) else None


def _signature(signed: SignedMultichainApproval, action: Leaf) -> bytes:
    """The owner's signature as the contract checks it: raw for the owner's own escrow grants and for account
    leaves (checked against the owner key); `root ++ signature` where the escrow asks a payer that is not the
    owner, i.e. the owner's `AgentAccount`, whose ERC-1271 takes that form for `MultichainApproval(root)`."""
    payer = _escrow_payer(action)
    if payer is not None and payer.lower() != signed.owner.lower():
        return _raw(signed.root) + _raw(signed.signature)
    return _raw(signed.signature)


def _calldata(signed: SignedMultichainApproval, entry: MultichainEntry) -> tuple[bytes, Any]:
    action = entry.action
    proof = (_raw(signed.root), [_raw(p) for p in entry.proof], _signature(signed, action))
    if isinstance(action, EscrowGrantLeaf):
        g, abi = action.grant, _escrow_abi()
        params = (g.token, g.max_per_call, g.budget, g.valid_after, g.valid_until)
        return abi.encode("grantWithProof", g.payer, g.signer, params, list(g.payees), g.epoch, proof), abi
    if isinstance(action, EscrowRevokeLeaf):
        abi = _escrow_abi()
        return abi.encode("revokeWithProof", action.payer, action.signer, action.epoch, proof), abi
    account_abi = _account_abi()
    if isinstance(action, SessionKeyInstallLeaf):
        data = account_abi.encode(
            "installSessionKeyWithProof",
            action.key,
            action.policy.abi(),
            action.nonce,
            action.deadline,
            proof,
        )
        return data, account_abi
    if isinstance(action, SessionKeyCancelLeaf):
        return account_abi.encode("cancelOwnerApprovalWithProof", action.nonce, proof), account_abi
    data = account_abi.encode("revokeSessionKeyWithProof", action.key, action.nonce, action.deadline, proof)
    return data, account_abi


async def _nothing_to_do(relayer: TxSender, action: Leaf) -> bool:
    """A revoke of a key not installed here, or a cancel of a nonce already used here (the install landed, and
    the revoke leaf ends it): skipped, as they would only revert."""
    if isinstance(action, SessionKeyRevokeLeaf):
        account = AgentAccount(relayer.rpc, action.account, chain_id=relayer.chain_id)
        return not (await account.session_key(action.key)).installed
    if isinstance(action, SessionKeyCancelLeaf):
        account = AgentAccount(relayer.rpc, action.account, chain_id=relayer.chain_id)
        return await account.approval_nonce_used(action.nonce)
    return False


async def relay_multichain(
    relayer: TxSender, signed: SignedMultichainApproval, *, entries: Sequence[MultichainEntry] | None = None
) -> list[Receipt]:
    """Send this chain's leaves of `signed` (those for `relayer.chain_id`, or `entries`) from any account with
    gas, one transaction each, in order. A leaf the contract would refuse raises `MultichainError` (code
    `multichain_refused`, with the contract's error name; `multichain_no_contract` when the escrow or account
    is not deployed there) before anything more is sent. Account revokes of a key not installed there, and
    cancels of a nonce already used there, are skipped (see `MultichainApproval.revoking`)."""
    todo = list(entries) if entries is not None else signed.for_chain(relayer.chain_id)
    receipts: list[Receipt] = []
    for entry in todo:
        if entry.action.chain_id != relayer.chain_id:
            raise MultichainError(
                f"leaf for chain {entry.action.chain_id} relayed on chain {relayer.chain_id}",
                code="multichain_wrong_chain",
            )
        to = entry.action.contract
        payer = _escrow_payer(entry.action)
        # A call to an address without code "succeeds" doing nothing: an undeployed account must not pass. An
        # account payer must be deployed too, or the escrow would find no ERC-1271 to ask.
        account_payer = payer if payer is not None and payer.lower() != signed.owner.lower() else None
        for needed in (to, account_payer):
            if needed and await relayer.rpc.request("eth_getCode", [needed, "latest"]) in ("0x", "0x0"):
                raise MultichainError(
                    f"no contract at {needed} on chain {relayer.chain_id} (deploy the account first)",
                    code="multichain_no_contract",
                )
        if await _nothing_to_do(relayer, entry.action):
            continue
        data, abi = _calldata(signed, entry)
        tx = {"from": relayer.address, "to": to, "data": _hex(data)}
        try:
            gas = int(await relayer.rpc.request("eth_estimateGas", [tx]), 16)
        except RevertError as exc:
            decoded = abi.decode_error(exc.data)
            name = decoded[0] if decoded else _hex(exc.data)
            raise MultichainError(
                f"chain {relayer.chain_id} refuses the {entry.action.__class__.__name__} on {to}: {name}",
                code="multichain_refused",
            ) from None
        receipts.append(await relayer.transact(to, data, gas=gas + gas // 5 + 10_000))
    return receipts
