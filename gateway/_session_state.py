"""Session state shared by the session paywall and billed streams: routes, problems, channels, SSE billing.

`billed_sse` bills one unit per item a handler yields: when the channel's credit runs out it sends the
draft's `payment-need-voucher` event and pauses (it does not fail) until a voucher arrives on a separate
request, or until `VOUCHER_WAIT` passes; it ends with a `payment-receipt` event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import msgspec
from starlette.requests import Request

from x402 import X402Error
from x402._session import SessionReceipt, VoucherVerifier

from ._channels import ChannelInfo
from ._pricing import Asset, to_atomic

__all__ = [
    "PROBLEMS",
    "SCOPE_KEY",
    "VOUCHER_WAIT",
    "charged_key",
    "Channel",
    "Context",
    "KeyedLocks",
    "SessionProblem",
    "SessionRoute",
    "billed_sse",
]


class _Biller(Protocol):
    asset: Asset

    async def _commit(self, ch: Channel, cost: int) -> None: ...

    async def _hold(self, ch: Channel, amount: int) -> bool: ...

    def _receipt(
        self, ch: Channel, challenge: str, *, units: int | None = None, tx: str | None = None
    ) -> SessionReceipt: ...


PROBLEMS = "https://paymentauth.org/problems/session/"
SCOPE_KEY = "agentpay.session"
#: A stream waiting for a voucher gives up after this long (the draft: about 60 s).
VOUCHER_WAIT = 60.0


class SessionRoute(msgspec.Struct, frozen=True, kw_only=True):
    """A route paid over a session: `unit_price` per unit; a request reserves `units` units at most.

    `metered`: the handler reports the actual charge (at most `units * unit_price`); otherwise a request
    costs exactly `units * unit_price`. `stream`: the handler bills per unit with `billed_sse`.
    """

    unit_price: Any  # Amount
    units: int = 1
    unit_type: str = "request"
    metered: bool = False
    stream: bool = False
    suggested_deposit: Any = None  # Amount | None


class SessionProblem(X402Error):
    """A session credential refused: `kind` is the draft's problem type, `state` the channel's numbers."""

    default_code = "session_refused"
    default_status = 402

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int = 402,
        state: dict[str, Any] | None = None,
        base: str = PROBLEMS,
    ):
        super().__init__(message, code=kind, status_hint=status)
        self.kind = kind
        self.state = state or {}
        self.type = base + kind  # a session problem, or one of the core spec's (`malformed-credential`)


def charged_key(channel_id: str) -> str:
    """The store's count (`add_pending`) of what every process sharing the store charged, or holds for a
    request in flight, on a channel: bounded by the accepted voucher, so replicas never serve it twice."""
    return "session:" + channel_id


class KeyedLocks:
    """One `asyncio.Lock` per key, kept only while someone holds or awaits it: keys come from requests
    (channel ids, payers), so a lock left behind per key would let anyone grow the gateway's memory."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        """How many keys are held or awaited now."""
        return len(self._locks)


class Channel:
    """What the paywall knows of one channel; mutated only under `lock`."""

    #: Vouchers above `spent` kept in memory: past it every other one is dropped (the newest kept), since a
    #: payer may send one per atomic unit of its deposit uncharged. Only how finely charges can be settled
    #: before the next voucher or the close suffers, never what is paid (the close pays exactly `spent`).
    MAX_VOUCHERS = 64

    def __init__(self, channel_id: str, info: ChannelInfo, accepted: int, spent: int) -> None:
        self.id = channel_id
        self.info = info
        self.accepted = accepted
        self.spent = spent
        self.reserved = 0
        # Accepted vouchers above `spent`, ascending: (cumulative, signature). Each becomes `settleable`, the
        # highest voucher not above `spent` (the most the payee may take), once charges reach it.
        self.vouchers: list[tuple[int, str]] = []
        self.settleable: tuple[int, str] | None = None
        self.queued = info.settled  # the highest voucher handed to the settler (or settled on chain)
        self.lock = asyncio.Lock()
        self.changed = asyncio.Condition(self.lock)
        self.closed = False

    @property
    def info(self) -> ChannelInfo:
        return self._info

    @info.setter
    def info(self, info: ChannelInfo) -> None:
        self._info = info
        self.signer_bytes = bytes.fromhex(info.signer[2:])  # compared with each voucher's recovered signer
        self.verifier: VoucherVerifier | None = None  # built by the paywall on the next voucher

    def state(self) -> dict[str, Any]:
        return {
            "channelId": self.id,
            "acceptedCumulative": str(self.accepted),
            "spent": str(self.spent),
            "deposit": str(self.info.deposit),
        }


class Context:
    """The session a request is paid over, for `billed_sse` and `charge()`."""

    def __init__(self, paywall: _Biller, channel: Channel, challenge: str, route: SessionRoute) -> None:
        self.paywall = paywall
        self.channel = channel
        self.challenge = challenge
        self.unit = to_atomic(route.unit_price, paywall.asset.decimals)
        self.units = 0

    async def debit(self, units: int = 1) -> bytes | None:
        """Charge `units`; when the credit is short, return the `payment-need-voucher` event to send and
        wait (call again after sending it). None: charged. b"": the channel was closed, stop serving."""
        ch, cost = self.channel, self.unit * units
        async with ch.lock:
            if ch.closed:  # its close voucher covers what was spent until now, nothing after
                return b""
            if ch.accepted - ch.spent - ch.reserved >= cost and await self.paywall._hold(ch, cost):
                await self.paywall._commit(ch, cost)
                self.units += units
                return None
            need = {
                "channelId": ch.id,
                "requiredCumulative": str(ch.spent + ch.reserved + cost),
                "acceptedCumulative": str(ch.accepted),
                "deposit": str(ch.info.deposit),
            }
            return _event("payment-need-voucher", msgspec.json.encode(need))

    async def wait_voucher(self, timeout: float) -> bool:
        ch = self.channel
        async with ch.lock:
            before = ch.accepted
            try:
                await asyncio.wait_for(
                    ch.changed.wait_for(lambda: ch.accepted > before or ch.closed), timeout
                )
            except TimeoutError:
                return False
            return not ch.closed

    def receipt(self, *, units: int | None = None) -> SessionReceipt:
        return self.paywall._receipt(self.channel, self.challenge, units=units)


def _event(name: str, data: bytes) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


async def billed_sse(request: Request, units: AsyncIterable[str]) -> AsyncIterable[bytes]:
    """SSE body billing one unit per item of `units` over the request's session.

    Pauses (sends `payment-need-voucher`, waits for a voucher) when the credit runs out; ends with
    `payment-receipt`. Without a session (an unpaid route) it streams unbilled.
    """
    ctx: Context | None = request.scope.get(SCOPE_KEY)
    async for item in units:
        if ctx is not None:
            while (need := await ctx.debit()) is not None:
                if need:
                    yield need
                if not need or not await ctx.wait_voucher(VOUCHER_WAIT):
                    yield _event("payment-receipt", msgspec.json.encode(ctx.receipt(units=ctx.units)))
                    return
        yield b"event: message\ndata: " + item.encode() + b"\n\n"
    if ctx is not None:
        yield _event("payment-receipt", msgspec.json.encode(ctx.receipt(units=ctx.units)))
