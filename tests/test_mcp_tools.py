"""Paid MCP tools on anvil: `examples.paid_tools` served by uvicorn (streamable HTTP at /mcp), driven by the
`mcp` package's own `Client`, paid by `x402.client_mcp.McpPayer` in both bindings; bad `_meta` credentials
get each binding's error, never an internal one."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import jsonschema
import pytest
from mcp import Client
from mcp.client import advertise
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError, UrlElicitationRequiredError
from mcp_types import CallToolResult, ElicitRequestURLParams, TextContent
from pydantic import BaseModel

from escrow import Chain as EscrowChain
from escrow import DevnetState, ExactEvm, Rpc, TxSender
from examples.paid_tools import build_app
from gateway import Asset, ExactScheme, MemoryStore, Paywall
from gateway.mcp import PaidTools
from tests._gateways import Chain, key_hex
from tests._serving import serving
from x402 import (
    MCP_INTERNAL_ERROR,
    MCP_INVALID_PARAMS,
    MPP_CREDENTIAL_META,
    MPP_EXTENSION,
    MPP_PAYMENT_REQUIRED,
    MPP_REQUIRED_META,
    MPP_VERIFICATION_FAILED,
    X402_EXTENSION,
    X402_PAYMENT_META,
    LocalSigner,
    MppReceipt,
    Reason,
    SettleResponse,
    SpendPolicyViolation,
)
from x402.client import Eip3009Wallet, PaymentAuth, SpendPolicy
from x402.client_mcp import (
    McpPayer,
    PaymentRequiredResult,
    X402McpExtension,
    mcp_offers,
    mcp_payment_meta,
)

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

PRICE = 1000  # $0.001 of a 6-decimal token


class Summary(BaseModel):
    summary: str
    words: int


def _required(result: CallToolResult) -> dict[str, Any]:
    """The x402 PaymentRequired of an isError result (content[0].text: the tools declare outputSchemas)."""
    text = result.content[0]
    assert isinstance(text, TextContent)
    out: dict[str, Any] = json.loads(text.text)
    return out


@dataclass
class Env:
    chain: Chain
    url: str
    payee: str
    auth: PaymentAuth
    store: MemoryStore


@pytest.fixture
async def env(devnet: DevnetState) -> AsyncIterator[Env]:
    chain = Chain(devnet)
    payer, payee, relayer = await chain.key(), await chain.key(), await chain.key()
    await chain.mint(payer.address, 1_000_000)
    store = MemoryStore()
    network = EscrowChain.from_devnet(devnet, relayer=key_hex(relayer))
    app = build_app(network, pay_to=payee.address, store=store)
    auth = PaymentAuth(chain.wallet(payer), SpendPolicy(max_per_call=10_000, total_budget=100_000))
    try:
        async with serving(lambda _: app) as base:
            yield Env(chain, base + "/mcp", payee.address, auth, store)
    finally:
        await chain.aclose()


async def test_x402_binding_pays_summarize_exactly_the_price(env: Env) -> None:
    before = await env.chain.balance(env.payee)
    async with Client(env.url) as session:
        (tool,) = [t for t in (await session.list_tools()).tools if t.name == "summarize"]
        assert tool.output_schema is not None  # mcp 2 declares one for `-> str`
        unpaid = await session.call_tool("summarize", {"text": "a long text to summarize"})
        assert unpaid.is_error
        text = unpaid.content[0]
        assert isinstance(text, TextContent) and json.loads(text.text)["x402Version"] == 2
        assert json.loads(text.text)["accepts"][0]["amount"] == str(PRICE)
        # structuredContent is the PaymentRequired, made valid for the tool's `{"result": str}` schema.
        structured = unpaid.structured_content
        assert structured is not None and structured["x402Version"] == 2 and structured["result"] == text.text
        assert jsonschema.Draft202012Validator(tool.output_schema).is_valid(structured)
        # The MPP side of the same answer: mppx reads the -32042 data from the result's _meta.
        assert (unpaid.meta or {})[MPP_REQUIRED_META]["challenges"][0]["request"]["amount"] == str(PRICE)
        paid = await McpPayer(env.auth).call_tool(session, "summarize", {"text": "a long text to summarize"})
    assert not paid.result.is_error
    assert paid.offer is not None and paid.offer.protocol == "x402v2"
    assert isinstance(paid.receipt, SettleResponse) and paid.receipt.success and paid.receipt.transaction
    assert await env.chain.balance(env.payee) - before == PRICE
    assert env.auth.policy.spent == PRICE


async def test_mpp_binding_pays_summarize_exactly_the_price(env: Env) -> None:
    before = await env.chain.balance(env.payee)
    async with Client(env.url, extensions=[advertise(MPP_EXTENSION)]) as session:
        with pytest.raises(MCPError) as raised:
            await session.call_tool("summarize", {"text": "hello"})
        assert raised.value.code == MPP_PAYMENT_REQUIRED
        assert raised.value.data["challenges"][0]["method"] == "evm"
        assert raised.value.data["x402"]["accepts"]  # the x402 offer rides along
        payer = McpPayer(PaymentAuth(env.auth.wallet, env.auth.policy, prefer=("mpp",)))
        paid = await payer.call_tool(session, "summarize", {"text": "hello"})
    assert paid.offer is not None and paid.offer.protocol == "mpp"
    assert isinstance(paid.receipt, MppReceipt) and paid.receipt.reference.startswith("0x")
    assert paid.receipt.challenge_id == paid.offer.challenge.id  # type: ignore[union-attr]
    assert await env.chain.balance(env.payee) - before == PRICE


async def test_x402_extension_binding_for_clients_that_advertise_it(env: Env) -> None:
    """A client advertising `org.x402/payment` gets `resultType: payment_required` (claimed and resolved by
    `X402McpExtension`), pays it, and gets the receipt; one that does not never sees that result type."""
    before = await env.chain.balance(env.payee)
    async with Client(env.url, extensions=[X402McpExtension()]) as session:
        raw = await session.session.call_tool("summarize", {"text": "x"}, allow_claimed=True)
        assert isinstance(raw, PaymentRequiredResult) and raw.payment_required["accepts"]
        assert MPP_REQUIRED_META in (raw.meta or {})
        paid = await McpPayer(env.auth).call_tool(session, "summarize", {"text": "extension binding"})
    assert isinstance(paid.receipt, SettleResponse) and paid.receipt.success
    assert await env.chain.balance(env.payee) - before == PRICE


async def test_mpp_from_a_result_meta_and_the_free_tool(env: Env) -> None:
    """A client that did not announce MPP can still pay by MPP (from the result's _meta); `ping` is free."""
    before = await env.chain.balance(env.payee)
    async with Client(env.url) as session:
        for _ in range(3):
            free = await McpPayer(env.auth).call_tool(session, "ping")
            assert free.offer is None and free.receipt is None and not free.result.is_error
        payer = McpPayer(PaymentAuth(env.auth.wallet, env.auth.policy, prefer=("mpp",)))
        paid = await payer.call_tool(session, "summarize", {"text": "x"})
    assert isinstance(paid.receipt, MppReceipt)
    assert await env.chain.balance(env.payee) - before == PRICE  # the pings moved nothing


async def test_nested_x402_form_is_accepted_and_answered_nested(env: Env) -> None:
    before = await env.chain.balance(env.payee)
    async with Client(env.url) as session:
        unpaid = await session.call_tool("summarize", {"text": "t"})
        (offer,) = [o for o in mcp_offers(unpaid) if o.protocol == "x402v2" and o.scheme == "exact"]
        reservation, credential = env.auth.authorize(offer)
        flat = mcp_payment_meta(offer, credential)[X402_PAYMENT_META]
        paid = await session.call_tool(
            "summarize", {"text": "t"}, meta={X402_EXTENSION: {"paymentPayload": flat}}
        )
        reservation.commit()
    assert not paid.is_error
    assert (paid.meta or {})[X402_EXTENSION]["settlementResponse"]["success"] is True
    assert await env.chain.balance(env.payee) - before == PRICE


async def test_replayed_and_malformed_credentials_get_the_binding_error(env: Env) -> None:
    before = await env.chain.balance(env.payee)
    async with Client(env.url) as session:
        # x402: a replay is an isError result with the reason and the offers again, never the output.
        unpaid = await session.call_tool("summarize", {"text": "t"})
        (offer,) = [o for o in mcp_offers(unpaid) if o.protocol == "x402v2" and o.scheme == "exact"]
        meta = mcp_payment_meta(offer, env.auth.wallet.pay(offer))
        assert not (await session.call_tool("summarize", {"text": "t"}, meta=meta)).is_error  # type: ignore[arg-type]
        replay = await session.call_tool("summarize", {"text": "t"}, meta=meta)  # type: ignore[arg-type]
        assert replay.is_error and _required(replay)["error"] == Reason.NONCE_ALREADY_USED
        assert _required(replay)["accepts"]
        garbage = await session.call_tool("summarize", {"text": "t"}, meta={X402_PAYMENT_META: {"x": 1}})
        assert garbage.is_error and _required(garbage)["error"] == Reason.INVALID_PAYLOAD
        not_object = await session.call_tool("summarize", {"text": "t"}, meta={X402_PAYMENT_META: "abc"})
        assert not_object.is_error and _required(not_object)["error"] == Reason.INVALID_PAYLOAD

        # MPP: malformed -> -32602; replayed -> -32043 with fresh challenges and the failure.
        mpp_offer = next(o for o in mcp_offers(unpaid) if o.protocol == "mpp" and env.auth.wallet.can_pay(o))
        mpp_meta = mcp_payment_meta(mpp_offer, env.auth.wallet.pay(mpp_offer))
        assert not (await session.call_tool("summarize", {"text": "t"}, meta=mpp_meta)).is_error  # type: ignore[arg-type]
        with pytest.raises(MCPError) as replayed:
            await session.call_tool("summarize", {"text": "t"}, meta=mpp_meta)  # type: ignore[arg-type]
        assert replayed.value.code == MPP_VERIFICATION_FAILED
        assert replayed.value.data["failure"]["reason"] and replayed.value.data["challenges"]
        for bad in ({"challenge": {"id": "x"}, "payload": {}}, "nope", {"payload": {}}):
            with pytest.raises(MCPError) as malformed:
                await session.call_tool("summarize", {"text": "t"}, meta={MPP_CREDENTIAL_META: bad})
            assert malformed.value.code == MCP_INVALID_PARAMS, malformed.value.data
    assert await env.chain.balance(env.payee) - before == 2 * PRICE  # only the two genuine payments


async def test_policy_refuses_before_signing(env: Env) -> None:
    tight = PaymentAuth(env.auth.wallet, SpendPolicy(max_per_call=PRICE - 1))
    async with Client(env.url) as session:
        with pytest.raises(SpendPolicyViolation, match="max_per_call"):
            await McpPayer(tight).call_tool(session, "summarize", {"text": "t"})
    assert tight.policy.spent == tight.policy.reserved == 0
    assert (await env.store.stats()).settled == 0


async def test_structured_content_without_output_schema_metering_hook_and_unbound_tools(
    devnet: DevnetState,
) -> None:
    """A tool without an outputSchema gets the PaymentRequired in structuredContent too; a price function of
    the arguments prices each call; a priced tool whose extension has no paywall is never served free."""
    asset = Asset(
        address=devnet.contracts["usdc"],
        chain_id=devnet.chain_id,
        name=devnet.usdc_name,
        version=devnet.usdc_version,
    )
    rpc = Rpc(devnet.rpc_url)
    scheme = ExactScheme(
        ExactEvm(rpc, TxSender(rpc, devnet.accounts[3].private_key, chain_id=devnet.chain_id))
    )
    paywall = Paywall([scheme], store=MemoryStore(), secrets=[b"s" * 32])
    paid = PaidTools(
        {"count": lambda args: 100 * len(str(args.get("text", ""))), "typed": lambda args: 300},
        paywall=paywall,
        pay_to=devnet.accounts[2].address,
        asset=asset,
    )
    unbound = PaidTools({"locked": "$0.001"})
    ran: list[str] = []
    server = paid.attach(MCPServer("t", extensions=[paid]))
    other = MCPServer("u", extensions=[unbound])

    @server.tool(structured_output=False)
    def count(text: str) -> str:
        ran.append(text)
        return str(len(text))

    @server.tool()
    def typed(text: str) -> Summary:
        ran.append(text)
        return Summary(summary=text[:3], words=len(text.split()))

    @other.tool(structured_output=False)
    def locked() -> str:
        ran.append("locked")
        return "secret"

    try:
        async with Client(server) as session:
            unpaid = await session.call_tool("count", {"text": "abcd"})
            assert unpaid.is_error and unpaid.structured_content is not None
            assert unpaid.structured_content["accepts"][0]["amount"] == "400"  # 100 per character
            assert _required(unpaid) == unpaid.structured_content
            longer = await session.call_tool("count", {"text": "abcdefgh"})
            assert _required(longer)["accepts"][0]["amount"] == "800"
            # An outputSchema the PaymentRequired cannot meet: no structuredContent, the text carries it.
            typed_unpaid = await session.call_tool("typed", {"text": "a b"})
            assert typed_unpaid.is_error and typed_unpaid.structured_content is None
            assert _required(typed_unpaid)["accepts"][0]["amount"] == "300"
        async with Client(other) as session:
            with pytest.raises(MCPError) as raised:
                await session.call_tool("locked", {})
            assert raised.value.code == MCP_INTERNAL_ERROR
    finally:
        await rpc.aclose()
    assert ran == []  # nothing ran unpaid


async def test_a_url_elicitation_is_not_taken_for_a_payment() -> None:
    """-32042 is also MCP 2025-11-25's URL elicitation: the payer re-raises it untouched, pays nothing."""
    server = MCPServer("elicits")

    @server.tool()
    def login() -> str:
        raise UrlElicitationRequiredError(
            [ElicitRequestURLParams(message="sign in", url="https://example.com/auth", elicitation_id="e1")]
        )

    policy = SpendPolicy(max_per_call=10_000)
    payer = McpPayer(PaymentAuth(Eip3009Wallet(LocalSigner.random(), 31337, {}), policy))
    async with Client(server) as session:
        with pytest.raises(MCPError) as raised:
            await payer.call_tool(session, "login")
    assert raised.value.code == MPP_PAYMENT_REQUIRED
    assert raised.value.data["elicitations"][0]["elicitationId"] == "e1"
    assert policy.spent == policy.reserved == 0
