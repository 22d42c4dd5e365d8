"""What the multichain approval suites share: two anvils (`Devnets(2)`) and one chain seen from a test
(its contracts, a funded relayer, the owner's account)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from escrow import AgentAccount, AgentEscrow, Bundler, Devnets, Erc20
from escrow.chain._rpc import Rpc, TxSender
from escrow.devnet._devnet import DevnetChain
from tests.conftest import unavailable
from x402._escrow import EscrowPayload


def two_chains() -> Iterator[list[DevnetChain]]:
    """For a module-scoped fixture: chain ids 31337 and 31338, the same contracts at the same addresses."""
    with Devnets(2) as state:
        if state.backend != "anvil":
            unavailable("the multichain suite funds fresh keys with anvil_setBalance")
        yield list(state.chains)


@dataclass
class ChainSide:
    """One chain, from a test's point of view: its contracts, a funded relayer, the owner's account."""

    chain: DevnetChain
    rpc: Rpc
    relayer: TxSender
    escrow: AgentEscrow
    usdc: Erc20
    bundler: Bundler
    account: AgentAccount

    @property
    def chain_id(self) -> int:
        return self.chain.chain_id

    async def send(self, to: str, data: bytes) -> None:
        tx = {"from": self.relayer.address, "to": to, "data": "0x" + data.hex()}
        gas = int(await self.rpc.request("eth_estimateGas", [tx]), 16)
        await self.relayer.transact(to, data, gas=gas * 2)

    async def settle(self, payload: EscrowPayload) -> None:
        await self.send(self.escrow.address, self.escrow.settle_calldata([payload]))
