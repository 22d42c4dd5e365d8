"""An `AgentAccount` signs for itself (ERC-1271) with its owner key through ERC-7739, offline.

`sign_typed_data_as_account` nests an app's EIP-712 message (an escrow `Grant`, an EIP-3009 deposit
authorization) in a `TypedDataSign` struct bound to the account; `account_typed_data` is what the owner's
wallet displays and signs. Session keys never pass the account's `isValidSignature`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from eth_account.messages import encode_typed_data
from eth_utils.address import to_checksum_address

from x402 import Signer, typed_data_digest

__all__ = ["account_typed_data", "sign_typed_data_as_account"]

_TYPED_DATA_SIGN_FIELDS: Final = (
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
    {"name": "salt", "type": "bytes32"},
)


def _base_type(type_name: str) -> str:
    return type_name.split("[", 1)[0]


def _contents_type(types: Mapping[str, Sequence[Mapping[str, str]]], primary: str) -> str:
    """Every struct type `primary` reaches (itself included), encoded as EIP-712 `encodeType` lists them after
    `TypedDataSign(...)`: sorted by name. This is the `contentsType` the account hashes."""
    seen: set[str] = set()
    todo = [primary]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_base_type(f["type"]) for f in types[name] if _base_type(f["type"]) in types)
    return "".join(
        f"{name}({','.join(f['type'] + ' ' + f['name'] for f in types[name])})" for name in sorted(seen)
    )


def account_typed_data(typed_data: Mapping[str, Any], *, chain_id: int, account: str) -> dict[str, Any]:
    """The ERC-7739 `TypedDataSign` typed data that `account`'s owner signs so that the account accepts, by
    ERC-1271, a signature of `typed_data` (an app's EIP-712 message, e.g. an escrow `Grant`).

    It is what an offline wallet displays: the app's domain, the app's message as `contents`, and the
    account it is signed for (name, version, chain and address of the account's own domain), so one owner
    signature can neither be replayed on another of the owner's accounts nor mistaken for another app's
    message.
    """
    types = {k: v for k, v in typed_data["types"].items() if k != "EIP712Domain"}
    primary = str(typed_data["primaryType"])
    return {
        "types": {
            "EIP712Domain": list(typed_data["types"]["EIP712Domain"]),
            "TypedDataSign": [{"name": "contents", "type": primary}, *_TYPED_DATA_SIGN_FIELDS],
            **types,
        },
        "primaryType": "TypedDataSign",
        "domain": dict(typed_data["domain"]),
        "message": {
            "contents": typed_data["message"],
            "name": "AgentAccount",
            "version": "1",
            "chainId": chain_id,
            "verifyingContract": to_checksum_address(account),
            "salt": bytes(32),
        },
    }


def sign_typed_data_as_account(
    owner: Signer, typed_data: Mapping[str, Any], *, chain_id: int, account: str
) -> bytes:
    """`account`'s ERC-1271 signature of `typed_data`, made with its owner key and no node.

    ERC-7739 nested typed-data form, as OpenZeppelin's `ERC7739` decodes it: `ownerSignature (65) ++
    appDomainSeparator ++ contentsHash ++ contentsDescr ++ uint16(len(contentsDescr))`, with `contentsDescr`
    in the explicit form (`contentsType ++ contentsName`), which holds for any nesting of struct types. The
    contract that asks `isValidSignature(digest, signature)` passes the app's own digest of `typed_data`; the
    account rebuilds it from the appended separator and contents hash.
    """
    signable = encode_typed_data(full_message=dict(typed_data))
    separator, contents_hash = bytes(signable.header), bytes(signable.body)
    primary = str(typed_data["primaryType"])
    types = {k: v for k, v in typed_data["types"].items() if k != "EIP712Domain"}
    descr = (_contents_type(types, primary) + primary).encode()
    if len(descr) >= 2**16:
        raise ValueError("the contents type description is too long for ERC-7739")
    digest = typed_data_digest(account_typed_data(typed_data, chain_id=chain_id, account=account))
    return owner.sign_hash(digest) + separator + contents_hash + descr + len(descr).to_bytes(2, "big")
