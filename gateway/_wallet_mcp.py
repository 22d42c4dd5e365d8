"""A wallet MCP server for any agent: `agentpay mcp --wallet FILE` (stdio) lets an off-the-shelf MCP host pay
for HTTP resources within its session key's limits, with no payment code of its own.

Tools:

- `fetch_paid(url, method, headers, body, max_price)`: the request, paid through `PaymentAuth` (the same offer
  choice, policy reservation, signing, single retry and receipt as `x402.client`); returns the status,
  the body (text, bounded), the receipt and what was paid. A payment over `max_price` or over the wallet's
  policy is refused *before anything is signed*, as a tool error naming the limit.
- `list_offers(url, method)`: what the resource costs, in which protocols, schemes and networks, and whether
  this wallet can and may pay each offer.
- `spend_status()`: budget used and left (overall and per payee), and for a session-key wallet its grant
  window and terms, the escrow deposit and the escrow's own account of the grant (read from the chain).

The owner key is never needed: the wallet is a session key (plus an optional small hot key for `exact`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import httpx
import msgspec
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from escrow import AgentEscrow, EscrowError, Rpc
from x402 import (
    MppReceipt,
    NoPayableOffer,
    SettleResponse,
    SpendPolicyViolation,
    X402Error,
    json_encode,
)
from x402.client import (
    PAYMENT_ERROR_EXTENSION,
    Offer,
    PaymentAuth,
    SpendPolicy,
    offers_from_response,
    receipt_of,
)
from x402.client_escrow import SessionKeyWallet, SessionWalletFile

from ._pricing import Amount, to_atomic

__all__ = ["DEFAULT_MAX_BODY_CHARS", "WalletTools", "load_wallet_tools"]

#: The longest body `fetch_paid` returns (characters); a host's context is not the place for megabytes.
DEFAULT_MAX_BODY_CHARS = 100_000


class _Capped(PaymentAuth):
    """`base`'s wallet, policy and preferences, paying no offer above `cap` for this one request."""

    def __init__(self, base: PaymentAuth, cap: int) -> None:
        super().__init__(
            base.wallet, base.policy, prefer=base.prefer, accept_payment=bool(base.accept_payment)
        )
        self.cap = cap

    def choose(self, offers: Iterable[Offer]) -> Offer:
        offers = list(offers)
        within = [o for o in offers if o.amount <= self.cap]
        if offers and not within:
            cheapest = min(o.amount for o in offers)
            raise SpendPolicyViolation(f"amount {cheapest} exceeds max_price {self.cap}")
        return super().choose(within)


def _builtins(value: Any) -> Any:
    decoded: Any = msgspec.json.decode(json_encode(value))
    return decoded


