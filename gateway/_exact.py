"""The x402 `exact` scheme on EVM with EIP-3009, which is also MPP `evm`/`charge` with an `authorization`
credential: one signed `TransferWithAuthorization`, two wire forms, one verifier and one settle path.

The off-chain checks (recipient, exact amount, validity window, MPP challenge binding) run here; everything
that needs the chain (signature routing by `eth_getCode`, ERC-1271, simulation, broadcast) is behind the
`ExactChain` protocol, which `escrow.ExactEvm` implements (and a stub implements in benchmarks). Deferred
payments are queued as `escrow.ExactPayment` for `escrow.ExactSettler`.

Reservations. Each chain check looks at one authorization alone, so without more a payer holding 1 × price
could sign ten authorizations and be served ten times under `settle="deferred"` (nine would revert later).
Every accepted-but-unsettled payment is therefore reserved in the store, per (payer, token, network)
(`escrow.payments._exact_settler.exact_reservation`), atomically against the balance the verification read:
a payment
is refused with `insufficient_funds_pending` when balance − reserved < amount. The reservation is given
back once the payment settles or is given up on (by whoever reports that first, once), or at once when it
is not charged (handler failed, settlement refused). The reservation is taken by `reserve`, which the
pipeline calls once the replay claim is held, so a replayed credential never reserves anything.

It errs on the safe side: a settlement that landed counts against the payer twice until its settler records
it, and a gateway killed between `reserve` and recording the payment leaves its reservation behind; either
refuses a payer early, never lets one spend twice.

What a reservation cannot stop: after verification the payer may `cancelAuthorization` or move the funds
away, and the deferred transfer then fails. `credit_limit` bounds that: a payment is only deferred while
the payer's reserved total (this one included) stays within it; beyond, it is settled before it is served.
So the most one payer can leave unpaid is `credit_limit` per token and network (per store: gateways sharing
a store share the limit). Likewise, an authorization whose `validBefore` is closer than `settle_delay` +
`min_validity` is settled before it is served: the settler might not land it in time.

Slow settlement. A payment settled before its response whose receipt did not come in time is answered
`settlement_pending` (the money may be moving). Presented again, the very same credential is not a replay:
`verify` finds the in-flight record (`exact:now`) the first attempt wrote, and the pipeline serves the
request once that transaction is confirmed (`Verified.resume`), never charging a second time.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

import msgspec

from escrow.payments._exact_settler import (
    ExactPayment,
    decode_payment,
    encode_payment,
    exact_reservation,
    pending_transaction,
    unreserve_once,
)
from x402 import (
    VALID_BEFORE_BUFFER_SECONDS,
    Eip712Domain,
    ExactEvmPayload,
    MalformedPayment,
    MppAuthorizationPayload,
    PaymentRejected,
    PaymentRequirements,
    Reason,
    UnsupportedScheme,
    convert_payload,
    decode_exact_payload,
    exact_domain,
)

from ._pricing import Quote
from ._scheme import MppOffer, Offer, Presented, Verified, in_flight_kind
from ._store import PaymentStore, Settlement

__all__ = ["DEFAULT_CREDIT_LIMIT", "DEFAULT_SETTLE_DELAY", "ExactChain", "ExactScheme", "ExactState"]

#: Default `credit_limit`: 1 token of a 6-decimal stablecoin (1 USDC) per payer, token and network.
DEFAULT_CREDIT_LIMIT: Final = 1_000_000
#: Default `settle_delay`: seconds a deferred settler may take to land a payment (batch age, lease, send,
#: inclusion) on a healthy chain.
DEFAULT_SETTLE_DELAY: Final = 30.0


class ExactChain(Protocol):
    """The chain side of `exact`: `escrow.ExactEvm` on a real node."""

    async def verify(self, domain: Eip712Domain, payload: ExactEvmPayload) -> int | None:
        """Check the payment on chain; the payer's balance (None: unknown, nothing is reserved)."""
        ...

    async def settle(self, domain: Eip712Domain, payload: ExactEvmPayload) -> str: ...


class ExactState(msgspec.Struct, kw_only=True):
    """`Verified.state` of an `exact` payment."""

    domain: Eip712Domain
    payload: ExactEvmPayload
    balance: int | None = None  # the payer's balance as verification read it (None: unknown)
    reserved: str = ""  # the store counter holding the amount ("" when nothing was reserved)
    held: bool = False  # the reservation is taken and not yet given back
    settle_now: bool = False  # past the credit limit, or too close to validBefore to defer
    pending: str = ""  # resumed: the transaction the earlier attempt sent
    settled: str = ""  # resumed: the transaction recovery already found on chain


_UINT256_MAX = 2**256 - 1


