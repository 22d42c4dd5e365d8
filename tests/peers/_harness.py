"""Test-side harness for the peer scripts (imported by our tests; stdlib + httpx only).

The official `x402` and `pympp` packages live in .venv-peers because their top-level names clash
with ours, so they only ever run as subprocesses of that venv's interpreter, started with ``-E``
(no PYTHONPATH leaking our tree in) from the scripts' own directory.

* ``run_peer(script, *args)``: run a one-shot peer (a client, the benchmark) and return the JSON
  object it printed on its last line.
* ``PeerServer(script, *args)``: start a peer server on a socket this process bound and listens
  on (handed over as ``--fd``: the port is known before the server starts and nobody can take
  it), wait until ``/health`` answers, and always stop it on exit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

PEERS_DIR = Path(__file__).resolve().parent
REPO = PEERS_DIR.parent.parent
PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"


class PeerError(RuntimeError):
    """A peer process failed or printed no JSON result; the message carries its output."""


def peers_missing() -> str | None:
    """Why the peer venv is unusable, or None when it is there. Under CI (CI=true) the peers are required:
    None, so the tests run and fail loudly instead of skipping."""
    if not PEERS_PYTHON.exists() and not os.environ.get("CI"):
        return f"{PEERS_PYTHON} is missing (run `make setup`)"
    return None


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(extra or {})
    return env


def _command(script: str, args: tuple[str, ...]) -> list[str]:
    return [str(PEERS_PYTHON), "-E", str(PEERS_DIR / script), *args]


def last_json(stdout: str) -> Any:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith(("{", "[")):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def run_peer(
    script: str,
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 300,
) -> Any:
    """Run a one-shot peer script under .venv-peers and return its last-line JSON."""
    done = subprocess.run(
        _command(script, args),
        input=stdin,
        cwd=PEERS_DIR,
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    try:
        result = last_json(done.stdout)
    except ValueError:
        raise PeerError(
            f"{script} exited {done.returncode} without a JSON result\n"
            f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-8000:]}"
        ) from None
    if done.returncode != 0:
        raise PeerError(f"{script} exited {done.returncode}: {result}\n{done.stderr[-8000:]}")
    return result


class PeerServer:
    """A peer server subprocess on a pre-bound socket; a context manager that always stops it."""

    def __init__(
        self,
        script: str,
        *args: str,
        env: dict[str, str] | None = None,
        ready_timeout: float = 60,
        python: str | None = None,
        cwd: Path | None = None,
        module: str | None = None,
    ) -> None:
        self.script = script
        self.args = args
        self.env = env
        self.ready_timeout = ready_timeout
        self.python = python
        self.cwd = cwd
        self.module = module
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self._stderr = tempfile.TemporaryFile()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PeerServer:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.set_inheritable(True)
        self.port = self.sock.getsockname()[1]
        fd = self.sock.fileno()
        if self.python is None:
            command = [*_command(self.script, self.args), "--fd", str(fd)]
            env = _env(self.env)
        else:  # one of our own servers (our venv), e.g. examples.subagent
            target = ["-m", self.module] if self.module else [self.script]
            command = [self.python, *target, *self.args, "--fd", str(fd)]
            env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(
            command,
            cwd=self.cwd or PEERS_DIR,
            env=env,
            pass_fds=(fd,),
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise PeerError(f"{self.script} exited {self.proc.returncode} at start\n{self.stderr()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise PeerError(f"{self.script} did not answer /health\n{self.stderr()}")
            time.sleep(0.1)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")[-8000:]

    def log(self) -> Any:
        """What the peer recorded (its ``/_peer/log``)."""
        return httpx.get(f"{self.url}/_peer/log", timeout=10).json()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> PeerServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self._stderr.close()
