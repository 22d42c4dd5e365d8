"""The settlement engine: one loop that drains a store's settlement queue, whatever the payment scheme.

    engine = SettlementEngine(store, scheme, kind="exact", batch_size=64, max_age=0.5)
    await engine.run(stop)               # or step() in a supervised loop; drain() in tests, at shutdown

The engine owns everything schemes share: leasing due items (`store.lease`, each under a lease token),
batching by count (`batch_size`) and age (`max_age`), the run/step/drain loop, decoding (an undecodable
payload is a dead letter), exponential backoff (`retry_base`, `retry_cap`), the retry cap (`max_attempts`),
recording every outcome under the item's `lease=` token (`settled` / `retry` / `dead`), renewing the leases
of a batch while it is sent and its receipts awaited (`store.renew_lease` every third of `lease_seconds`), the
per-batch warning line, and the `on_outcome` callback. A scheme adds only its part, a `SchemeSettlement`:

- `name` (log label), `malformed` (dead code of an undecodable payload), `decode(raw) -> payment`;
- `async submit(engine, jobs) -> outcomes`: send a batch of (item, payment) jobs and judge the receipts;
- `async reconcile(engine, jobs) -> outcomes`: recovery, record what the chain already shows, never send;
- `parties(payment)`: amount, payer, payee (and signer) for the job's `SettleOutcome`;
- `retry_at(engine, payment, delay=)` / `gives_up(payment, now)`: when a failed job is tried again, or never;
- `on_settled(engine, job)` / `on_dead(engine, job, recorded=)`: counters to move (reservations, spend).

Inside `submit` / `reconcile` a part reports through `engine.settled(jobs, tx_hash, status)`,
`engine.retry(job, error)` and `engine.dead(job, code, detail)`. `exact` (EIP-3009) and `escrow` (batched
`settle`) and `channel` (AgentChannels `settle` / `close` of a channel's latest voucher) are the parts;
`upto` settles before the response and needs none. Each public settler (`ExactSettler`, `EscrowSettler`,
`ChannelSettler`) is a `SettlementEngine` subclass that builds its
part and passes its own defaults for the knobs (`EngineOptions`, the same keywords for every scheme).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Literal, NamedTuple, Protocol, TypeAlias, TypedDict, TypeVar

import msgspec

from ._queue import QueuedItem, SettlementQueue

__all__ = [
    "EngineOptions",
    "Job",
    "Parties",
    "SchemeSettlement",
    "SettleOutcome",
    "SettlementEngine",
    "Status",
]

log = logging.getLogger("agentpay.settler")

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


class Parties(NamedTuple):
    """Who pays whom how much, for a payment's `SettleOutcome`."""

    amount: int
    payer: str
    payee: str
    signer: str = ""


P = TypeVar("P")  # a scheme's decoded payment
Q = TypeVar("Q", bound=SettlementQueue)  # the part of the store a scheme's counters need
Job: TypeAlias = tuple[QueuedItem, P]


class SchemeSettlement(Protocol[P, Q]):
    """What one payment scheme adds to the engine (see the module doc)."""

    name: str
    malformed: str

    def decode(self, raw: bytes) -> P:
        """The queued payment; raises `msgspec.DecodeError` (or `ValidationError`) when malformed."""
        ...

    async def submit(self, engine: SettlementEngine[P, Q], jobs: list[Job[P]]) -> list[SettleOutcome]: ...
    async def reconcile(self, engine: SettlementEngine[P, Q], jobs: list[Job[P]]) -> list[SettleOutcome]: ...
    def parties(self, payment: P) -> Parties: ...
    def retry_at(self, engine: SettlementEngine[P, Q], payment: P, *, delay: float) -> float: ...
    def gives_up(self, payment: P, now: float) -> bool: ...
    async def on_settled(self, engine: SettlementEngine[P, Q], job: Job[P]) -> None: ...
    async def on_dead(self, engine: SettlementEngine[P, Q], job: Job[P], *, recorded: bool) -> None: ...


