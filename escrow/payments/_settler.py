"""The batching settler of `escrow` claims: lease from the store's queue, `settle` in one transaction, then
reconcile each claim from the receipt's events.

    settler = EscrowSettler(store, relayer, batch_size=32, max_age=2.0)
    await settler.run(stop_event)        # or: await settler.drain() (tests, shutdown)

Outcomes, per claim:

- `settled`: `PaymentSettled` in our receipt;
- `settled_elsewhere`: the escrow says `NonceUsed`, and a `PaymentSettled` log shows this very payment (its
  EIP-712 digest, the same signer and charge): someone (another settler, a receipt we never saw) already
  paid it. Counted as settled, once;
- `dead` with `escrow_nonce_reused`: the nonce paid a *different* payment: this one is lost;
- `dead` with the reason's code (`escrow_grant_revoked`, `escrow_budget_exceeded`, ...): the payer's
  grant no longer covers it; the payee's loss is the store record's `error` (`"<code>: <detail>"`);
- `retry`: the transaction did not land (RPC down, timeout, revert) or the reason may pass later
  (`escrow_insufficient_deposit`, `escrow_grant_not_yet_valid`) before the payment's deadline; backoff.

Metered claims (`EscrowClaim.actual` set: a charge below the signed maximum) go through `settleMetered`, which
pays exactly the actual charge (the settler's sender must be the payee or an operator it allowed, else
`escrow_not_payee_settler`); a claim of 0 is closed as `settled` with no transaction at all. The grant
budget and deposit counters move by the actual charge; the rest of the maximum's reservation is given back.

The contract's nonce bitmap makes every path idempotent: a claim submitted twice, or by two settlers at once,
pays once and the second submission reconciles to `settled_elsewhere`.

`reconcile_items` is the record-only variant for `escrow:now` records a crashed gateway left open (see
`gateway._recovery`): it never sends. The loop (lease, batch, backoff, retry cap, dead letters) is
`escrow.payments._engine.SettlementEngine`; this module is the `escrow` part (`EscrowSettlement`) and its
counters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Protocol

import msgspec

from x402._escrow import EscrowCode, EscrowPayload, escrow_domain, payment_digest, reason_code

from ..chain._rpc import ChainError, Receipt, TxSender
from ._engine import EngineOptions, Job, Parties, SettlementEngine, SettleOutcome, Status
from ._escrow import AgentEscrow, EscrowEvent
from ._escrow_verify import EscrowClaim
from ._queue import QueuedItem
from ._queue import SettlementQueue as _BaseQueue

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "EscrowSettlement",
    "EscrowSettler",
    "SettleOutcome",
    "SettlementQueue",
    "count_once",
    "count_settled",
    "decode_claim",
    "encode_claim",
    "find_settlement",
]

KIND: Final = "escrow"
_NONCE_USED: Final = 4
_RETRYABLE: Final = frozenset({8, 13})  # GrantNotYetValid, InsufficientDeposit: may pass before the deadline
_UINT256_MAX: Final = 2**256 - 1
_FOREVER: Final = 100 * 365 * 86400.0  # claim TTL of a count-once marker (finalized right after anyway)
_LOOKBACK: Final = 10_000  # blocks before the claim's verification searched for an earlier settlement

encode_claim = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(EscrowClaim).decode


def decode_claim(raw: bytes) -> EscrowClaim:
    return _decode(raw)


class SettlementQueue(_BaseQueue, Protocol):
    """The part of `gateway.PaymentStore` the escrow settler uses: the queue, plus the spend counters."""

    async def get_settlement(self, key: str) -> QueuedItem | None: ...
    async def add_pending(self, account: str, amount: int, *, limit: int) -> bool: ...
    async def sub_pending(self, account: str, amount: int) -> None: ...
    async def claim(self, key: str, *, ttl: float) -> str | None: ...
    async def finalize(self, key: str, *, keep_until: float | None = None) -> None: ...


Pair = Job[EscrowClaim]
Engine = SettlementEngine[EscrowClaim, SettlementQueue]


async def count_once(store: SettlementQueue, key: str, *, keep_until: float | None = None) -> bool:
    """True exactly once per settled payment `key`: the one caller that may move its spend counters.

    A permanent marker in the store (kept at least until `keep_until`, the payment's deadline, after which
    it cannot be reported settled again), taken before the counters move: a crash in between under-counts
    this gateway's settled spend, so it refuses early; counting twice would let it overspend a grant.
    """
    marker = f"{key}#counted"
    if await store.claim(marker, ttl=_FOREVER) is None:
        return False
    await store.finalize(marker, keep_until=keep_until)
    return True


async def count_settled(store: SettlementQueue, claim: EscrowClaim) -> None:
    """A payment landed: raise its `settled` counters (budget and deposit) by what it paid, which is what
    releases its reservations (pending = reserved - settled; see `escrow.payments._exposure`); a metered
    charge below the maximum also gives back the rest of the maximum it reserved. Only after `count_once`."""
    charge = claim.charge
    unused = int(claim.payload.payment.amount) - charge
    for settled, reserved in (
        (claim.settled, claim.reserved),
        (claim.deposit_settled, claim.deposit_reserved),
    ):
        if settled is not None and charge:
            await store.add_pending(settled, charge, limit=_UINT256_MAX)
        if reserved is not None and unused:
            await store.sub_pending(reserved, unused)


class EscrowSettlement:
    """The `escrow` part of the settlement engine: one `settle` transaction per escrow and batch, judged
    from the receipt's `PaymentFailed` events (a `SchemeSettlement`)."""

    name = KIND
    malformed = "escrow_claim_malformed"

    def __init__(self, sender: TxSender) -> None:
        self.sender = sender
        self.gas_used = 0  # total over every batch this settler sent
        self.batches: list[tuple[int, int]] = []  # (payments, gasUsed) per transaction

    def decode(self, raw: bytes) -> EscrowClaim:
        return decode_claim(raw)

    async def submit(self, engine: Engine, jobs: list[Pair]) -> list[SettleOutcome]:
        groups: dict[str, list[Pair]] = {}
        out: list[SettleOutcome] = []
        for item, claim in jobs:
            if claim.chain_id != self.sender.chain_id:
                await engine.store.mark_failed(
                    item.key,
                    error="escrow_wrong_chain: not this relayer's chain",
                    retry_at=None,
                    lease=item.lease_token,
                )
                out.append(SettleOutcome(key=item.key, status="dead", code="escrow_wrong_chain"))
                continue
            if claim.charge == 0:  # metered to nothing: no transaction, and the nonce stays unused
                out.extend(await engine.settled([(item, claim)], "", "settled"))
                continue
            groups.setdefault(claim.escrow.lower(), []).append((item, claim))
        for group in groups.values():
            out.extend(await self._settle_group(engine, group))
        return out

    async def transact(self, escrow: AgentEscrow, claims: Sequence[EscrowClaim], timeout: float) -> Receipt:
        payloads: list[EscrowPayload] = [claim.payload for claim in claims]
        if any(claim.actual is not None for claim in claims):
            data = escrow.settle_metered_calldata(payloads, [claim.charge for claim in claims])
        else:  # the plain batch, as `settlePacked` when it fits: cheaper calldata, anyone may send it
            data = escrow.settle_calldata(payloads)
        try:
            estimate = await self.sender.rpc.request(
                "eth_estimateGas",
                [{"from": self.sender.address, "to": escrow.address, "data": "0x" + data.hex()}],
            )
            gas = int(estimate, 16) * 6 // 5 + 20_000
        except ChainError:
            gas = 80_000 + 60_000 * len(payloads)  # a revert here is decided by the real transaction
        return await self.sender.transact(escrow.address, data, gas=gas, timeout=timeout)

    async def _settle_group(self, engine: Engine, group: list[Pair]) -> list[SettleOutcome]:
        escrow = AgentEscrow(self.sender.rpc, group[0][1].escrow)
        try:
            receipt = await self.transact(escrow, [claim for _, claim in group], engine.receipt_timeout)
        except ChainError as exc:
            return [await engine.retry(job, f"{exc.code}: {exc}") for job in group]
        gas = int(receipt.gas_used, 16)
        self.gas_used += gas
        self.batches.append((len(group), gas))
        failed: dict[int, int] = {}
        for event in escrow.decode_logs(receipt):
            if event.name == "PaymentFailed":
                failed[int(event.args["index"])] = int(event.args["reason"])
        out: list[SettleOutcome] = []
        settled: list[Pair] = []
        for index, job in enumerate(group):
            reason = failed.get(index, 0)
            if reason == 0:
                settled.append(job)
            elif reason == _NONCE_USED:
                out.append(await self.nonce_used(engine, escrow, job))
            elif reason in _RETRYABLE and engine.may_retry(job):
                out.append(await engine.retry(job, f"{reason_code(reason)}: will retry"))
            else:
                out.append(await self.dead(engine, job, reason_code(reason), receipt.transaction_hash))
        if settled:
            out.extend(
                await engine.settled(settled, receipt.transaction_hash, "settled", gas=gas // len(group))
            )
        return out

    async def reconcile(self, engine: Engine, jobs: list[Pair]) -> list[SettleOutcome]:
        """Close `escrow:now` records a crashed gateway left open, from the chain, sending nothing.

        Paid by the escrow (this very payment in a `PaymentSettled` log): settled, counters moved as the
        settler would. Unpaid past its deadline: final, nothing charged, reservations returned. Otherwise
        looked at again at the deadline (the payer may present it again meanwhile).
        """
        out: list[SettleOutcome] = []
        for job in jobs:
            item, claim = job
            p = claim.payload.payment
            escrow = AgentEscrow(self.sender.rpc, claim.escrow)
            try:
                used = await escrow.nonce_used(claim.signer, int(p.nonce))
                found = await find_settlement(escrow, claim) if used else None
            except ChainError as exc:
                retry_at = engine.clock() + engine.backoff(item.attempts)
                await engine.store.mark_failed(
                    item.key, error=f"{exc.code}: {exc}", retry_at=retry_at, lease=item.lease_token
                )
                out.append(SettleOutcome(key=item.key, status="retry", code=exc.code))
                continue
            if found is not None:
                out.extend(await engine.settled([job], found.tx_hash, "settled_elsewhere"))
            elif used:
                out.append(await self.dead(engine, job, EscrowCode.NONCE_REUSED, ""))
            elif int(p.deadline) <= engine.clock():
                detail = "the payment expired unsettled: nothing was charged"
                out.append(await self.dead(engine, job, "escrow_never_settled", "", detail=detail))
            else:
                error = "escrow_unsettled: not paid by the escrow; final once the payment's deadline passes"
                await engine.store.mark_failed(
                    item.key, error=error, retry_at=int(p.deadline) + 1.0, lease=item.lease_token
                )
                out.append(SettleOutcome(key=item.key, status="retry", code="escrow_unsettled"))
        return out

    async def nonce_used(self, engine: Engine, escrow: AgentEscrow, job: Pair) -> SettleOutcome:
        """Tell "this payment was already settled" (fine) from "the nonce paid another payment" (a loss)."""
        try:
            found = await find_settlement(escrow, job[1])
        except ChainError as exc:
            return await engine.retry(job, f"{exc.code}: looking up the earlier settlement")
        if found is None:
            return await self.dead(engine, job, EscrowCode.NONCE_REUSED, "")
        (outcome,) = await engine.settled([job], found.tx_hash, "settled_elsewhere")
        return outcome

    # -- outcomes ------------------------------------------------------------------------------------------

    async def dead(
        self, engine: Engine, job: Pair, code: str, tx_hash: str, *, detail: str | None = None
    ) -> SettleOutcome:
        p = job[1].payload.payment
        detail = detail or (
            f"lost {int(p.amount)} of {p.token} from payer {p.payer} (session key {job[1].signer}, "
            f"nonce {p.nonce})" + (f" in {tx_hash}" if tx_hash else "")
        )
        return await engine.dead(job, code, detail, tx_hash=tx_hash)

    def retry_at(self, engine: Engine, payment: EscrowClaim, *, delay: float) -> float:
        return engine.clock() + delay

    def gives_up(self, payment: EscrowClaim, now: float) -> bool:
        return int(payment.payload.payment.deadline) <= now

    async def on_settled(self, engine: Engine, job: Pair) -> None:
        item, claim = job
        deadline = float(int(claim.payload.payment.deadline))
        # whoever reports it: this settler, another, or recovery
        if await count_once(engine.store, item.key, keep_until=deadline):
            await count_settled(engine.store, claim)
            if claim.credit is not None:
                await engine.store.sub_pending(claim.credit, int(claim.payload.payment.amount))

    async def on_dead(self, engine: Engine, job: Pair, *, recorded: bool) -> None:
        if not recorded:  # another settler holds it now (or it settled): its outcome moves the counters
            return
        claim = job[1]
        for account in (claim.reserved, claim.deposit_reserved, claim.credit):  # never charged: give back
            if account is not None:
                await engine.store.sub_pending(account, int(claim.payload.payment.amount))

    def parties(self, payment: EscrowClaim) -> Parties:
        p = payment.payload.payment
        return Parties(payment.charge, p.payer, p.payee, payment.signer)


async def find_settlement(escrow: AgentEscrow, claim: EscrowClaim) -> EscrowEvent | None:
    """The `PaymentSettled` log of exactly this payment, if the escrow has one.

    The log is indexed by the payment's EIP-712 digest, which stands for all its fields; the signer (nonces
    are per signer) and the charge (a metered payment's actual) must match too.
    """
    digest = payment_digest(escrow_domain(claim.chain_id, escrow.address), claim.payload.payment)
    events = await escrow.logs(
        ["PaymentSettled"],
        from_block=max(0, claim.from_block - _LOOKBACK),
        topics=["0x" + digest.hex()],
    )
    for event in events:
        a = event.args
        if str(a["signer"]).lower() == claim.signer.lower() and int(a["amount"]) == claim.charge:
            return event
    return None


_DEFAULTS: Final[EngineOptions] = {
    "kind": KIND,
    "batch_size": 32,
    "max_age": 2.0,
    "retry_cap": 300.0,
    "max_attempts": 20,
}


class EscrowSettler(SettlementEngine[EscrowClaim, SettlementQueue]):
    """Drains `escrow` claims from a store into batched `settle` transactions sent by `sender`."""

    def __init__(self, store: SettlementQueue, sender: TxSender, **options: Unpack[EngineOptions]) -> None:
        self.part = EscrowSettlement(sender)
        settings: EngineOptions = {**_DEFAULTS, **options}
        super().__init__(store, self.part, **settings)
        self.sender = sender
        self.batches = self.part.batches  # (payments, gasUsed) per transaction

    @property
    def gas_used(self) -> int:
        """Total gas over every transaction this settler sent."""
        return self.part.gas_used

    find_settlement = staticmethod(find_settlement)

    async def count_once(self, key: str, *, keep_until: float | None = None) -> bool:
        """See `count_once`: True exactly once per settled payment `key`."""
        return await count_once(self.store, key, keep_until=keep_until)

    async def count_settled(self, claim: EscrowClaim) -> None:
        """See `count_settled`: raise a landed payment's `settled` counters (only after `count_once`)."""
        await count_settled(self.store, claim)

    async def _settled(
        self, pairs: list[Pair], tx_hash: str, status: Status, gas: int = 0
    ) -> list[SettleOutcome]:
        return await self.settled(pairs, tx_hash, status, gas=gas)

    async def _dead(
        self, item: QueuedItem, claim: EscrowClaim, code: str, tx_hash: str, *, detail: str | None = None
    ) -> SettleOutcome:
        return await self.part.dead(self, (item, claim), code, tx_hash, detail=detail)

    # -- settle before serving -------------------------------------------------------------------------------

    async def settle_now(self, claim: EscrowClaim) -> tuple[str, str]:
        """Settle one claim in its own transaction (a gateway past its credit limit, before it serves).

        Returns (tx_hash, code): code "" when paid ("", "" for a metered charge of 0: nothing sent).
        Raises `ChainError` if the transaction did not land.
        """
        escrow = AgentEscrow(self.sender.rpc, claim.escrow)
        if claim.charge == 0:
            return "", ""
        receipt = await self.part.transact(escrow, [claim], self.receipt_timeout)
        self.part.gas_used += int(receipt.gas_used, 16)
        for event in escrow.decode_logs(receipt):
            if event.name == "PaymentFailed":
                return receipt.transaction_hash, reason_code(int(event.args["reason"]))
        self.paid += 1
        return receipt.transaction_hash, ""
