"""The ERC-7677 paymaster web service: `AgentPaymaster` sponsorships over JSON-RPC, for any ERC-4337 client.

    app = paymaster_app(SponsorService(paymaster=address, signer=sponsor_key, chain_id=31337))
    # POST / {"method": "pm_getPaymasterStubData", "params": [userOp, entryPoint, chainId, context]}

Methods (ERC-7677): `pm_getPaymasterStubData` answers `paymaster`, `paymasterData` (real terms, dummy
signature), `paymasterVerificationGasLimit` and `paymasterPostOpGasLimit` for gas estimation;
`pm_getPaymasterData` answers the final `paymaster` and signed `paymasterData` for the operation as estimated.
`context` chooses the mode: `{"mode": "verifying"}` (the sponsor pays, within the account's spend limit) or
`{"mode": "token"}` (the account pays in the payment token at the signed price).

Errors are JSON-RPC error objects: -32700 for a body that is not JSON (HTTP 400), -32600 for a request that
is not JSON-RPC (HTTP 400), -32601 for an unknown method, -32602 for bad parameters, and -32000 for an
operation the sponsor refuses, whose `data.code` is the stable reason (`paymaster_account_unknown`,
`paymaster_wrong_chain`, ...). A body past `max_body_bytes` is a 413 problem document.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from escrow.accounts._bundler_rpc import user_op_from_json
from escrow.accounts._paymaster import PaymasterMode, PaymasterRefused, SponsorService
from escrow.accounts._userop import PackedUserOperation
from x402 import PROBLEM_CONTENT_TYPE

__all__ = ["DEFAULT_MAX_BODY_BYTES", "paymaster_app"]

#: A user operation is a few KiB at most; 64 KiB leaves room for large calldata batches.
DEFAULT_MAX_BODY_BYTES: Final = 64 << 10
_MODES: Final = {"verifying": PaymasterMode.VERIFYING, "token": PaymasterMode.TOKEN}


class _BadParams(Exception):
    pass


def _reply(
    rid: Any, *, result: Any = None, error: dict[str, Any] | None = None, status: int = 200
) -> Response:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": rid}
    if error is not None:
        body["error"] = error
    else:
        body["result"] = result
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def _parse_params(sponsor: SponsorService, params: Any) -> tuple[PackedUserOperation, PaymasterMode]:
    if not isinstance(params, list) or len(params) < 3:
        raise _BadParams("params are [userOperation, entryPoint, chainId, context?]")
    try:
        op = user_op_from_json(params[0])
    except ValueError as exc:
        raise _BadParams(f"userOperation: {exc}") from None
    entry_point, chain_id = params[1], params[2]
    if not isinstance(entry_point, str) or not isinstance(chain_id, str | int):
        raise _BadParams("entryPoint must be an address and chainId a 0x-hex quantity")
    try:
        chain = chain_id if isinstance(chain_id, int) else int(chain_id, 16)
    except ValueError:
        raise _BadParams(f"chainId: not a quantity: {chain_id!r}") from None
    context = params[3] if len(params) > 3 and params[3] is not None else {}
    if not isinstance(context, dict):
        raise _BadParams("context must be an object")
    mode_name = context.get("mode", "verifying" if sponsor.mode == PaymasterMode.VERIFYING else "token")
    if mode_name not in _MODES:
        raise _BadParams(f"context.mode must be one of {sorted(_MODES)}")
    try:
        sponsor.check_request(entry_point, chain)
    except ValueError as exc:  # not an address
        raise _BadParams(f"entryPoint: {exc}") from None
    return op, _MODES[mode_name]


def paymaster_app(sponsor: SponsorService, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Starlette:
    """A Starlette app serving ERC-7677 for `sponsor` at `/` (POST, JSON-RPC 2.0)."""

    async def rpc(request: Request) -> Response:
        declared = request.headers.get("content-length", "")
        body = b""
        # ASCII digits only ("²".isdigit() is true; int() refuses it, and more than 4300 digits)
        if (
            declared.isascii()
            and declared.isdigit()
            and (len(declared) > 18 or int(declared) > max_body_bytes)
        ):
            return _too_large(max_body_bytes)
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return _too_large(max_body_bytes)
        try:
            call = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return _reply(None, error={"code": -32700, "message": "parse error: not JSON"}, status=400)
        if (
            not isinstance(call, dict)
            or call.get("jsonrpc") != "2.0"
            or not isinstance(call.get("method"), str)
        ):
            return _reply(None, error={"code": -32600, "message": "invalid JSON-RPC 2.0 request"}, status=400)
        rid, method = call.get("id"), call["method"]
        if method not in ("pm_getPaymasterStubData", "pm_getPaymasterData"):
            return _reply(rid, error={"code": -32601, "message": f"method not found: {method}"})
        try:
            op, mode = _parse_params(sponsor, call.get("params"))
            if method == "pm_getPaymasterStubData":
                pnd = sponsor.stub(op, mode=mode)
                result = {
                    "paymaster": sponsor.paymaster,
                    "paymasterData": "0x" + pnd[52:].hex(),
                    "paymasterVerificationGasLimit": hex(int.from_bytes(pnd[20:36], "big")),
                    "paymasterPostOpGasLimit": hex(int.from_bytes(pnd[36:52], "big")),
                    "isFinal": False,
                }
            else:
                pnd = sponsor.sign(op, mode=mode)
                result = {"paymaster": sponsor.paymaster, "paymasterData": "0x" + pnd[52:].hex()}
        except _BadParams as exc:
            return _reply(rid, error={"code": -32602, "message": f"invalid params: {exc}"})
        except PaymasterRefused as exc:
            return _reply(rid, error={"code": -32000, "message": str(exc), "data": {"code": exc.code}})
        return _reply(rid, result=result)

    return Starlette(routes=[Route("/", rpc, methods=["POST"])])


def _too_large(limit: int) -> Response:
    body = {
        "type": "about:blank",
        "title": "Content Too Large",
        "status": 413,
        "detail": f"the request body exceeds {limit} bytes",
    }
    return Response(msgspec.json.encode(body), status_code=413, media_type=PROBLEM_CONTENT_TYPE)