class WalletTools:
    """The three wallet tools over `auth` (its wallet and spend policy, shared by every call).

    `rpc_url` (with a `SessionKeyWallet`) lets `spend_status` read the escrow deposit and grant from the
    chain. `decimals` are the token's, for human prices (`"$0.001"`) in and out.
    """

    def __init__(
        self,
        auth: PaymentAuth,
        *,
        rpc_url: str | None = None,
        decimals: int = 6,
        timeout: float = 30.0,
        max_body_chars: int = DEFAULT_MAX_BODY_CHARS,
    ) -> None:
        self.auth = auth
        self.rpc_url = rpc_url
        self.decimals = decimals
        self.timeout = timeout
        self.max_body_chars = max_body_chars

    def server(self, name: str = "agentpay-wallet") -> MCPServer:
        server = MCPServer(
            name, instructions="Pays for HTTP resources (x402, MPP) within a session key's limits."
        )
        server.add_tool(self.fetch_paid, description="Fetch a URL, paying its 402 within the wallet's limits")
        server.add_tool(self.list_offers, description="What a URL costs: its payment offers")
        server.add_tool(
            self.spend_status, description="Budget used and left, per payee, deposit, grant window"
        )
        return server

    def _human(self, atomic: int) -> str:
        return f"${Decimal(atomic).scaleb(-self.decimals).normalize():f}"

    def _offer(self, offer: Offer) -> dict[str, Any]:
        return {
            "protocol": offer.protocol,
            "scheme": offer.scheme,
            "network": offer.network,
            "asset": offer.asset,
            "amount": str(offer.amount),
            "price": self._human(offer.amount),
            "payTo": offer.pay_to,
        }

    # -- tools ---------------------------------------------------------------------------------------------

    async def fetch_paid(
        self,
        url: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: str | None = None,
        max_price: str | None = None,
    ) -> dict[str, Any]:
        """Fetch `url`, paying a 402 with the wallet. `max_price` ("$0.01" or atomic units) caps this call."""
        auth = self.auth
        if max_price is not None:
            try:
                auth = _Capped(self.auth, to_atomic(_amount(max_price), self.decimals))
            except Exception as exc:
                raise ToolError(f"invalid max_price {max_price!r}: {exc}") from None
        try:
            async with httpx.AsyncClient(auth=auth, timeout=self.timeout, follow_redirects=False) as client:
                response = await client.request(
                    method.upper(), url, headers=headers or {}, content=body.encode() if body else None
                )
        except SpendPolicyViolation as exc:
            raise ToolError(f"refused before signing: {exc.message}") from None
        except NoPayableOffer as exc:
            raise ToolError(f"refused: {exc.message}") from None
        except X402Error as exc:
            raise ToolError(f"payment failed: {exc.message}") from None
        except httpx.HTTPError as exc:
            raise ToolError(f"request failed: {type(exc).__name__}: {exc}") from None
        text = response.text
        out: dict[str, Any] = {
            "status": response.status_code,
            "contentType": response.headers.get("content-type", ""),
            "body": text[: self.max_body_chars],
            "truncated": len(text) > self.max_body_chars,
            "receipt": None,
            "paid": None,
        }
        try:
            receipt = receipt_of(response)
        except X402Error:
            receipt = None
        if isinstance(receipt, SettleResponse | MppReceipt):
            out["receipt"] = _builtins(receipt)
        offer = response.extensions.get("x402_offer")
        if isinstance(offer, Offer):
            out["paid"] = self._offer(offer)
        refusal = response.extensions.get(PAYMENT_ERROR_EXTENSION)
        if refusal is not None:
            out["paymentError"] = _builtins(refusal)
        return out

    async def list_offers(self, url: str, method: str = "GET") -> dict[str, Any]:
        """Every offer of `url`'s 402, and whether this wallet can and may pay it."""
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.request(method.upper(), url)
        except httpx.HTTPError as exc:
            raise ToolError(f"request failed: {type(exc).__name__}: {exc}") from None
        offers = offers_from_response(response) if response.status_code == 402 else []
        listed = []
        for offer in offers:
            entry = self._offer(offer)
            entry["payable"] = self.auth.wallet.can_pay(offer)
            entry["refusal"] = self.auth.policy.refusal(offer)
            listed.append(entry)
        return {"status": response.status_code, "paid": response.status_code == 402, "offers": listed}

    async def spend_status(self) -> dict[str, Any]:
        """Budget used and left, per payee; for a session key, its grant window, deposit and escrow grant."""
        policy = self.auth.policy
        spent, reserved = policy.spent, policy.reserved
        left = None if policy.total_budget is None else policy.total_budget - spent - reserved
        out: dict[str, Any] = {
            "spent": spent,
            "reserved": reserved,
            "budget": policy.total_budget,
            "left": left,
            "maxPerCall": policy.max_per_call,
            "perPayee": policy.spent_by_payee(),
        }
        wallet = self.auth.wallet
        if isinstance(wallet, SessionKeyWallet):
            out["grant"] = await self._grant(wallet)
        return out

    async def _grant(self, wallet: SessionKeyWallet) -> dict[str, Any]:
        escrow = wallet.escrow
        now = time.time()
        until = escrow.valid_until
        grant: dict[str, Any] = {
            "payer": escrow.payer,
            "sessionKey": escrow.session.address,
            "escrow": escrow.escrow,
            "token": escrow.token,
            "maxPerCall": escrow.max_per_call,
            "payees": sorted(escrow.payees),
            "validAfter": escrow.valid_after,
            "validUntil": until,
            "windowOpen": escrow.valid_after <= now and (until is None or now <= until),
            "secondsLeft": None if until is None else max(0, int(until - now)),
        }
        if self.rpc_url:
            rpc = Rpc(self.rpc_url)
            try:
                contract = AgentEscrow(rpc, escrow.escrow)
                grant["deposit"] = await contract.deposit_of(escrow.payer, escrow.token)
                info = await contract.grant_of(escrow.payer, escrow.session.address)
                grant["onChain"] = {
                    "live": info.live,
                    "budget": info.budget,
                    "spent": info.spent,
                    "left": info.remaining,
                    "validUntil": info.valid_until,
                }
            except (EscrowError, OSError) as exc:
                grant["chainError"] = f"{type(exc).__name__}: {exc}"
            finally:
                await rpc.aclose()
        return grant


def _amount(value: Amount) -> Amount:
    """A typed-in amount: digits are atomic units, anything else (`"$0.01"`) a human amount."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 78 else text


def load_wallet_tools(
    path: str,
    *,
    rpc_url: str | None = None,
    max_per_call: Amount | None = None,
    budget: Amount | None = None,
) -> WalletTools:
    """`WalletTools` for a session wallet file (`x402.client_escrow.SessionWalletFile`, which
    `escrow.Chain.open_session` writes); the spend policy carries the grant's per-call cap and budget (or
    the tighter `max_per_call` / `budget` given here) and allows the network's token only."""
    file = SessionWalletFile.load(path)  # InvalidWalletFile (an X402Error) for a bad file
    wallet = SessionKeyWallet.from_file(file)
    network, grant = file.network, file.grant
    cap, total = grant.max_per_call, grant.budget
    if max_per_call is not None:
        cap = min(cap, network.atomic(_amount(max_per_call)))
    if budget is not None:
        total = min(total, network.atomic(_amount(budget)))
    policy = SpendPolicy(max_per_call=cap, total_budget=total, allowed_assets=[network.token])
    auth = PaymentAuth(wallet, policy)
    return WalletTools(auth, rpc_url=rpc_url or network.rpc_url or None, decimals=network.token_decimals)
