"""Sub-agents for the demo: small paid APIs behind agentpay gateways, served in-process on real ports.

    agent = SubAgent.escrow(state, name="summarizer", pay_to=account, settler_key=key, routes={"/x": 1_000})
    async with serving(agent):           # uvicorn on 127.0.0.1:<free port>, in this event loop
        ...                              # agent.url; agent.store / agent.settler: the operator's view

An `escrow` sub-agent verifies each session-key payment (signature, grant, cap, budget: one `check` call),
serves the request, and queues the claim; its own settler, running inside the app, submits the queued claims
in one batched `settle` once the oldest is `max_age` seconds old, and pays that gas with the sub-agent's key.
An `exact` sub-agent settles each EIP-3009 payment before it responds (one `transferWithAuthorization`).
Either way the money goes to `pay_to`: here, the sub-agent's own counterfactual smart-account address.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from escrow import DevnetState
from escrow._escrow import AgentEscrow
from escrow._escrow_verify import EscrowVerifier, GrantCache
from escrow._exact import ExactEvm
from escrow._rpc import Rpc, TxSender
from escrow._settler import EscrowSettler
from gateway import Asset, ExactScheme, MemoryStore, PaymentMiddleware, QueueStats, Scheme
from gateway._escrow_scheme import EscrowScheme

__all__ = ["CREDIT_CALLS", "SubAgent", "demo_asset", "serving"]

#: An escrow sub-agent's default credit limit, in calls of its dearest route: how much it serves one payer
#: before that payer's earlier calls have settled. Past it, a call is settled before its response.
CREDIT_CALLS = 10

Kind = Literal["escrow", "exact"]


def demo_asset(state: DevnetState) -> Asset:
    return Asset(
        address=state.contracts["usdc"],
        chain_id=state.chain_id,
        name=state.usdc_name,
        version=state.usdc_version,
        decimals=state.usdc_decimals,
    )


class SubAgent:
    """One sub-agent: a Starlette app with priced `GET` routes, its gateway, its store and (for `escrow`) its
    settler. Build it with `SubAgent.escrow` or `SubAgent.exact`; serve it with `serving`."""

    def __init__(
        self,
        state: DevnetState,
        *,
        name: str,
        kind: Kind,
        pay_to: str,
        settler_key: str,
        routes: Mapping[str, int],
        max_age: float = 1.0,
        credit_limit: int | None = None,
    ) -> None:
        self.name, self.kind, self.pay_to = name, kind, pay_to
        self.prices = dict(routes)
        self.served: dict[str, int] = dict.fromkeys(routes, 0)
        self.url = ""
        self.rpc = Rpc(state.rpc_url)
        self.sender = TxSender(self.rpc, settler_key, chain_id=state.chain_id)
        self.store = MemoryStore()
        self.settler: EscrowSettler | None = None
        scheme: Scheme
        if kind == "escrow":
            escrow = AgentEscrow(self.rpc, state.contracts["escrow"])
            # Settle once the oldest queued claim is `max_age` old, or 32 are queued: one transaction a batch.
            self.settler = EscrowSettler(self.store, self.sender, batch_size=32, max_age=max_age)
            verifier = EscrowVerifier(
                escrow, chain_id=state.chain_id, cache=GrantCache(escrow, poll_interval=1.0)
            )
            # The most it serves one payer unsettled; past it, a payment is settled before its response. The
            # payer's deposit bounds every gateway anyway; this bounds what this one risks if the payer
            # spends the deposit elsewhere first (see docs/schemes/escrow.md, "Exposure").
            if credit_limit is None:
                credit_limit = CREDIT_CALLS * max(routes.values())
            scheme = EscrowScheme(verifier, self.store, self.settler, credit_limit=credit_limit)
        else:
            scheme = ExactScheme(ExactEvm(self.rpc, self.sender))

        async def work(request: Request) -> Response:
            path = request.url.path
            self.served[path] += 1
            return JSONResponse({"agent": name, "path": path, "result": f"{name} did {path.strip('/')}"})

        async def health(request: Request) -> Response:
            return JSONResponse({"ok": True, "agent": name})

        self.app = PaymentMiddleware(
            Starlette(
                routes=[*(Route(path, work) for path in routes), Route("/health", health)],
                lifespan=self._lifespan,
            ),
            routes={f"GET {path}": price for path, price in routes.items()},
            schemes=[scheme],
            pay_to=pay_to,
            asset=demo_asset(state),
            store=self.store,
            # Escrow funds are locked in the deposit, so the sub-agent may serve first and settle in batches;
            # an `exact` authorization is only money once it is on chain, so it settles before responding.
            settle="deferred" if kind == "escrow" else "before-response",
        )

    @classmethod
    def escrow(
        cls, state: DevnetState, *, name: str, pay_to: str, settler_key: str, routes: Mapping[str, int]
    ) -> SubAgent:
        return cls(state, name=name, kind="escrow", pay_to=pay_to, settler_key=settler_key, routes=routes)

    @classmethod
    def exact(
        cls, state: DevnetState, *, name: str, pay_to: str, settler_key: str, routes: Mapping[str, int]
    ) -> SubAgent:
        return cls(state, name=name, kind="exact", pay_to=pay_to, settler_key=settler_key, routes=routes)

    @property
    def earned(self) -> int:
        """What the sub-agent served, priced: what its account must have received once everything settled."""
        return sum(self.prices[path] * count for path, count in self.served.items())

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        stop = asyncio.Event()
        loop = None if self.settler is None else asyncio.create_task(self.settler.run(stop))
        try:
            yield
        finally:
            stop.set()
            if loop is not None:
                await loop  # `run` settles whatever is still queued before it returns
            await self.rpc.aclose()

    async def settled(self, *, timeout: float = 30.0) -> QueueStats:
        """Wait until the settler has dealt with every queued claim (settled or dead); the final counts."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            stats = await self.store.stats()
            if stats.queued == stats.leased == stats.failed == 0:
                return stats
            if loop.time() > deadline:
                raise TimeoutError(f"{self.name}: settlement still pending after {timeout}s: {stats}")
            await asyncio.sleep(0.05)


class _InProcessServer(uvicorn.Server):
    """uvicorn without its signal handlers: the demo owns Ctrl-C (a KeyboardInterrupt unwinds everything and
    stops the devnet), and several servers in one process would otherwise overwrite each other's handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(*agents: SubAgent) -> AsyncIterator[None]:
    """Serve `agents` with uvicorn on free local ports, in the running event loop; stop them on exit."""
    servers: list[tuple[_InProcessServer, asyncio.Task[None]]] = []
    try:
        for agent in agents:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))  # the kernel picks the port; no race with other processes
            agent.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            config = uvicorn.Config(agent.app, log_level="warning", lifespan="on")
            server = _InProcessServer(config)
            task = asyncio.create_task(server.serve(sockets=[sock]))
            servers.append((server, task))
            while not server.started:
                if task.done():
                    task.result()  # raises what stopped it
                    raise RuntimeError(f"sub-agent {agent.name} stopped while starting")
                await asyncio.sleep(0.01)
        yield
    finally:
        for server, _ in servers:
            server.should_exit = True
        for _, task in servers:
            with contextlib.suppress(asyncio.CancelledError):
                await task  # each app's lifespan ends: its settler flushes, its RPC client closes
