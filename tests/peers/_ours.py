"""Our side of the interop tests (runs in OUR venv, imported by tests/test_interop_*.py; never by a peer).

``GatewayServer`` serves a Starlette app behind our ``gateway.PaymentMiddleware`` (exact/EIP-3009 settled
on the devnet by a relayer key) with uvicorn on a real socket, in a background thread with its own event
loop, so that peer clients (subprocesses of .venv-peers) can reach it. The socket is bound before the
thread starts; the server is always stopped on exit.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import httpx
import uvicorn
from eth_account import Account
from eth_account.signers.local import LocalAccount
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from web3 import Web3
from web3.contract import Contract

from escrow import DevnetState
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._exact import ExactEvm
from gateway import Asset, ExactScheme, MemoryStore, PaidRoute, PaymentMiddleware, Price, SettleMode

SECRET = b"interop-tests-secret-of-at-least-32-bytes!!"


def devnet_asset(devnet: DevnetState) -> Asset:
    return Asset(
        address=devnet.contracts["usdc"],
        chain_id=devnet.chain_id,
        name=devnet.usdc_name,
        version=devnet.usdc_version,
        decimals=devnet.usdc_decimals,
    )


def _app() -> Starlette:
    async def paid(request: Request) -> Response:
        body = (await request.body()).decode() if request.method == "POST" else None
        return JSONResponse({"ok": True, "server": "agentpay", "echo": body})

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/paid", paid, methods=["GET", "POST"]), Route("/health", health)])


class GatewayServer:
    """Our paywall on a real port: ``with GatewayServer(devnet, relayer_key, pay_to) as gw: gw.url``."""

    def __init__(
        self,
        devnet: DevnetState,
        relayer_key: str,
        pay_to: str,
        *,
        routes: Mapping[str, PaidRoute | Price] | None = None,
        realm: str | None = "gateway.interop",
        settle: SettleMode = "before-response",
        mpp_strict: bool = False,
        ready_timeout: float = 30,
    ) -> None:
        self.devnet = devnet
        self.relayer_key = relayer_key
        self.pay_to = pay_to
        self.routes = routes or {"GET /paid": 1000, "POST /paid": 1000}
        self.realm = realm
        self.settle = settle
        self.mpp_strict = mpp_strict
        self.ready_timeout = ready_timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port: int = self.sock.getsockname()[1]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _main(self) -> None:
        rpc = Rpc(self.devnet.rpc_url)
        try:
            relayer = TxSender(rpc, self.relayer_key, chain_id=self.devnet.chain_id)
            app = PaymentMiddleware(
                _app(),
                routes=self.routes,
                schemes=[ExactScheme(ExactEvm(rpc, relayer))],
                pay_to=self.pay_to,
                asset=devnet_asset(self.devnet),
                store=MemoryStore(),
                secret=SECRET,
                realm=self.realm,
                settle=self.settle,
                mpp_strict=self.mpp_strict,
            )
            config = uvicorn.Config(app, log_level="warning", lifespan="off")
            self._server = uvicorn.Server(config)
            await self._server.serve(sockets=[self.sock])
        finally:
            await rpc.aclose()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # surfaced by start()/stop()
            self._error = error

    def start(self) -> GatewayServer:
        self._thread = threading.Thread(target=self._run, name=f"gateway:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self._error is not None:
                raise RuntimeError(f"gateway server failed to start: {self._error!r}") from self._error
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("gateway server did not answer /health")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.sock.close()

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class Funds:
    """Fresh, funded payers and exact balances (TestUSDC's mint is open; ``minter`` pays the gas)."""

    def __init__(
        self,
        devnet: DevnetState,
        usdc: Contract,
        transact: Callable[..., Any],
        *,
        default: int,
        minter: int = 0,
    ) -> None:
        self.devnet, self.usdc, self.transact = devnet, usdc, transact
        self.default, self.minter = default, minter

    def payer(self, amount: int | None = None) -> LocalAccount:
        """A fresh EOA holding ``amount`` TestUSDC and no ETH (EIP-3009 payers need no gas)."""
        account: LocalAccount = Account.create()
        amount = self.default if amount is None else amount
        if amount:
            self.transact(
                self.devnet.accounts[self.minter], self.usdc.functions.mint(account.address, amount)
            )
        return account

    def balance(self, address: str) -> int:
        return int(self.usdc.functions.balanceOf(Web3.to_checksum_address(address)).call())

    def tx_ok(self, tx_hash: str) -> bool:
        """The transaction is mined and succeeded."""
        receipt = self.usdc.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
        return bool(receipt["status"] == 1)


def describe(response: httpx.Response) -> dict[str, Any]:
    """A response as a failure message shows it: status, payment headers, body."""
    keep = (
        "payment-required",
        "payment-response",
        "x-payment-response",
        "www-authenticate",
        "payment-receipt",
    )
    return {
        "status": response.status_code,
        "headers": {k: v for k, v in response.headers.items() if k in keep},
        "body": response.text[:2000],
    }
