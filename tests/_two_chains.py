"""Helpers for two devnet chains with distinct chain ids (`escrow.Devnets`), and our gateway on both
(issue 14).

`Devnets([8453, 42161])` deploys the same table from the same deployer on each anvil, so every contract
(TestUSDC included) has the same address on both chains: only the chain id tells a payment for one from a
payment for the other. `MultiGateway` serves `PaymentMiddleware(chain=[a,
b])` on a real port from a thread, with its lifespan (settlers started, queues flushed at stop).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import uvicorn
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_utils.crypto import keccak
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from escrow import Chain, DevnetState
from escrow.devnet._devnet import _Chain
from gateway import PaidRoute, PaymentMiddleware, Price, SettlementOptions
from gateway._pipeline import SettleMode
from x402 import LocalSigner
from x402.client import Eip3009Wallet

GATEWAY_RELAYER = 3  # the gateway's relayer account on both chains
MINTER = 0  # the deployer mints TestUSDC (its mint is open) and pays the gas


class Node:
    """One chain of a multichain devnet (`escrow.Devnets`), with what the tests do on it."""

    def __init__(self, devnet: DevnetState, chain_id: int) -> None:
        one = devnet.chain(chain_id)
        self.devnet, self.one = devnet, one
        self.chain = _Chain(one.rpc_url)
        self.state = DevnetState(  # this chain alone, as a one-chain devnet state
            backend=devnet.backend,
            rpc_url=one.rpc_url,
            chain_id=one.chain_id,
            network=one.network,
            contracts=one.contracts,
            accounts=devnet.accounts,
            usdc_name=one.usdc_name,
            usdc_version=one.usdc_version,
            usdc_decimals=one.usdc_decimals,
            pid=one.pid,
        )
        self.usdc = one.contracts["usdc"]

    @property
    def network(self) -> str:
        return self.state.network

    def mint(self, to: str, amount: int) -> None:
        data = keccak(text="mint(address,uint256)")[:4] + abi_encode(["address", "uint256"], [to, amount])
        minter = self.state.accounts[MINTER]
        self.chain.wait(self.chain.send(minter, self.usdc, data, 200_000), "mint")

    def balance(self, who: str) -> int:
        data = keccak(text="balanceOf(address)")[:4] + abi_encode(["address"], [who])
        return int(abi_decode(["uint256"], self.chain.call(self.usdc, data))[0])

    def wallet(self, signer: LocalSigner) -> Eip3009Wallet:
        state = self.state
        return Eip3009Wallet(signer, state.chain_id, {self.usdc: (state.usdc_name, state.usdc_version)})

    def receipt_ok(self, tx_hash: str) -> bool:
        receipt: Any = self.chain.rpc("eth_getTransactionReceipt", tx_hash)
        return receipt is not None and int(receipt["status"], 16) == 1

    def close(self) -> None:
        self.chain.close()


def fresh_payer() -> LocalSigner:
    return LocalSigner(bytes(Account.create().key))


def _app() -> Starlette:
    async def paid(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/paid", paid), Route("/health", health)])


class MultiGateway:
    """`PaymentMiddleware(chain=[a, b])` on a real port (uvicorn in a thread; started and stopped as its
    lifespan would: settlers running while it serves, queues flushed at stop)."""

    def __init__(
        self,
        nodes: list[Node],
        pay_to: str,
        *,
        store: str,
        settle: SettleMode = "before-response",
        settlement: SettlementOptions | None = None,
        schemes: list[str] | None = None,
        routes: Mapping[str, PaidRoute | Price] | None = None,
    ) -> None:
        self.nodes, self.pay_to, self.store = nodes, pay_to, store
        self.settle, self.settlement, self.schemes = settle, settlement, schemes
        self.routes = routes or {"GET /paid": 1000}
        self.discovery = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port: int = self.sock.getsockname()[1]
        self.middleware: PaymentMiddleware | None = None
        self.settlers: dict[str, dict[str, Any]] = {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _main(self) -> None:
        chains = [
            Chain.from_devnet(n.devnet, chain=n.one.chain_id, relayer=GATEWAY_RELAYER) for n in self.nodes
        ]
        self.middleware = PaymentMiddleware(
            _app(),
            routes=self.routes,
            chain=chains,
            schemes=self.schemes,
            pay_to=self.pay_to,
            store=self.store,
            settle=self.settle,
            settlement=self.settlement,
            secret=b"multichain-tests-secret-of-32-bytes-at-least",
            discovery=self.discovery,
        )
        self.settlers = self.middleware.network_settlers
        config = uvicorn.Config(self.middleware, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        await self.middleware.startup()
        try:
            await self._server.serve(sockets=[self.sock])
        finally:  # what the lifespan does: the settlers flush their queues, then the store closes
            await self.middleware.shutdown()
            await self.middleware.close_store()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:
            self._error = error

    def start(self) -> MultiGateway:
        self._thread = threading.Thread(target=self._run, name=f"multigateway:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while True:
            if self._error is not None:
                raise RuntimeError(f"gateway failed to start: {self._error!r}") from self._error
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("gateway did not answer /health")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop serving; the lifespan shutdown flushes the settlers' queues first."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        self.sock.close()
        if self._error is not None:
            raise RuntimeError(f"gateway failed: {self._error!r}") from self._error

    def __enter__(self) -> MultiGateway:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'payments.db'}"
