"""Point reads of the SQLite store off the committer: a read-only WAL connection per calling thread.

A lookup by key (a receipt, a settlement record, a high-water mark) is a few microseconds of SQLite, a tenth
of a hand-over to the committer thread and back; a WAL reader never waits for the writer. Each thread that
reads gets its own connection (`sqlite3` connections are not for concurrent use), opened on first use.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

__all__ = ["Readers"]


class Readers:
    """Read-only connections to the database at `path`, one per thread; none for an in-memory database."""

    def __init__(self, path: str) -> None:
        self._uri = None if path == ":memory:" else f"{Path(path).resolve().as_uri()}?mode=ro"
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def here(self) -> sqlite3.Connection | None:
        """This thread's reader (opened now if need be), or None when reads must go to the committer."""
        if self._uri is None or self._closed:
            return None
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self._uri, uri=True, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA busy_timeout = 50")  # waits only for WAL recovery; then the committer reads
            with self._lock:
                self._opened.append(con)
            self._local.con = con
        return con

    def close(self) -> None:
        self._closed = True
        with self._lock:
            opened, self._opened = self._opened, []
        for con in opened:
            con.close()
