"""Verifying `escrow` payments for a gateway: the signature offline, the grant from a cache, the rest by one
`check` call, and the claim a settler later redeems.

Grant cache. `grantOf` and `isPayeeAllowed` answers are cached per (payer, signer). Before answering, the
cache makes sure it has polled the escrow's `GrantIssued`/`GrantRevoked` logs within the last
`poll_interval` (one `eth_getLogs` from the last block it saw, shared by concurrent callers), dropping every
entry those logs touch; entries also expire after `ttl`, and a settler's outcomes invalidate them. The cache
only serves early refusals (`precheck`) and the payee list: `confirm` reads the grant again in the same
`eth_call` as the deposit, so the budget, epoch and revocation a payment is reserved against are those of the
latest block, never the cache's. A payment revoked after verification fails on chain and the settler reports
it (`escrow_grant_revoked`).

Spend accounting (see `EscrowClaim` and `escrow.payments._exposure`): the store's counters hold, per
deposit pool and
per grant epoch, what the gateways sharing the store *reserved* (accepted, not given back) and *settled*. A
payment is accepted only if, for both pools,

    reserved + amount <= available_on_chain + settled

checked and added atomically by `store.add_pending`, so concurrent requests can never reserve past the
deposit (net of a requested withdrawal) or the budget. Spend through gateways on other stores is seen once it
settles; what they spend meanwhile is the credit risk each gateway caps with its per-payer credit limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgspec
from eth_utils.address import to_checksum_address

from x402 import Eip712Domain, InvalidSignature
from x402._escrow import EscrowCode, EscrowPayload, escrow_domain, reason_code, recover_payment

from ..chain._artifacts import EscrowError
from ._escrow import AgentEscrow, GrantInfo, payment_tuple

__all__ = [
    "EscrowClaim",
    "EscrowRejected",
    "EscrowVerifier",
    "GrantCache",
    "PrecheckedEscrowPayment",
    "VerifiedEscrowPayment",
    "accounts_for",
]


class EscrowRejected(EscrowError):
    """An `escrow` payment the gateway refuses; `code` is the scheme's stable code (`EscrowCode`)."""

    status_hint = 402

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


