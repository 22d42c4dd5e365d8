"""Decoding a credential in each dialect and finding the offer it pays, for `Paywall.verify`.

x402 v2: `accepted` must equal an advertised requirement (`match_accepted` says the most specific reason when
none does); x402 v1: scheme and network; MPP: an HMAC-valid, unexpired challenge of this realm whose request
and route scope equal what this request would be offered now. Also the MPP realm helpers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from x402 import (
    InvalidChallenge,
    PaymentRejected,
    PaymentRequirements,
    Reason,
    UnsupportedScheme,
    challenge_hash,
    challenge_hash_pympp,
    check_bound_field,
    decode_payment_signature,
    decode_x_payment,
    parse_credential,
    requirements_match,
    verify_challenge,
)

from ._answers import Challenger, v1_network
from ._errors import GatewayError
from ._pricing import Quote
from ._scheme import Offer, Presented

__all__ = [
    "check_realm",
    "decode_mpp",
    "decode_x402v1",
    "decode_x402v2",
    "host_name",
    "log_binding",
    "match_accepted",
]

log = logging.getLogger("agentpay.gateway")


def decode_x402v2(raw: bytes, offers: Sequence[Offer]) -> tuple[Offer, Presented]:
    payment = decode_payment_signature(raw)
    offer = match_accepted(payment.accepted, offers)
    return offer, Presented(dialect="x402v2", payload=payment.payload)


def decode_x402v1(raw: bytes, offers: Sequence[Offer]) -> tuple[Offer, Presented]:
    payment = decode_x_payment(raw)
    same_scheme = [o for o in offers if o.requirements.scheme == payment.scheme]
    if not same_scheme:
        raise UnsupportedScheme(f"scheme {payment.scheme[:32]!r} is not offered")
    for offer in same_scheme:
        network = offer.requirements.network
        if payment.network in (network, v1_network(network)):
            return offer, Presented(dialect="x402v1", payload=payment.payload)
    raise PaymentRejected(Reason.NETWORK_MISMATCH, f"network {payment.network[:64]!r} is not offered")


def decode_mpp(
    raw: bytes,
    quote: Quote,
    offers: Sequence[Offer],
    *,
    secrets: Sequence[bytes],
    realm: str,
    strict: bool,
    now: float,
) -> tuple[Offer, Presented]:
    """The offer an MPP credential pays and what it presents: its challenge must be ours (HMAC id), for this
    `realm`, unexpired, for this route and this price."""
    credential = parse_credential(raw)
    ch = credential.challenge
    if not verify_challenge(secrets, ch):
        raise InvalidChallenge("the challenge id does not match its parameters")
    if ch.realm != realm:
        raise InvalidChallenge("the challenge was issued for another realm")
    expires = ch.expires_at()
    if expires is None:  # mpp-tools: missing_credential_expires_rejected_with_route_expiry
        raise InvalidChallenge("the challenge has no expiry", code=Reason.INVALID_CHALLENGE)
    if expires.timestamp() <= now:
        raise InvalidChallenge("the challenge expired", code=Reason.CHALLENGE_EXPIRED)
    request = ch.request_json()
    if request.pop("_mppx_scope", None) != Challenger.scope(quote):
        raise InvalidChallenge(
            "the challenge was issued for another route", code=Reason.CHALLENGE_BINDING_MISMATCH
        )
    same_method = [
        o for o in offers if o.mpp is not None and (o.mpp.method, o.mpp.intent) == (ch.method, ch.intent)
    ]
    if not same_method:
        raise UnsupportedScheme(f"{ch.method[:32]}/{ch.intent[:32]} is not offered here")
    offer = next((o for o in same_method if o.mpp is not None and o.mpp.request == request), None)
    if offer is None:
        raise InvalidChallenge(
            "the challenge no longer matches the price", code=Reason.CHALLENGE_BINDING_MISMATCH
        )
    # Both forms commit to the same HMAC-checked id and realm: the spec's keccak256(id || realm) and
    # pympp 0.16's keccak256(JSON [id, realm]); `mpp_strict` takes the spec's only.
    bindings: tuple[bytes, ...] = (challenge_hash(ch.id, ch.realm),)
    if not strict:
        bindings += (challenge_hash_pympp(ch.id, ch.realm),)
    presented = Presented(
        dialect="mpp",
        payload=credential.payload,
        challenge=ch,
        bindings=bindings,
        source=credential.source,
    )
    return offer, presented


def check_realm(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise GatewayError(f"{what} must be a non-empty string", code="configuration_error")
    try:
        check_bound_field("realm", value)
    except ValueError as exc:
        raise GatewayError(f"{what} {value[:64]!r}: {exc}", code="configuration_error") from None
    return value


def host_name(host: str) -> str:
    """`Host` without its port, lower-cased (`[::1]:8000` -> `[::1]`, `API.example:443` -> `api.example`)."""
    if host.startswith("["):
        return host[: host.find("]") + 1].lower() if "]" in host else ""
    return host.partition(":")[0].lower()


def log_binding(presented: Presented) -> None:
    """Say which challengeHash form a verified MPP credential used (the second is pympp 0.16's)."""
    nonce = presented.payload.get("nonce")
    if not isinstance(nonce, str):
        return
    hexed = nonce.lower().removeprefix("0x")
    forms = ("spec keccak256(id || realm)", "pympp keccak256(JSON [id, realm])")
    for form, binding in zip(forms, presented.bindings, strict=False):
        if binding.hex() == hexed:
            challenge_id = presented.challenge.id if presented.challenge else "?"
            log.log(
                logging.DEBUG if form.startswith("spec") else logging.INFO,
                "MPP challenge %s bound by the %s challengeHash",
                challenge_id[:16],
                form,
            )
            return


def _same(a: str, b: str) -> bool:
    return a.lower() == b.lower()


def match_accepted(accepted: PaymentRequirements, offers: Sequence[Offer]) -> Offer:
    """The offer `accepted` echoes, or the most specific reason why none matches."""
    same_scheme = [o for o in offers if o.requirements.scheme == accepted.scheme]
    if not same_scheme:
        raise UnsupportedScheme(f"scheme {accepted.scheme[:32]!r} is not offered")
    same_network = [o for o in same_scheme if o.requirements.network == accepted.network]
    if not same_network:
        raise PaymentRejected(Reason.NETWORK_MISMATCH, f"network {accepted.network[:64]!r} is not offered")
    for offer in same_network:
        if requirements_match(accepted, offer.requirements):
            return offer
    for offer in same_network:
        r = offer.requirements
        if (
            _same(r.asset, accepted.asset)
            and _same(r.pay_to, accepted.pay_to)
            and r.amount != accepted.amount
        ):
            raise PaymentRejected(
                Reason.VALUE_MISMATCH, f"accepted.amount {accepted.amount} is not the price"
            )
        if _same(r.asset, accepted.asset) and not _same(r.pay_to, accepted.pay_to):
            raise PaymentRejected(Reason.RECIPIENT_MISMATCH, "accepted.payTo is not the recipient")
    raise PaymentRejected(Reason.INVALID_PAYMENT_REQUIREMENTS, "accepted matches no advertised requirement")
