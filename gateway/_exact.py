"""The x402 `exact` scheme on EVM with EIP-3009, which is also MPP `evm`/`charge` with an `authorization`
credential: one signed `TransferWithAuthorization`, two wire forms, one verifier and one settle path.

The off-chain checks (recipient, exact amount, validity window, MPP challenge binding) run here; everything
that needs the chain (signature routing by `eth_getCode`, ERC-1271, simulation, broadcast) is behind the
`ExactChain` protocol, which `escrow.ExactEvm` implements (and a stub implements in benchmarks). Deferred
payments are queued as `escrow.ExactPayment` for `escrow.ExactSettler`.
"""

from __future__ import annotations

from typing import Any, Protocol

from escrow._exact_settler import ExactPayment, encode_payment
from x402 import (
    VALID_BEFORE_BUFFER_SECONDS,
    Eip712Domain,
    ExactEvmPayload,
    MalformedPayment,
    MppAuthorizationPayload,
    PaymentRejected,
    PaymentRequirements,
    Reason,
    UnsupportedScheme,
    convert_payload,
    decode_exact_payload,
    exact_domain,
)

from ._pricing import Quote
from ._scheme import MppOffer, Offer, Presented, Verified
from ._store import Settlement

__all__ = ["ExactChain", "ExactScheme"]


class ExactChain(Protocol):
    """The chain side of `exact`: `escrow.ExactEvm` on a real node."""

    async def verify(self, domain: Eip712Domain, payload: ExactEvmPayload) -> None: ...

    async def settle(self, domain: Eip712Domain, payload: ExactEvmPayload) -> str: ...


_UINT256_MAX = 2**256 - 1


class ExactScheme:
    """x402 `exact` / MPP `evm` `charge` (`authorization` credential) over EIP-3009."""

    name = "exact"

    def __init__(self, chain: ExactChain, *, min_validity: int = VALID_BEFORE_BUFFER_SECONDS) -> None:
        self.chain = chain
        self.min_validity = min_validity

    def offer(self, quote: Quote) -> Offer:
        asset = quote.asset
        requirements = PaymentRequirements(
            scheme=self.name,
            network=asset.network,
            asset=asset.address,
            amount=str(quote.amount),
            pay_to=quote.pay_to,
            max_timeout_seconds=quote.max_timeout_seconds,
            extra={"name": asset.name, "version": asset.version},
        )
        request: dict[str, Any] = {
            "amount": str(quote.amount),
            "currency": asset.address,
            "recipient": quote.pay_to,
            "methodDetails": {
                "chainId": asset.chain_id,
                "credentialTypes": ["authorization"],
                "decimals": asset.decimals,
            },
        }
        mpp = MppOffer(method="evm", intent="charge", request=request)
        return Offer(scheme=self.name, requirements=requirements, mpp=mpp)

    def _payload(self, presented: Presented) -> ExactEvmPayload:
        payload = self._decode(presented)
        auth = payload.authorization
        if max(int(auth.value), int(auth.valid_after), int(auth.valid_before)) > _UINT256_MAX:
            raise MalformedPayment("authorization numbers must fit in uint256")
        return payload

    def _decode(self, presented: Presented) -> ExactEvmPayload:
        if presented.dialect != "mpp":
            return decode_exact_payload(presented.payload)
        # evm/charge requires `type`; a payload without it can only be an authorization (x402's own encoder
        # leaves the default out), so it is read as one.
        kind = presented.payload.get("type", "authorization")
        if kind != "authorization":
            raise UnsupportedScheme(
                f"credential type {str(kind)[:32]!r} is not accepted (only 'authorization')"
            )
        return convert_payload(presented.payload, MppAuthorizationPayload).to_exact()

    async def verify(self, offer: Offer, presented: Presented, *, now: float) -> Verified:
        req = offer.requirements
        payload = self._payload(presented)
        auth = payload.authorization
        if auth.to.lower() != req.pay_to.lower():
            raise PaymentRejected(
                Reason.RECIPIENT_MISMATCH, f"authorization pays {auth.to}, not {req.pay_to}"
            )
        if int(auth.value) != int(req.amount):
            raise PaymentRejected(
                Reason.VALUE_MISMATCH, f"authorization value {auth.value} != price {req.amount}"
            )
        if int(auth.valid_before) < now + self.min_validity:
            raise PaymentRejected(Reason.VALID_BEFORE, "authorization expires too soon to settle")
        if int(auth.valid_after) > now:
            raise PaymentRejected(Reason.VALID_AFTER, "authorization is not valid yet")
        if presented.bindings and bytes.fromhex(auth.nonce[2:]) not in presented.bindings:
            raise PaymentRejected(
                Reason.CHALLENGE_BINDING_MISMATCH, "authorization nonce is not the challenge hash"
            )
        domain = exact_domain(req)
        await self.chain.verify(domain, payload)
        key = f"exact:{domain.chain_id}:{req.asset.lower()}:{auth.from_.lower()}:{auth.nonce.lower()}"
        return Verified(
            scheme=self.name,
            key=key,
            payer=auth.from_,
            amount=int(auth.value),
            network=req.network,
            state=(domain, payload),
            expires_at=float(int(auth.valid_before)),
        )

    async def settle(self, verified: Verified) -> str:
        domain, payload = verified.state
        return await self.chain.settle(domain, payload)

    def settlement(self, verified: Verified, *, now: float) -> Settlement:
        domain, payload = verified.state
        body = ExactPayment(
            name=domain.name,
            version=domain.version,
            chain_id=domain.chain_id,
            asset=domain.verifying_contract,
            payload=payload,
        )
        return Settlement(
            key=verified.key,
            kind=self.name,
            payload=encode_payment(body),
            payer=verified.payer,
            amount=verified.amount,
            created_at=now,
            expires_at=verified.expires_at,
        )
