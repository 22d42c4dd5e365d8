"""A paid API on the session devnet for the operator suites (metrics, logs, dashboard): real `exact`
payments through the real middleware, our own client paying, TestUSDC minted to fresh payers.

The relayer is devnet account 7, which no other suite sends from.
"""

from __future__ import annotations

import httpx
from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from escrow import DevnetState
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._exact import ExactEvm
from gateway import Asset, ExactScheme, Metrics, PaidRoute, PaymentMiddleware, PaymentStore, SettleMode
from x402 import LocalSigner
from x402.client import Eip3009Wallet, PaymentAuth, SpendPolicy

RELAYER = 7
SECRET = b"operator-tests-secret-of-at-least-32-bytes"
HELLO, REPORT = 1000, 2500  # atomic prices of GET /hello and GET /report


async def _hello(request: Request) -> Response:
    return JSONResponse({"hello": "world"})


async def _fail(request: Request) -> Response:
    return JSONResponse({"error": "handler failed"}, status_code=500)


class Shop:
    """The paid app (`/hello`, `/report`, `/fail`; `/free` unpriced) and helpers to pay it."""

    def __init__(
        self, devnet: DevnetState, rpc: Rpc, store: PaymentStore, *, settle: SettleMode, metrics: Metrics
    ) -> None:
        self.devnet = devnet
        self.rpc = rpc
        self.store = store
        self.metrics = metrics
        self.relayer = TxSender(rpc, devnet.accounts[RELAYER].private_key, chain_id=devnet.chain_id)
        self.exact = ExactEvm(rpc, self.relayer)
        self.usdc = to_checksum_address(devnet.contracts["usdc"])
        self.asset = Asset(
            address=self.usdc,
            chain_id=devnet.chain_id,
            name=devnet.usdc_name,
            version=devnet.usdc_version,
            decimals=devnet.usdc_decimals,
        )
        self.payee = LocalSigner.random().address
        api = Starlette(
            routes=[
                Route("/hello", _hello),
                Route("/report", _hello),
                Route("/fail", _fail),
                Route("/free", _hello),
            ]
        )
        self.app = PaymentMiddleware(
            api,
            routes={
                "GET /hello": "$0.001",
                "GET /report": PaidRoute(price=REPORT, description="A report"),
                "GET /fail": HELLO,
            },
            schemes=[ExactScheme(self.exact)],
            pay_to=self.payee,
            asset=self.asset,
            store=store,
            secret=SECRET,
            settle=settle,
            metrics=metrics,
        )
        self.client = httpx.AsyncClient(transport=self.transport(), base_url="http://shop.test")

    def transport(self) -> httpx.ASGITransport:
        return httpx.ASGITransport(app=self.app, raise_app_exceptions=False)

    def paying(self, signer: LocalSigner, *, prefer: tuple[str, ...] = ("x402v2",)) -> httpx.AsyncClient:
        wallet = Eip3009Wallet(
            signer, self.devnet.chain_id, {self.usdc: (self.asset.name, self.asset.version)}
        )
        auth = PaymentAuth(wallet, SpendPolicy(max_per_call=10 * REPORT), prefer=prefer)  # type: ignore[arg-type]
        return httpx.AsyncClient(transport=self.transport(), base_url="http://shop.test", auth=auth)

    async def payer(self, amount: int = 100 * REPORT) -> LocalSigner:
        """A fresh key holding `amount` TestUSDC (minting is open on the test token)."""
        signer = LocalSigner.random()
        data = keccak(text="mint(address,uint256)")[:4] + abi_encode(
            ["address", "uint256"], [signer.address, amount]
        )
        await self.relayer.transact(self.usdc, data, gas=120_000)
        return signer

    async def aclose(self) -> None:
        await self.client.aclose()
