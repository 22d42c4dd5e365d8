"""The settler of AgentChannels channels (MPP sessions): the `channel` part of the settlement engine.

    settler = ChannelSettler(store, AgentChannelsChain(rpc, channels, chain_id=..., sender=payee))
    await settler.run(stop)              # or kick() after an enqueue; drain() in tests, at shutdown

The session paywall queues a channel's latest settleable voucher (`ChannelVoucher`, kind `channel`) every
`settle_every` of charges, and a `close` voucher when the payer closes. The engine leases them in batches;
this part groups a batch by channel and sends one transaction per channel: `close` with the close voucher if
one is queued, else `settle` with the highest voucher. Every other item of that channel at or below it is
recorded settled by the same transaction (a voucher is cumulative: the highest one pays for all).

Never twice: before anything is sent, the channel is read. Settled on chain up to a voucher (a `settle` of
ours whose receipt we never saw, another settler's) means that item is done (`settled_elsewhere`); a
finalized channel settles nothing more (a `settle` item above what it paid is dead: `channel_finalized`).
A send whose receipt did not arrive in time is recorded as pending (`settlement_pending: sent in 0x...`):
while any of its hashes is still unmined, nothing is sent for that channel; a close too stays queued until
its transaction is seen (a close that surely failed, reverted or never sent, is dead at once: the payer,
answered, may ask again). `reconcile` (recovery) only
records what the chain shows.

The loop (lease, batch, lease renewal, backoff, dead letters) is `escrow.payments._engine.SettlementEngine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import msgspec

from ..chain._rpc import ChainError, ReceiptTimeout
from ._channels import ChannelChain, ChannelInfo
from ._engine import EngineOptions, Job, Parties, SettlementEngine, SettleOutcome
from ._exact_settler import pending_transactions
from ._queue import QueuedItem, SettlementQueue

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "KIND",
    "ChannelSettlement",
    "ChannelSettler",
    "ChannelVoucher",
    "decode_voucher",
    "encode_voucher",
]

KIND: Final = "channel"

log = logging.getLogger("agentpay.settler.channel")


class ChannelVoucher(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """What the queue holds for a channel settlement: a voucher the payee may redeem, and what to send."""

    chain_id: int
    escrow: str
    channel: str
    cumulative: int
    signature: str
    payer: str = ""
    payee: str = ""
    close: bool = False  # `close` (final) rather than `settle`

    def key(self, nonce: str = "") -> str:
        """The queue key: one item per voucher amount, and one per close attempt (`nonce`)."""
        action = f"close:{nonce}:" if self.close else ""
        return f"channel:{self.chain_id}:{self.channel.lower()}:{action}{self.cumulative}"


encode_voucher = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(ChannelVoucher).decode


def decode_voucher(raw: bytes) -> ChannelVoucher:
    return _decode(raw)


Work = Job[ChannelVoucher]
Engine = SettlementEngine[ChannelVoucher, SettlementQueue]


class ChannelSettlement:
    """The `channel` part of the settlement engine: one `settle` or `close` per channel and batch, after a
    look at the channel (a `SchemeSettlement`)."""

    name = KIND
    malformed = "channel_voucher_malformed"

    def __init__(self, chain: ChannelChain) -> None:
        self.chain = chain
        self.transactions: list[str] = []  # every transaction this settler sent that landed
        self.gas = 0  # their total gasUsed

    def decode(self, raw: bytes) -> ChannelVoucher:
        return decode_voucher(raw)

    async def submit(self, engine: Engine, jobs: list[Work]) -> list[SettleOutcome]:
        return await self._by_channel(engine, jobs, send=True)

    async def reconcile(self, engine: Engine, jobs: list[Work]) -> list[SettleOutcome]:
        return await self._by_channel(engine, jobs, send=False)

    async def _by_channel(self, engine: Engine, jobs: list[Work], *, send: bool) -> list[SettleOutcome]:
        out: list[SettleOutcome] = []
        groups: dict[str, list[Work]] = {}
        for w in jobs:
            v = w[1]
            if v.chain_id != self.chain.chain_id or v.escrow.lower() != self.chain.escrow.lower():
                out.append(await engine.dead(w, "channel_wrong_chain", "not this settler's channels"))
            else:
                groups.setdefault(v.channel.lower(), []).append(w)
        for group in groups.values():
            out.extend(await self._channel(engine, group, send=send))
        return out

    async def _channel(self, engine: Engine, group: list[Work], *, send: bool) -> list[SettleOutcome]:
        out: list[SettleOutcome] = []
        sent = [h for w in group for h in pending_transactions(w[0].error)]
        try:
            info = await self.chain.channel(group[0][1].channel)
            # An earlier send of ours mined since: read the channel after it, not before (never a second send
            # racing the one that just paid). Still in the pool: wait for it, send nothing.
            waiting = [h for h in sent if not await self.chain.mined(h)] if send else []
            if send and len(waiting) < len(sent):
                info = await self.chain.channel(group[0][1].channel)
        except ChainError as exc:
            return [await engine.retry(w, f"{exc.code}: reading the channel: {exc}") for w in group]
        done = [w for w in group if _covered(w[1], info)]
        if done:  # paid already: by a transaction of ours we never saw mined, or by another settler
            out.extend(await engine.settled(done, _sent(done), "settled_elsewhere"))
        rest = [w for w in group if not _covered(w[1], info)]
        if not rest:
            return out
        if info.finalized:  # closed below these vouchers: nothing more can be taken from the channel
            detail = f"the channel was closed having paid {info.settled}"
            return out + [await engine.dead(w, "channel_finalized", detail) for w in rest]
        if not send:
            error = "channel_unsettled: not settled on chain yet"
            return out + [await _later(engine, w, error) for w in rest]
        if waiting:  # an earlier send may still land: never a second one meanwhile
            hashes = " ".join(f"sent in {h}" for h in waiting)
            return out + [await engine.retry(w, f"settlement_pending: {hashes}, not mined yet") for w in rest]
        return out + await self._send(engine, rest)

    async def _send(self, engine: Engine, rest: list[Work]) -> list[SettleOutcome]:
        closes = [w for w in rest if w[1].close]
        target = max(closes or rest, key=lambda w: w[1].cumulative)[1]
        send = self.chain.close if target.close else self.chain.settle
        try:
            tx_hash, gas = await send(
                target.channel, target.cumulative, target.signature, timeout=engine.receipt_timeout
            )
        except ReceiptTimeout as exc:  # may land yet: remember every hash, never send blindly again
            hashes = " ".join(f"sent in {h}" for h in exc.tx_hashes)
            return [await engine.retry(w, f"settlement_pending: {hashes} ({exc.code})") for w in rest]
        except ChainError as exc:  # reverted or unreachable: the next attempt reads the channel first
            # A close that surely did not land is the payer's to ask again (the channel stays open); a close
            # that may land (above) is retried like any settle: the engine waits for its transaction.
            return [
                await (
                    engine.dead(w, exc.code, str(exc))
                    if w[1].close
                    else engine.retry(w, f"{exc.code}: {exc}")
                )
                for w in rest
            ]
        self.transactions.append(tx_hash)
        self.gas += gas
        paid = [w for w in rest if w[1].cumulative <= target.cumulative and (target.close or not w[1].close)]
        out = await engine.settled(paid, tx_hash, "settled", gas=gas)
        lost = [w for w in rest if w not in paid]  # a settle above the close voucher: the channel is shut
        detail = f"the channel was closed at {target.cumulative} in {tx_hash}"
        return out + [await engine.dead(w, "channel_finalized", detail) for w in lost]

    def parties(self, payment: ChannelVoucher) -> Parties:
        return Parties(payment.cumulative, payment.payer, payment.payee)

    def retry_at(self, engine: Engine, payment: ChannelVoucher, *, delay: float) -> float:
        return engine.clock() + delay

    def gives_up(self, payment: ChannelVoucher, now: float) -> bool:
        # A voucher never expires. A close is retried only while it may have been sent (its receipt late, the
        # channel unreadable): a close that surely failed is dead at once (`_send`), the payer may ask again.
        return False

    async def on_settled(self, engine: Engine, job: Work) -> None:
        return None  # no counters: the channel's own numbers are on chain and in the high-water marks

    async def on_dead(self, engine: Engine, job: Work, *, recorded: bool) -> None:
        return None


def _covered(v: ChannelVoucher, info: ChannelInfo) -> bool:
    """The chain already paid this voucher (a close: only once the channel is finalized)."""
    return info.settled >= v.cumulative and (info.finalized or not v.close)


def _sent(jobs: Sequence[Work]) -> str:
    """The transaction a job recorded as sent, if any (the one that paid it, most likely)."""
    for item, _ in jobs:
        found = pending_transactions(item.error)
        if found:
            return found[-1]
    return ""


async def _later(engine: Engine, w: Work, error: str) -> SettleOutcome:
    """Recovery found it unpaid: the settler's loop sends it after the usual backoff."""
    item = w[0]
    retry_at = engine.clock() + engine.backoff(item.attempts)
    await engine.store.mark_failed(item.key, error=error, retry_at=retry_at, lease=item.lease_token)
    return engine.outcome(w, "retry", code=error.split(":", 1)[0])


