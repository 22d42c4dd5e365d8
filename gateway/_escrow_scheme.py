"""The `escrow` scheme: a session key's signed `AgentEscrow.Payment`, served against a deferred, batched
settlement.

Offered as x402 `accepts[]` entry `{"scheme": "escrow", "extra": {"escrow", "name", "version",
"deadlineSeconds"}}` and as an MPP `evm`/`charge` challenge whose `methodDetails.credentialTypes` is
`["escrow"]` (credential payload `{"type": "escrow", "signature", "payment"}`). MPP credentials are bound by
the payment's single-use nonce, not by the challenge hash: the sequential bitmap nonce is what keeps
batched settlement cheap, and a payment is only ever good for its payee and amount.

Verification = `escrow.EscrowVerifier` (signature, cached grant, cap, payee, window, deadline; then one chain
read: deposit, requested withdrawal, the grant as of the latest block, and the contract's `check`) plus
atomic store counters (`escrow.payments._exposure`): the payer's deposit pool (net of any requested
withdrawal) and
the grant's budget, both shared by every gateway on the store (refuse past them:
`escrow_insufficient_deposit`, `escrow_budget_exceeded`), and this gateway's credit to the payer (past its
`credit_limit` the payment is settled before its response, after the handler succeeded: the pipeline asks
`settle_now`). Deferred payments become `escrow.EscrowClaim`s in the store's queue, which
`escrow.EscrowSettler` drains; payments settled before their response are recorded as `escrow:now` first,
and `reconcile_items` is how recovery closes such a record if the gateway died mid-settlement.

Metered (`gateway._scheme.Meters`): the signed `amount` is the maximum, and it is what verification checks
against the grant's per-call cap and reserves; `settle(verified, actual=n)` / `settlement(verified, now=,
actual=n)` pay `n` through `AgentEscrow.settleMetered` (the settler's key must be the payee or allowed by it
with `setSettler`), the budget and deposit counters then count `n`, and the rest is given back. `n == 0`
sends nothing and releases everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from escrow.payments._escrow_verify import EscrowClaim, EscrowRejected, EscrowVerifier, accounts_for
from escrow.payments._exposure import budget_limit, deposit_accounts, deposit_limit
from escrow.payments._settler import EscrowSettler, SettleOutcome, encode_claim
from x402 import PaymentRejected, PaymentRequirements, Reason
from x402._escrow import ESCROW_DOMAIN_NAME, ESCROW_DOMAIN_VERSION, EscrowCode, decode_escrow_payload

from ._errors import PaymentFailed
from ._pricing import Quote
from ._scheme import MppOffer, Offer, Presented, Verified, check_actual
from ._store import ClaimLost, PaymentStore, Settlement

__all__ = ["EscrowScheme", "EscrowState"]


class EscrowState(msgspec.Struct, kw_only=True):
    """`Verified.state` of an escrow payment."""

    claim: EscrowClaim
    settle_now: bool  # past the credit limit, or too close to a deadline to defer
    tx_hash: str = ""  # set once settled before serving
    pooled: bool = False  # the payer's deposit pool reserved (to give back on release)
    reserved: bool = False  # the grant's budget reserved
    credited: bool = False  # counted on this gateway's credit to the payer
    reserve_holder: str = ""  # our token on the `<key>#reserve` claim ("" once given back)


class EscrowScheme:
    """x402 `escrow` / MPP `evm` `charge` (`escrow` credential) against one `AgentEscrow`.

    `store` must be the middleware's store (the counters and the queue live there); `settler` sends the
    settle-before-serve transactions (its batching loop may run anywhere else). `credit_limit` is the most
    this gateway serves one payer unsettled.
    """

    name = "escrow"
    metered = True  # `settle` / `settlement` take `actual=` (see `gateway._scheme.Meters`)

    def __init__(
        self,
        verifier: EscrowVerifier,
        store: PaymentStore,
        settler: EscrowSettler,
        *,
        credit_limit: int,
        deadline_seconds: int = 3600,
        claim_ttl: float = 300.0,
        settle_in_verify: bool = False,
    ) -> None:
        self.verifier = verifier
        self.store = store
        self.settler = settler
        self.credit_limit = credit_limit
        self.deadline_seconds = deadline_seconds
        self.claim_ttl = claim_ttl
        # The pipeline asks `settle_now` per payment, so a payment past the credit limit is settled after the
        # handler succeeded. `settle_in_verify=True` settles it during verification instead (before the app
        # runs), for callers that drive `verify`/`settle` without the pipeline.
        self.settle_in_verify = settle_in_verify
        self.escrow = verifier.escrow.address
        self.chain_id = verifier.chain_id
        self.kind: str = getattr(settler, "kind", self.name)  # the queue its settler drains

    # -- offer ---------------------------------------------------------------------------------------------

    def offer(self, quote: Quote) -> Offer:
        asset = quote.asset
        extra: dict[str, Any] = {
            "escrow": self.escrow,
            "name": ESCROW_DOMAIN_NAME,
            "version": ESCROW_DOMAIN_VERSION,
            "deadlineSeconds": self.deadline_seconds,
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
        request: dict[str, Any] = {
            "amount": str(quote.amount),
            "currency": asset.address,
            "recipient": quote.pay_to,
            "methodDetails": {
                "chainId": asset.chain_id,
                "credentialTypes": ["escrow"],
                "decimals": asset.decimals,
                "escrowContract": self.escrow,
                "deadlineSeconds": self.deadline_seconds,
            },
        }
        return Offer(
            scheme=self.name,
            requirements=requirements,
            mpp=MppOffer(method="evm", intent="charge", request=request),
        )

    # -- verify --------------------------------------------------------------------------------------------

    async def verify(self, offer: Offer, presented: Presented, *, now: float) -> Verified:
        req = offer.requirements
        if (
            req.network != f"eip155:{self.chain_id}"
            or str(req.extra.get("escrow", "")).lower() != self.escrow.lower()
        ):
            raise PaymentRejected(EscrowCode.WRONG_ESCROW, "the offer is for another escrow or chain")
        payload = decode_escrow_payload(presented.payload, mpp=presented.dialect == "mpp")
        pre = await self.verifier.precheck(
            payload, pay_to=req.pay_to, amount=int(req.amount), token=req.asset, now=now
        )
        p = payload.payment
        key = f"escrow:{self.chain_id}:{self.escrow.lower()}:{pre.signer.lower()}:{int(p.nonce)}"
        # Our own claim, taken before any counter moves, so a replay can never reserve twice.
        # A served payment stays finalized under `key` forever, while our claim expires: check both.
        if await self.store.is_finalized(key):
            raise PaymentRejected(Reason.NONCE_ALREADY_USED, "this payment was already presented")
        reserve = await self.store.claim(key + "#reserve", ttl=self.claim_ttl)
        if reserve is None:
            raise PaymentRejected(Reason.NONCE_ALREADY_USED, "this payment was already presented")
        session = pre.grant is not None
        credit, reserved, settled = accounts_for(self.chain_id, self.escrow, p.payer, pre.signer, p.epoch)
        pool = deposit_accounts(self.chain_id, self.escrow, p.payer, p.token)
        amount = int(p.amount)
        claim = EscrowClaim(
            chain_id=self.chain_id,
            escrow=self.escrow,
            signer=pre.signer,
            payload=payload,
            credit=credit,
            reserved=reserved if session else None,
            settled=settled if session else None,
            deposit_reserved=pool.reserved,
            deposit_settled=pool.settled,
        )
        state = EscrowState(claim=claim, settle_now=False, reserve_holder=reserve)
        try:
            # The `settled` counters are read before the chain: see `escrow.payments._exposure` for why the
            # order makes the reservations below safe while other payments land.
            pool_settled = await self.store.get_pending(pool.settled)
            budget_settled = await self.store.get_pending(settled) if session else 0
            checked = await self.verifier.confirm(pre, now=now)
            state.claim = msgspec.structs.replace(claim, from_block=checked.block)
            state.settle_now = checked.expires_soon
            # Deposit net of a requested withdrawal, minus what is accepted and not settled, per payer.
            limit = deposit_limit(
                deposit=checked.deposit, withdrawal=checked.withdrawal, settled=pool_settled
            )
            if not await self.store.add_pending(pool.reserved, amount, limit=limit):
                raise EscrowRejected(
                    EscrowCode.INSUFFICIENT_DEPOSIT,
                    "the payer's deposit, net of pending withdrawals, is committed to unsettled payments",
                )
            state.pooled = True
            if checked.grant is not None:
                grant = checked.grant
                limit = budget_limit(budget=grant.budget, spent=grant.spent, settled=budget_settled)
                if not await self.store.add_pending(reserved, amount, limit=limit):
                    raise EscrowRejected(
                        EscrowCode.BUDGET_EXCEEDED, "the grant's budget is committed to other calls"
                    )
                state.reserved = True
            if not state.settle_now:
                state.credited = await self.store.add_pending(credit, amount, limit=self.credit_limit)
                state.settle_now = not state.credited
            verified = Verified(
                scheme=self.name,
                key=key,
                payer=p.payer,
                amount=amount,
                network=req.network,
                state=state,
                expires_at=float(int(p.deadline)),
            )
            if state.settle_now and self.settle_in_verify:
                await self._settle_now(verified, record=True, now=now)
        except BaseException:
            await self.release_state(state, key)
            raise
        return verified

    # -- settle --------------------------------------------------------------------------------------------

    async def _settle_now(self, verified: Verified, *, record: bool, now: float) -> str:
        state: EscrowState = verified.state
        claim = state.claim
        tx_hash, code = await self.settler.settle_now(claim)
        if code:
            raise PaymentFailed(f"the escrow refused to settle: {code}", code=code, status_hint=402)
        state.tx_hash = tx_hash
        # Counted once: recovery may report this same settlement again if we die before it is recorded.
        if await self.settler.count_once(verified.key, keep_until=verified.expires_at):
            await self.settler.count_settled(claim)
        if record:
            # The pipeline's later enqueue of this key is a no-op: the record already says settled.
            await self.store.enqueue(self._settlement(verified, now))
            await self.store.mark_settled([verified.key], tx_hash=tx_hash)
        return tx_hash

    async def settle(self, verified: Verified, *, actual: int | None = None) -> str:
        """Settle before the response (`settle="before-response"`, or past the credit limit).

        `actual`: the metered charge, at most `verified.amount` (None: all of it). 0 sends nothing, gives
        back every reservation and returns "". A refusal raises `PaymentFailed`; the pipeline then calls
        `release` (nothing is charged).
        """
        state: EscrowState = verified.state
        if state.tx_hash:
            return state.tx_hash
        charge = check_actual(verified, actual)
        if charge == 0:
            await self.release_state(state, verified.key)
            return ""
        if charge != verified.amount:
            state.claim = msgspec.structs.replace(state.claim, actual=charge)
        tx_hash = await self._settle_now(verified, record=False, now=0.0)
        if state.credited:  # paid: this payment no longer sits on the payer's credit
            await self.store.sub_pending(state.claim.credit or "", verified.amount)
            state.credited = False
        return tx_hash

    def settle_now(self, verified: Verified) -> bool:
        """Whether this payment must be settled before it is served, even under `settle="deferred"`."""
        state: EscrowState = verified.state
        return state.settle_now and not state.tx_hash

    def _settlement(self, verified: Verified, now: float, actual: int | None = None) -> Settlement:
        state: EscrowState = verified.state
        claim = state.claim
        charge = check_actual(verified, actual)
        if charge != int(claim.payload.payment.amount):
            claim = msgspec.structs.replace(claim, actual=charge)
        if not state.credited:
            claim = msgspec.structs.replace(claim, credit=None)
        return Settlement(
            key=verified.key,
            kind=self.kind,
            payload=encode_claim(claim),
            payer=verified.payer,
            amount=charge,
            created_at=now,
            expires_at=verified.expires_at,
        )

    def settlement(self, verified: Verified, *, now: float, actual: int | None = None) -> Settlement:
        """The queue item paying `actual` (None: the signed maximum; 0: closed without a transaction)."""
        return self._settlement(verified, now, actual)

    # -- recovery ------------------------------------------------------------------------------------------

    async def reconcile_items(self, items: Sequence[Settlement]) -> list[SettleOutcome]:
        """Close `escrow:now` records a crashed gateway left open, from the chain, sending nothing.

        Paid by the escrow (this very payment in a `PaymentSettled` log): settled, counters moved as the
        settler would. Unpaid past its deadline: final, nothing charged, reservations returned. Otherwise
        looked at again at the deadline (the payer may present it again meanwhile).
        """
        # The settler's own bookkeeping (pending counters, dead letters) keeps both paths identical.
        return await self.settler.reconcile_items(items)

    # -- release -------------------------------------------------------------------------------------------

    async def release(self, verified: Verified) -> None:
        """The app failed (or settlement was refused): give back what verification reserved."""
        state: EscrowState = verified.state
        if state.tx_hash:
            return  # already paid on chain: nothing to give back
        await self.release_state(state, verified.key)

    async def release_state(self, state: EscrowState, key: str) -> None:
        claim = state.claim
        amount = int(claim.payload.payment.amount)
        for taken, account in (
            (state.pooled, claim.deposit_reserved),
            (state.reserved, claim.reserved),
            (state.credited, claim.credit),
        ):
            if taken and account is not None:
                await self.store.sub_pending(account, amount)
        state.pooled = state.reserved = state.credited = False
        holder, state.reserve_holder = state.reserve_holder, ""
        if holder:
            try:
                await self.store.release(key + "#reserve", holder)
            except ClaimLost:  # it ran out: nothing left to free
                pass
