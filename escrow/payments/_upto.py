"""The chain side of x402 `upto`: reads for verification (Permit2 allowance, balance, nonce bitmap) and the
settlement of an actual amount through the upto proxy, sent by the facilitator key the payer named.

`UptoChain(rpc, sender)`: `sender.address` is the facilitator (`extra.facilitatorAddress`): the proxy lets
only `witness.facilitator` call `settle`, so the key that signs the transaction must be that address.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, NamedTuple

from x402._upto import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS, UptoPayload

from ..chain._abi import ContractAbi
from ..chain._artifacts import load_artifact
from ..chain._rpc import Log, Receipt, Rpc
from ..chain._sender import TxSender
from ._escrow import Erc20, topic_address

__all__ = ["UptoChain", "UptoSettlement", "permit_args"]


class UptoSettlement(NamedTuple):
    """A `Settled` log of the proxy: which transaction paid how much."""

    tx_hash: str
    amount: int


@lru_cache(maxsize=1)
def _proxy_abi() -> ContractAbi:
    return ContractAbi(load_artifact("X402UptoPermit2Proxy").abi)


@lru_cache(maxsize=1)
def _permit2_abi() -> ContractAbi:
    return ContractAbi(load_artifact("Permit2").abi)


def permit_args(payload: UptoPayload) -> tuple[Any, ...]:
    """(permit, owner, witness, signature) as `X402UptoPermit2Proxy.settle` takes them."""
    a = payload.permit2_authorization
    permit = ((a.permitted.token, int(a.permitted.amount)), int(a.nonce), int(a.deadline))
    witness = (a.witness.to, a.witness.facilitator, int(a.witness.valid_after))
    return permit, a.from_, witness, bytes.fromhex(payload.signature[2:])


class UptoChain:
    """Verification reads and settlement of `upto` payments on one chain."""

    def __init__(self, rpc: Rpc, sender: TxSender, *, proxy: str = UPTO_PROXY_ADDRESS) -> None:
        self.rpc = rpc
        self.sender = sender
        self.proxy = proxy
        self.chain_id = sender.chain_id

    @property
    def facilitator(self) -> str:
        return self.sender.address

    async def allowance(self, token: str, owner: str) -> int:
        erc20 = Erc20(self.rpc, token)
        (value,) = erc20.abi.decode(
            "allowance",
            await self.rpc.call(erc20.address, erc20.abi.encode("allowance", owner, PERMIT2_ADDRESS)),
        )
        return int(value)

    async def balance(self, token: str, owner: str) -> int:
        return await Erc20(self.rpc, token).balance_of(owner)

    async def nonce_used(self, owner: str, nonce: int) -> bool:
        abi = _permit2_abi()
        data = abi.encode("nonceBitmap", owner, nonce >> 8)
        (bits,) = abi.decode("nonceBitmap", await self.rpc.call(PERMIT2_ADDRESS, data))
        return bool(int(bits) >> (nonce & 0xFF) & 1)

    def settle_calldata(self, payload: UptoPayload, amount: int) -> bytes:
        permit, owner, witness, signature = permit_args(payload)
        return _proxy_abi().encode("settle", permit, amount, owner, witness, signature)

    async def settle(self, payload: UptoPayload, amount: int, *, timeout: float = 30.0) -> Receipt:
        """Send `proxy.settle(..., amount, ...)`; raises `TransactionFailed` if it reverts."""
        return await self.sender.transact(
            self.proxy, self.settle_calldata(payload, amount), gas=200_000, timeout=timeout
        )

    async def find_settlement(self, payload: UptoPayload, *, from_block: int = 0) -> UptoSettlement | None:
        """The proxy's `Settled` log of this very authorization (owner, recipient, token, nonce)."""
        a = payload.permit2_authorization
        abi = _proxy_abi()
        raw = await self.rpc.request(
            "eth_getLogs",
            [
                {
                    "address": self.proxy,
                    "fromBlock": hex(from_block),
                    "toBlock": "latest",
                    "topics": [abi.topics["Settled"], topic_address(a.from_), topic_address(a.witness.to)],
                }
            ],
        )
        for entry in raw:
            log = Log(address=entry["address"], topics=entry["topics"], data=entry["data"])
            event = abi.decode_log(log, tx_hash=entry["transactionHash"])
            if event is None:
                continue
            args = event.args
            if int(args["nonce"]) == int(a.nonce) and str(args["token"]).lower() == a.permitted.token.lower():
                return UptoSettlement(tx_hash=entry["transactionHash"], amount=int(args["amount"]))
        return None
