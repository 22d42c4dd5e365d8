"""Discovery documents (`/openapi.json`, `/llms.txt`, `/discovery/resources`) generated from the route table.

The gateway under test offers two real schemes (`exact` and `escrow`, built on the session devnet's
contracts), so the documents must show both offer forms; every advertised amount is compared with what the
route's real 402 asks for. `mppx validate` (the MPP reference CLI, from node_modules) runs against the
example sub-agent served by uvicorn on the devnet.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_utils.address import to_checksum_address
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from escrow import AgentEscrow, DevnetState, EscrowSettler, EscrowVerifier, GrantCache
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._exact import ExactEvm
from gateway import Asset, Discovery, ExactScheme, MemoryStore, PaidRoute, PaymentMiddleware
from gateway._escrow_scheme import EscrowScheme
from x402 import decode_payment_required

pytestmark = [pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[1]
SECRET = b"discovery-tests-secret-of-at-least-32-bytes"
PAY_TO = to_checksum_address("0x" + "22" * 20)
OTHER = to_checksum_address("0x" + "33" * 20)


async def _summarize_price(request: Request) -> int:
    return 100 * max(1, len(str((await request.json())["text"])) // 100)


async def _ok(request: Request) -> Response:
    return JSONResponse({"ok": True})


ROUTES: dict[str, Any] = {
    "GET /hello": "$0.001",
    "GET /items/{item_id:int}": PaidRoute(price=2500, pay_to=OTHER, description="One item"),
    "POST /summarize": PaidRoute(price=_summarize_price, description="Summarize a text"),
    "/any": 7,
    "GET /escrow-only": PaidRoute(price=3000, schemes=("escrow",)),
}
PAID_PATHS = {"/hello", "/items/{item_id}", "/summarize", "/any", "/escrow-only"}


class World:
    def __init__(self, devnet: DevnetState, rpc: Rpc, discovery: Discovery | bool) -> None:
        self.usdc = to_checksum_address(devnet.contracts["usdc"])
        self.network = devnet.network
        asset = Asset(
            address=self.usdc,
            chain_id=devnet.chain_id,
            name=devnet.usdc_name,
            version=devnet.usdc_version,
            decimals=devnet.usdc_decimals,
        )
        store = MemoryStore()
        sender = TxSender(rpc, devnet.accounts[9].private_key, chain_id=devnet.chain_id)  # never sends here
        escrow = AgentEscrow(rpc, devnet.contracts["escrow"])
        verifier = EscrowVerifier(escrow, chain_id=devnet.chain_id, cache=GrantCache(escrow))
        schemes = [
            ExactScheme(ExactEvm(rpc, sender)),
            EscrowScheme(verifier, store, EscrowSettler(store, sender), credit_limit=10_000),
        ]
        api = Starlette(
            routes=[
                Route(path, _ok, methods=["GET", "POST"])
                for path in ("/hello", "/items/{item_id:int}", "/summarize", "/any", "/escrow-only", "/free")
            ]
        )
        self.app = PaymentMiddleware(
            api,
            routes=ROUTES,
            schemes=schemes,
            pay_to=PAY_TO,
            asset=asset,
            store=store,
            secret=SECRET,
            discovery=discovery,
        )
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://api.test")


@pytest.fixture
async def world(devnet: DevnetState) -> AsyncIterator[World]:
    rpc = Rpc(devnet.rpc_url)
    w = World(devnet, rpc, Discovery(title="Test API", categories=("test",)))
    try:
        yield w
    finally:
        await w.client.aclose()
        await rpc.aclose()


def _offers(info: dict[str, Any]) -> list[dict[str, Any]]:
    return list(info["offers"]) if "offers" in info else [info]


async def test_openapi_lists_exactly_the_paid_routes_with_402_and_payment_info(world: World) -> None:
    response = await world.client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    doc = response.json()
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["title"] == "Test API"
    assert doc["servers"] == [{"url": "http://api.test"}]
    assert doc["x-service-info"] == {"docs": {"llms": "/llms.txt"}, "categories": ["test"]}
    assert set(doc["paths"]) == PAID_PATHS  # "/free" is not priced, so not listed
    methods = {path: set(item) for path, item in doc["paths"].items()}
    assert methods == {p: {"post" if p == "/summarize" else "get"} for p in PAID_PATHS}
    for item in doc["paths"].values():
        for operation in item.values():
            assert "402" in operation["responses"]
            info = operation["x-payment-info"]
            # flat fields or `offers`, never both (mppx rejects the mix)
            assert ("offers" in info) != ("amount" in info)
            for offer in _offers(info):
                assert set(offer) == {"amount", "currency", "description", "intent", "method"}
                assert (offer["method"], offer["intent"], offer["currency"]) == ("evm", "charge", world.usdc)

    def amounts(path: str, method: str = "get") -> list[Any]:
        return [o["amount"] for o in _offers(doc["paths"][path][method]["x-payment-info"])]

    assert amounts("/hello") == ["1000", "1000"]  # exact and escrow
    assert amounts("/items/{item_id}") == ["2500", "2500"]
    assert amounts("/any") == ["7", "7"]
    assert amounts("/escrow-only") == ["3000"]  # one scheme: the flat form
    assert amounts("/summarize", "post") == [None, None]  # priced from the body
    summarize = doc["paths"]["/summarize"]["post"]
    assert summarize["summary"] == "Summarize a text"
    assert "application/json" in summarize["requestBody"]["content"]
    assert doc["paths"]["/items/{item_id}"]["get"]["parameters"] == [
        {"name": "item_id", "in": "path", "required": True, "schema": {"type": "string"}}
    ]


async def test_advertised_prices_are_what_each_402_asks_for(world: World) -> None:
    listing = (await world.client.get("/discovery/resources")).json()
    for item in listing["items"]:
        if item["metadata"]["dynamicPrice"]:
            continue
        path = item["resource"].removeprefix("http://api.test").replace("{item_id}", "41")
        response = await world.client.request(item["metadata"]["method"], path)
        assert response.status_code == 402
        required = decode_payment_required(response.headers["payment-required"])
        asked = sorted((r.scheme, r.amount, r.pay_to, r.network, r.asset) for r in required.accepts)
        listed = sorted(
            (a["scheme"], a["amount"], a["payTo"], a["network"], a["asset"]) for a in item["accepts"]
        )
        assert asked == listed


async def test_bazaar_listing_shape_filters_and_pages(world: World) -> None:
    response = await world.client.get("/discovery/resources")
    assert response.status_code == 200
    body = response.json()
    assert body["x402Version"] == 2
    assert body["pagination"] == {"limit": 20, "offset": 0, "total": 5}
    by_path = {item["resource"]: item for item in body["items"]}
    assert set(by_path) == {"http://api.test" + p for p in PAID_PATHS}
    hello = by_path["http://api.test/hello"]
    assert hello["type"] == "http" and hello["x402Version"] == 2 and isinstance(hello["lastUpdated"], int)
    assert {a["scheme"] for a in hello["accepts"]} == {"exact", "escrow"}
    assert {(a["amount"], a["payTo"], a["network"]) for a in hello["accepts"]} == {
        ("1000", PAY_TO, world.network)
    }
    summarize = by_path["http://api.test/summarize"]
    assert summarize["metadata"] == {
        "method": "POST",
        "description": "Summarize a text",
        "mimeType": "application/json",
        "dynamicPrice": True,
    }
    assert all("amount" not in a for a in summarize["accepts"])  # the 402 names the real price

    async def listed(query: str) -> dict[str, Any]:
        r = await world.client.get("/discovery/resources?" + query)
        assert r.status_code == 200
        result: dict[str, Any] = r.json()
        return result

    escrow = await listed("scheme=escrow")
    assert escrow["pagination"]["total"] == 5
    assert all(a["scheme"] == "escrow" for item in escrow["items"] for a in item["accepts"])
    exact = await listed("scheme=exact")
    assert {item["resource"] for item in exact["items"]} == {
        "http://api.test" + p for p in PAID_PATHS - {"/escrow-only"}
    }
    other = await listed(f"payTo={OTHER.lower()}")
    assert [item["resource"] for item in other["items"]] == ["http://api.test/items/{item_id}"]
    assert (await listed("network=eip155:1"))["items"] == []
    assert (await listed("type=mcp"))["items"] == []
    page = await listed("limit=2&offset=1")
    assert page["pagination"] == {"limit": 2, "offset": 1, "total": 5}
    assert [i["resource"] for i in page["items"]] == [i["resource"] for i in body["items"][1:3]]


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=101", "limit=abc", "offset=-1", "limit=1e3", "limit=%C2%B2", "offset=" + "9" * 5000],
)
async def test_bazaar_listing_refuses_bad_paging_with_a_problem(world: World, query: str) -> None:
    response = await world.client.get("/discovery/resources?" + query)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 400


async def test_llms_txt_lists_every_paid_route_and_its_price(world: World) -> None:
    response = await world.client.get("/llms.txt")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/markdown")
    text = response.text
    assert text.startswith("# Test API\n")
    for line in (
        "- [GET /hello](http://api.test/hello)",
        "- [GET /items/{item_id}](http://api.test/items/{item_id}): One item",
        "- [POST /summarize](http://api.test/summarize): Summarize a text",
        f"  - exact on {world.network}: 1000 atomic units of {world.usdc}, paid to {PAY_TO}",
        f"  - escrow on {world.network}: 2500 atomic units of {world.usdc}, paid to {OTHER}",
        "  - exact on " + world.network + ": priced per request (see its 402)",
        "- [OpenAPI](http://api.test/openapi.json)",
    ):
        assert line in text, line
    assert "/free" not in text


async def test_head_gets_the_headers_without_a_body(world: World) -> None:
    response = await world.client.head("/openapi.json")
    assert response.status_code == 200 and response.content == b""
    assert int(response.headers["content-length"]) > 100


async def test_discovery_is_off_unless_asked_for(devnet: DevnetState) -> None:
    rpc = Rpc(devnet.rpc_url)
    w = World(devnet, rpc, discovery=False)
    try:
        for path in ("/openapi.json", "/llms.txt", "/discovery/resources"):
            assert (await w.client.get(path)).status_code == 404  # the app's own answer
    finally:
        await w.client.aclose()
        await rpc.aclose()


async def test_a_request_its_price_function_cannot_read_is_a_400_not_a_500(world: World) -> None:
    """POST /summarize is priced from its JSON body: without one the gateway answers 400 (problem+json),
    which is also what lets `mppx validate` retry with the example body of the OpenAPI document."""
    response = await world.client.post("/summarize")
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert "could not be priced" in response.json()["detail"]
    response = await world.client.post("/summarize", json={"text": "x" * 250})
    assert response.status_code == 402


def test_mppx_validate_passes_against_the_example_subagent(devnet: DevnetState, tmp_path: Path) -> None:
    """`npx mppx validate`: discovery (openapi.json, llms.txt), challenges and error handling, zero fails.

    mppx has no EVM payment plugin and the devnet is no chain it knows, so it skips the paying step (a
    skip, which the paid-route tests cover with our own and the official clients)."""
    mppx = ROOT / "node_modules" / ".bin" / "mppx"
    assert mppx.exists(), "node_modules lacks mppx: run `npm ci` (make setup does)"
    state_file = tmp_path / "devnet.json"
    devnet.dump(state_file)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AGENTPAY_STORE": "memory://", "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "examples.subagent", "--devnet", str(state_file), "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://localhost:{port}"  # the MPP realm the sub-agent binds (the default, "localhost")
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
            assert time.monotonic() < deadline, "the sub-agent did not start"
            time.sleep(0.1)
        run = subprocess.run(
            [str(mppx), "validate", base, "--output-json"],
            cwd=tmp_path,
            env={**os.environ, "HOME": str(tmp_path), "NO_COLOR": "1"},
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    out = run.stdout
    report = json.loads(out[out.index("{") :])
    assert report["summary"]["failed"] == 0, json.dumps(report, indent=1)
    assert report["summary"]["warnings"] == 0, json.dumps(report, indent=1)
    assert run.returncode == 0, run.stderr
    discovery = report["discovery"]
    assert discovery["found"] and discovery["valid"]
    assert {c["label"]: c["severity"] for c in discovery["checks"]} == {
        "llms.txt found and nonempty": "pass",
        "Document found and parseable": "pass",
        "Valid OpenAPI structure": "pass",
        "Paid endpoints found": "pass",
    }
    assert [(e["method"], e["path"], e["amount"]) for e in discovery["endpoints"]] == [
        ("GET", "/hello", "1000"),
        ("GET", "/weather", "2000"),
        ("POST", "/summarize", None),
    ]
    for endpoint in report["endpoints"]:
        assert {r["severity"] for r in endpoint["challenge"] + endpoint["errorHandling"]} == {"pass"}
        assert "Returns 402 without credentials" in {r["label"] for r in endpoint["challenge"]}
        assert [r["severity"] for r in endpoint["payment"]] == ["skip"]