_DEFAULTS: Final[EngineOptions] = {
    "kind": KIND,
    "batch_size": 64,
    "max_age": 0.0,  # what is queued is due: the paywall already waited for `settle_every` of charges
    "retry_cap": 60.0,
    "lease_seconds": 60.0,
}


class ChannelSettler(SettlementEngine[ChannelVoucher, SettlementQueue]):
    """Settles queued channel vouchers through `chain` (sent by the payee's key: only it may settle).

    Besides `run` (a loop), `kick()` starts a drain in the background right after an enqueue, and
    `wait_for(key)` waits for one item's outcome (the paywall answers a close with its transaction).
    `transactions` and `gas` count what it sent (the benchmark reads both).
    """

    def __init__(self, store: SettlementQueue, chain: ChannelChain, **options: Unpack[EngineOptions]) -> None:
        self.part = ChannelSettlement(chain)
        settings: EngineOptions = {**_DEFAULTS, **options}
        super().__init__(store, self.part, **settings)
        self.chain = chain
        self.transactions = self.part.transactions
        self._stepping = asyncio.Lock()  # `run`, `kick` and `drain` may overlap: one step at a time
        self._kicked: asyncio.Task[None] | None = None
        self._again = False
        self._waiters: dict[str, asyncio.Future[SettleOutcome]] = {}

    @property
    def gas(self) -> int:
        """Total gasUsed of the transactions this settler sent."""
        return self.part.gas

    async def step(self, *, force: bool = False) -> list[SettleOutcome]:
        async with self._stepping:
            return await super().step(force=force)

    async def settle_items(self, items: Sequence[QueuedItem]) -> list[SettleOutcome]:
        out = await super().settle_items(items)
        for outcome in out:
            waiter = self._waiters.pop(outcome.key, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(outcome)
        return out

    def kick(self) -> None:
        """Drain what is due, in the background (coalesced: one drain at a time, rerun if kicked again)."""
        if self._kicked is not None and not self._kicked.done():
            self._again = True
            return
        self._kicked = asyncio.get_running_loop().create_task(self._drain_kicked())

    async def _drain_kicked(self) -> None:
        self._again = True
        while self._again:
            self._again = False
            try:
                await super().drain()
            except Exception as exc:  # the queue keeps it: the next kick, the loop or a drain retries
                log.error("channel settlement failed: %r", exc)
                return

    async def drain(self) -> list[SettleOutcome]:
        if self._kicked is not None:
            with contextlib.suppress(Exception):
                await self._kicked
        return await super().drain()

    def watch(self, key: str) -> asyncio.Future[SettleOutcome]:
        """The future outcome of the item `key`: watch it before it is queued, so no outcome is missed."""
        return self._waiters.setdefault(key, asyncio.get_running_loop().create_future())

    async def wait_for(self, key: str, *, timeout: float) -> SettleOutcome | None:
        """Kick a drain; wait up to `timeout` for the outcome of the queued item `key` (None: not in time)."""
        waiter = self.watch(key)
        self.kick()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            return None
        finally:
            if not waiter.done():  # nobody waits any more: an outcome that comes later is not kept
                self._waiters.pop(key, None)
