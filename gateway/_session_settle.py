"""The settling half of the session paywall: stored vouchers, the channel settler's queue, its lifecycle.

A voucher is stored with a channel's high-water marks (`pack_voucher`): the latest accepted one with the
channel's mark, the settleable one (the highest not above what was charged) with its `#spent` mark. A
restarted gateway reads both back (`_restore`) and queues the settleable voucher at once: the process that
charged it may never have settled it. `ChannelSettler` drains the queue (`kick()` after each enqueue; its
`run` loop between lifespan startup and shutdown).
"""

from __future__ import annotations

import asyncio
import time

import msgspec
from starlette.types import Message, Receive

from ._channels import ChannelChain, ChannelInfo, ChannelSettler, ChannelVoucher, encode_voucher
from ._session_state import Channel
from ._store import PaymentStore, Settlement

__all__ = ["SessionSettling", "pack_voucher", "unpack_voucher"]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(tuple[int, str]).decode


def pack_voucher(voucher: tuple[int, str] | None) -> bytes | None:
    """A voucher as the store keeps it with a high-water mark: `[cumulative, signature]`."""
    return None if voucher is None else _encode(voucher)


def unpack_voucher(raw: bytes | None) -> tuple[int, str] | None:
    return None if raw is None else _decode(raw)


class SessionSettling:
    """Mixed into `SessionPaywall`: what it settles, and when."""

    settler: ChannelSettler
    chain: ChannelChain
    pay_to: str
    _opened: PaymentStore | None
    _store_url: str | None
    _channels: dict[str, Channel]
    _stop: asyncio.Event
    _running: asyncio.Task[None] | None

    @property
    def store(self) -> PaymentStore:
        raise NotImplementedError

    async def _open_store(self) -> PaymentStore:
        raise NotImplementedError

    async def _channel(self, channel_id: str) -> Channel:
        raise NotImplementedError

    # -- lifecycle: the settler's loop -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and run the channel settler's loop (lifespan startup; idempotent)."""
        await self._open_store()
        if self._running is None:
            self._stop.clear()
            self._running = asyncio.get_running_loop().create_task(self.settler.run(self._stop))

    async def stop(self) -> None:
        """Queue every known channel's unsettled charges, let the settler send them, stop (shutdown)."""
        if self._opened is not None:
            for ch in list(self._channels.values()):
                async with ch.lock:
                    await self._queue_settleable(ch)
        running, self._running = self._running, None
        if running is not None:
            self._stop.set()
            await running
        if self._opened is not None:  # what was just queued (and any drain kicked meanwhile) goes out first
            await self.settler.drain()
        if self._store_url is not None and self._opened is not None:
            await self._opened.close()
            self._opened = None

    def _lifespan(self, receive: Receive) -> Receive:
        # Started before the app's own startup, stopped before its shutdown (the store still open).
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.start()
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
            return message

        return wrapped

    async def settle(self, channel_id: str) -> None:
        """Queue `channel_id`'s settleable voucher now (from the store if this process never saw it)."""
        await self._open_store()
        ch = await self._channel(channel_id)
        async with ch.lock:
            await self._queue_settleable(ch)

    async def _restore(self, channel_id: str, info: ChannelInfo) -> Channel:
        """A channel as the store and the chain know it (nothing stored, for a new channel)."""
        accepted, last = await self.store.channel_voucher(channel_id)
        spent, settleable = await self.store.channel_voucher(channel_id + "#spent")
        ch = Channel(channel_id, info, max(accepted, info.settled), max(spent, info.settled))
        for voucher in (unpack_voucher(settleable), unpack_voucher(last)):
            if voucher is not None and voucher[0] > info.settled:
                if voucher[0] <= ch.spent:
                    ch.settleable = max(ch.settleable or voucher, voucher)
                else:
                    ch.vouchers.append(voucher)
        async with ch.lock:  # charged by a process that may never have settled it: settle it now
            await self._queue_settleable(ch)
        return ch

    async def _queue_settleable(self, ch: Channel) -> None:
        """Queue the settleable voucher unless it is queued already (caller holds the lock)."""
        if ch.settleable is not None and ch.settleable[0] > ch.queued:
            await self._enqueue(ch, *ch.settleable)
            self.settler.kick()

    async def _enqueue(self, ch: Channel, cumulative: int, signature: str, *, close: str = "") -> str:
        voucher = ChannelVoucher(
            chain_id=self.chain.chain_id,
            escrow=self.chain.escrow,
            channel=ch.id,
            cumulative=cumulative,
            signature=signature,
            payer=ch.info.payer,
            payee=self.pay_to,
            close=bool(close),
        )
        key = voucher.key(close)
        if close:  # the paywall answers a close with its outcome: watched before anyone can settle it
            self.settler.watch(key)
        await self.store.enqueue(
            Settlement(
                key=key,
                kind=self.settler.kind,
                payload=encode_voucher(voucher),
                payer=ch.info.payer,
                amount=cumulative,
                created_at=time.time(),
            )
        )
        if not close:  # a close that fails leaves the channel open: its later charges are still to queue
            ch.queued = max(ch.queued, cumulative)
        return key
