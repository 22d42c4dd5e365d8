"""The x402 `upto` scheme (`specs/schemes/upto/scheme_upto_evm.md`): plain-EOA payers, Permit2, metered.

Offered as `{"scheme": "upto", "amount": <maximum>, "extra": {"name", "version", "facilitatorAddress",
"assetTransferMethod": "permit2"}}`; `facilitatorAddress` is our settler key, the only address the upto
proxy lets settle (`witness.facilitator`). Verification, in the official facilitator's order: spender =
the upto proxy (`invalid_permit2_spender`), `witness.to` = payTo (`invalid_permit2_recipient_mismatch`),
`witness.facilitator` = ours (`upto_facilitator_mismatch`), deadline and `validAfter`, permitted amount =
the offered maximum (`permit2_amount_mismatch`: a payer cannot raise, nor the gateway accept, a maximum
above the route's), token, signature, then the chain: Permit2 allowance (`permit2_allowance_required`,
412), balance, and the Permit2 nonce.

Settlement is metered (`gateway._scheme.Meters`): `settle(verified, actual=n)` sends `proxy.settle(...,
n, ...)`, so the payee receives exactly `n <= maximum`; 0 sends nothing. An `upto` payment is always
settled before its response (`settle_now`), as x402 facilitators do: there is no batching settler for it.
Its `upto:now` in-flight record is closed by `reconcile_items` (recovery: `reconcilers={"upto": scheme}`)
from the chain alone: the proxy's `Settled` log of this authorization means settled; a Permit2 nonce used
without one means the payer cancelled it; past its deadline unsettled means nothing was charged.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec

from escrow.chain._rpc import ChainError
from escrow.payments._settler import SettleOutcome
from escrow.payments._upto import UptoChain
from x402 import PaymentRejected, PaymentRequirements
from x402._upto import UPTO_PROXY_ADDRESS, UPTO_SCHEME, UptoCode, decode_upto_payload, recover_upto

from ._errors import PaymentFailed
from ._pricing import Quote
from ._scheme import Offer, Presented, Verified, check_actual
from ._store import PaymentStore, Settlement, backoff

__all__ = ["UptoScheme"]

_DEADLINE_BUFFER = 6  # seconds a deadline must still have: the settlement must land before it


def _same(a: str, b: str) -> bool:
    return a.lower() == b.lower()


class UptoScheme:
    """x402 v2 `upto` against the canonical Permit2 and upto proxy, settled by `chain.sender`."""

    name = UPTO_SCHEME
    metered = True

    def __init__(
        self, chain: UptoChain, *, store: PaymentStore | None = None, kind: str | None = None
    ) -> None:
        """`store`: where `reconcile_items` records outcomes (the middleware's store; see `use_store`).
        `kind`: the queue kind of its in-flight records (default `upto`; one per chain on several)."""
        self.chain = chain
        self.store = store
        self.kind = kind or self.name

    def use_store(self, store: PaymentStore) -> None:
        if self.store is None:
            self.store = store

    def offer(self, quote: Quote) -> Offer:
        asset = quote.asset
        extra: dict[str, Any] = {
            "name": asset.name,
            "version": asset.version,
            "facilitatorAddress": self.chain.facilitator,
            "assetTransferMethod": "permit2",
        }
        requirements = PaymentRequirements(
            scheme=self.name,
            network=asset.network,
            asset=asset.address,
            amount=str(quote.amount),
            pay_to=quote.pay_to,
            max_timeout_seconds=quote.max_timeout_seconds,
            extra=extra,
        )
        return Offer(scheme=self.name, requirements=requirements)

    async def verify(self, offer: Offer, presented: Presented, *, now: float) -> Verified:
        req = offer.requirements
        if presented.dialect != "x402v2":
            raise PaymentRejected("unsupported_scheme", "upto is an x402 v2 scheme")
        if req.network != f"eip155:{self.chain.chain_id}":
            raise PaymentRejected(UptoCode.NETWORK_MISMATCH, "the offer is for another chain")
        payload = decode_upto_payload(presented.payload)
        a = payload.permit2_authorization
        if not _same(a.spender, UPTO_PROXY_ADDRESS):
            raise PaymentRejected(UptoCode.INVALID_SPENDER, "the Permit2 spender is not the upto proxy")
        if not _same(a.witness.to, req.pay_to):
            raise PaymentRejected(UptoCode.RECIPIENT_MISMATCH, "the witness pays someone else than payTo")
        if not _same(a.witness.facilitator, self.chain.facilitator):
            raise PaymentRejected(
                UptoCode.FACILITATOR_MISMATCH, "the witness names another facilitator than ours"
            )
        if int(a.deadline) < now + _DEADLINE_BUFFER:
            raise PaymentRejected(UptoCode.DEADLINE_EXPIRED, "the Permit2 deadline has passed")
        if int(a.witness.valid_after) > now:
            raise PaymentRejected(UptoCode.NOT_YET_VALID, "the authorization is not valid yet")
        maximum = int(a.permitted.amount)
        if maximum != int(req.amount):
            raise PaymentRejected(
                UptoCode.AMOUNT_MISMATCH, f"the signed maximum {maximum} is not the offered {req.amount}"
            )
        if not _same(a.permitted.token, req.asset):
            raise PaymentRejected(UptoCode.TOKEN_MISMATCH, "the permit is for another token")
        if not _same(recover_upto(self.chain.chain_id, payload), a.from_):
            raise PaymentRejected(UptoCode.INVALID_SIGNATURE, "the signature is not the payer's")
        try:
            allowance = await self.chain.allowance(req.asset, a.from_)
            balance = await self.chain.balance(req.asset, a.from_)
            used = await self.chain.nonce_used(a.from_, int(a.nonce))
        except ChainError as exc:
            raise PaymentFailed(f"chain read failed: {exc}", code=exc.code, status_hint=503) from None
        if allowance < maximum:
            raise PaymentRejected(
                UptoCode.ALLOWANCE_REQUIRED, "approve Permit2 on the token first", status_hint=412
            )
        if balance < maximum:
            raise PaymentRejected(UptoCode.INSUFFICIENT_BALANCE, "the payer's balance is below the maximum")
        if used:
            raise PaymentRejected(UptoCode.NONCE_USED, "this Permit2 nonce was already used")
        return Verified(
            scheme=self.name,
            key=f"upto:{self.chain.chain_id}:{a.from_.lower()}:{int(a.nonce)}",
            payer=a.from_,
            amount=maximum,
            network=req.network,
            state=payload,
            expires_at=float(int(a.deadline)),
        )

    def settle_now(self, verified: Verified) -> bool:
        return True  # no batching settler: always before the response

    async def settle(self, verified: Verified, *, actual: int | None = None) -> str:
        """Settle `actual` (None: the maximum) through the proxy now; "" with nothing sent for 0."""
        charge = check_actual(verified, actual)
        if charge == 0:
            return ""
        try:
            receipt = await self.chain.settle(verified.state, charge)
        except ChainError as exc:
            raise PaymentFailed(
                f"the upto settlement failed: {exc}", code=UptoCode.TRANSACTION_FAILED, status_hint=402
            ) from None
        return receipt.transaction_hash

    def settlement(self, verified: Verified, *, now: float, actual: int | None = None) -> Settlement:
        """The in-flight record of a settlement of `actual` (see `in_flight_kind`)."""
        charge = check_actual(verified, actual)
        return Settlement(
            key=verified.key,
            kind=self.kind,
            payload=msgspec.json.encode(verified.state),
            payer=verified.payer,
            amount=charge,
            created_at=now,
            expires_at=verified.expires_at,
        )

    async def reconcile_items(self, items: Sequence[Settlement]) -> list[SettleOutcome]:
        """Close `upto:now` records a crashed gateway left open, from the chain, sending nothing."""
        store = self.store
        if store is None:
            raise RuntimeError("UptoScheme.reconcile_items needs a store (use_store)")
        out: list[SettleOutcome] = []
        for item in items:
            try:
                payload = decode_upto_payload(msgspec.json.decode(item.payload))
                a = payload.permit2_authorization
                used = await self.chain.nonce_used(a.from_, int(a.nonce))
                found = await self.chain.find_settlement(payload) if used else None
            except ChainError as exc:
                retry_at = time.time() + backoff(item.attempts)
                await store.mark_failed(
                    item.key, error=f"{exc.code}: {exc}", retry_at=retry_at, lease=item.lease_token
                )
                out.append(SettleOutcome(key=item.key, status="retry", code=exc.code))
                continue
            except (msgspec.DecodeError, PaymentRejected, ValueError) as exc:
                await store.mark_failed(
                    item.key, error=f"upto_record_malformed: {exc}", retry_at=None, lease=item.lease_token
                )
                out.append(SettleOutcome(key=item.key, status="dead", code="upto_record_malformed"))
                continue
            if found is not None:
                await store.mark_settled([item.key], tx_hash=found.tx_hash, lease=item.lease_token)
                out.append(
                    SettleOutcome(
                        key=item.key,
                        status="settled",
                        tx_hash=found.tx_hash,
                        amount=found.amount,
                        payer=a.from_,
                    )
                )
            elif used or int(a.deadline) <= time.time():
                code = UptoCode.NONCE_USED if used else "upto_never_settled"
                detail = "cancelled by the payer" if used else "expired unsettled"
                await store.mark_failed(
                    item.key,
                    error=f"{code}: {detail}; nothing was charged",
                    retry_at=None,
                    lease=item.lease_token,
                )
                out.append(SettleOutcome(key=item.key, status="dead", code=code, payer=a.from_))
            else:
                error = "upto_unsettled: not settled yet; final once the authorization's deadline passes"
                await store.mark_failed(
                    item.key, error=error, retry_at=int(a.deadline) + 1.0, lease=item.lease_token
                )
                out.append(SettleOutcome(key=item.key, status="retry", code="upto_unsettled"))
        return out
