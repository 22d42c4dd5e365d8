"""The settling half of the session paywall: stored vouchers, the channel settler's queue, its lifecycle.

A voucher is stored with a channel's high-water marks (`pack_voucher`): the latest accepted one with the
channel's mark, the settleable one (the highest not above what was charged) with its `#spent` mark. A
restarted gateway reads both back (`_restore`) and queues the settleable voucher at once: the process that
charged it may never have settled it. At startup (`start`, `discover`) it lists every stored settleable
voucher and queues each one not queued yet (nor closed): what was served is settled even if the payer never
comes back. `ChannelSettler` drains the queue (`kick()` after each enqueue; its `run` loop between lifespan
startup and shutdown).

A close is queued like any voucher and answered with its outcome. One whose receipt is late stays in the
queue, pending with its hash (the settler waits for that transaction, never sends another): the payer is
answered 503 `close-pending` and, asking again, gets the outcome of that same close.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING

import msgspec
from starlette.types import Message, Receive, Send

from escrow import EscrowError, SettleOutcome, TransactionFailed
from escrow.payments._exact_settler import pending_transactions
from x402 import b64url_encode, rfc3339
from x402._session import SessionAction, SessionReceipt

from ._channels import ChannelChain, ChannelInfo, ChannelSettler, ChannelVoucher, encode_voucher
from ._session_state import Channel, SessionProblem, charged_key
from ._store import PaymentStore, Settlement

__all__ = ["SessionSettling", "pack_voucher", "receipt_headers", "unpack_voucher"]

log = logging.getLogger("agentpay.gateway.session")

#: Added to a channel's charged count when it closes: above any voucher (uint128), so no process sharing the
#: store charges on it afterwards.
_CLOSED = 2**129

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(tuple[int, str]).decode


def pack_voucher(voucher: tuple[int, str] | None) -> bytes | None:
    """A voucher as the store keeps it with a high-water mark: `[cumulative, signature]`."""
    return None if voucher is None else _encode(voucher)


def unpack_voucher(raw: bytes | None) -> tuple[int, str] | None:
    return None if raw is None else _decode(raw)


def receipt_headers(receipt: SessionReceipt) -> list[tuple[bytes, bytes]]:
    return [(b"payment-receipt", b64url_encode(msgspec.json.encode(receipt)).encode())]


class SessionSettling:
    """Mixed into `SessionPaywall`: what it settles, and when."""

    settler: ChannelSettler
    chain: ChannelChain
    pay_to: str
    _opened: PaymentStore | None
    _store_url: str | None
    _channels: dict[str, Channel]
    _closing: dict[str, str]
    _stop: asyncio.Event
    _running: asyncio.Task[None] | None
    _watching: asyncio.Task[None] | None
    watch_interval: float

    if TYPE_CHECKING:  # provided by `SessionPaywall`, the class this is mixed into

        @property
        def store(self) -> PaymentStore: ...

        async def _open_store(self) -> PaymentStore: ...

        async def _channel(self, channel_id: str) -> Channel: ...

        def _check_signature(self, ch: Channel, action: SessionAction) -> None: ...

    def _receipt(
        self,
        ch: Channel,
        challenge: str,
        *,
        units: int | None = None,
        tx: str | None = None,
        private: bool = False,
    ) -> SessionReceipt:
        """`private`: for a credential the channel's signer did not sign (a `hash` top-up): no amounts."""
        return SessionReceipt(
            method="evm",
            intent="session",
            status="success",
            timestamp=rfc3339(time.time()),
            reference=ch.id,
            challenge_id=challenge,
            channel_id=ch.id,
            accepted_cumulative=None if private else str(ch.accepted),
            spent=None if private else str(ch.spent),
            chain_id=self.chain.chain_id,
            units=units,
            tx_hash=tx,
        )

    async def _no_content(self, send: Send, ch: Channel | None, cid: str, *, private: bool = False) -> None:
        headers = [] if ch is None else receipt_headers(self._receipt(ch, cid, private=private))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    # -- lifecycle: the settler's loop -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, queue what an earlier process served and never settled (`discover`), and run the
        channel settler's loop (lifespan startup; idempotent)."""
        await self._open_store()
        if self._running is None:
            await self.discover()
            self._stop.clear()
            self._running = asyncio.get_running_loop().create_task(self.settler.run(self._stop))
            self._watching = asyncio.get_running_loop().create_task(self._watch_loop())

    async def discover(self) -> list[str]:
        """Queue every channel whose stored settleable voucher is neither queued nor settled yet (nor the
        channel closed): a crashed gateway's charges. Reads the chain once per such channel, never for one
        already queued; returns the channels queued."""
        store = await self._open_store()
        found: list[str] = []
        after = ""
        while page := await store.list_channel_vouchers(after=after, limit=500):
            after = page[-1][0]
            for key, _, raw in page:
                cid = key.removesuffix("#spent")
                voucher = unpack_voucher(raw) if cid != key else None
                if voucher is None or cid in self._channels:
                    continue  # a channel's latest voucher (its `#spent` one is what was charged), or known
                settle_key = ChannelVoucher(
                    chain_id=self.chain.chain_id,
                    escrow=self.chain.escrow,
                    channel=cid,
                    cumulative=voucher[0],
                    signature=voucher[1],
                ).key()
                if await store.get_settlement(settle_key) or await store.high_water(cid + "#closed"):
                    continue  # queued (or settled) already; or closed, which paid everything charged
                try:
                    await self.settle(cid)  # the one chain read: it queues the voucher unless chain paid it
                except (SessionProblem, EscrowError) as exc:  # closed, another escrow's, chain down: skip
                    log.warning("discovering channel %s: %s", cid, exc)
                    continue
                found.append(cid)
        return found

    async def watch(self) -> list[str]:
        """One pass over the channels this process serves, each read again (one chain read): one whose payer
        asked the chain to close has its settleable voucher queued at once, and accepts no more vouchers.
        AgentChannels pays the payer back everything unsettled `CLOSE_GRACE_PERIOD` (15 minutes) after its
        `requestClose()`, and the paywall otherwise settles on its own schedule: what it served would be
        taken back. A finalized channel is forgotten (its next request is refused). Returns the channels
        queued."""
        queued: list[str] = []
        for ch in list(self._channels.values()):
            if ch.closed:
                continue  # its close is queued already
            try:
                info = await self.chain.channel(ch.id)
            except EscrowError as exc:
                log.warning("watching channel %s: %s", ch.id, exc)
                continue
            if info.finalized:
                self._channels.pop(ch.id, None)
            elif info.close_requested_at:
                async with ch.lock:
                    ch.info = info
                    before = ch.queued
                    await self._queue_settleable(ch)
                    if ch.queued > before:
                        queued.append(ch.id)
        return queued

    async def _watch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.watch_interval)
                return
            except TimeoutError:
                pass
            try:
                await self.watch()
            except Exception:  # a store outage: the next pass tries again, the loop never dies
                log.exception("watching channels failed")

    async def stop(self) -> None:
        """Queue every known channel's unsettled charges, let the settler send them, stop (shutdown)."""
        if self._opened is not None:
            for ch in list(self._channels.values()):
                async with ch.lock:
                    await self._queue_settleable(ch)
        running, self._running = self._running, None
        watching, self._watching = self._watching, None
        if running is not None:
            self._stop.set()
            await running
        if watching is not None:
            await watching
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

    # -- what every process charged: the store's count --------------------------------------------------

    async def _hold(self, ch: Channel, amount: int) -> bool:
        """Count `amount` against the channel's accepted voucher for every process sharing the store (each
        has its own lock and credit); False, nothing counted, if what all of them charged would pass it."""
        return not amount or await self.store.add_pending(charged_key(ch.id), amount, limit=ch.accepted)

    async def _unhold(self, ch: Channel, amount: int) -> None:
        if amount > 0:
            await self.store.sub_pending(charged_key(ch.id), amount)

    # -- close -------------------------------------------------------------------------------------------

    async def _close(self, send: Send, ch: Channel, action: SessionAction, cid: str) -> None:
        """Close with the payer's final voucher, which must cover exactly what was spent (at most what it
        pre-authorized): the payee is paid the actual charges, never an unused pre-authorization. A close
        already in the queue (its receipt late) is not queued again: the payer gets that one's outcome."""
        assert action.cumulative is not None and action.signature is not None
        async with ch.lock:
            self._check_signature(ch, action)
            key = self._closing.get(ch.id)
            if key is None:
                if ch.closed:
                    raise SessionProblem("channel-finalized", f"channel {ch.id} is closed", status=410)
                # What every process sharing the store charged counts, and no process charges after the
                # close: its count jumps past any voucher, atomically with the check (`_CLOSED`).
                charged = await self.store.get_pending(charged_key(ch.id))
                if charged >= _CLOSED:  # closed, or closing, by another process sharing the store
                    raise SessionProblem("channel-finalized", f"channel {ch.id} is closed", status=410)
                covered = max(ch.spent + ch.reserved, charged) <= action.cumulative
                if not covered or action.cumulative > max(ch.accepted, ch.spent, charged):
                    raise SessionProblem(
                        "close-mismatch",
                        f"the close voucher ({action.cumulative}) must cover what was spent"
                        f" ({max(ch.spent, charged)})",
                        state=ch.state(),
                    )
                if not await self.store.add_pending(
                    charged_key(ch.id), _CLOSED, limit=action.cumulative + _CLOSED
                ):
                    raise SessionProblem(
                        "close-mismatch",
                        "another process charged on this channel meanwhile",
                        state=ch.state(),
                    )
                ch.closed = True
                ch.changed.notify_all()
                key = await self._enqueue(ch, action.cumulative, action.signature, close=secrets.token_hex(8))
                self._closing[ch.id] = key
            # Settled by the engine like any queued voucher (with the channel's other queued vouchers).
            outcome = await self._close_outcome(key)
            if outcome is None or outcome.status == "retry":  # sent, maybe: the engine waits for it
                item = await self.store.get_settlement(key)
                sent = pending_transactions(item.error if item is not None else None)
                raise SessionProblem(
                    "close-pending",
                    "the close is pending; ask again for its outcome",
                    status=503,
                    state={**ch.state(), **({"txHash": sent[-1]} if sent else {})},
                )
            del self._closing[ch.id]
            if outcome.status not in ("settled", "settled_elsewhere"):
                ch.closed = False  # the channel stays open and usable; the payer may try again
                await self.store.sub_pending(charged_key(ch.id), _CLOSED)
                log.warning("closing channel %s failed: %s", ch.id, outcome)
                reverted = outcome.code == TransactionFailed.code
                raise SessionProblem(
                    "transaction-reverted" if reverted else "chain-unavailable",
                    "the close transaction reverted" if reverted else "the chain is unreachable; retry later",
                    status=409 if reverted else 503,
                    state=ch.state(),
                )
            await self.store.raise_high_water(ch.id + "#closed", 1)  # startup discovery skips it
            receipt = self._receipt(ch, cid, tx=outcome.tx_hash or None)
        self._channels.pop(ch.id, None)
        await send({"type": "http.response.start", "status": 204, "headers": receipt_headers(receipt)})
        await send({"type": "http.response.body", "body": b""})

    async def _close_outcome(self, key: str) -> SettleOutcome | None:
        """The queued close's outcome: final already (recorded in the store), or awaited for a while."""
        done = await self.store.get_settlement(key)
        if done is not None and done.state in ("settled", "dead"):
            code = (done.error or "").split(":", 1)[0]
            settled = done.state == "settled"
            return SettleOutcome(
                key=key, status="settled" if settled else "dead", code=code, tx_hash=done.tx_hash or ""
            )
        return await self.settler.wait_for(key, timeout=self.settler.receipt_timeout + 5.0)
