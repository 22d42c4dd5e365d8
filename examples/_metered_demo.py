"""The demo's usage-priced part: the orchestrator pays `examples.subagent` per use, not per call.

`GET /metered?units=7` (at most $0.01, charged $0.0001 per unit) is paid through x402 `upto` from the
orchestrator's hot wallet, a plain EOA: it signs a Permit2 authorization for the maximum and is charged
what the sub-agent's handler reports, no more. `GET /stream?tokens=N` is a billed Server-Sent-Events stream
($0.00001 per token) over an MPP session: one AgentChannels channel, a signed cumulative voucher whenever the
stream needs more credit, no transaction per token; closing the channel settles exactly what was streamed.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from decimal import Decimal

import httpx

from escrow import Chain, DevnetState, Erc20, Rpc, TxSender
from gateway import AgentChannelsChain, EoaChannelOpener
from x402 import PERMIT2_ADDRESS, LocalSigner, SettleResponse
from x402.client import PaymentAuth, SpendPolicy, receipt_of
from x402.client_session import SessionClient
from x402.client_upto import UptoWallet

from ._escrow_subagents import serving_app
from .subagent import UNIT_PRICE, build_app, with_sessions

__all__ = ["TOKENS", "UNITS", "pay_per_use"]

UNITS = 7  # /metered?units=7
TOKENS = 1000  # /stream?tokens=1000
TOKEN_PRICE = Decimal("0.00001")
PAYEE, FACILITATOR = 2, 9  # devnet accounts the rest of the demo leaves alone


async def pay_per_use(state: DevnetState, rpc: Rpc, say: Callable[..., None]) -> bool:
    """One metered call (upto) and one billed stream (MPP session) from the hot wallet (devnet account 1);
    prints and checks the exact balance changes. True when every one is exact."""
    if "permit2" not in state.contracts or "channels" not in state.contracts:
        say("per use", f"skipped: the {state.backend} devnet has no Permit2 or AgentChannels")
        return True
    decimals = 6
    unit, token_unit = int(UNIT_PRICE * 10**decimals), int(TOKEN_PRICE * 10**decimals)
    payee = state.accounts[PAYEE]
    hot = TxSender(rpc, state.accounts[1].private_key, chain_id=state.chain_id)
    usdc = Erc20(rpc, state.contracts["usdc"])
    # The hot wallet's one-time Permit2 approval (it pays its own gas: a plain EOA).
    await hot.transact(usdc.address, usdc.approve_calldata(PERMIT2_ADDRESS, 2**256 - 1), gas=100_000)
    chain = Chain.from_devnet(state, relayer=FACILITATOR)
    app = with_sessions(
        build_app(chain, pay_to=payee.address, schemes=["upto"], store="memory://"),
        chain,
        channels=state.contracts["channels"],
        payee_key=payee.private_key,
        secret=secrets.token_hex(32),
    )
    before = {who: await usdc.balance_of(who) for who in (payee.address, hot.address)}
    try:
        async with serving_app(lambda _url: app, "metered sub-agent") as url:
            say("sub-agent", f"{'metered':<11}upto+session /metered ≤ 0.01, /stream 0.00001/token  {url}")
            charged = await _metered(url, LocalSigner(state.accounts[1].private_key), say)
            settled = await _streamed(url, state, hot, say)
    finally:
        await chain.aclose()
    if charged is None or settled is None:
        return False
    after = {who: await usdc.balance_of(who) for who in (payee.address, hot.address)}
    served = f"{UNITS} x {UNIT_PRICE} + {TOKENS} x {TOKEN_PRICE}"
    want = UNITS * unit + TOKENS * token_unit
    rows = [
        ("sub-agent", after[payee.address] - before[payee.address], want, served),
        ("hot wallet", after[hot.address] - before[hot.address], -want, served),
        ("upto charge", charged, UNITS * unit, f"{UNITS} x {UNIT_PRICE}"),
        ("channel paid", settled, TOKENS * token_unit, f"{TOKENS} x {TOKEN_PRICE}"),
    ]
    ok = True
    say("per use", f"{'USDC':<15}{'change':>11}")
    for name, change, expected, why in rows:
        ok &= change == expected
        verdict = "exactly" if change == expected else f"MISMATCH (expected {expected / 10**6:+.6f}):"
        say("", f"{name:<15}{change / 10**6:>+11.6f}  {verdict} {why}")
    return ok


async def _metered(url: str, hot: LocalSigner, say: Callable[..., None]) -> int | None:
    """`/metered?units=7` through x402 `upto`: the actual charge, from the receipt (None: failed)."""
    auth = PaymentAuth(UptoWallet(hot, max_per_call=10_000), SpendPolicy(max_per_call="$0.01"))
    async with httpx.AsyncClient(auth=auth, timeout=30.0) as client:
        response = await client.get(f"{url}/metered?units={UNITS}")
    receipt = receipt_of(response)
    if response.status_code != 200 or not isinstance(receipt, SettleResponse) or receipt.amount is None:
        say("metered?", f"GET /metered answered {response.status_code}: {response.text[:200]}")
        return None
    charged = Decimal(receipt.amount) / 10**6
    say(
        "paid",
        f"{'metered':<11}GET /metered?units={UNITS}     upto: signed at most 0.01, charged {charged}"
        f" (PAYMENT-RESPONSE amount {receipt.amount}), tx {receipt.transaction[:12]}…",
    )
    return int(receipt.amount)


async def _streamed(url: str, state: DevnetState, hot: TxSender, say: Callable[..., None]) -> int | None:
    """`/stream?tokens=1000` over an MPP session; what the closed channel settled (None: failed)."""
    usdc = state.contracts["usdc"]
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as http:
        client = SessionClient(
            http,
            signer=LocalSigner.random(),  # the channel's voucher key (`authorizedSigner`)
            opener=EoaChannelOpener(hot, usdc),
            deposit=100_000,
            max_voucher_step=10_000,
        )
        tokens = sum([1 async for name, _ in client.stream(f"/stream?tokens={TOKENS}") if name == "message"])
        receipt = await client.close("/stream")
    if receipt is None or tokens != TOKENS:
        say("streamed?", f"{tokens} of {TOKENS} tokens, close receipt {receipt}")
        return None
    channels = AgentChannelsChain(hot.rpc, state.contracts["channels"], chain_id=state.chain_id)
    info = await channels.channel(receipt.channel_id)
    say(
        "paid",
        f"{'metered':<11}GET /stream?tokens={TOKENS}  {tokens} tokens over one MPP session channel"
        f", vouchers but no transaction per token; closed: tx {(receipt.tx_hash or '')[:12]}…",
    )
    return info.settled
