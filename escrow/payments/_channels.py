"""AgentChannels on the chain side: reading a channel, and sending the payee's `settle` / `close`.

The session paywall (`gateway._session`) reads a channel once (payer, signer, deposit) and then verifies
vouchers without the chain; the channel settler (`_channel_settler`) sends what it settles through
`ChannelChain`.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from x402._session import DepositAuthorization

from ..chain._abi import ContractAbi
from ..chain._rpc import Rpc, TransactionFailed
from ..chain._sender import TxSender
from ._escrow import escrow_artifact

__all__ = ["AgentChannelsChain", "ChannelChain", "ChannelInfo", "RelayReverted"]


class RelayReverted(TransactionFailed):
    """A relayed deposit passed its simulation and reverted on chain (its payer front-ran it: moved the funds
    or cancelled the authorization in between): `gas_used` is what the relayer paid for nothing."""

    def __init__(self, message: str, *, tx_hash: str, gas_used: int) -> None:
        super().__init__(message, tx_hash=tx_hash)
        self.gas_used = gas_used


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

    async def settle(
        self, channel_id: str, cumulative: int, signature: str, *, timeout: float = 30.0
    ) -> tuple[str, int]:
        """Send `settle` and wait up to `timeout` for its receipt; returns (transaction hash, gas used).
        Raises `ReceiptTimeout` (the transaction may still land), `TransactionFailed`, `ChainError`."""
        ...

    async def close(
        self, channel_id: str, cumulative: int, signature: str, *, timeout: float = 30.0
    ) -> tuple[str, int]: ...

    async def mined(self, tx_hash: str) -> bool:
        """Whether `tx_hash` is in a block (False: still in the pool, or unknown to the node)."""
        ...

    async def relay_deposit(
        self, deposit: DepositAuthorization, *, payee: str, token: str, channel: str, timeout: float = 30.0
    ) -> tuple[str, int]:
        """Send the payer's `openWithAuthorization` / `topUpWithAuthorization` (the server pays the gas),
        only after an `eth_call` of the same call succeeds; `RevertError` if it would revert (none sent),
        `RelayReverted` (with the gas paid) if it was sent and reverted."""
        ...

    async def topped_up(self, tx_hash: str, channel_id: str) -> int | None:
        """The channel's deposit after the top-up `tx_hash` (its `ChannelToppedUp` log, one receipt read),
        or None unless `tx_hash` is a mined, successful transaction that topped up `channel_id` here."""
        ...


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

    async def _send(
        self, name: str, channel_id: str, cumulative: int, signature: str, timeout: float
    ) -> tuple[str, int]:
        if self.sender is None:
            raise RuntimeError("AgentChannelsChain built without a sender cannot settle")
        data = self.abi.encode(name, bytes.fromhex(channel_id[2:]), cumulative, bytes.fromhex(signature[2:]))
        receipt = await self.sender.transact(self.escrow, data, gas=300_000, timeout=timeout)
        return receipt.transaction_hash, int(receipt.gas_used, 16)

    async def settle(
        self, channel_id: str, cumulative: int, signature: str, *, timeout: float = 30.0
    ) -> tuple[str, int]:
        return await self._send("settle", channel_id, cumulative, signature, timeout)

    async def close(
        self, channel_id: str, cumulative: int, signature: str, *, timeout: float = 30.0
    ) -> tuple[str, int]:
        return await self._send("close", channel_id, cumulative, signature, timeout)

    async def relay_deposit(
        self, deposit: DepositAuthorization, *, payee: str, token: str, channel: str, timeout: float = 30.0
    ) -> tuple[str, int]:
        if self.sender is None:
            raise RuntimeError("AgentChannelsChain built without a sender cannot relay a deposit")
        salt, nonce = bytes.fromhex(deposit.salt[2:]), bytes.fromhex(deposit.nonce[2:])
        signature = bytes.fromhex(deposit.signature[2:])
        window = (deposit.valid_after, deposit.valid_before, nonce)
        if deposit.kind == "open":
            auth: tuple[Any, ...] = (
                payee,
                token,
                deposit.value,
                salt,
                deposit.authorized_signer,
                deposit.payer,
                *window,
            )
            data = self.abi.encode("openWithAuthorization", auth, signature)
        else:
            auth = (bytes.fromhex(channel[2:]), deposit.value, deposit.payer, salt, *window)
            data = self.abi.encode("topUpWithAuthorization", auth, signature)
        sender = self.sender.address
        # The simulation is free; a send that reverts is not: a refused authorization (replayed, expired,
        # unfunded, badly signed) raises RevertError here and nothing is sent.
        await self.rpc.call(self.escrow, data, sender=sender)
        tx = {"from": sender, "to": self.escrow, "data": "0x" + data.hex()}
        estimate = int(await self.rpc.request("eth_estimateGas", [tx]), 16)
        try:
            receipt = await self.sender.transact(
                self.escrow, data, gas=estimate * 6 // 5 + 10_000, timeout=timeout
            )
        except TransactionFailed as exc:  # mined and reverted: read what it cost
            failed = await self.rpc.get_receipt(exc.tx_hash)
            gas = 0 if failed is None else int(failed.gas_used, 16)
            raise RelayReverted(str(exc), tx_hash=exc.tx_hash, gas_used=gas) from None
        return receipt.transaction_hash, int(receipt.gas_used, 16)

    async def topped_up(self, tx_hash: str, channel_id: str) -> int | None:
        receipt = await self.rpc.get_receipt(tx_hash)
        if receipt is None or not receipt.ok:
            return None
        topic, channel = self.abi.topics["ChannelToppedUp"], channel_id.lower()
        deposit = None
        for log in receipt.logs:  # an EntryPoint bundle (a smart account's top-up) carries it too
            if log.address.lower() != self.escrow.lower() or len(log.topics) < 2:
                continue
            if log.topics[0].lower() == topic and log.topics[1].lower() == channel:
                event = self.abi.decode_log(log)
                if event is not None:
                    deposit = max(deposit or 0, int(event.args["deposit"]))
        return deposit

    async def mined(self, tx_hash: str) -> bool:
        tx = await self.rpc.request("eth_getTransactionByHash", [tx_hash])
        return isinstance(tx, dict) and tx.get("blockNumber") is not None


def _channel_fields() -> tuple[str, ...]:
    abi = escrow_artifact("AgentChannels").abi
    for entry in abi:
        if entry.get("name") == "getChannel":
            return tuple(c["name"] for c in entry["outputs"][0]["components"])
    raise RuntimeError("AgentChannels ABI has no getChannel")


_CHANNEL_FIELDS = _channel_fields()
