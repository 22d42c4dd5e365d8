"""Offline (sans-I/O) checks of an EIP-3009 payment against what was offered.

These are the facilitator's checks that need no chain: scheme, network, EIP-712 domain, recipient, exact
amount, time window and signature (EOA ``ecrecover``). Balance, on-chain nonce state, ERC-1271 smart
wallets and simulation are the gateway's/escrow's job. Each failure raises the typed error whose ``code``
is the x402 ``invalidReason``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Final

from ._eip712 import Eip712Domain, recover_transfer_authorization
from ._errors import InvalidChallenge, PaymentRejected, Reason
from ._evm_charge import EvmChargeRequest, MppAuthorizationPayload, decode_evm_charge_request
from ._mpp import MppChallenge, challenge_hash, challenge_hash_pympp
from ._schemes import evm_chain_id
from ._types import ExactEvmPayload, PaymentRequirements, PaymentRequirementsV1

__all__ = [
    "VALID_BEFORE_BUFFER_SECONDS",
    "exact_domain",
    "find_matching_requirements",
    "requirements_from_v1",
    "requirements_match",
    "verify_exact_payment",
    "verify_mpp_authorization",
]

#: The facilitator refuses an authorization that expires within this many seconds (one block of slack).
VALID_BEFORE_BUFFER_SECONDS: Final = 6


def _same_address(a: str, b: str) -> bool:
    return a.lower() == b.lower()


def exact_domain(requirements: PaymentRequirements) -> Eip712Domain:
    """EIP-712 domain of an ``exact`` offer: ``extra.name``/``extra.version``, the chain of ``network``,
    and the token ``asset`` as verifying contract."""
    chain_id = evm_chain_id(requirements.network)
    name = requirements.extra.get("name")
    version = requirements.extra.get("version")
    if not isinstance(name, str) or not isinstance(version, str):
        raise PaymentRejected(Reason.MISSING_EIP712_DOMAIN, "extra.name and extra.version are required")
    return Eip712Domain(name=name, version=version, chain_id=chain_id, verifying_contract=requirements.asset)


def requirements_from_v1(requirements: PaymentRequirementsV1) -> PaymentRequirements:
    """A v1 offer in v2 shape (``maxAmountRequired`` -> ``amount``; the network keeps its v1 name)."""
    return PaymentRequirements(
        scheme=requirements.scheme,
        network=requirements.network,
        asset=requirements.asset,
        amount=requirements.max_amount_required,
        pay_to=requirements.pay_to,
        max_timeout_seconds=requirements.max_timeout_seconds,
        extra=dict(requirements.extra or {}),
    )


def requirements_match(accepted: PaymentRequirements, offered: PaymentRequirements) -> bool:
    """The x402 server's rule: equal scheme, network, amount, asset, payTo and maxTimeoutSeconds (exact
    strings), and the offered ``extra`` is a subset of the echoed one."""
    if (
        accepted.scheme != offered.scheme
        or accepted.network != offered.network
        or accepted.amount != offered.amount
        or accepted.asset != offered.asset
        or accepted.pay_to != offered.pay_to
        or accepted.max_timeout_seconds != offered.max_timeout_seconds
    ):
        return False
    return all(k in accepted.extra and accepted.extra[k] == v for k, v in offered.extra.items())


def find_matching_requirements(
    accepted: PaymentRequirements, offers: Iterable[PaymentRequirements]
) -> PaymentRequirements | None:
    for offer in offers:
        if requirements_match(accepted, offer):
            return offer
    return None


def _check_window(valid_after: str, valid_before: str, now: int) -> None:
    if int(valid_before) < now + VALID_BEFORE_BUFFER_SECONDS:
        raise PaymentRejected(Reason.VALID_BEFORE, "authorization expired or about to expire")
    if int(valid_after) > now:
        raise PaymentRejected(Reason.VALID_AFTER, "authorization not yet valid")


def verify_exact_payment(
    requirements: PaymentRequirements,
    payload: ExactEvmPayload,
    *,
    accepted: PaymentRequirements | None = None,
    now: int | None = None,
) -> str:
    """Check an ``exact``/EIP-3009 payment against the offer; return the payer's checksummed address.

    ``accepted`` is the requirements object the client echoed (v2); when given, it must be for the same
    scheme and network. Raises :class:`PaymentRejected` / :class:`InvalidSignature`.
    """
    if accepted is not None:
        if accepted.scheme != "exact" or requirements.scheme != "exact":
            raise PaymentRejected(
                Reason.UNSUPPORTED_SCHEME, f"scheme {accepted.scheme[:32]!r} is not 'exact'"
            )
        if accepted.network != requirements.network:
            raise PaymentRejected(Reason.NETWORK_MISMATCH, "accepted.network differs from the requirements")
    elif requirements.scheme != "exact":
        raise PaymentRejected(
            Reason.UNSUPPORTED_SCHEME, f"scheme {requirements.scheme[:32]!r} is not 'exact'"
        )
    domain = exact_domain(requirements)
    auth = payload.authorization
    if not _same_address(auth.to, requirements.pay_to):
        raise PaymentRejected(Reason.RECIPIENT_MISMATCH, "authorization.to is not payTo")
    if int(auth.value) != int(requirements.amount):
        raise PaymentRejected(Reason.VALUE_MISMATCH, "authorization.value is not the required amount")
    _check_window(auth.valid_after, auth.valid_before, int(time.time()) if now is None else now)
    signer = recover_transfer_authorization(domain, payload)
    if not _same_address(signer, auth.from_):
        raise PaymentRejected(Reason.SIGNATURE, "signature does not recover to authorization.from")
    return signer


def verify_mpp_authorization(
    challenge: MppChallenge,
    payload: MppAuthorizationPayload,
    *,
    token_name: str,
    token_version: str,
    now: int | None = None,
    strict: bool = False,
) -> str:
    """Check an ``evm``/``charge`` ``authorization`` credential against its (already HMAC-verified)
    challenge; return the payer. The token's EIP-712 ``name``/``version`` are server configuration (the
    challenge does not carry them).

    The nonce must bind the challenge: the spec's :func:`~x402.challenge_hash`, or pympp 0.16's
    :func:`~x402.challenge_hash_pympp` (both commit to the same HMAC-checked id and realm); ``strict``
    accepts the spec's form only.
    """
    request: EvmChargeRequest = decode_evm_charge_request(challenge.request_json())
    if challenge.method != "evm" or challenge.intent != "charge":
        raise PaymentRejected(Reason.UNSUPPORTED_SCHEME, "not an evm/charge challenge")
    if not request.accepts_credential("authorization"):
        raise PaymentRejected(
            Reason.UNSUPPORTED_SCHEME, "the challenge does not accept authorization credentials"
        )
    if request.method_details.splits:
        raise PaymentRejected(Reason.INVALID_PAYMENT_REQUIREMENTS, "splits need a permit2 credential")
    now_s = int(time.time()) if now is None else now
    expires = challenge.expires_at()
    if expires is not None and expires.timestamp() < now_s:
        raise InvalidChallenge("challenge expired", code=Reason.CHALLENGE_EXPIRED)
    nonce = payload.nonce.lower()
    expected = {"0x" + challenge_hash(challenge.id, challenge.realm).hex()}
    if not strict:
        expected.add("0x" + challenge_hash_pympp(challenge.id, challenge.realm).hex())
    if nonce not in expected:
        raise InvalidChallenge("nonce is not the challenge hash", code=Reason.CHALLENGE_BINDING_MISMATCH)
    requirements = PaymentRequirements(
        scheme="exact",
        network=f"eip155:{request.method_details.chain_id}",
        asset=request.currency,
        amount=request.amount,
        pay_to=request.recipient,
        max_timeout_seconds=0,
        extra={"name": token_name, "version": token_version},
    )
    return verify_exact_payment(requirements, payload.to_exact(), now=now_s)
