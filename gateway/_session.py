"""MPP `session` intent (draft-evm-session-00) on AgentChannels: a paywall for per-unit priced routes.

A payer opens a channel on AgentChannels (deposit, `authorizedSigner` = its session key) and then sends,
with each request, a cumulative voucher: "the payee may take N in total". This paywall checks vouchers
with no chain call per request: the channel (payer, signer, deposit) is read once and cached; the
signature is recovered locally; the highest voucher (`acceptedCumulative`) and what was charged (`spent`)
are persisted in the store (`raise_high_water`, under `<channel>` and `<channel>#spent`) before the
handler runs. Voucher acceptance and charges are serialized per channel.

Charges: a request route reserves its maximum (`SessionRoute.unit_price * units`) out of the channel's
available credit (`accepted - spent`), runs the handler, and charges the actual amount (`charge()` or
`Settlement-Overrides`, see `_metering`). A stream route (`stream=True`) charges per unit as the handler
produces them (`billed_sse`): when the credit runs out it sends `payment-need-voucher` and pauses until a
voucher arrives on a separate request (which is not itself charged), then resumes; it ends with a
`payment-receipt` event.

Sharing a route: when the wrapped app is a `PaymentMiddleware` that prices a session route too (e.g. a
metered route offered as x402 `upto` and metered `escrow` as well), a request without a session credential
goes to it, and its 402 gets this paywall's `evm/session` challenge added: one answer offers everything. A
request paid over the session is marked in its scope, so the middleware lets it through to the handler,
whose `charge()` sets the session's charge.

Settlement: vouchers are pre-authorizations ahead of `spent`; the highest voucher not above `spent` is the
channel's settleable voucher. Each one accepted is stored with the channel's high-water mark, and the
settleable one with the `spent` mark, in the same atomic store step (`raise_high_water(..., voucher=)`), so a
restarted gateway can still settle what it served. The settleable voucher is queued in the store's
settlement queue (kind `channel`) once it is `settle_every` past what was queued, when a restarted gateway
first sees the channel again, on `settle(channel)` and at shutdown; `close` queues the payer's final voucher
(which the payer signs for exactly `spent`). `ChannelSettler` (the settlement engine's `channel` part)
sends them. So the payee receives exactly the actual charges.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from escrow import Chain, EscrowError, TxSender
from x402 import (
    MalformedPayment,
    MppChallenge,
    X402Error,
    challenge_id,
    encode_json_param,
    format_www_authenticate,
    parse_credential,
    rfc3339,
    verify_challenge,
)
from x402._session import SessionAction, VoucherVerifier, parse_session_payload

from ._channels import (
    AgentChannelsChain,
    ChannelChain,
    ChannelInfo,
    ChannelSettler,
)
from ._errors import ConfigurationError
from ._metering import PAID_SCOPE_KEY, Meter
from ._pricing import Amount, Asset, to_atomic
from ._session_deposit import SessionDeposits
from ._session_settle import SessionSettling, pack_voucher
from ._session_settle import receipt_headers as _receipt_headers
from ._session_state import (
    PROBLEMS,
    SCOPE_KEY,
    Channel,
    Context,
    KeyedLocks,
    SessionProblem,
    SessionRoute,
    billed_sse,
)
from ._session_topup import SessionTopUps
from ._store import PaymentStore, StoreError
from ._stores import open_store
from ._stores.memory import MemoryStore

__all__ = ["SessionPaywall", "SessionProblem", "SessionRoute", "billed_sse"]

log = logging.getLogger("agentpay.gateway.session")


class SessionPaywall(SessionDeposits, SessionSettling, SessionTopUps):
    """ASGI middleware paying `routes` (exact paths, any method) over MPP sessions on one AgentChannels.

    `fee_payer`: offer server-submitted opens and top-ups (the chain's sender relays the payer's signed
    deposit and pays the gas, see `_session_deposit`). `watch_interval`: how often (seconds) the lifespan's
    loop re-reads the channels served, to settle at once one whose payer asked the chain to close
    (`watch`)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Mapping[str, SessionRoute],
        chain: ChannelChain,
        asset: Asset,
        pay_to: str,
        store: PaymentStore | str,
        secret: bytes | str,
        realm: str = "agentpay",
        settler: ChannelSettler | None = None,
        settle_every: Amount = 0,
        challenge_ttl: float = 300.0,
        fee_payer: bool = False,
        watch_interval: float = 60.0,
    ) -> None:
        self.app = app
        self.fee_payer = fee_payer
        self._relaying = KeyedLocks()  # per payer: its relays one at a time, each simulated after the last
        self._relayed: dict[str, str] = {}  # the last RELAY_MEMORY relayed nonces (oldest first)
        self._closing: dict[str, str] = {}  # channel -> its close in the settlement queue, not yet final
        self.relay_transactions: deque[str] = deque(maxlen=self.RELAY_MEMORY)  # the latest ones
        self.relay_gas = 0
        self.relay_reverts = 0  # relayed deposits that passed their simulation and reverted (front-run)
        self.relay_reverted_gas = 0  # the gas they cost the gateway
        self._top_ups: dict[str, tuple[str, int]] = {}  # top-up hash -> (channel, deposit it made)
        self._top_up_reads: dict[str, deque[float]] = {}  # per channel: the latest top-up receipt reads
        self.top_up_receipt_reads = 0
        self.routes = dict(routes)
        self.chain = chain
        self.asset = asset
        self.pay_to = pay_to
        self._store_url = store if isinstance(store, str) else None
        self._opened: PaymentStore | None = None if isinstance(store, str) else store
        self.secret = secret
        self.realm = realm
        # Until a URL store opens (first request or lifespan startup), the settler holds a placeholder it
        # never reads: nothing is queued before the store is open.
        self.settler = (
            settler if settler is not None else ChannelSettler(self._opened or MemoryStore(), chain)
        )
        self.settle_every = to_atomic(settle_every, asset.decimals)
        self.challenge_ttl = challenge_ttl
        self._channels: dict[str, Channel] = {}
        self._loading = KeyedLocks()
        # `PaymentMiddleware.prices`: whether the wrapped app charges a request itself (a shared route).
        prices = getattr(app, "prices", None)
        self._inner_prices: Callable[[Scope], bool] | None = prices if callable(prices) else None
        self._params: dict[SessionRoute, str] = {}
        self._stop = asyncio.Event()
        self._running: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None
        if not 0 < watch_interval < 300:
            raise ConfigurationError("watch_interval must be under 300 s (a payer's close: 900 s)")
        self.watch_interval = watch_interval

    @classmethod
    def on_chain(
        cls,
        app: ASGIApp,
        chain: Chain,
        *,
        channels: str,
        payee_key: str,
        routes: Mapping[str, SessionRoute],
        store: PaymentStore | str = "memory://",
        secret: bytes | str,
        **options: Any,
    ) -> SessionPaywall:
        """Sessions on the AgentChannels at `channels` of `chain`, settled by the payee's key (the
        contract lets only the payee settle and close)."""
        network = chain.network
        sender = TxSender(chain.settle_rpc, payee_key, chain_id=network.chain_id)
        asset = Asset(
            address=network.token,
            chain_id=network.chain_id,
            name=network.token_name,
            version=network.token_version,
            decimals=network.token_decimals,
        )
        channel_chain = AgentChannelsChain(chain.rpc, channels, chain_id=network.chain_id, sender=sender)
        return cls(
            app,
            routes=routes,
            chain=channel_chain,
            asset=asset,
            pay_to=sender.address,
            store=store,
            secret=secret,
            **options,
        )

    @property
    def store(self) -> PaymentStore:
        if self._opened is None:
            raise RuntimeError("the session store opens with the first paid request")
        return self._opened

    async def _open_store(self) -> PaymentStore:
        if self._opened is None:
            assert self._store_url is not None
            self._opened = await open_store(self._store_url)
            self.settler.store = self._opened
        return self._opened

    # -- wire --------------------------------------------------------------------------------------------

    def request_object(self, route: SessionRoute) -> dict[str, Any]:
        request: dict[str, Any] = {
            "amount": str(to_atomic(route.unit_price, self.asset.decimals)),
            "unitType": route.unit_type,
            "currency": self.asset.address,
            "recipient": self.pay_to,
            "methodDetails": {
                "chainId": self.chain.chain_id,
                "escrowContract": self.chain.escrow,
                "minVoucherDelta": "0",
                "credentialTypes": self.credential_types,
            },
        }
        if self.fee_payer:
            request["methodDetails"]["feePayer"] = True
        if route.suggested_deposit is not None:
            request["suggestedDeposit"] = str(to_atomic(route.suggested_deposit, self.asset.decimals))
        return request

    def _request_param(self, route: SessionRoute) -> str:
        """The route's encoded `request` parameter, built once: a presented challenge is compared with it as
        a string (its HMAC already binds these very bytes), not decoded and rebuilt per request."""
        param = self._params.get(route)
        if param is None:
            param = self._params[route] = encode_json_param(self.request_object(route))
        return param

    def challenge(self, route: SessionRoute) -> MppChallenge:
        request = self._request_param(route)
        expires = rfc3339(time.time() + self.challenge_ttl)
        cid = challenge_id(self.secret, self.realm, "evm", "session", request, expires)
        return MppChallenge(
            id=cid, realm=self.realm, method="evm", intent="session", request=request, expires=expires
        )

    async def _problem(self, send: Send, route: SessionRoute, exc: SessionProblem | X402Error) -> None:
        kind = exc.kind if isinstance(exc, SessionProblem) else "invalid-credential"
        body: dict[str, Any] = {
            "type": exc.type if isinstance(exc, SessionProblem) else PROBLEMS + kind,
            "title": kind.replace("-", " "),
            "status": exc.status_hint,
            "detail": exc.message,
        }
        if isinstance(exc, SessionProblem):
            body.update(exc.state)
            if kind == "amount-exceeds-deposit":
                body["title"] = "insufficient deposit"
        headers = [(b"content-type", b"application/problem+json")]
        if exc.status_hint == 402:
            headers.append((b"www-authenticate", format_www_authenticate(self.challenge(route)).encode()))
        raw = msgspec.json.encode(body)
        headers.append((b"content-length", str(len(raw)).encode()))
        await send({"type": "http.response.start", "status": exc.status_hint, "headers": headers})
        await send({"type": "http.response.body", "body": raw})

    # -- channel state -----------------------------------------------------------------------------------

    async def _channel(self, channel_id: str) -> Channel:
        ch = self._channels.get(channel_id)
        if ch is not None:
            return ch
        async with self._loading.hold(channel_id):
            ch = self._channels.get(channel_id)
            if ch is not None:
                return ch
            info = await self.chain.channel(channel_id)  # once per channel
            self._check_channel(channel_id, info)
            ch = await self._restore(channel_id, info)
            self._channels[channel_id] = ch
            return ch

    def _check_channel(self, channel_id: str, info: ChannelInfo) -> None:
        if not info.exists:
            raise SessionProblem("channel-not-found", f"no channel {channel_id} on this escrow", status=410)
        if info.finalized:
            raise SessionProblem("channel-finalized", f"channel {channel_id} is closed", status=410)
        if info.payee.lower() != self.pay_to.lower() or info.token.lower() != self.asset.address.lower():
            raise SessionProblem("channel-mismatch", "the channel pays another payee or token")

    async def _refresh(self, ch: Channel) -> None:
        """Re-read the channel (a top-up, or a voucher above the cached deposit): the rare path."""
        info = await self.chain.channel(ch.id)
        self._check_channel(ch.id, info)
        ch.info = info

    def _check_signature(self, ch: Channel, action: SessionAction) -> None:
        assert action.cumulative is not None and action.signature is not None
        try:
            verifier = ch.verifier
            if verifier is None:  # once per channel (and after a re-read): the typed data's fixed part
                verifier = ch.verifier = VoucherVerifier(
                    chain_id=self.chain.chain_id,
                    escrow=self.chain.escrow,
                    channel=ch.id,
                    signer=ch.signer_bytes,
                )
            ok = verifier.signed_by(action.cumulative, action.signature)
        except X402Error:
            raise SessionProblem(
                "invalid-signature", "the voucher signature is invalid", state={"channelId": ch.id}
            ) from None
        if not ok:  # the channel's amounts are told only to its signer
            raise SessionProblem(
                "signer-mismatch",
                "the voucher is not signed by the channel's signer",
                state={"channelId": ch.id},
            )

    async def _accept(self, ch: Channel, action: SessionAction) -> None:
        """Steps 1-10 of the draft's voucher verification; caller holds `ch.lock`."""
        assert action.cumulative is not None and action.signature is not None
        if ch.closed or ch.info.close_requested_at:
            raise SessionProblem("channel-finalized", "the payer asked to close this channel", status=410)
        self._check_signature(ch, action)
        if action.cumulative == ch.accepted:
            return  # the same voucher again: a no-op once its signature is checked
        if action.cumulative < ch.accepted:
            raise SessionProblem(
                "stale-voucher", "the voucher is below the highest one accepted", state=ch.state()
            )
        if action.cumulative > ch.info.deposit:
            await self._refresh(ch)
            if action.cumulative > ch.info.deposit:
                raise SessionProblem(
                    "amount-exceeds-deposit",
                    f"the voucher ({action.cumulative}) is above the deposit ({ch.info.deposit})",
                    state=ch.state(),
                )
        # persisted (with the voucher itself) before serving
        await self.store.raise_high_water(
            ch.id, action.cumulative, voucher=pack_voucher((action.cumulative, action.signature))
        )
        ch.accepted = action.cumulative
        ch.vouchers.append((action.cumulative, action.signature))
        if len(ch.vouchers) > ch.MAX_VOUCHERS:
            ch.vouchers[:] = ch.vouchers[::-2][::-1]  # every other one, the newest kept: still ascending
        ch.changed.notify_all()

    async def _commit(self, ch: Channel, cost: int) -> None:
        """Charge `cost` (caller holds the lock); queue the settleable voucher every `settle_every`."""
        if not cost:
            return
        ch.spent += cost
        i = bisect.bisect_right(ch.vouchers, (ch.spent, "\xff"))
        if i:
            ch.settleable = ch.vouchers[i - 1]
            del ch.vouchers[:i]
        # the charge and the voucher that pays for it, in one atomic step
        await self.store.raise_high_water(
            ch.id + "#spent", ch.spent, voucher=pack_voucher(ch.settleable) if i else None
        )
        if self.settle_every and ch.settleable and ch.settleable[0] - ch.queued >= self.settle_every:
            await self._queue_settleable(ch)

    # -- ASGI --------------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._lifespan(receive), send)
            return
        route = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        auth = _header(scope, b"authorization")
        if self._inner_prices is not None and self._inner_prices(scope) and not _is_session(auth):
            # A route the wrapped paywall prices too: it answers, its 402 also offering our session.
            await self.app(scope, receive, self._add_challenge(send, route))
            return
        if auth is None or not auth[:8].lower() == "payment ":
            await self._problem(send, route, SessionProblem("payment-required", "pay over an MPP session"))
            return
        try:
            credential = parse_credential(auth[8:].strip())
            ch_ = credential.challenge
            if not verify_challenge(self.secret, ch_) or ch_.intent != "session" or ch_.method != "evm":
                raise SessionProblem("challenge-not-found", "the challenge was not issued here")
            if ch_.request != self._request_param(route):
                raise SessionProblem("challenge-mismatch", "the challenge was issued for another route")
            expires = ch_.expires_at()
            if expires is not None and expires.timestamp() < time.time():
                raise SessionProblem("challenge-expired", "the challenge has expired")
            action = parse_session_payload(credential.payload)
            self._check_type(action)
            await self._open_store()
            deposit = action.deposit  # processed first: if it fails, the whole credential is refused
            if deposit is not None and deposit.kind == "open":
                await self._relay(action, deposit, None, minimum=self.least_deposit)
            if action.action == "topUp" and deposit is None:  # unsigned: checked before any channel read
                made = await self._top_up_deposit(action)
                ch = None if made is None else await self._channel(action.channel)
                if ch is not None and made is not None:
                    await self._apply_top_up(ch, made)
                await self._no_content(send, ch, ch_.id, private=True)
                return
            ch = await self._channel(action.channel)
            if deposit is not None and deposit.kind == "topUp":
                await self._relay(action, deposit, ch.info.payer, minimum=self.least_deposit)
        except EscrowError as exc:  # the one chain read of a new channel failed: retry later, never a 500
            log.warning("reading channel failed: %s", exc)
            await self._problem(send, route, SessionProblem("chain-unavailable", "retry later", status=503))
            return
        except StoreError as exc:  # the database is down: retry later, never a 500; nothing was charged
            log.warning("session store unavailable: %s", exc)
            await self._problem(send, route, SessionProblem("store-unavailable", "retry later", status=503))
            return
        except (SessionProblem, X402Error) as exc:
            if isinstance(exc, MalformedPayment):
                exc.status_hint = 400
            await self._problem(send, route, exc)
            return
        try:
            await self._serve(scope, receive, send, route, ch, action, ch_.id)
        except SessionProblem as exc:
            await self._problem(send, route, exc)
        except EscrowError as exc:  # a top-up or deposit re-read failed on the chain
            log.warning("channel %s: chain read failed: %s", ch.id, exc)
            await self._problem(send, route, SessionProblem("chain-unavailable", "retry later", status=503))
        except StoreError as exc:  # a voucher or charge could not be recorded: not served (or not charged)
            log.warning("channel %s: store failed: %s", ch.id, exc)
            await self._problem(send, route, SessionProblem("store-unavailable", "retry later", status=503))

    def _add_challenge(self, send: Send, route: SessionRoute) -> Send:
        async def challenging(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 402:
                challenge = format_www_authenticate(self.challenge(route)).encode()
                message = {
                    **message,
                    "headers": [*message.get("headers", ()), (b"www-authenticate", challenge)],
                }
            await send(message)

        return challenging

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: SessionRoute,
        ch: Channel,
        action: SessionAction,
        cid: str,
    ) -> None:
        if action.action == "topUp":
            async with ch.lock:
                await self._refresh(ch)
                ch.changed.notify_all()
            await self._no_content(send, ch, cid)
            return
        if action.action == "close":
            await self._close(send, ch, action, cid)
            return
        maximum = 0 if route.stream else to_atomic(route.unit_price, self.asset.decimals) * route.units
        async with ch.lock:
            await self._accept(ch, action)
            if (
                action.action == "open"
                or _header(scope, b"x-payment-voucher-only") is not None
                or (route.stream and _is_voucher_post(scope))
            ):
                # A voucher posted to resume a stream (or an open) is management: it is not charged.
                voucher_only = True
            else:
                voucher_only = False
                if ch.accepted - ch.spent - ch.reserved < maximum or not await self._hold(ch, maximum):
                    raise SessionProblem(
                        "insufficient-balance",
                        "the voucher does not cover this request",
                        state={**ch.state(), "requiredCumulative": str(ch.spent + ch.reserved + maximum)},
                    )
                ch.reserved += maximum
        if voucher_only:
            await self._no_content(send, ch, cid)
            return
        if route.stream:
            scope[SCOPE_KEY] = Context(self, ch, cid, route)
        meter = Meter(maximum, self.asset.decimals)
        meter.install(scope)
        scope[PAID_SCOPE_KEY] = True  # paid here: a `PaymentMiddleware` inside lets it through
        committed = False

        async def paid_send(message: Message) -> None:
            nonlocal committed
            if message["type"] == "http.response.start" and not committed:
                committed = True
                message = meter.take_override(message)
                status = int(message["status"])
                async with ch.lock:
                    ch.reserved -= maximum
                    # A failed handler is not charged; a streamed route charged its units as it went.
                    cost = meter.actual if status < 400 and not route.stream else 0
                    await self._commit(ch, cost)
                    await self._unhold(ch, maximum - cost)
                    receipt = self._receipt(ch, cid)
                message = {**message, "headers": [*message.get("headers", ()), *_receipt_headers(receipt)]}
            await send(message)

        try:
            await self.app(scope, receive, paid_send)
        finally:
            if not committed:
                async with ch.lock:
                    ch.reserved -= maximum
                    await self._unhold(ch, maximum)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _is_session(auth: str | None) -> bool:
    """Whether `auth` is an MPP credential for a session challenge (any other goes to the wrapped app)."""
    if auth is None or auth[:8].lower() != "payment ":
        return False
    try:
        return parse_credential(auth[8:].strip()).challenge.intent == "session"
    except X402Error:
        return False


def _is_voucher_post(scope: Scope) -> bool:
    return scope["method"] in ("POST", "HEAD")
