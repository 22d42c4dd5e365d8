"""The batching settler of `escrow` claims: lease from the store's queue, `settle` in one transaction, then
reconcile each claim from the receipt's events.

    settler = EscrowSettler(store, relayer, batch_size=32, max_age=2.0)
    await settler.run(stop_event)        # or: await settler.drain() (tests, shutdown)

Outcomes, per claim:

- `settled`: `PaymentSettled` in our receipt;
- `settled_elsewhere`: the escrow says `NonceUsed`, and a `PaymentSettled` log shows this very payment (same
  payer, payee, signer, token, amount, nonce): someone (another settler, a receipt we never saw) already
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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Literal, Protocol

import msgspec

from x402._escrow import EscrowCode, EscrowPayload, reason_code

from ._escrow import AgentEscrow, EscrowEvent, topic_address
from ._escrow_verify import EscrowClaim
from ._queue import QueuedItem
from ._queue import SettlementQueue as _BaseQueue
from ._rpc import ChainError, Receipt, TxSender

__all__ = ["EscrowSettler", "SettleOutcome", "SettlementQueue", "decode_claim", "encode_claim"]

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


Status = Literal["settled", "settled_elsewhere", "retry", "dead"]


class SettleOutcome(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    status: Status
    code: str = ""  # empty when settled
    tx_hash: str = ""
    replaced: tuple[str, ...] = ()  # hashes `tx_hash` replaced at the same nonce (stuck, fee-bumped)
    gas: int = 0  # this payment's share of the transaction's gasUsed
    amount: int = 0
    payer: str = ""
    payee: str = ""
    signer: str = ""


class EscrowSettler:
    """Drains `escrow` claims from a store into batched `settle` transactions sent by `sender`."""

    def __init__(
        self,
        store: SettlementQueue,
        sender: TxSender,
        *,
        batch_size: int = 32,
        max_age: float = 2.0,
        tick: float = 0.05,
        lease_seconds: float = 120.0,
        receipt_timeout: float = 30.0,
        retry_base: float = 1.0,
        retry_cap: float = 300.0,
        max_attempts: int = 20,
        on_outcome: Callable[[SettleOutcome], Awaitable[None] | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.sender = sender
        self.batch_size = batch_size
        self.max_age = max_age
        self.tick = tick
        self.lease_seconds = lease_seconds
        self.receipt_timeout = receipt_timeout
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.max_attempts = max_attempts
        self.on_outcome = on_outcome
        self.clock = clock
        self._buffer: list[QueuedItem] = []
        self.gas_used = 0  # total over every batch this settler sent
        self.paid = 0  # payments settled by this settler's transactions
        self.batches: list[tuple[int, int]] = []  # (payments, gasUsed) per transaction

    # -- the loop ------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Settle until `stop` is set; then settle what is buffered and return."""
        while not stop.is_set():
            await self.step()
            try:
                await asyncio.wait_for(stop.wait(), self.tick)
            except TimeoutError:
                pass
        await self.step(force=True)

    async def step(self, *, force: bool = False) -> list[SettleOutcome]:
        """Lease what is due; settle a batch if it is full, its oldest claim is `max_age` old, or `force`."""
        room = self.batch_size - len(self._buffer)
        if room > 0:
            self._buffer.extend(await self.store.lease(KIND, limit=room, lease_seconds=self.lease_seconds))
        if not self._buffer:
            return []
        oldest = min(item.created_at for item in self._buffer)
        if not force and len(self._buffer) < self.batch_size and self.clock() - oldest < self.max_age:
            return []
        batch, self._buffer = self._buffer, []
        return await self.settle_items(batch)

    async def drain(self) -> list[SettleOutcome]:
        """Settle everything due now, in full batches (tests, shutdown); stops at a batch that only got
        retries, which are not due again until their backoff has passed."""
        out: list[SettleOutcome] = []
        while True:
            done = await self.step(force=True)
            out.extend(done)
            if all(o.status == "retry" for o in done):
                return out

    # -- one batch -----------------------------------------------------------------------------------------

    async def settle_items(self, items: Sequence[QueuedItem]) -> list[SettleOutcome]:
        groups: dict[str, list[tuple[QueuedItem, EscrowClaim]]] = {}
        out: list[SettleOutcome] = []
        for item in items:
            try:
                claim = decode_claim(item.payload)
            except msgspec.DecodeError as exc:
                await self.store.mark_failed(
                    item.key, error=f"escrow_claim_malformed: {exc}", retry_at=None, lease=item.lease_token
                )
                out.append(SettleOutcome(key=item.key, status="dead", code="escrow_claim_malformed"))
                continue
            if claim.chain_id != self.sender.chain_id:
                await self.store.mark_failed(
                    item.key,
                    error="escrow_wrong_chain: not this relayer's chain",
                    retry_at=None,
                    lease=item.lease_token,
                )
                out.append(SettleOutcome(key=item.key, status="dead", code="escrow_wrong_chain"))
                continue
            if claim.charge == 0:  # metered to nothing: no transaction, and the nonce stays unused
                out.extend(await self._settled([(item, claim)], "", "settled"))
                continue
            groups.setdefault(claim.escrow.lower(), []).append((item, claim))
        for group in groups.values():
            out.extend(await self._settle_group(group))
        for outcome in out:
            if self.on_outcome is not None:
                result = self.on_outcome(outcome)
                if result is not None:
                    await result
        return out

    async def _submit(self, escrow: AgentEscrow, claims: Sequence[EscrowClaim]) -> Receipt:
        payloads: list[EscrowPayload] = [claim.payload for claim in claims]
        if any(claim.actual is not None for claim in claims):
            data = escrow.settle_metered_calldata(payloads, [claim.charge for claim in claims])
        else:  # the plain batch: cheaper calldata, and anyone may send it
            data = escrow.settle_calldata(payloads)
        try:
            estimate = await self.sender.rpc.request(
                "eth_estimateGas",
                [{"from": self.sender.address, "to": escrow.address, "data": "0x" + data.hex()}],
            )
            gas = int(estimate, 16) * 6 // 5 + 20_000
        except ChainError:
            gas = 80_000 + 60_000 * len(payloads)  # a revert here is decided by the real transaction
        return await self.sender.transact(escrow.address, data, gas=gas, timeout=self.receipt_timeout)

    async def _settle_group(self, group: list[tuple[QueuedItem, EscrowClaim]]) -> list[SettleOutcome]:
        escrow = AgentEscrow(self.sender.rpc, group[0][1].escrow)
        try:
            receipt = await self._submit(escrow, [claim for _, claim in group])
        except ChainError as exc:
            return [await self._retry(item, claim, f"{exc.code}: {exc}") for item, claim in group]
        gas = int(receipt.gas_used, 16)
        self.gas_used += gas
        self.batches.append((len(group), gas))
        share = gas // len(group)
        failed: dict[int, int] = {}
        for event in escrow.decode_logs(receipt):
            if event.name == "PaymentFailed":
                failed[int(event.args["index"])] = int(event.args["reason"])
        out: list[SettleOutcome] = []
        settled: list[tuple[QueuedItem, EscrowClaim]] = []
        for index, (item, claim) in enumerate(group):
            reason = failed.get(index, 0)
            if reason == 0:
                settled.append((item, claim))
            elif reason == _NONCE_USED:
                out.append(await self._nonce_used(escrow, item, claim))
            elif reason in _RETRYABLE and self._may_retry(item, claim):
                out.append(await self._retry(item, claim, f"{reason_code(reason)}: will retry"))
            else:
                out.append(await self._dead(item, claim, reason_code(reason), receipt.transaction_hash))
        if settled:
            self.paid += len(settled)
            out.extend(await self._settled(settled, receipt.transaction_hash, "settled", share))
        return out

    # -- outcomes ------------------------------------------------------------------------------------------

    def _may_retry(self, item: QueuedItem, claim: EscrowClaim) -> bool:
        return item.attempts < self.max_attempts and int(claim.payload.payment.deadline) > self.clock()

    def _outcome(self, item: QueuedItem, claim: EscrowClaim, status: Status, **kw: object) -> SettleOutcome:
        p = claim.payload.payment
        return SettleOutcome(
            key=item.key,
            status=status,
            amount=claim.charge,
            payer=p.payer,
            payee=p.payee,
            signer=claim.signer,
            **kw,  # type: ignore[arg-type]
        )

    async def _settled(
        self, pairs: list[tuple[QueuedItem, EscrowClaim]], tx_hash: str, status: Status, gas: int = 0
    ) -> list[SettleOutcome]:
        out = []
        for item, claim in pairs:
            deadline = float(int(claim.payload.payment.deadline))
            # whoever reports it: this settler, another, or recovery
            if await self.count_once(item.key, keep_until=deadline):
                amount = int(claim.payload.payment.amount)
                await self.count_settled(claim)
                if claim.credit is not None:
                    await self.store.sub_pending(claim.credit, amount)
            out.append(self._outcome(item, claim, status, tx_hash=tx_hash, gas=gas))
        by_lease: dict[str | None, list[str]] = {}
        for item, _ in pairs:  # a batch may hold items of several leases
            by_lease.setdefault(item.lease_token, []).append(item.key)
        for lease, keys in by_lease.items():
            await self.store.mark_settled(keys, tx_hash=tx_hash, lease=lease)
        return out

    async def count_settled(self, claim: EscrowClaim) -> None:
        """A payment landed: raise its `settled` counters (budget and deposit) by what it paid, which is what
        releases its reservations (pending = reserved - settled; see `escrow._exposure`); a metered charge
        below the maximum also gives back the rest of the maximum it reserved. Only after `count_once`."""
        charge = claim.charge
        unused = int(claim.payload.payment.amount) - charge
        for settled, reserved in (
            (claim.settled, claim.reserved),
            (claim.deposit_settled, claim.deposit_reserved),
        ):
            if settled is not None and charge:
                await self.store.add_pending(settled, charge, limit=_UINT256_MAX)
            if reserved is not None and unused:
                await self.store.sub_pending(reserved, unused)

    async def count_once(self, key: str, *, keep_until: float | None = None) -> bool:
        """True exactly once per settled payment `key`: the one caller that may move its spend counters.

        A permanent marker in the store (kept at least until `keep_until`, the payment's deadline, after
        which it cannot be reported settled again), taken before the counters move: a crash in between
        under-counts this gateway's settled spend, so it refuses early; counting twice would let it
        overspend a grant.
        """
        marker = f"{key}#counted"
        if await self.store.claim(marker, ttl=_FOREVER) is None:
            return False
        await self.store.finalize(marker, keep_until=keep_until)
        return True

    async def _retry(self, item: QueuedItem, claim: EscrowClaim, error: str) -> SettleOutcome:
        if not self._may_retry(item, claim):
            code = error.split(":", 1)[0]
            return await self._dead(
                item, claim, code, "", detail=f"gave up after {item.attempts} attempts: {error}"
            )
        delay = min(self.retry_cap, self.retry_base * 2.0 ** max(item.attempts - 1, 0))
        await self.store.mark_failed(
            item.key, error=error, retry_at=self.clock() + delay, lease=item.lease_token
        )
        return self._outcome(item, claim, "retry", code=error.split(":", 1)[0])

    async def _dead(
        self, item: QueuedItem, claim: EscrowClaim, code: str, tx_hash: str, *, detail: str | None = None
    ) -> SettleOutcome:
        p = claim.payload.payment
        amount = int(p.amount)
        detail = detail or (
            f"lost {amount} of {p.token} from payer {p.payer} (session key {claim.signer}, nonce {p.nonce})"
            + (f" in {tx_hash}" if tx_hash else "")
        )
        recorded = await self.store.mark_failed(
            item.key, error=f"{code}: {detail}", retry_at=None, lease=item.lease_token
        )
        if not recorded:  # another settler holds it now (or it settled): its outcome moves the counters
            return self._outcome(item, claim, "dead", code=code, tx_hash=tx_hash)
        # Never charged: give back every reservation it held.
        for account in (claim.reserved, claim.deposit_reserved, claim.credit):
            if account is not None:
                await self.store.sub_pending(account, amount)
        return self._outcome(item, claim, "dead", code=code, tx_hash=tx_hash)

    async def _nonce_used(self, escrow: AgentEscrow, item: QueuedItem, claim: EscrowClaim) -> SettleOutcome:
        """Tell "this payment was already settled" (fine) from "the nonce paid another payment" (a loss)."""
        try:
            found = await self.find_settlement(escrow, claim)
        except ChainError as exc:
            return await self._retry(item, claim, f"{exc.code}: looking up the earlier settlement")
        if found is None:
            return await self._dead(item, claim, EscrowCode.NONCE_REUSED, "")
        (outcome,) = await self._settled([(item, claim)], found.tx_hash, "settled_elsewhere")
        return outcome

    @staticmethod
    async def find_settlement(escrow: AgentEscrow, claim: EscrowClaim) -> EscrowEvent | None:
        """The `PaymentSettled` log of exactly this payment, if the escrow has one."""
        p = claim.payload.payment
        events = await escrow.logs(
            ["PaymentSettled"],
            from_block=max(0, claim.from_block - _LOOKBACK),
            topics=[topic_address(p.payer), topic_address(p.payee), topic_address(claim.signer)],
        )
        for event in events:
            a = event.args
            if (
                str(a["token"]).lower() == p.token.lower()
                and int(a["amount"]) == claim.charge
                and int(a["nonce"]) == int(p.nonce)
            ):
                return event
        return None

    # -- settle before serving -------------------------------------------------------------------------------

    async def settle_now(self, claim: EscrowClaim) -> tuple[str, str]:
        """Settle one claim in its own transaction (a gateway past its credit limit, before it serves).

        Returns (tx_hash, code): code "" when paid ("", "" for a metered charge of 0: nothing sent).
        Raises `ChainError` if the transaction did not land.
        """
        escrow = AgentEscrow(self.sender.rpc, claim.escrow)
        if claim.charge == 0:
            return "", ""
        receipt = await self._submit(escrow, [claim])
        self.gas_used += int(receipt.gas_used, 16)
        for event in escrow.decode_logs(receipt):
            if event.name == "PaymentFailed":
                return receipt.transaction_hash, reason_code(int(event.args["reason"]))
        self.paid += 1
        return receipt.transaction_hash, ""
