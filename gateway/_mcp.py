"""Paid MCP tools: an `mcp` 2.x server extension charging for `tools/call` through the gateway's `Paywall`.

    paid = PaidTools({"summarize": "$0.001"})
    mcp = MCPServer("agent", extensions=[paid])        # declare the tools on it as usual
    app = paid.http_app(mcp, schemes=[ExactScheme(...)], pay_to=..., asset=..., store=...)  # ASGI, at /mcp

The same pipeline as an HTTP route (verify -> claim -> the tool runs -> settle, or release when it fails), the
same store, schemes and settlement; only the wire differs (`x402._mcp`). An unpaid call to a priced tool is
answered in both bindings at once:

- by default, a tool result with `isError: true`: x402's `PaymentRequired` in `structuredContent` (made to
  match the tool's `outputSchema` when it has one, or left out when it cannot: see `_structured`) and as
  JSON in `content[0].text`, and the MPP `-32042` data in `_meta["org.paymentauth/payment-required"]` (mppx's
  fallback for servers that answer with results);
- to a client that advertised the x402 extension (`org.x402/payment`, MCP 2026-07-28), its binding:
  `{"resultType": "payment_required", "paymentRequired": ...}` (MPP's data in `_meta` again);
- to a client that announces MPP (`capabilities.experimental.payment`, or the `org.paymentauth/payment`
  extension), a JSON-RPC error `-32042` whose `data` has the MPP `challenges` and the x402 `PaymentRequired`
  under `x402`.

A paid call carries `_meta["x402/payment"]` (or the nested `org.x402/payment.paymentPayload`) or
`_meta["org.paymentauth/credential"]`; the receipt comes back in the result's `_meta` under the matching key.
A refused credential gets the binding's error, never an internal one: x402 an `isError` result with the
`PaymentRequired` again and the reason in `error`; MPP `-32602` (malformed) or `-32043` (refused or replayed,
with fresh challenges and `failure`). A failed settlement never returns the tool's output.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal, TypeAlias

import jsonschema
import msgspec
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolRequestParams, CallToolResult, TextContent

from x402 import (
    MCP_INTERNAL_ERROR,
    MCP_INVALID_PARAMS,
    MPP_CREDENTIAL_META,
    MPP_EXTENSION,
    MPP_PAYMENT_REQUIRED,
    MPP_RECEIPT_META,
    MPP_REQUIRED_META,
    MPP_VERIFICATION_FAILED,
    X402_EXTENSION,
    X402_PAYMENT_META,
    X402_RESPONSE_META,
    MalformedPayment,
    PaymentRequired,
    ResourceInfo,
    X402Error,
    b64_json_encode,
    decode_payment_response,
    error_answer,
    format_credential,
    json_encode,
    mpp_challenge_to_json,
    mpp_credential_from_json,
    parse_receipt,
    x402_payment_in,
)
from x402.client_mcp import PaymentRequiredResult

from ._errors import PaymentFailed
from ._middleware import PaymentMiddleware
from ._pipeline import Attempt, Paywall
from ._priced import CallPrice, CallPriceFunction, PaywallSource, PricedCalls
from ._pricing import Asset, PaidRoute, Quote
from ._scheme import Dialect, Offer

__all__ = ["PaidTools", "ToolPrice", "ToolPriceFunction"]

log = logging.getLogger("agentpay.gateway.mcp")

#: A tool's price from its call arguments (sync or async): how metered pricing plugs in.
ToolPriceFunction: TypeAlias = CallPriceFunction
ToolPrice: TypeAlias = CallPrice

_PROBLEM_402 = "https://paymentauth.org/problems/payment-required"
_Binding = Literal["x402", "x402-nested", "mpp"]


class PaidTools(Extension):
    """Charges for the MCP tools named in `tools` (name -> price or `PaidRoute`; a `PaidRoute.price` may be
    a `ToolPriceFunction` of the call's arguments). Tools not named stay free.

    The payments go through `paywall`: a `PaymentMiddleware` (its store, schemes, MPP secret and realm;
    `pay_to` and `asset` default to its own) or a bare `Paywall` (then pass `pay_to` and `asset`), given
    here, later with `bind`, or made by `http_app`. `resource_url` is the x402 `resource.url` of every tool
    (the MCP server's URL; default `mcp://tool/<name>`). One `PaidTools` per server (its identifier is the
    x402 extension's): name every paid tool of the server in it.
    """

    identifier = X402_EXTENSION

    def __init__(
        self,
        tools: Mapping[str, PaidRoute | ToolPrice],
        *,
        paywall: PaywallSource | None = None,
        pay_to: str | None = None,
        asset: Asset | None = None,
        resource_url: str | None = None,
    ) -> None:
        self.calls = PricedCalls(tools, what="tool", paywall=paywall, pay_to=pay_to, asset=asset)
        self.resource_url = resource_url
        self._server: MCPServer[Any] | None = None
        self._schemas: dict[str, dict[str, Any] | None] | None = None

    def bind(self, paywall: PaywallSource) -> None:
        """Charge through `paywall` from now on."""
        self.calls.bind(paywall)

    def attach(self, server: MCPServer[Any]) -> MCPServer[Any]:
        """Let the interceptor see `server`'s tool declarations (which have an `outputSchema`); returns it."""
        self._server = server
        return server

    def http_app(self, server: MCPServer[Any], *, path: str = "/mcp", **middleware: Any) -> PaymentMiddleware:
        """`server` over streamable HTTP at `path`, behind a `PaymentMiddleware(**middleware)` (schemes,
        store, pay_to, asset, ...) that these tools are charged through; serve it with any ASGI server."""
        self.attach(server)
        app = PaymentMiddleware(
            server.streamable_http_app(streamable_http_path=path), routes={}, **middleware
        )
        self.bind(app)
        return app

    @property
    def paywall(self) -> Paywall:
        return self.calls.paywall

    def settings(self) -> dict[str, Any]:
        return {"tools": sorted(self.calls.specs)}

    def priced(self, name: str) -> bool:
        return name in self.calls.specs

    async def quote(self, name: str, arguments: Mapping[str, Any]) -> Quote:
        """What calling `name` with `arguments` costs (the tool must be priced)."""
        url = self.resource_url or f"mcp://tool/{name}"
        return await self.calls.quote(
            name, arguments, method="tools/call", url=url, description=f"MCP tool {name}"
        )

    # -- the interceptor -----------------------------------------------------------------------------------

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if params.name not in self.calls.specs:
            return await call_next(ctx)
        if not self.calls.bound:  # priced, but no paywall was bound: never serve it for free
            raise MCPError(MCP_INTERNAL_ERROR, "this paid tool is not connected to a paywall")
        meta: Mapping[str, Any] = dict(params.meta or {})
        try:
            quote = await self.quote(params.name, dict(params.arguments or {}))
        except Exception as exc:  # a pricing function failed: the operator's bug, not the payer's
            log.error("pricing tool %s failed: %r", params.name, exc)
            raise MCPError(MCP_INTERNAL_ERROR, "pricing failed") from None
        paywall = self.paywall
        offers = paywall.offers(quote)
        schema = await self._output_schema(params.name)
        try:
            found = _find_credential(meta)
        except PaymentFailed as exc:
            return self._refusal(quote, offers, exc, _binding_hint(meta), schema)
        if found is None:
            return self._required(quote, offers, ctx, meta, schema)
        binding, dialect, raw = found
        try:
            attempt = await paywall.verify(quote, offers, dialect, raw, host="")
        except PaymentFailed as exc:
            return self._refusal(quote, offers, exc, binding, schema)
        try:
            result = await call_next(ctx)
        except BaseException:
            await paywall.release(attempt)
            raise
        if not isinstance(result, CallToolResult) or result.is_error:
            await paywall.release(attempt)  # the tool failed: nothing is charged
            return result
        try:
            receipt = await paywall.settle(attempt)
        except PaymentFailed as exc:
            return self._refusal(quote, offers, exc, binding, schema, settling=True)
        return _with_receipt(result, binding, attempt, receipt)

    async def _output_schema(self, name: str) -> dict[str, Any] | None:
        """The tool's declared `outputSchema` (None when it has none, or the server was not attached)."""
        if self._schemas is None:
            if self._server is None:
                return None
            self._schemas = {t.name: t.output_schema for t in await self._server.list_tools()}
        return self._schemas.get(name)

    # -- answers -------------------------------------------------------------------------------------------

    def _payment_required(self, quote: Quote, offers: list[Offer], error: str) -> dict[str, Any]:
        required = PaymentRequired(
            error=error,
            resource=ResourceInfo(url=quote.url, description=quote.description, mime_type=quote.mime_type),
            accepts=[o.requirements for o in offers],
        )
        out: dict[str, Any] = msgspec.json.decode(json_encode(required))
        return out

    def _mpp_data(
        self, quote: Quote, offers: list[Offer], *, detail: str, status: int = 402
    ) -> dict[str, Any]:
        paywall = self.paywall
        challenges = paywall.challenger.mpp_challenges(
            quote, offers, realm=paywall.realm_for(""), now=paywall.clock()
        )
        problem = {"type": _PROBLEM_402, "title": "Payment Required", "status": status, "detail": detail}
        return {
            "httpStatus": status,
            "challenges": [mpp_challenge_to_json(ch) for ch in challenges],
            "problem": problem,
        }

    def _required(
        self,
        quote: Quote,
        offers: list[Offer],
        ctx: ServerRequestContext[Any, Any],
        meta: Mapping[str, Any],
        schema: dict[str, Any] | None,
    ) -> CallToolResult | PaymentRequiredResult:
        detail = f"payment is required for the tool {quote.path}"
        required = self._payment_required(quote, offers, "payment required")
        mpp = self._mpp_data(quote, offers, detail=detail)
        if _advertised(ctx, meta, X402_EXTENSION):  # the x402 extension binding: preferred when offered
            return PaymentRequiredResult(paymentRequired=required, _meta={MPP_REQUIRED_META: mpp})
        if _wants_mpp(ctx, meta):
            raise MCPError(MPP_PAYMENT_REQUIRED, "Payment Required", {**mpp, "x402": required})
        return _x402_result(required, schema, meta={MPP_REQUIRED_META: mpp})

    def _refusal(
        self,
        quote: Quote,
        offers: list[Offer],
        exc: PaymentFailed,
        binding: _Binding,
        schema: dict[str, Any] | None,
        *,
        settling: bool = False,
    ) -> CallToolResult:
        answer = error_answer(X402Error(exc.message, code=exc.code, status_hint=exc.status_hint))
        reason = answer.invalid_reason
        if binding == "mpp":
            if answer.status >= 500 and not settling:
                raise MCPError(MCP_INTERNAL_ERROR, exc.message, {"reason": reason})
            code = MCP_INVALID_PARAMS if answer.status == 400 else MPP_VERIFICATION_FAILED
            data = self._mpp_data(quote, offers, detail=exc.message)
            data["failure"] = {"reason": reason, "detail": exc.message}
            data["problem"] = {**data["problem"], "type": answer.problem_type, "title": answer.title}
            raise MCPError(code, answer.title, data)
        error = "Settlement failed" if settling else reason
        required = self._payment_required(quote, offers, error)
        if settling:
            required["error"] = f"Settlement failed: {reason}"
        return _x402_result(required, schema)


def _structured(required: dict[str, Any], text: str, schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `structuredContent` of a payment-required result: the `PaymentRequired` itself (x402 clients read
    it first), as long as it is valid for the tool's `outputSchema` (some SDKs validate error results too).
    mcp 2's wrapper schema for a plain return (`{"result": ...}`) is met by adding `result` (the same JSON
    text); for any other schema it is left out, and clients read `content[0].text`."""
    if schema is None:
        return required
    try:
        validator = jsonschema.Draft202012Validator(schema)
        for candidate in (required, {**required, "result": text}):
            if validator.is_valid(candidate):
                return candidate
    except jsonschema.SchemaError:
        pass
    return None


def _x402_result(
    required: dict[str, Any], schema: dict[str, Any] | None, *, meta: dict[str, Any] | None = None
) -> CallToolResult:
    text = json_encode(required).decode()
    return CallToolResult(
        is_error=True,
        structured_content=_structured(required, text, schema),
        content=[TextContent(type="text", text=text)],
        _meta=meta,
    )


def _with_receipt(
    result: CallToolResult, binding: _Binding, attempt: Attempt, receipt: list[tuple[bytes, bytes]]
) -> CallToolResult:
    meta = dict(result.meta or {})
    for name, value in receipt:
        if name in (b"payment-response", b"x-payment-response"):
            settled = msgspec.json.decode(json_encode(decode_payment_response(value)))
            meta[X402_RESPONSE_META] = settled
            if binding == "x402-nested":
                meta[X402_EXTENSION] = {"settlementResponse": settled}
        elif name == b"payment-receipt":
            meta[MPP_RECEIPT_META] = {
                "status": "success",
                **msgspec.json.decode(json_encode(parse_receipt(value))),
            }
    del attempt
    return result.model_copy(update={"meta": meta})


def _binding_hint(meta: Mapping[str, Any]) -> _Binding:
    return "mpp" if MPP_CREDENTIAL_META in meta else "x402"


def _find_credential(meta: Mapping[str, Any]) -> tuple[_Binding, Dialect, bytes] | None:
    """The one credential in `_meta`, re-encoded as its HTTP header value for `Paywall.verify`."""
    mpp = meta.get(MPP_CREDENTIAL_META)
    try:
        x402 = x402_payment_in(meta)
        if x402 is not None and mpp is not None:
            raise MalformedPayment("send exactly one payment credential")
        if mpp is not None:
            return "mpp", "mpp", format_credential(mpp_credential_from_json(mpp)).encode()
        if x402 is None:
            return None
        if not isinstance(x402, Mapping):
            raise MalformedPayment("the x402 payment must be a PaymentPayload object")
        binding: _Binding = "x402" if X402_PAYMENT_META in meta else "x402-nested"
        return binding, "x402v2", b64_json_encode(dict(x402)).encode()
    except MalformedPayment as exc:
        raise PaymentFailed(exc.message, code=exc.code, status_hint=400) from None
    except (TypeError, ValueError) as exc:  # e.g. a value JSON cannot carry
        raise PaymentFailed(f"malformed payment: {exc}", code="invalid_payload", status_hint=400) from None


def _capabilities(ctx: ServerRequestContext[Any, Any], meta: Mapping[str, Any]) -> Mapping[str, Any]:
    """The client's capabilities: per request (2026-07-28 `_meta`) or from its initialize."""
    caps: Any = meta.get("io.modelcontextprotocol/clientCapabilities")
    if not isinstance(caps, Mapping):
        session_caps = getattr(ctx.session, "client_capabilities", None)
        caps = session_caps.model_dump(by_alias=True) if session_caps is not None else {}
    out: Mapping[str, Any] = caps
    return out


def _advertised(ctx: ServerRequestContext[Any, Any], meta: Mapping[str, Any], identifier: str) -> bool:
    extensions = _capabilities(ctx, meta).get("extensions")
    return isinstance(extensions, Mapping) and identifier in extensions


def _wants_mpp(ctx: ServerRequestContext[Any, Any], meta: Mapping[str, Any]) -> bool:
    """Whether the client announced MPP (`experimental.payment`, or the `org.paymentauth/payment` ext.)."""
    experimental = _capabilities(ctx, meta).get("experimental")
    return (isinstance(experimental, Mapping) and "payment" in experimental) or _advertised(
        ctx, meta, MPP_EXTENSION
    )
