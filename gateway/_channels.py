"""The gateway's side of AgentChannels (MPP sessions): the chain bindings and the channel settler live in
`escrow.payments` (the settler is the settlement engine's `channel` part); the payer's opener for plain EOAs
is here."""

from __future__ import annotations

from escrow.chain._abi import ContractAbi
from escrow.chain._sender import TxSender
from escrow.payments._channel_settler import ChannelSettler, ChannelVoucher, encode_voucher
from escrow.payments._channels import AgentChannelsChain, ChannelChain, ChannelInfo, RelayReverted
from escrow.payments._escrow import escrow_artifact

__all__ = [
    "AgentChannelsChain",
    "ChannelChain",
    "ChannelInfo",
    "ChannelSettler",
    "ChannelVoucher",
    "EoaChannelOpener",
    "RelayReverted",
    "encode_voucher",
]


class EoaChannelOpener:
    """The payer's side for a plain EOA: `approve` once, then `open` / `topUp` sent by the payer itself
    (the relayed `openWithAuthorization` replaces this for smart accounts and gasless payers)."""

    def __init__(self, sender: TxSender, token: str) -> None:
        self.sender = sender
        self.token = token
        self.abi = ContractAbi(escrow_artifact("AgentChannels").abi)
        self._erc20 = ContractAbi(escrow_artifact("TestUSDC").abi)
        self.gas = 0

    @property
    def payer(self) -> str:
        return self.sender.address

    async def _approve(self, escrow: str, amount: int) -> None:
        data = self._erc20.encode("approve", escrow, amount)
        await self.sender.transact(self.token, data, gas=100_000)

    async def open(self, *, escrow: str, payee: str, token: str, deposit: int, salt: str, signer: str) -> str:
        await self._approve(escrow, deposit)
        data = self.abi.encode("open", payee, token, deposit, bytes.fromhex(salt[2:]), signer, [], [])
        receipt = await self.sender.transact(escrow, data, gas=400_000)
        self.gas += int(receipt.gas_used, 16)
        return receipt.transaction_hash

    async def top_up(self, *, escrow: str, channel: str, amount: int) -> str:
        await self._approve(escrow, amount)
        data = self.abi.encode("topUp", bytes.fromhex(channel[2:]), amount)
        receipt = await self.sender.transact(escrow, data, gas=200_000)
        self.gas += int(receipt.gas_used, 16)
        return receipt.transaction_hash
