"""The chain side of MPP sessions: reading AgentChannels channels, and the channel settler.

The session paywall reads a channel once (payer, signer, deposit) and then verifies vouchers without the
chain; the settler turns the highest voucher the payer has been charged up to into one `settle` every so
often, and into `close` when the payer closes. The settler is a small queue of "settle channel X up to
voucher V" jobs, so that it can later be drained by the unified settlement engine instead.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import msgspec

from escrow.chain._abi import ContractAbi
from escrow.chain._rpc import Rpc
from escrow.chain._sender import TxSender
from escrow.payments._escrow import escrow_artifact

__all__ = ["AgentChannelsChain", "ChannelChain", "ChannelInfo", "ChannelSettler", "EoaChannelOpener"]

log = logging.getLogger("agentpay.gateway.channels")

_ZERO = "0x" + "00" * 20


class ChannelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One channel as the contract holds it (`getChannel`)."""

    payer: str
    payee: str
    token: str
    authorized_signer: str
    deposit: int
    settled: int
    close_requested_at: int = 0
    finalized: bool = False

    @property
    def exists(self) -> bool:
        return int(self.payer, 16) != 0

    @property
    def signer(self) -> str:
        """Who signs vouchers: the authorized signer, else the payer."""
        return self.payer if int(self.authorized_signer, 16) == 0 else self.authorized_signer


class ChannelChain(Protocol):
    """What the session paywall and its settler need from the chain."""

    chain_id: int
    escrow: str

    async def channel(self, channel_id: str) -> ChannelInfo: ...

    async def settle(self, channel_id: str, cumulative: int, signature: str) -> tuple[str, int]:
        """Send `settle`; returns (transaction hash, gas used)."""
        ...

    async def close(self, channel_id: str, cumulative: int, signature: str) -> tuple[str, int]: ...


class AgentChannelsChain:
    """`ChannelChain` over a deployed AgentChannels, sending with the payee's (or its relayer's) key.

    `settle`/`close` are payee-only on the contract, so `sender` must be the payee's key.
    """

    def __init__(self, rpc: Rpc, escrow: str, *, chain_id: int, sender: TxSender | None = None) -> None:
        self.rpc = rpc
        self.escrow = escrow
        self.chain_id = chain_id
        self.sender = sender
        self.abi = ContractAbi(escrow_artifact("AgentChannels").abi)

    async def channel(self, channel_id: str) -> ChannelInfo:
        data = await self.rpc.call(self.escrow, self.abi.encode("getChannel", bytes.fromhex(channel_id[2:])))
        (raw,) = self.abi.decode("getChannel", data)
        fields: dict[str, Any] = dict(zip(_CHANNEL_FIELDS, raw, strict=False))
        return ChannelInfo(
            payer=str(fields["payer"]),
            payee=str(fields["payee"]),
            token=str(fields["token"]),
            authorized_signer=str(fields["authorizedSigner"]),
            deposit=int(fields["deposit"]),
            settled=int(fields["settled"]),
            close_requested_at=int(fields["closeRequestedAt"]),
            finalized=bool(fields["finalized"]),
        )

    async def _send(self, name: str, channel_id: str, cumulative: int, signature: str) -> tuple[str, int]:
        if self.sender is None:
            raise RuntimeError("AgentChannelsChain built without a sender cannot settle")
        data = self.abi.encode(name, bytes.fromhex(channel_id[2:]), cumulative, bytes.fromhex(signature[2:]))
        receipt = await self.sender.transact(self.escrow, data, gas=300_000)
        return receipt.transaction_hash, int(receipt.gas_used, 16)

    async def settle(self, channel_id: str, cumulative: int, signature: str) -> tuple[str, int]:
        return await self._send("settle", channel_id, cumulative, signature)

    async def close(self, channel_id: str, cumulative: int, signature: str) -> tuple[str, int]:
        return await self._send("close", channel_id, cumulative, signature)


def _channel_fields() -> tuple[str, ...]:
    abi = escrow_artifact("AgentChannels").abi
    for entry in abi:
        if entry.get("name") == "getChannel":
            return tuple(c["name"] for c in entry["outputs"][0]["components"])
    raise RuntimeError("AgentChannels ABI has no getChannel")


_CHANNEL_FIELDS = _channel_fields()


class ChannelSettler:
    """Settles channels on chain, one transaction at a time per channel, never below what is settled.

    `request(channel, cumulative, signature)` records the highest settleable voucher; a background task
    sends it. `close(...)` settles and finalizes at once. `transactions` counts what was sent, `gas` sums
    its gas (the benchmark reads both).
    """

    def __init__(self, chain: ChannelChain) -> None:
        self.chain = chain
        self._wanted: dict[str, tuple[int, str]] = {}
        self._settled: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.transactions: list[str] = []
        self.gas = 0

    def settled(self, channel_id: str) -> int:
        return self._settled.get(channel_id, 0)

    def note_settled(self, channel_id: str, amount: int) -> None:
        self._settled[channel_id] = max(self._settled.get(channel_id, 0), amount)

    def request(self, channel_id: str, cumulative: int, signature: str) -> None:
        """Settle `channel_id` up to this voucher soon (in the background)."""
        if cumulative <= max(self.settled(channel_id), self._wanted.get(channel_id, (0, ""))[0]):
            return
        self._wanted[channel_id] = (cumulative, signature)
        task = asyncio.get_running_loop().create_task(self._drain(channel_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, channel_id: str) -> None:
        async with self._locks.setdefault(channel_id, asyncio.Lock()):
            wanted = self._wanted.pop(channel_id, None)
            if wanted is None or wanted[0] <= self.settled(channel_id):
                return
            try:
                tx, gas = await self.chain.settle(channel_id, *wanted)
            except Exception:  # kept for the next request or the close; nothing is lost
                log.exception("settling channel %s up to %d failed", channel_id, wanted[0])
                self._wanted.setdefault(channel_id, wanted)
                return
            self.transactions.append(tx)
            self.gas += gas
            self.note_settled(channel_id, wanted[0])

    async def close(self, channel_id: str, cumulative: int, signature: str) -> str:
        """Close the channel paying up to `cumulative` (the payer's final voucher)."""
        async with self._locks.setdefault(channel_id, asyncio.Lock()):
            self._wanted.pop(channel_id, None)
            tx, gas = await self.chain.close(channel_id, cumulative, signature)
            self.transactions.append(tx)
            self.gas += gas
            self.note_settled(channel_id, cumulative)
            return tx

    async def drain(self) -> None:
        """Wait for every settlement in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


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
