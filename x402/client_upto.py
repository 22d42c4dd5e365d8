"""Client side of the x402 `upto` scheme: a plain EOA pays usage-priced routes through Permit2.

    wallet = UptoWallet(LocalSigner(key), max_per_call=10_000)      # atomic units
    auth = PaymentAuth(wallet, SpendPolicy(max_per_call="$0.01"))

The payer approves Permit2 (`0x000000000022D473030F116dDEE9F6B43aC78BA3`) on the token once. Per request it
signs the route's MAXIMUM for the upto proxy (spender), bound to the server's `payTo` and to the
facilitator the offer names (`extra.facilitatorAddress`): only that facilitator can settle, and only up to
the maximum. The actual charge comes back in `PAYMENT-RESPONSE` (`SettleResponse.amount`).

A maximum above `max_per_call` is refused before anything is signed (`can_pay` is False, `pay` raises
`NoPayableOffer`).
"""

from __future__ import annotations

import time
from typing import Final

from ._errors import NoPayableOffer
from ._schemes import encode_scheme_payload
from ._signer import Signer
from ._upto import UPTO_SCHEME, sign_upto
from .client import Credential, Offer

__all__ = ["UptoWallet"]

_VALID_AFTER_SKEW: Final = 600  # as the official client: tolerate a server clock behind ours


class UptoWallet:
    """Pays x402 v2 `upto` offers on EVM with Permit2 witness signatures from `signer` (an EOA)."""

    def __init__(self, signer: Signer, *, max_per_call: int | None = None) -> None:
        self.signer = signer
        self.max_per_call = max_per_call

    def can_pay(self, offer: Offer) -> bool:
        if offer.protocol != "x402v2" or offer.scheme != UPTO_SCHEME or offer.chain_id is None:
            return False
        facilitator = offer.extra.get("facilitatorAddress")
        if not isinstance(facilitator, str) or len(facilitator) != 42:
            return False
        return self.max_per_call is None or offer.amount <= self.max_per_call

    def pay(self, offer: Offer) -> Credential:
        if not self.can_pay(offer) or offer.chain_id is None:
            raise NoPayableOffer(
                f"this wallet cannot pay {offer.scheme} {offer.amount} on {offer.network}"
                + (f" (per-call cap {self.max_per_call})" if self.max_per_call is not None else "")
            )
        now = int(time.time())
        signed = sign_upto(
            self.signer,
            chain_id=offer.chain_id,
            token=offer.asset,
            maximum=offer.amount,
            pay_to=offer.pay_to,
            facilitator=str(offer.extra["facilitatorAddress"]),
            deadline=now + max(offer.max_timeout_seconds, 60),
            valid_after=now - _VALID_AFTER_SKEW,
        )
        return Credential(payload=encode_scheme_payload(signed))