class EngineOptions(TypedDict, total=False):
    """The engine's knobs, as keywords of every settler (each scheme has its own defaults)."""

    kind: str  # the store queue drained
    batch_size: int  # a batch is settled when it holds this many items...
    max_age: float  # ...or its oldest item is this many seconds old
    tick: float  # seconds between steps of `run`
    lease_seconds: float  # how long a leased item is ours before another settler may take it
    receipt_timeout: float  # how long a sent transaction's receipt is awaited
    retry_base: float  # backoff after the first failure, doubling with each attempt...
    retry_cap: float  # ...up to this
    max_attempts: int | None  # failures after which an item is dead (None: the scheme decides)
    on_outcome: Callable[[SettleOutcome], Awaitable[None] | None] | None  # told every settled outcome
    clock: Callable[[], float]


class SettlementEngine(Generic[P, Q]):
    """Drains `kind` settlements from `store` in batches, settling each batch through `scheme`."""

    def __init__(
        self,
        store: Q,
        scheme: SchemeSettlement[P, Q],
        *,
        kind: str,
        batch_size: int = 32,
        max_age: float = 1.0,
        tick: float = 0.05,
        lease_seconds: float = 120.0,
        receipt_timeout: float = 30.0,
        retry_base: float = 1.0,
        retry_cap: float = 60.0,
        max_attempts: int | None = None,
        on_outcome: Callable[[SettleOutcome], Awaitable[None] | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.scheme = scheme
        self.kind = kind
        self.batch_size = batch_size
        self.max_age = max_age
        self.tick = tick
        self.lease_seconds = lease_seconds
        # The lease is renewed while a batch is in flight (`_renewing`), so a receipt may be awaited longer
        # than one lease. A send not seen mined in `receipt_timeout` is recorded as pending (with its hash)
        # under our lease, so the settler that leases it next waits for that very transaction instead of
        # sending again.
        self.receipt_timeout = receipt_timeout
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.max_attempts = max_attempts  # None: retried until the scheme gives up on the payment
        self.on_outcome = on_outcome
        self.clock = clock
        self._buffer: list[QueuedItem] = []
        self.paid = 0  # payments settled by this engine's own transactions

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
        """Lease what is due; settle a batch when it is full, its oldest item is `max_age` old, or `force`."""
        room = self.batch_size - len(self._buffer)
        if room > 0:
            self._buffer.extend(
                await self.store.lease(self.kind, limit=room, lease_seconds=self.lease_seconds)
            )
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
        """Settle leased `items`: what the chain has seen is recorded, the rest is sent."""
        return await self._process(items, send=True)

    async def reconcile_items(self, items: Sequence[QueuedItem]) -> list[SettleOutcome]:
        """Record what the chain has seen of leased `items`; send nothing (recovery)."""
        return await self._process(items, send=False)

    async def _process(self, items: Sequence[QueuedItem], *, send: bool) -> list[SettleOutcome]:
        out: list[SettleOutcome] = []
        jobs: list[Job[P]] = []
        malformed = self.scheme.malformed
        for item in items:
            try:
                payment = self.scheme.decode(item.payload)
            except msgspec.DecodeError as exc:  # ValidationError included: nothing to settle, ever
                await self.store.mark_failed(
                    item.key, error=f"{malformed}: {exc}", retry_at=None, lease=item.lease_token
                )
                out.append(SettleOutcome(key=item.key, status="dead", code=malformed))
                continue
            jobs.append((item, payment))
        if jobs:
            settle = self.scheme.submit if send else self.scheme.reconcile
            renewing = asyncio.ensure_future(self._renewing([item for item, _ in jobs]))
            try:
                out.extend(await settle(self, jobs))
            finally:
                renewing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewing
        troubles = Counter(f"{o.status} {o.code}" for o in out if o.status in ("retry", "dead"))
        if troubles:  # one line per batch, not per payment: an outage must not flood the log
            log.warning("%s settlement of %d payment(s): %s", self.scheme.name, len(items), dict(troubles))
        if send and self.on_outcome is not None:  # what this engine settled, not what recovery recorded
            for outcome in out:
                result = self.on_outcome(outcome)
                if result is not None:
                    await result
        return out

    async def _renewing(self, items: Sequence[QueuedItem]) -> None:
        """Keep `items` leased to us while their batch is sent and awaited: renewed every third of a lease,
        so a store or chain slower than one lease cannot hand them to another settler mid-send."""
        by_lease: dict[str, list[str]] = {}
        for item in items:
            if item.lease_token is not None:
                by_lease.setdefault(item.lease_token, []).append(item.key)
        while by_lease:
            await asyncio.sleep(self.lease_seconds / 3)
            for lease, keys in by_lease.items():
                try:
                    await self.store.renew_lease(keys, lease=lease, lease_seconds=self.lease_seconds)
                except Exception as exc:  # the lease may lapse: the pending-hash record still guards a resend
                    log.warning("renewing %d lease(s) failed: %r", len(keys), exc)

    # -- outcomes, recorded under each item's lease --------------------------------------------------------

    def outcome(
        self,
        job: Job[P],
        status: Status,
        *,
        code: str = "",
        tx_hash: str = "",
        gas: int = 0,
        replaced: tuple[str, ...] = (),
    ) -> SettleOutcome:
        amount, payer, payee, signer = self.scheme.parties(job[1])
        return SettleOutcome(
            key=job[0].key,
            status=status,
            code=code,
            tx_hash=tx_hash,
            replaced=replaced,
            gas=gas,
            amount=amount,
            payer=payer,
            payee=payee,
            signer=signer,
        )

    def backoff(self, attempts: int) -> float:
        """Seconds before a job that failed `attempts` times is tried again."""
        return min(self.retry_cap, self.retry_base * 2.0 ** min(max(attempts - 1, 0), 30))

    def may_retry(self, job: Job[P]) -> bool:
        """Whether a failure of `job` is tried again (else it is final: `dead`)."""
        item, payment = job
        if self.max_attempts is not None and item.attempts >= self.max_attempts:
            return False
        return not self.scheme.gives_up(payment, self.clock())

    async def settled(
        self,
        jobs: Sequence[Job[P]],
        tx_hash: str,
        status: Status,
        *,
        gas: int = 0,
        replaced: tuple[str, ...] = (),
    ) -> list[SettleOutcome]:
        """`jobs` landed in `tx_hash`: move the scheme's counters, then record them settled."""
        out = []
        if status == "settled":
            self.paid += len(jobs)
        for job in jobs:
            await self.scheme.on_settled(self, job)
            out.append(self.outcome(job, status, tx_hash=tx_hash, gas=gas, replaced=replaced))
        by_lease: dict[str | None, list[str]] = {}
        for item, _ in jobs:  # a batch may hold items of several leases
            by_lease.setdefault(item.lease_token, []).append(item.key)
        for lease, keys in by_lease.items():
            await self.store.mark_settled(keys, tx_hash=tx_hash, lease=lease)
        return out

    async def retry(self, job: Job[P], error: str) -> SettleOutcome:
        """Try `job` again after its backoff; past the retry cap (or the scheme's limit) it is dead."""
        item, payment = job
        code = error.split(":", 1)[0]
        if not self.may_retry(job):
            return await self.dead(job, code, f"gave up after {item.attempts} attempts: {error}")
        retry_at = self.scheme.retry_at(self, payment, delay=self.backoff(item.attempts))
        await self.store.mark_failed(item.key, error=error, retry_at=retry_at, lease=item.lease_token)
        return self.outcome(job, "retry", code=code)

    async def dead(self, job: Job[P], code: str, detail: str, *, tx_hash: str = "") -> SettleOutcome:
        """A dead letter: never tried again; the store's `error` says why (`"<code>: <detail>"`)."""
        item, _ = job
        recorded = await self.store.mark_failed(
            item.key, error=f"{code}: {detail}", retry_at=None, lease=item.lease_token
        )
        await self.scheme.on_dead(self, job, recorded=recorded)
        return self.outcome(job, "dead", code=code, tx_hash=tx_hash)