class EscrowClaim(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """What the settlement queue holds for one served `escrow` payment.

    The store accounts are the pending counters the settler moves once the outcome is known: `credit`
    (unsettled amount this gateway serves the payer, released on any outcome), `reserved` / `settled` (the
    grant budget: given back only on failure / raised on settlement) and `deposit_reserved` /
    `deposit_settled` (the same for the payer's deposit pool, see `escrow.payments._exposure`).
    `from_block` bounds the log search that tells "settled by someone else" from "nonce used by another
    payment".
    """

    chain_id: int
    escrow: str
    signer: str
    payload: EscrowPayload
    from_block: int = 0
    credit: str | None = None
    reserved: str | None = None
    settled: str | None = None
    deposit_reserved: str | None = None
    deposit_settled: str | None = None


def accounts_for(chain_id: int, escrow: str, payer: str, signer: str, epoch: int) -> tuple[str, str, str]:
    """(credit, reserved, settled) store accounts of a payment."""
    base = f"escrow:{chain_id}:{escrow.lower()}:{payer.lower()}"
    grant = f"{base}:{signer.lower()}:{epoch}"
    return f"{base}:credit", f"{grant}:reserved", f"{grant}:settled"


class _Entry:
    __slots__ = ("at", "grant", "payees")

    def __init__(self, grant: GrantInfo, at: float) -> None:
        self.grant = grant
        self.at = at
        self.payees: dict[str, bool] = {}


class GrantCache:
    """Grant state of one escrow, invalidated by its events (see the module docstring)."""

    def __init__(
        self,
        escrow: AgentEscrow,
        *,
        poll_interval: float = 1.0,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.escrow = escrow
        self.poll_interval = poll_interval
        self.ttl = ttl
        self.clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._next_block: int | None = None
        self._polled_at = float("-inf")
        self._lock = asyncio.Lock()
        self.head = 0  # the latest block the cache has seen

    def invalidate(self, payer: str, signer: str) -> None:
        self._entries.pop((payer.lower(), signer.lower()), None)

    async def poll(self) -> int:
        """Read grant events since the last poll and drop what they touch; returns how many entries went."""
        head = int(await self.escrow.rpc.request("eth_blockNumber", []), 16)
        start = head if self._next_block is None else self._next_block
        dropped = 0
        if self._next_block is not None and start <= head:
            events = await self.escrow.logs(["GrantIssued", "GrantRevoked"], from_block=start, to_block=head)
            for event in events:
                key = (str(event.args["payer"]).lower(), str(event.args["signer"]).lower())
                dropped += self._entries.pop(key, None) is not None
        elif self._next_block is None:
            self._entries.clear()  # nothing cached can predate the first poll
        self._next_block = head + 1
        self.head = head
        return dropped

    async def _fresh(self) -> None:
        if self.clock() - self._polled_at < self.poll_interval:
            return
        async with self._lock:
            if self.clock() - self._polled_at < self.poll_interval:
                return  # another caller polled while this one waited
            started = self.clock()
            await self.poll()
            self._polled_at = started

    async def grant(self, payer: str, signer: str) -> GrantInfo:
        await self._fresh()
        key = (payer.lower(), signer.lower())
        entry = self._entries.get(key)
        now = self.clock()
        if entry is None or now - entry.at >= self.ttl:
            entry = _Entry(await self.escrow.grant_of(payer, signer), now)
            self._entries[key] = entry
        return entry.grant

    async def payee_allowed(self, payer: str, signer: str, payee: str) -> bool:
        grant = await self.grant(payer, signer)
        if grant.payee_count == 0:
            return grant.live
        entry = self._entries[(payer.lower(), signer.lower())]
        allowed = entry.payees.get(payee.lower())
        if allowed is None:
            allowed = await self.escrow.is_payee_allowed(payer, signer, payee)
            entry.payees[payee.lower()] = allowed
        return allowed


class PrecheckedEscrowPayment(msgspec.Struct, frozen=True, kw_only=True):
    """A payment that passed every offline check and the cached grant: `EscrowVerifier.confirm` is next."""

    payload: EscrowPayload
    signer: str
    grant: GrantInfo | None  # the cached grant; None when the payer signed for itself


class VerifiedEscrowPayment(msgspec.Struct, frozen=True, kw_only=True):
    payload: EscrowPayload
    signer: str
    grant: GrantInfo | None  # as of `block`'s chain read; None when the payer signed for itself
    expires_soon: bool  # the grant or payment ends before a deferred settlement could land: settle now
    block: int
    deposit: int = 0  # the payer's `depositOf(token)`, read with the grant
    withdrawal: int = 0  # the payer's requested withdrawal of `token` (`withdrawalOf().amount`)


def _reject(code: str, message: str) -> EscrowRejected:
    return EscrowRejected(code, message)


class EscrowVerifier:
    """Checks `escrow` payments against one escrow contract.

    `min_validity`: a payment's deadline must be at least this far ahead. `settle_margin`: if the payment's
    deadline or the grant's window ends sooner than this, the payment is still valid but must be settled
    before it is served (`expires_soon`). `simulate`: also run the contract's own `check` in `confirm`'s
    `eth_call` (the nonce and the signature as the contract sees them); without it, replay protection is the
    store's claim. The grant, deposit and withdrawal are read in that call either way.
    """

    def __init__(
        self,
        escrow: AgentEscrow,
        *,
        chain_id: int,
        cache: GrantCache | None = None,
        min_validity: int = 30,
        settle_margin: int = 300,
        simulate: bool = True,
    ) -> None:
        self.escrow = escrow
        self.chain_id = chain_id
        self.domain: Eip712Domain = escrow_domain(chain_id, escrow.address)
        self.cache = cache or GrantCache(escrow)
        self.min_validity = min_validity
        self.settle_margin = settle_margin
        self.simulate = simulate

    async def verify(
        self, payload: EscrowPayload, *, pay_to: str, amount: int, token: str, now: float
    ) -> VerifiedEscrowPayment:
        """`precheck`, then `confirm`: everything a gateway checks before it may reserve the payment."""
        pre = await self.precheck(payload, pay_to=pay_to, amount=amount, token=token, now=now)
        return await self.confirm(pre, now=now)

    async def precheck(
        self, payload: EscrowPayload, *, pay_to: str, amount: int, token: str, now: float
    ) -> PrecheckedEscrowPayment:
        """The offer, the deadline, the signature, and the grant as the cache has it (no chain read, unless
        the cache has to fetch the grant)."""
        p = payload.payment
        if p.payee.lower() != pay_to.lower():
            raise _reject(EscrowCode.RECIPIENT_MISMATCH, f"the payment pays {p.payee}, not {pay_to}")
        if int(p.amount) != amount:
            raise _reject(EscrowCode.AMOUNT_MISMATCH, f"the payment is {p.amount}, the price {amount}")
        if p.token.lower() != token.lower():
            raise _reject(EscrowCode.TOKEN_MISMATCH, f"the payment is in {p.token}, the price in {token}")
        deadline = int(p.deadline)
        if deadline < now:
            raise _reject(EscrowCode.DEADLINE_EXPIRED, "the payment's deadline has passed")
        if deadline < now + self.min_validity:
            raise _reject(
                EscrowCode.DEADLINE_TOO_SOON, f"the deadline must be {self.min_validity}s ahead at least"
            )
        try:
            signer = recover_payment(self.domain, payload)
        except InvalidSignature as exc:
            raise _reject(EscrowCode.INVALID_SIGNATURE, exc.message) from None
        grant: GrantInfo | None = None
        if signer.lower() != p.payer.lower():
            grant = await self.cache.grant(p.payer, signer)
            self._check_grant(grant, payload, now)
            if not await self.cache.payee_allowed(p.payer, signer, p.payee):
                raise _reject(EscrowCode.PAYEE_NOT_ALLOWED, f"{p.payee} is not on the grant's payee list")
        return PrecheckedEscrowPayment(payload=payload, signer=to_checksum_address(signer), grant=grant)

    async def confirm(self, pre: PrecheckedEscrowPayment, *, now: float) -> VerifiedEscrowPayment:
        """One `eth_call` (the escrow's `multicall`): the payer's deposit and requested withdrawal, the
        grant as of the latest block (so neither its budget, epoch nor revocation is only as fresh as the
        cache), and with `simulate` the contract's own `check`.

        A gateway reads its `settled` counters before calling this (see `escrow.payments._exposure`).
        """
        payload = pre.payload
        p = payload.payment
        calls: list[tuple[str, tuple[Any, ...]]] = [
            ("depositOf", (p.payer, p.token)),
            ("withdrawalOf", (p.payer, p.token)),
        ]
        if pre.grant is not None:
            calls.append(("grantOf", (p.payer, pre.signer)))
        if self.simulate:
            calls.append(("check", (payment_tuple(p), bytes.fromhex(payload.signature[2:]))))
        results = await self.escrow.read_many(calls)
        if self.simulate:
            reason = int(results[-1][0])
            if reason != 0:
                raise _reject(reason_code(reason), f"the escrow refuses the payment ({reason_code(reason)})")
        grant: GrantInfo | None = None
        horizon = now + self.settle_margin
        if pre.grant is not None:
            grant = AgentEscrow.grant_info(results[2][0])
            self._check_grant(grant, payload, now)
            horizon = min(horizon, grant.valid_until)
        return VerifiedEscrowPayment(
            payload=payload,
            signer=pre.signer,
            grant=grant,
            expires_soon=min(int(p.deadline), horizon) < now + self.settle_margin,
            block=self.cache.head,
            deposit=int(results[0][0]),
            withdrawal=int(results[1][0]),
        )

    @staticmethod
    def _check_grant(grant: GrantInfo, payload: EscrowPayload, now: float) -> None:
        """The contract's `_checkGrant`, in its order, against the cached grant."""
        p = payload.payment
        if grant.epoch == 0 or p.epoch > grant.epoch:
            raise _reject(EscrowCode.GRANT_NOT_FOUND, "no grant for this session key")
        if p.epoch < grant.epoch or not grant.live:
            raise _reject(EscrowCode.GRANT_REVOKED, "the session key's grant was revoked or replaced")
        if grant.token.lower() != p.token.lower():
            raise _reject(EscrowCode.TOKEN_MISMATCH, "the grant is for another token")
        if now < grant.valid_after:
            raise _reject(EscrowCode.GRANT_NOT_YET_VALID, "the grant is not valid yet")
        if now > grant.valid_until:
            raise _reject(EscrowCode.GRANT_EXPIRED, "the grant has expired")
        amount = int(p.amount)
        if amount > grant.max_per_call:
            raise _reject(
                EscrowCode.AMOUNT_EXCEEDS_CAP, f"{amount} is over the per-call cap {grant.max_per_call}"
            )
        if amount > grant.remaining:
            raise _reject(EscrowCode.BUDGET_EXCEEDED, "the grant's budget is spent")
