"""The paywall on several networks, without a chain (property test): every offer of a route priced on N
networks is verified by the scheme of its own network, offers come in the networks' order, and a
credential echoing one network's offer never reaches another network's scheme."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from gateway import Asset, MemoryStore, Offer, Paywall, Presented, RouteTable, Verified
from gateway._decode import match_accepted
from x402 import PaymentRejected, PaymentRequirements

TOKEN = "0x" + "11" * 20
PAYEE = "0x" + "22" * 20


class StubScheme:
    """A scheme bound to one network: its offers and its verdicts name that network."""

    def __init__(self, name: str, network: str) -> None:
        self.name, self.network = name, network

    def offer(self, quote: Any) -> Offer:
        assert quote.asset.network == self.network  # the paywall hands each network's scheme its own quote
        requirements = PaymentRequirements(
            scheme=self.name,
            network=quote.asset.network,
            asset=quote.asset.address,
            amount=str(quote.amount),
            pay_to=quote.pay_to,
            max_timeout_seconds=60,
        )
        return Offer(scheme=self.name, requirements=requirements)

    async def verify(self, offer: Offer, presented: Presented, *, now: float) -> Verified:
        raise NotImplementedError

    async def settle(self, verified: Verified) -> str:
        raise NotImplementedError

    def settlement(self, verified: Verified, *, now: float) -> Any:
        raise NotImplementedError


def _request(path: str = "/paid") -> Request:
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "headers": [(b"host", b"gw")],
        "query_string": b"",
    }
    return Request(scope)


@settings(max_examples=60, deadline=None)
@given(
    chain_ids=st.lists(st.integers(1, 10**6), min_size=1, max_size=5, unique=True),
    names=st.lists(st.sampled_from(["exact", "escrow", "upto"]), min_size=1, max_size=3, unique=True),
)
def test_each_offer_is_its_own_networks(chain_ids: list[int], names: list[str]) -> None:
    assets = [Asset(address=TOKEN, chain_id=c, name="USD Coin", version="2") for c in chain_ids]
    groups = {a.network: [StubScheme(n, a.network) for n in names] for a in assets}
    paywall = Paywall(
        groups[assets[0].network],
        store=MemoryStore(),
        secrets=[b"s" * 32],
        networks=groups if len(assets) > 1 else None,
    )
    table = RouteTable({"GET /paid": 1000}, pay_to=PAYEE, asset=assets[0], assets=assets)
    (entry,) = table.entries
    quote = asyncio.run(table.quote(entry, _request()))
    offers = paywall.offers(quote)
    assert [(o.requirements.network, o.scheme) for o in offers] == [
        (a.network, n) for a in assets for n in names
    ]
    for offer in offers:
        scheme = paywall.scheme_of(offer)
        assert isinstance(scheme, StubScheme)
        assert (scheme.network, scheme.name) == (offer.requirements.network, offer.scheme)
        # what a credential echoes (`accepted`) picks that very offer, and so that network's scheme
        assert match_accepted(offer.requirements, offers) is offer
    if len(assets) > 1:
        forged = offers[0].requirements
        unknown = PaymentRequirements(
            scheme=forged.scheme,
            network="eip155:0",
            asset=forged.asset,
            amount=forged.amount,
            pay_to=forged.pay_to,
            max_timeout_seconds=forged.max_timeout_seconds,
        )
        with pytest.raises(PaymentRejected):
            match_accepted(unknown, offers)
