"""Sub-agents for the demo: small paid APIs behind agentpay gateways, served in-process on real ports.

    agent = SubAgent.escrow(state, name="summarizer", pay_to=account, settler_key=key, routes={"/x": 1_000})
    async with serving(agent):           # uvicorn on 127.0.0.1:<free port>, in this event loop
        ...                              # agent.url; agent.store / agent.batches: the operator's view

An `escrow` sub-agent verifies each session-key payment (signature, grant, cap, budget: one `check` call),
serves the request, and queues the claim; its settler, run by the middleware's lifespan, submits the queued
claims in one batched `settle` once the oldest is `max_age` seconds old, paying the gas with the sub-agent's
key.
An `exact` sub-agent settles each EIP-3009 payment before it responds (one `transferWithAuthorization`).
Either way the money goes to `pay_to`: here, the sub-agent's own counterfactual smart-account address.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from escrow import Chain, DevnetState
from gateway import MemoryStore, PaymentMiddleware, QueueStats, SettlementOptions

__all__ = ["CREDIT_CALLS", "SubAgent", "serving", "serving_app"]

#: An escrow sub-agent's default credit limit, in calls of its dearest route: how much it serves one payer
#: before that payer's earlier calls have settled. Past it, a call is settled before its response.
CREDIT_CALLS = 10

Kind = Literal["escrow", "exact"]


class SubAgent:
    """One sub-agent: a Starlette app with priced `GET` routes behind its gateway, with its store and (for
    `escrow`) its settler. Build it with `SubAgent.escrow` or `SubAgent.exact`; serve it with `serving`."""

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
        chain: str | None = None,
    ) -> None:
        self.name, self.kind, self.pay_to = name, kind, pay_to
        self.chain = state.chain(chain) if chain is not None else state.chains[0]
        self.prices = dict(routes)
        self.served: dict[str, int] = dict.fromkeys(routes, 0)
        self.url = ""
        self.store = MemoryStore()

        async def work(request: Request) -> Response:
            path = request.url.path
            self.served[path] += 1
            return JSONResponse({"agent": name, "path": path, "result": f"{name} did {path.strip('/')}"})

        async def health(request: Request) -> Response:
            return JSONResponse({"ok": True, "agent": name})

        self.app = PaymentMiddleware(
            Starlette(routes=[*(Route(path, work) for path in routes), Route("/health", health)]),
            routes={f"GET {path}": price for path, price in routes.items()},
            # On `chain` (a label like "arbitrum"; default: the devnet's first); the sub-agent pays its gas.
            chain=Chain.from_devnet(state, relayer=settler_key, chain=self.chain.network),
            schemes=[kind],
            pay_to=pay_to,
            store=self.store,
            # Escrow funds are locked in the deposit, so the sub-agent may serve first and settle in batches
            # (one transaction once the oldest queued claim is `max_age` old, or 32 are queued); an `exact`
            # authorization is only money once it is on chain, so it settles before responding.
            settle="deferred" if kind == "escrow" else "before-response",
            settlement=SettlementOptions(
                batch_size=32,
                max_age=max_age,
                credit_limit=CREDIT_CALLS * max(routes.values()) if credit_limit is None else credit_limit,
            ),
        )

    @classmethod
    def escrow(
        cls,
        state: DevnetState,
        *,
        name: str,
        pay_to: str,
        settler_key: str,
        routes: Mapping[str, int],
        chain: str | None = None,
    ) -> SubAgent:
        return cls(
            state,
            name=name,
            kind="escrow",
            pay_to=pay_to,
            settler_key=settler_key,
            routes=routes,
            chain=chain,
        )

    @classmethod
    def exact(
        cls, state: DevnetState, *, name: str, pay_to: str, settler_key: str, routes: Mapping[str, int]
    ) -> SubAgent:
        return cls(state, name=name, kind="exact", pay_to=pay_to, settler_key=settler_key, routes=routes)

    @property
    def batches(self) -> list[tuple[int, int]]:
        """(payments, gas) of each settlement transaction the escrow settler sent."""
        settler = self.app.settlers.get("escrow")
        return list(getattr(settler, "batches", []))

    @property
    def earned(self) -> int:
        """What the sub-agent served, priced: what its account must have received once everything settled."""
        return sum(self.prices[path] * count for path, count in self.served.items())

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
    async with contextlib.AsyncExitStack() as stack:
        for agent in agents:
            agent.url = await stack.enter_async_context(serving_app(_built(agent.app), agent.name))
        yield


def _built(app: ASGIApp) -> Callable[[str], ASGIApp]:
    return lambda _url: app


@contextlib.asynccontextmanager
async def serving_app(build: Callable[[str], ASGIApp], name: str = "app") -> AsyncIterator[str]:
    """Serve the app `build(base_url)` makes (it may need its own URL, as an A2A agent's card does) with
    uvicorn on a free local port, in the running event loop; yield its base URL; stop it on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the kernel picks the port; no race with other processes
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = _InProcessServer(uvicorn.Config(build(url), log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError(f"{name} stopped while starting")
            await asyncio.sleep(0.01)
        yield url
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task  # the app's lifespan ends: its settler flushes, its RPC client closes
        sock.close()
