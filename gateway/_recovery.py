"""Recovery: finish what a stopped or crashed gateway left half done, and keep the settlement queues moving.

    recovery = Recovery(store, settlers=[exact_settler], reconcilers={"exact": exact_settler}, claim_ttl=300)
    await recovery.start()     # one recovery pass, then the loops (an app's lifespan startup)
    await recovery.stop()      # lifespan shutdown: the settlers flush what they hold

The store holds two kinds of settlement records, and each has its own way back after a crash:

- `<kind>` (`exact`, `escrow`): served under `settle="deferred"`, owned by a batching settler
  (`escrow.ExactSettler`, `escrow.EscrowSettler`) that leases, sends and records. A lease that ran out (its
  settler died) is due again, and the settler's look at the chain before sending keeps a transaction that
  already landed from being sent twice. `Recovery` runs these settlers' loops.
- `<kind>:now` (see `gateway._scheme.in_flight_kind`): written by the pipeline just before it settles a
  payment *before* answering, and marked settled right after. A record still open means the process died
  (or the outcome was unknown) while the transaction may have been out. The response was never sent, so
  recovery never sends either: the chain decides (`reconcile_items`): on chain means settled (and the key
  is finalized, so it can never be served again); not on chain means nothing was charged, and the payer
  may present the payment again.

An open `:now` record whose payment is still held by a live replay claim belongs to a request in progress,
maybe on another replica: it is left alone (its lease keeps other passes off it for a claim TTL). Once the
claim has expired, recovery takes the claim itself while it asks the chain, so the payment cannot be served
meanwhile. The claim TTL must therefore exceed a handler's run time plus one settlement.

With `retention` set, a third loop purges the store every `purge_every` seconds (see `PaymentStore.purge`:
nothing goes before its payment's validity has ended), so a long-running gateway's store stops growing.

Every loop step is supervised: a store or RPC outage is logged and retried with backoff, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

from escrow.payments._settler import SettleOutcome

from ._scheme import in_flight_kind
from ._store import ClaimLost, PaymentStore, Settlement, backoff

__all__ = ["Reconciler", "Recovery", "Stepper"]

log = logging.getLogger("agentpay.recovery")

_PAID = frozenset({"settled", "settled_elsewhere"})


class Reconciler(Protocol):
    """Closes in-flight records from the chain without sending (`ExactSettler`, `EscrowScheme`)."""

    async def reconcile_items(self, items: Sequence[Settlement]) -> Sequence[SettleOutcome]: ...


class Stepper(Protocol):
    """A batching settler driven one step at a time (`ExactSettler`, `EscrowSettler`)."""

    @property
    def tick(self) -> float: ...

    async def step(self, *, force: bool = False) -> Sequence[SettleOutcome]: ...


class Recovery:
    """Runs the settlers of deferred payments and reconciles in-flight ones; see the module doc.

    `reconcilers` maps a scheme's queue kind (`exact`) to what closes its `exact:now` records. `claim_ttl`
    should be the pipeline's; `interval` is how often open in-flight records are looked at.
    """

    def __init__(
        self,
        store: PaymentStore,
        *,
        settlers: Sequence[Stepper] = (),
        reconcilers: Mapping[str, Reconciler] | None = None,
        claim_ttl: float = 300.0,
        interval: float = 5.0,
        batch: int = 100,
        start_timeout: float = 30.0,
        stop_timeout: float = 30.0,
        retention: float | None = None,
        purge_every: float = 600.0,
    ) -> None:
        self.store = store
        self.settlers = list(settlers)
        self.reconcilers = dict(reconcilers or {})
        self.claim_ttl = claim_ttl
        self.interval = interval
        self.batch = batch
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.retention = retention
        self.purge_every = purge_every
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- one pass ------------------------------------------------------------------------------------------

    async def recover(self) -> list[SettleOutcome]:
        """Look at every open in-flight record once: close what the chain has decided, release the rest."""
        out: list[SettleOutcome] = []
        for kind, reconciler in self.reconcilers.items():
            while True:
                # Leased for a claim TTL: a record we must leave alone stays out of the next passes meanwhile.
                leased = await self.store.lease(
                    in_flight_kind(kind), limit=self.batch, lease_seconds=self.claim_ttl
                )
                taken = {item.key: await self._take(item.key) for item in leased}
                ours = [item for item in leased if taken[item.key] is not None]
                if ours:
                    outcomes = await reconciler.reconcile_items(ours)
                    expiry = {item.key: item.expires_at for item in ours}
                    for outcome in outcomes:
                        holder = taken.get(outcome.key)
                        if outcome.status in _PAID:  # paid: never served again
                            await self.store.finalize(outcome.key, keep_until=expiry.get(outcome.key))
                        elif holder:  # not charged: may be presented again
                            with contextlib.suppress(ClaimLost):  # lapsed: already free
                                await self.store.release(outcome.key, holder)
                    out.extend(outcomes)
                if len(leased) < self.batch:
                    break
        return out

    async def _take(self, key: str) -> str | None:
        """Our holder token ("" when finalized: nothing to hold), or None when a live request owns it."""
        # Finalized: its request completed after the transaction, only the record is missing. Otherwise the
        # claim decides: held means a live request owns the payment.
        if await self.store.is_finalized(key):
            return ""
        return await self.store.claim(key, ttl=self.claim_ttl)

    # -- the loops -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """One recovery pass (bounded by `start_timeout`), then the settler and reconcile loops."""
        if self._tasks:
            return
        self._stop.clear()
        try:
            done = await asyncio.wait_for(self.recover(), self.start_timeout)
            if done:
                log.warning("recovered %d in-flight settlement(s) at start", len(done))
        except Exception as exc:  # the loop below tries again; starting must not depend on the chain
            log.warning("recovery at start did not finish: %r", exc)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._drive(settler)) for settler in self.settlers]
        if self.reconcilers:
            self._tasks.append(loop.create_task(self._reconcile_loop()))
        if self.retention is not None:
            self._tasks.append(loop.create_task(self._purge_loop(self.retention)))

    async def stop(self) -> None:
        """Stop the loops; each settler gets one last forced step (bounded by `stop_timeout`)."""
        self._stop.set()
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.stop_timeout)
        for task in pending:  # still waiting on a chain that does not answer: leases expire, nothing is lost
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _drive(self, settler: Stepper) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                await settler.step()
                failures = 0
            except Exception as exc:
                failures += 1
                log.error("settler step failed (%d in a row): %r", failures, exc)
            await self._pause(
                backoff(failures, base=settler.tick * 20, cap=30.0) if failures else settler.tick
            )
        try:
            await settler.step(force=True)
        except Exception as exc:
            log.error("final settler step failed; leases will expire and be retried: %r", exc)

    async def _reconcile_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            await self._pause(backoff(failures, base=self.interval, cap=60.0) if failures else self.interval)
            if self._stop.is_set():
                return
            try:
                await self.recover()
                failures = 0
            except Exception as exc:
                failures += 1
                log.error("recovery pass failed (%d in a row): %r", failures, exc)

    async def _purge_loop(self, retention: float) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                purged = await self.store.purge(retention=retention)
                failures = 0
                if purged.claims or purged.settlements:
                    log.info("purged %s", purged)
            except Exception as exc:
                failures += 1
                log.error("purge failed (%d in a row): %r", failures, exc)
            await self._pause(
                backoff(failures, base=self.purge_every, cap=3600.0) if failures else self.purge_every
            )

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
