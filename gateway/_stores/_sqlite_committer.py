"""The SQLite store's committer: one thread owns the connection and commits queued calls in groups.

See `gateway._stores.sqlite` for what each kind of call (`READ`, `LIGHT`, `DURABLE`) asks of its commit.
Calls submitted during one event-loop iteration cross to the thread together; the thread takes whatever
has queued up (at most `_MAX_BATCH`), runs it in one transaction, commits once, and hands every result
back to the loop that is waiting for it. A failing call undoes only itself (see `Committer._attempt`).
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["DURABLE", "LIGHT", "READ", "Committer"]

_MAX_BATCH = 256
_Call = Callable[[sqlite3.Connection], Any]
_Outcome = tuple[bool, Any]  # (succeeded, result or exception)
# How much a call needs from its commit: nothing (it reads), to survive a process crash, or to survive a
# power loss too (the configured `synchronous` mode).
READ, LIGHT, DURABLE = 0, 1, 2
_Job = tuple[_Call, "asyncio.Future[Any]", asyncio.AbstractEventLoop, int]


def _hand_back(results: list[tuple[asyncio.Future[Any], _Outcome]]) -> None:
    for future, (ok, value) in results:
        if future.done():  # the caller was cancelled meanwhile
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class Committer:
    """The thread that owns the connection and commits queued calls in groups."""

    def __init__(self, con: sqlite3.Connection, synchronous: str) -> None:
        self._con = con
        self._durable_sync = synchronous
        # a light batch never syncs more than `normal`, nor more than the configured mode
        self._light_sync = "off" if synchronous == "off" else "normal"
        self._sync = synchronous  # the mode the connection is in now
        # Calls submitted during one event-loop iteration cross to the thread together, at its end: one
        # wake-up of the thread (and one GIL hand-over) per iteration rather than per call.
        self._jobs: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        self._pending: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        self._pending_lock = threading.Lock()  # loops on other threads may share the store
        self._thread = threading.Thread(target=self._serve, name="agentpay-sqlite", daemon=True)
        self._thread.start()

    def submit(self, call: _Call, need: int = DURABLE) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._pending_lock:
            pending = self._pending.get(loop)
            if pending is None:
                pending = self._pending[loop] = []
                loop.call_soon(self._hand_over, loop)
            pending.append((call, future, loop, need))
        return future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._pending_lock:
            jobs = self._pending.pop(loop, None)
        if jobs:
            self._jobs.put(jobs)

    async def stop(self) -> None:
        self._hand_over(asyncio.get_running_loop())
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            first = self._jobs.get()
            if first is None:
                break
            batch = list(first)
            while len(batch) < _MAX_BATCH:
                try:
                    jobs = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if jobs is None:
                    stopping = True
                    break
                batch.extend(jobs)
            outcomes = self._execute(batch)
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], _Outcome]]] = {}
            for (_, future, loop, _), outcome in zip(batch, outcomes, strict=True):
                by_loop.setdefault(loop, []).append((future, outcome))
            for loop, results in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_hand_back, results)
                except RuntimeError:  # that event loop is closed: nobody is waiting any more
                    pass
        self._con.close()

    def _execute(self, batch: list[_Job]) -> list[_Outcome]:
        need = max(job[3] for job in batch)
        try:
            outcomes = self._attempt(batch, need, isolate=False)
            if outcomes is None:  # a call failed: undo the batch, rerun it a savepoint per call
                outcomes = self._attempt(batch, need, isolate=True)
                assert outcomes is not None
        except Exception as exc:  # locked past busy_timeout, disk full, ...: nothing in the batch happened
            con = self._con
            if con.in_transaction:
                try:
                    con.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            return [(False, exc)] * len(batch)
        return outcomes

    def _attempt(self, batch: list[_Job], need: int, *, isolate: bool) -> list[_Outcome] | None:
        """Run `batch` in one transaction and commit it; None (rolled back) when a call raised and
        `isolate` is false.

        Most batches fail nowhere, so the first attempt runs the calls back to back: two statements
        (SAVEPOINT, RELEASE) per call were about as many as the calls' own. When one raises, the whole
        transaction is rolled back and the batch rerun with a savepoint per call, so a failing call
        undoes only itself. Rerunning is safe: a call is a function of the database (its arguments,
        tokens included, are fixed when it is submitted) and touches nothing outside the connection.
        A lone call needs no savepoint either way: its failure rolls back the whole transaction.
        """
        con = self._con
        if need == READ:
            con.execute("BEGIN")  # one snapshot for the batch; no write lock, nothing to sync
        else:
            sync = self._durable_sync if need == DURABLE else self._light_sync
            if sync != self._sync:  # only outside a transaction
                con.execute(f"PRAGMA synchronous = {sync}")
                self._sync = sync
            con.execute("BEGIN IMMEDIATE")
        outcomes: list[_Outcome] = []
        if len(batch) == 1 or not isolate:
            for call, _, _, _ in batch:
                try:
                    outcomes.append((True, call(con)))
                except Exception as exc:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
                    if len(batch) == 1:
                        return [(False, exc)]
                    return None
        else:
            for call, _, _, kind in batch:
                outcomes.append(self._savepoint(con, call) if kind != READ else self._read(con, call))
        con.execute("COMMIT")
        return outcomes

    @staticmethod
    def _read(con: sqlite3.Connection, call: _Call) -> _Outcome:
        try:
            return (True, call(con))
        except Exception as exc:  # a read changed nothing: nothing to undo
            return (False, exc)

    @staticmethod
    def _savepoint(con: sqlite3.Connection, call: _Call) -> _Outcome:
        con.execute("SAVEPOINT call")
        try:
            outcome: _Outcome = (True, call(con))
        except Exception as exc:
            con.execute("ROLLBACK TO call")
            outcome = (False, exc)
        con.execute("RELEASE call")
        return outcome