class ExactScheme:
    """x402 `exact` / MPP `evm` `charge` (`authorization` credential) over EIP-3009."""

    name = "exact"

    def __init__(
        self,
        chain: ExactChain,
        *,
        min_validity: int = VALID_BEFORE_BUFFER_SECONDS,
        store: PaymentStore | None = None,
        credit_limit: int = DEFAULT_CREDIT_LIMIT,
        settle_delay: float = DEFAULT_SETTLE_DELAY,
        kind: str | None = None,
    ) -> None:
        """`chain` checks and settles; `min_validity` is the least time an authorization must have left.

        `store` holds the reservations; when None, the middleware's store is used (`use_store`), and a
        scheme used without one (a facilitator) reserves nothing. `credit_limit` (token base units) is the
        most one payer may have accepted but unsettled here, per token and network, before its payments
        are settled before they are served: the bound on what a canceled authorization or funds moved
        away after verification can cost. `settle_delay` is the deferred settler's worst-case time to land
        a payment: an authorization expiring sooner (plus `min_validity`) is settled before it is served.
        `kind` is the store queue its deferred payments go to (default `exact`; a gateway on several
        chains gives each chain's scheme its own, drained by that chain's settler).
        """
        self.kind = kind or self.name
        self.chain = chain
        self.min_validity = min_validity
        self.store = store
        self._own_store = store is not None
        self.credit_limit = credit_limit
        self.settle_delay = settle_delay

    def use_store(self, store: PaymentStore) -> None:
        """The middleware's store, unless one was given to the constructor."""
        if not self._own_store:
            self.store = store

    def offer(self, quote: Quote) -> Offer:
        asset = quote.asset
        requirements = PaymentRequirements(
            scheme=self.name,
            network=asset.network,
            asset=asset.address,
            amount=str(quote.amount),
            pay_to=quote.pay_to,
            max_timeout_seconds=quote.max_timeout_seconds,
            extra={"name": asset.name, "version": asset.version},
        )
        request: dict[str, Any] = {
            "amount": str(quote.amount),
            "currency": asset.address,
            "recipient": quote.pay_to,
            "methodDetails": {
                "chainId": asset.chain_id,
                "credentialTypes": ["authorization"],
                "decimals": asset.decimals,
            },
        }
        mpp = MppOffer(method="evm", intent="charge", request=request)
        return Offer(scheme=self.name, requirements=requirements, mpp=mpp)

    def _payload(self, presented: Presented) -> ExactEvmPayload:
        payload = self._decode(presented)
        auth = payload.authorization
        if max(int(auth.value), int(auth.valid_after), int(auth.valid_before)) > _UINT256_MAX:
            raise MalformedPayment("authorization numbers must fit in uint256")
        return payload

    def _decode(self, presented: Presented) -> ExactEvmPayload:
        if presented.dialect != "mpp":
            return decode_exact_payload(presented.payload)
        # evm/charge requires `type`; a payload without it can only be an authorization (x402's own encoder
        # leaves the default out), so it is read as one.
        kind = presented.payload.get("type", "authorization")
        if kind != "authorization":
            raise UnsupportedScheme(
                f"credential type {str(kind)[:32]!r} is not accepted (only 'authorization')"
            )
        return convert_payload(presented.payload, MppAuthorizationPayload).to_exact()

    async def verify(self, offer: Offer, presented: Presented, *, now: float) -> Verified:
        req = offer.requirements
        payload = self._payload(presented)
        auth = payload.authorization
        if auth.to.lower() != req.pay_to.lower():
            raise PaymentRejected(
                Reason.RECIPIENT_MISMATCH, f"authorization pays {auth.to}, not {req.pay_to}"
            )
        if int(auth.value) != int(req.amount):
            raise PaymentRejected(
                Reason.VALUE_MISMATCH, f"authorization value {auth.value} != price {req.amount}"
            )
        if int(auth.valid_before) < now + self.min_validity:
            raise PaymentRejected(Reason.VALID_BEFORE, "authorization expires too soon to settle")
        if int(auth.valid_after) > now:
            raise PaymentRejected(Reason.VALID_AFTER, "authorization is not valid yet")
        if presented.bindings and bytes.fromhex(auth.nonce[2:]) not in presented.bindings:
            raise PaymentRejected(
                Reason.CHALLENGE_BINDING_MISMATCH, "authorization nonce is not the challenge hash"
            )
        domain = exact_domain(req)
        key = f"exact:{domain.chain_id}:{req.asset.lower()}:{auth.from_.lower()}:{auth.nonce.lower()}"
        amount = int(auth.value)
        state = ExactState(domain=domain, payload=payload)
        resumed = await self._resumable(key, domain, payload)
        if resumed is not None:
            return Verified(
                scheme=self.name,
                key=key,
                payer=auth.from_,
                amount=amount,
                network=req.network,
                state=resumed,
                resume=True,
            )
        state.balance = await self.chain.verify(domain, payload)
        if int(auth.valid_before) < now + self.settle_delay + self.min_validity:
            state.settle_now = True  # the settler might not land it before it expires
        return Verified(
            scheme=self.name,
            key=key,
            payer=auth.from_,
            amount=amount,
            network=req.network,
            state=state,
            expires_at=float(int(auth.valid_before)),
        )

    async def reserve(self, verified: Verified) -> None:
        """Hold the amount against the payer's balance (the pipeline calls this once the replay claim is
        taken, so a replay never reserves); refuse with `insufficient_funds_pending` when it cannot."""
        state: ExactState = verified.state
        store, balance = self.store, state.balance
        if store is None or balance is None or verified.resume or state.held:
            return
        domain, amount = state.domain, verified.amount
        state.reserved = exact_reservation(domain.chain_id, domain.verifying_contract, verified.payer)
        # Deferred only within the credit limit; beyond it (up to the balance) settled before serving.
        if await store.add_pending(state.reserved, amount, limit=min(balance, self.credit_limit)):
            state.held = True
        elif await store.add_pending(state.reserved, amount, limit=balance):
            state.held = state.settle_now = True
        else:
            raise PaymentRejected(
                Reason.INSUFFICIENT_FUNDS_PENDING,
                f"the payer's balance {balance} is committed to payments not settled yet",
            )

    async def _resumable(self, key: str, domain: Eip712Domain, payload: ExactEvmPayload) -> ExactState | None:
        """The state of a payment an earlier request of this very credential started settling, or None.

        Resumable: an in-flight record (`exact:now`) of the identical signed payload (so the signature was
        checked then), never served (no receipt), whose first request has answered (`settlement_pending`,
        or recovery recorded what the chain says). While that first request still waits for its receipt,
        the payer is told to come back: `settlement_pending`.
        """
        store = self.store
        if store is None:
            return None
        record = await store.get_settlement(key)
        if record is None or record.kind != in_flight_kind(self.kind) or record.state == "dead":
            return None
        try:
            earlier = decode_payment(record.payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        if earlier.payload != payload or earlier.domain != domain:
            return None  # not this credential: the normal checks decide (a replay of the nonce fails)
        if await store.get_receipt(key) is not None:
            return None  # served: a replay
        if record.state != "settled" and not record.error:
            raise PaymentRejected(
                Reason.SETTLEMENT_PENDING, "an earlier request is settling this payment; try again shortly"
            )
        return ExactState(
            domain=domain,
            payload=payload,
            reserved=earlier.reserved,
            pending=pending_transaction(record.error),
            settled=(record.tx_hash or "") if record.state == "settled" else "",
        )

    def settle_now(self, verified: Verified) -> bool:
        """Settle before serving even under `settle="deferred"`: past the credit limit, too close to expiry,
        or a resumed payment (its first attempt was already being settled before its response)."""
        state: ExactState = verified.state
        return verified.resume or state.settle_now

    async def settle(self, verified: Verified) -> str:
        """Settle before the response; the reservation is given back once the chain says paid."""
        state: ExactState = verified.state
        store = self.store
        try:
            if state.settled:
                tx_hash = state.settled
            elif state.pending:
                settle: Any = self.chain.settle  # `escrow.ExactEvm.settle` waits for an earlier send
                tx_hash = await settle(state.domain, state.payload, pending=state.pending)
            else:
                tx_hash = await self.chain.settle(state.domain, state.payload)
        except Exception as exc:
            if verified.resume and store is not None and getattr(exc, "status_hint", 0) == 402:
                if getattr(exc, "code", "") != Reason.SETTLEMENT_PENDING:  # final: the first hold goes
                    await unreserve_once(store, verified.key, self._payment(state))
            raise
        if store is not None and state.reserved:
            state.held = False
            await unreserve_once(store, verified.key, self._payment(state))
        return tx_hash

    async def release(self, verified: Verified) -> None:
        """Not charged (handler failed, settlement refused): give the reservation back."""
        state: ExactState = verified.state
        if state.held and self.store is not None:
            state.held = False
            await self.store.sub_pending(state.reserved, verified.amount)

    @staticmethod
    def _payment(state: ExactState) -> ExactPayment:
        domain = state.domain
        return ExactPayment(
            name=domain.name,
            version=domain.version,
            chain_id=domain.chain_id,
            asset=domain.verifying_contract,
            payload=state.payload,
            reserved=state.reserved,
        )

    def settlement(self, verified: Verified, *, now: float) -> Settlement:
        state: ExactState = verified.state
        body = self._payment(state)
        return Settlement(
            key=verified.key,
            kind=self.kind,
            payload=encode_payment(body),
            payer=verified.payer,
            amount=verified.amount,
            created_at=now,
            expires_at=verified.expires_at,
        )
