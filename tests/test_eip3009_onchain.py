"""EIP-3009 `transferWithAuthorization` against the deployed TestUSDC: the on-chain half of x402 `exact`.

Typed data is built and signed with eth-account directly (not with x402's helpers), so these tests pin the
token's behaviour independently of our own encoder.
"""

from __future__ import annotations

import os
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from web3 import Web3
from web3.contract import Contract

from escrow import DevnetState, load_artifact
from tests.conftest import Transact

TWA_VRS = "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
TWA_BYTES = "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
GAS = 200_000  # fixed, so a reverting transaction still goes on chain instead of failing the estimate


def authorization(
    devnet: DevnetState, payer: str, payee: str, value: int, *, valid_after: int = 0, valid_before: int
) -> dict[str, Any]:
    """The EIP-712 message for a TransferWithAuthorization under the devnet token's own domain."""
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "TransferWithAuthorization": [
                {"name": "from", "type": "address"},
                {"name": "to", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "validAfter", "type": "uint256"},
                {"name": "validBefore", "type": "uint256"},
                {"name": "nonce", "type": "bytes32"},
            ],
        },
        "primaryType": "TransferWithAuthorization",
        "domain": {
            "name": devnet.usdc_name,
            "version": devnet.usdc_version,
            "chainId": devnet.chain_id,
            "verifyingContract": devnet.contracts["usdc"],
        },
        "message": {
            "from": payer,
            "to": payee,
            "value": value,
            "validAfter": valid_after,
            "validBefore": valid_before,
            "nonce": "0x" + os.urandom(32).hex(),
        },
    }


def args(typed: dict[str, Any]) -> list[Any]:
    m = typed["message"]
    return [m["from"], m["to"], m["value"], m["validAfter"], m["validBefore"], bytes.fromhex(m["nonce"][2:])]


def far_future(w3: Web3) -> int:
    return int(w3.eth.get_block("latest")["timestamp"]) + 3600


def test_signed_authorization_moves_funds_once(
    devnet: DevnetState, w3: Web3, usdc: Contract, transact: Transact
) -> None:
    payer, payee, relayer = devnet.accounts[1], devnet.accounts[2], devnet.accounts[3]
    typed = authorization(devnet, payer.address, payee.address, 1_250_000, valid_before=far_future(w3))
    signed = Account.sign_message(encode_typed_data(full_message=typed), payer.private_key)
    before = usdc.functions.balanceOf(payer.address).call(), usdc.functions.balanceOf(payee.address).call()

    call = usdc.get_function_by_signature(TWA_VRS)(
        *args(typed), signed.v, signed.r.to_bytes(32), signed.s.to_bytes(32)
    )
    receipt = transact(relayer, call, gas=GAS)

    assert receipt["status"] == 1
    after = usdc.functions.balanceOf(payer.address).call(), usdc.functions.balanceOf(payee.address).call()
    assert after == (before[0] - 1_250_000, before[1] + 1_250_000)
    assert usdc.functions.authorizationState(payer.address, args(typed)[5]).call() is True

    replay = transact(relayer, call, gas=GAS)
    assert replay["status"] == 0
    assert usdc.functions.balanceOf(payee.address).call() == after[1]


def test_expired_authorization_reverts(
    devnet: DevnetState, w3: Web3, usdc: Contract, transact: Transact
) -> None:
    payer, payee, relayer = devnet.accounts[1], devnet.accounts[2], devnet.accounts[3]
    expired = int(w3.eth.get_block("latest")["timestamp"]) - 1
    typed = authorization(devnet, payer.address, payee.address, 1, valid_before=expired)
    signature = Account.sign_message(encode_typed_data(full_message=typed), payer.private_key).signature
    before = usdc.functions.balanceOf(payee.address).call()

    receipt = transact(relayer, usdc.get_function_by_signature(TWA_BYTES)(*args(typed), signature), gas=GAS)

    assert receipt["status"] == 0
    assert usdc.functions.balanceOf(payee.address).call() == before


def test_erc1271_wallet_pays_through_bytes_overload(
    devnet: DevnetState, w3: Web3, usdc: Contract, transact: Transact
) -> None:
    owner, payee, relayer = devnet.accounts[4], devnet.accounts[5], devnet.accounts[3]
    artifact = load_artifact("ERC1271Wallet")
    factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    wallet = transact(owner, factory.constructor(owner.address))["contractAddress"]
    assert wallet is not None
    assert transact(owner, usdc.functions.mint(wallet, 5_000_000))["status"] == 1
    before = usdc.functions.balanceOf(payee.address).call()

    typed = authorization(devnet, wallet, payee.address, 2_000_000, valid_before=far_future(w3))
    # The wallet accepts its owner's plain ECDSA signature over the EIP-712 digest (ERC-1271).
    signature = Account.sign_message(encode_typed_data(full_message=typed), owner.private_key).signature
    receipt = transact(relayer, usdc.get_function_by_signature(TWA_BYTES)(*args(typed), signature), gas=GAS)

    assert receipt["status"] == 1
    assert usdc.functions.balanceOf(wallet).call() == 3_000_000
    assert usdc.functions.balanceOf(payee.address).call() == before + 2_000_000


def test_erc1271_wallet_rejects_a_strangers_signature(
    devnet: DevnetState, w3: Web3, usdc: Contract, transact: Transact
) -> None:
    owner, payee, relayer, stranger = (
        devnet.accounts[4],
        devnet.accounts[5],
        devnet.accounts[3],
        devnet.accounts[6],
    )
    artifact = load_artifact("ERC1271Wallet")
    factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    wallet = transact(owner, factory.constructor(owner.address))["contractAddress"]
    assert wallet is not None
    assert transact(owner, usdc.functions.mint(wallet, 1_000_000))["status"] == 1

    typed = authorization(devnet, wallet, payee.address, 1_000_000, valid_before=far_future(w3))
    signature = Account.sign_message(encode_typed_data(full_message=typed), stranger.private_key).signature
    receipt = transact(relayer, usdc.get_function_by_signature(TWA_BYTES)(*args(typed), signature), gas=GAS)

    assert receipt["status"] == 0
    assert usdc.functions.balanceOf(wallet).call() == 1_000_000
