"""The payer: an ``httpx.Auth`` that answers HTTP 402 by paying, for sync and async clients alike.

    auth = PaymentAuth(Eip3009Wallet(LocalSigner(key), chain_id=8453, assets={USDC: ("USD Coin", "2")}),
                       policy=SpendPolicy(max_per_call=10_000, total_budget=1_000_000))
    with httpx.Client(auth=auth) as client:           # or httpx.AsyncClient(auth=auth)
        response = client.get("https://agent.example/paid")
        receipt = receipt_of(response)                # SettleResponse (x402) or MppReceipt (MPP)

One generator (:meth:`PaymentAuth.auth_flow`, the shape of httpx's ``DigestAuth``) does the exchange:
send -> 402 -> read every offer (x402 v2 ``PAYMENT-REQUIRED``, x402 v1 JSON body, MPP
``WWW-Authenticate: Payment``) -> keep the offers the wallet can pay -> pick by protocol preference ->
reserve the amount in the :class:`SpendPolicy` (atomically; a refusal raises
:class:`~x402.SpendPolicyViolation` before anything is signed) -> sign -> retry once with the right header.

Outcome of the paid retry:

- status < 400: the reservation is committed and the parsed receipt is put in
  ``response.extensions["x402_receipt"]`` (also available through :func:`receipt_of`);
- a 402 whose reason is ``settlement_pending`` (the server's settlement outlasted its wait; the money may
  be on its way): the *same* credential is sent again after the answer's ``Retry-After`` (capped at
  ``max_retry_wait``), at most ``settlement_retries`` times, so the payment is served once its transfer is
  confirmed and never paid twice; the reservation is held meanwhile;
- otherwise (a second 402, a 4xx/5xx): the reservation is released and the response is returned as is,
  with ``response.extensions["x402_payment_error"]`` describing the refusal when the server sent one. No
  exception is raised: the caller sees the server's answer.

A 402 that offers nothing the wallet can pay raises :class:`~x402.NoPayableOffer`; a 402 without any
recognisable offer is returned unchanged.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Collection, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, runtime_checkable

import anyio
import httpx

from ._codec import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    X_PAYMENT_HEADER,
    X_PAYMENT_RESPONSE_HEADER,
    decode_payment_required,
    decode_payment_required_v1,
    decode_payment_response,
    encode_payment_signature,
    encode_x_payment,
)
from ._eip712 import Eip712Domain, sign_transfer_authorization
from ._errors import MalformedPayment, NoPayableOffer, SpendPolicyViolation, X402Error
from ._evm_charge import EvmChargeRequest, MppAuthorizationPayload, decode_evm_charge_request, did_pkh
from ._mpp import (
    AUTHORIZATION_HEADER,
    PAYMENT_RECEIPT_HEADER,
    MppChallenge,
    MppCredential,
    MppReceipt,
    challenge_hash,
    challenge_hash_pympp,
    decode_problem,
    format_credential,
    parse_receipt,
    parse_www_authenticate,
)
from ._network import Amount, Network, to_atomic_units
from ._schemes import V1_NETWORKS, encode_scheme_payload
from ._signer import Signer
from ._types import (
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequired,
    PaymentRequirements,
    PaymentRequirementsV1,
    ResourceInfo,
    SettleResponse,
)

__all__ = [
    "ACCEPT_PAYMENT_HEADER",
    "DEFAULT_PREFERENCE",
    "EVM_CHARGE",
    "OFFER_EXTENSION",
    "PAYMENT_ERROR_EXTENSION",
    "RECEIPT_EXTENSION",
    "Credential",
    "Eip3009Wallet",
    "Offer",
    "PaymentAuth",
    "ProtocolName",
    "Receipt",
    "Reservation",
    "SpendPolicy",
    "Wallet",
    "offers_from_payment_required",
    "offers_from_response",
    "payment_headers",
    "receipt_of",
]

ProtocolName = Literal["x402v2", "mpp", "x402v1"]
Receipt = SettleResponse | MppReceipt

#: Default order in which protocols are preferred when a server offers several.
DEFAULT_PREFERENCE: Final[tuple[ProtocolName, ...]] = ("x402v2", "mpp", "x402v1")
#: ``response.extensions`` key of the parsed receipt of a paid response.
RECEIPT_EXTENSION: Final = "x402_receipt"
#: ``response.extensions`` key of the server's refusal (a problem detail or x402 error) after a paid retry.
PAYMENT_ERROR_EXTENSION: Final = "x402_payment_error"
#: ``response.extensions`` key of the :class:`Offer` that was paid.
OFFER_EXTENSION: Final = "x402_offer"

_PAYMENT_HEADERS: Final = (PAYMENT_SIGNATURE_HEADER, X_PAYMENT_HEADER)
#: Request header listing the MPP ``method/intent`` pairs the client can pay (mpp.md §1; servers SHOULD
#: filter and order their challenges by it).
ACCEPT_PAYMENT_HEADER: Final = "Accept-Payment"
#: The MPP method/intent that :class:`Eip3009Wallet` and the escrow session-key wallet answer.
EVM_CHARGE: Final = "evm/charge"
_REMEMBER_MAX: Final = 1024
#: ``request.extensions`` key through which the flow asks its driver to wait before sending (seconds).
_WAIT: Final = "x402_wait"
_SETTLEMENT_PENDING: Final = "settlement_pending"


# ---------------------------------------------------------------------------------------------- offers


@dataclass(frozen=True, slots=True)
class Offer:
    """One way to pay, normalised across x402 v2, x402 v1 and MPP.

    ``scheme`` is the x402 scheme (``exact``, ``escrow``, ...) or, for MPP, ``"<method>/<intent>"``
    (``evm/charge``). ``network`` is CAIP-2 (``eip155:8453``) whenever the chain is known. The original
    wire object stays attached (``requirements`` / ``requirements_v1`` / ``challenge``) so that the payment
    echoes exactly what the server sent.
    """

    protocol: ProtocolName
    scheme: str
    network: str
    asset: str
    amount: int
    pay_to: str
    max_timeout_seconds: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)
    requirements: PaymentRequirements | None = None
    requirements_v1: PaymentRequirementsV1 | None = None
    resource: ResourceInfo | None = None
    extensions: Mapping[str, Any] | None = None
    challenge: MppChallenge | None = None
    request: Mapping[str, Any] | None = None  # the decoded MPP request object

    @property
    def chain_id(self) -> int | None:
        digits = self.network[7:]
        # ASCII only: str.isdigit() also takes "²" (int() refuses it) and "١٢٣" (int() reads 123).
        if self.network.startswith("eip155:") and digits.isascii() and digits.isdigit():
            return int(digits)
        return None


def _v2_offers(value: str) -> list[Offer]:
    return offers_from_payment_required(decode_payment_required(value))


def offers_from_payment_required(required: PaymentRequired) -> list[Offer]:
    """The offers of an x402 v2 ``PaymentRequired`` (however it arrived: header, MCP result, A2A task)."""
    return [
        Offer(
            protocol="x402v2",
            scheme=req.scheme,
            network=req.network,
            asset=req.asset,
            amount=int(req.amount),
            pay_to=req.pay_to,
            max_timeout_seconds=req.max_timeout_seconds,
            extra=req.extra,
            requirements=req,
            resource=required.resource,
            extensions=required.extensions,
        )
        for req in required.accepts
    ]


def _v1_offers(body: bytes) -> list[Offer]:
    required = decode_payment_required_v1(body)
    offers = []
    for req in required.accepts:
        chain = V1_NETWORKS.get(req.network)
        offers.append(
            Offer(
                protocol="x402v1",
                scheme=req.scheme,
                network=f"eip155:{chain}" if chain is not None else req.network,
                asset=req.asset,
                amount=int(req.max_amount_required),
                pay_to=req.pay_to,
                max_timeout_seconds=req.max_timeout_seconds,
                extra=req.extra or {},
                requirements_v1=req,
            )
        )
    return offers


def _mpp_offer(challenge: MppChallenge) -> Offer | None:
    request = challenge.request_json()
    amount, currency, recipient = request.get("amount"), request.get("currency"), request.get("recipient")
    if not (isinstance(amount, str) and amount.isdigit() and amount.isascii() and len(amount) <= 78):
        return None
    details = request.get("methodDetails")
    chain = details.get("chainId") if isinstance(details, dict) else None
    if challenge.method == "evm" and challenge.intent == "charge":
        decode_evm_charge_request(request)  # validate the shape the wallet will rely on
    network = f"eip155:{chain}" if isinstance(chain, int) and not isinstance(chain, bool) else ""
    return Offer(
        protocol="mpp",
        scheme=f"{challenge.method}/{challenge.intent}",
        network=network,
        asset=currency if isinstance(currency, str) else "",
        amount=int(amount),
        pay_to=recipient if isinstance(recipient, str) else "",
        extra=details if isinstance(details, dict) else {},
        challenge=challenge,
        request=request,
    )


def offers_from_response(response: httpx.Response) -> list[Offer]:
    """Every offer in a 402 response, in server order per protocol (v2, then MPP, then v1).

    Malformed parts are skipped: one broken header must not hide a payable offer elsewhere. The response
    body must have been read (the auth flow does this for 402s).
    """
    offers: list[Offer] = []
    value = response.headers.get(PAYMENT_REQUIRED_HEADER)
    if value is not None:
        try:
            offers.extend(_v2_offers(value))
        except X402Error:
            pass
    challenges = parse_www_authenticate(response.headers.get_list("www-authenticate"), strict=False)
    for challenge in challenges:
        try:
            offer = _mpp_offer(challenge)
        except (X402Error, ValueError):
            continue
        if offer is not None:
            offers.append(offer)
    body = response.content
    if body and b"x402Version" in body:
        try:
            offers.extend(_v1_offers(body))
        except X402Error:
            pass
    return offers


# ------------------------------------------------------------------------------------------ credentials


@dataclass(frozen=True, slots=True)
class Credential:
    """What a wallet produces for an offer: the scheme payload (a JSON object in the shape of the offer's
    protocol: the x402 ``payload`` or the MPP credential ``payload``), and the MPP ``source``."""

    payload: Mapping[str, Any]
    source: str | None = None


def payment_headers(offer: Offer, credential: Credential) -> dict[str, str]:
    """The request header(s) that carry ``credential`` for ``offer``."""
    payload = dict(credential.payload)
    if offer.protocol == "x402v2":
        if offer.requirements is None:
            raise ValueError("an x402 v2 offer carries its requirements")
        message = PaymentPayload(
            payload=payload,
            accepted=offer.requirements,  # echoed as received
            resource=offer.resource,
            extensions=dict(offer.extensions) if offer.extensions is not None else None,
        )
        return {PAYMENT_SIGNATURE_HEADER: encode_payment_signature(message)}
    if offer.protocol == "x402v1":
        if offer.requirements_v1 is None:
            raise ValueError("an x402 v1 offer carries its requirements")
        v1 = PaymentPayloadV1(
            scheme=offer.requirements_v1.scheme, network=offer.requirements_v1.network, payload=payload
        )
        return {X_PAYMENT_HEADER: encode_x_payment(v1)}
    if offer.challenge is None:
        raise ValueError("an MPP offer carries its challenge")
    name = offer.challenge.header or AUTHORIZATION_HEADER
    mpp = MppCredential(challenge=offer.challenge, payload=payload, source=credential.source)
    return {name: format_credential(mpp)}


# ---------------------------------------------------------------------------------------------- wallets


@runtime_checkable
class Wallet(Protocol):
    """Something that can pay some offers. ``can_pay`` must be cheap and side-effect free (it is asked
    about every offer of every 402); ``pay`` signs and is called at most once per paid request.

    Two optional members, looked up once by :class:`PaymentAuth` (a wallet without them works as before):

    - ``rank(offer) -> int``: the wallet's own preference among the offers it can pay, lower first; it
      comes before the protocol preference (which then only breaks ties). A session-key wallet uses it to
      pay through the escrow whenever it can and with its fallback only otherwise.
    - ``mpp_methods: Sequence[str]``: the MPP ``method/intent`` pairs it can pay (``("evm/charge",)``),
      announced to servers in the ``Accept-Payment`` request header.
    """

    def can_pay(self, offer: Offer) -> bool: ...

    def pay(self, offer: Offer) -> Credential: ...


class Eip3009Wallet:
    """Pays with EIP-3009 ``transferWithAuthorization`` signatures: x402 ``exact`` (v1 and v2, transfer
    method ``eip3009``) and MPP ``evm``/``charge`` with ``authorization`` credentials.

    ``assets`` maps each token address this wallet may pay with to its EIP-712 domain ``(name, version)``;
    ``None`` means "trust the offer's ``extra.name``/``extra.version``" (x402 offers only, since MPP
    challenges do not carry the domain). x402 authorizations get a fresh random nonce each; MPP ones use
    the challenge hash as the spec requires (``pympp_compat`` switches to pympp 0.16's formula).
    """

    mpp_methods: Final[tuple[str, ...]] = (EVM_CHARGE,)

    def __init__(
        self,
        signer: Signer,
        chain_id: int,
        assets: Mapping[str, tuple[str, str] | None],
        *,
        pympp_compat: bool = False,
        mpp_default_validity: int = 300,
    ) -> None:
        self.signer = signer
        self.chain_id = chain_id
        self.network = f"eip155:{chain_id}"
        self._assets = {addr.lower(): dom for addr, dom in assets.items()}
        self._pympp_compat = pympp_compat
        self._mpp_default_validity = mpp_default_validity

    @classmethod
    def for_network(cls, signer: Signer, network: Network, **kwargs: Any) -> Eip3009Wallet:
        """Pays `network`'s token, with the EIP-712 domain the network description names."""
        return cls(
            signer, network.chain_id, {network.token: (network.token_name, network.token_version)}, **kwargs
        )

    @property
    def address(self) -> str:
        return self.signer.address

    def _domain(self, offer: Offer) -> Eip712Domain | None:
        if offer.network != self.network or offer.asset.lower() not in self._assets:
            return None
        configured = self._assets[offer.asset.lower()]
        name, version = offer.extra.get("name"), offer.extra.get("version")
        if offer.protocol == "mpp":
            if configured is None:
                return None
            name, version = configured
        elif configured is not None:
            # The offer must not name another domain than the token's; if it names none, use ours.
            if (name is not None and name != configured[0]) or (
                version is not None and version != configured[1]
            ):
                return None
            name, version = configured
        if not isinstance(name, str) or not isinstance(version, str):
            return None
        return Eip712Domain(
            name=name, version=version, chain_id=self.chain_id, verifying_contract=offer.asset
        )

    def can_pay(self, offer: Offer) -> bool:
        if offer.protocol == "mpp":
            if offer.scheme != EVM_CHARGE or offer.request is None:
                return False
            try:
                request = decode_evm_charge_request(dict(offer.request))
            except MalformedPayment:
                return False
            if not request.accepts_credential("authorization") or request.method_details.splits:
                return False
        else:
            if offer.scheme != "exact":
                return False
            method = offer.extra.get("assetTransferMethod")
            if method not in (None, "eip3009"):
                return False
        return self._domain(offer) is not None

    def pay(self, offer: Offer) -> Credential:
        domain = self._domain(offer)
        if domain is None or not self.can_pay(offer):
            raise NoPayableOffer(f"this wallet cannot pay {offer.scheme} on {offer.network}")
        now = int(time.time())
        if offer.protocol != "mpp":
            payload = sign_transfer_authorization(
                self.signer,
                domain,
                to=offer.pay_to,
                value=offer.amount,
                valid_after=0,
                valid_before=now + max(offer.max_timeout_seconds, 1),
            )
            return Credential(payload=encode_scheme_payload(payload))
        challenge = offer.challenge
        assert challenge is not None  # an MPP offer always carries its challenge
        request: EvmChargeRequest = decode_evm_charge_request(dict(offer.request or {}))
        expires = challenge.expires_at()
        valid_before = int(expires.timestamp()) if expires is not None else now + self._mpp_default_validity
        binding = challenge_hash_pympp if self._pympp_compat else challenge_hash
        signed = sign_transfer_authorization(
            self.signer,
            domain,
            to=request.recipient,
            value=request.amount,
            valid_after=0,
            valid_before=valid_before,
            nonce=binding(challenge.id, challenge.realm),
        )
        payload_mpp = MppAuthorizationPayload.from_exact(signed)
        return Credential(
            payload=encode_scheme_payload(payload_mpp), source=did_pkh(self.chain_id, self.signer.address)
        )


# -------------------------------------------------------------------------------------------- policy


class Reservation:
    """Budget held for one payment until the outcome is known; commit or release exactly once."""

    __slots__ = ("_done", "_policy", "amount", "payee")

    def __init__(self, policy: SpendPolicy, payee: str, amount: int) -> None:
        self._policy = policy
        self.payee = payee
        self.amount = amount
        self._done = False

    def commit(self) -> None:
        if not self._done:
            self._done = True
            self._policy._settle(self, spent=True)

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._policy._settle(self, spent=False)


class SpendPolicy:
    """Client-side spending limits. Amounts are atomic units (`2_000`) or human ones (`"$0.002"`), the
    latter converted with `decimals` (the token's, 6 for USDC).

    - ``max_per_call``: the largest single payment;
    - ``total_budget``: reserved + spent, over every payee;
    - ``per_payee_budget``: one limit for every payee, or a mapping payee -> limit (payees not in the
      mapping are then unlimited by this rule);
    - ``allowed_assets`` / ``allowed_payees`` / ``allowed_networks``: allow-lists (``None`` = any).

    Budgets count raw atomic units across assets: when you allow several assets, give them the same
    decimals. :meth:`reserve` is atomic (a ``threading.Lock``, which is safe from sync code and from
    asyncio tasks alike since it is never held across an ``await``), so concurrent calls cannot jointly
    overspend.
    """

    def __init__(
        self,
        *,
        max_per_call: Amount | None = None,
        total_budget: Amount | None = None,
        per_payee_budget: Amount | Mapping[str, Amount] | None = None,
        allowed_assets: Collection[str] | None = None,
        allowed_payees: Collection[str] | None = None,
        allowed_networks: Collection[str] | None = None,
        decimals: int = 6,
    ) -> None:
        def atomic(amount: Amount | None) -> int | None:
            return None if amount is None else to_atomic_units(amount, decimals)

        self.max_per_call = atomic(max_per_call)
        self.total_budget = atomic(total_budget)
        self.per_payee_budget: int | dict[str, int] | None = (
            {k.lower(): to_atomic_units(v, decimals) for k, v in per_payee_budget.items()}
            if isinstance(per_payee_budget, Mapping)
            else atomic(per_payee_budget)
        )
        self.allowed_assets = None if allowed_assets is None else {a.lower() for a in allowed_assets}
        self.allowed_payees = None if allowed_payees is None else {p.lower() for p in allowed_payees}
        self.allowed_networks = None if allowed_networks is None else set(allowed_networks)
        self._lock = threading.Lock()
        self._spent = 0
        self._reserved = 0
        self._spent_by: dict[str, int] = {}
        self._reserved_by: dict[str, int] = {}

    # -- introspection
    @property
    def spent(self) -> int:
        with self._lock:
            return self._spent

    @property
    def reserved(self) -> int:
        with self._lock:
            return self._reserved

    def spent_with(self, payee: str) -> int:
        with self._lock:
            return self._spent_by.get(payee.lower(), 0)

    def spent_by_payee(self) -> dict[str, int]:
        """What has been spent with each payee so far (lower-cased addresses)."""
        with self._lock:
            return dict(self._spent_by)

    # -- checks
    def _payee_limit(self, payee: str) -> int | None:
        if isinstance(self.per_payee_budget, dict):
            return self.per_payee_budget.get(payee)
        return self.per_payee_budget

    def refusal(self, offer: Offer) -> str | None:
        """Why the static rules refuse ``offer`` (None when they allow it); budgets are not consulted."""
        if offer.amount < 0:
            return "negative amount"
        if self.max_per_call is not None and offer.amount > self.max_per_call:
            return f"amount {offer.amount} exceeds max_per_call {self.max_per_call}"
        if self.allowed_assets is not None and offer.asset.lower() not in self.allowed_assets:
            return f"asset {offer.asset} is not allowed"
        if self.allowed_payees is not None and offer.pay_to.lower() not in self.allowed_payees:
            return f"payee {offer.pay_to} is not allowed"
        if self.allowed_networks is not None and offer.network not in self.allowed_networks:
            return f"network {offer.network} is not allowed"
        return None

    def reserve(self, offer: Offer) -> Reservation:
        """Atomically check every rule and hold ``offer.amount``; raise :class:`SpendPolicyViolation`."""
        reason = self.refusal(offer)
        if reason is not None:
            raise SpendPolicyViolation(reason)
        payee, amount = offer.pay_to.lower(), offer.amount
        with self._lock:
            if self.total_budget is not None and self._spent + self._reserved + amount > self.total_budget:
                raise SpendPolicyViolation(
                    f"total budget {self.total_budget} would be exceeded "
                    f"(spent {self._spent}, reserved {self._reserved}, asked {amount})"
                )
            limit = self._payee_limit(payee)
            used = self._spent_by.get(payee, 0) + self._reserved_by.get(payee, 0)
            if limit is not None and used + amount > limit:
                raise SpendPolicyViolation(f"budget {limit} for payee {offer.pay_to} would be exceeded")
            self._reserved += amount
            self._reserved_by[payee] = self._reserved_by.get(payee, 0) + amount
        return Reservation(self, payee, amount)

    def _settle(self, reservation: Reservation, *, spent: bool) -> None:
        payee, amount = reservation.payee, reservation.amount
        with self._lock:
            self._reserved -= amount
            left = self._reserved_by.get(payee, 0) - amount
            if left:
                self._reserved_by[payee] = left
            else:
                self._reserved_by.pop(payee, None)
            if spent:
                self._spent += amount
                self._spent_by[payee] = self._spent_by.get(payee, 0) + amount


# --------------------------------------------------------------------------------------------- receipts


def _parse_receipt(response: httpx.Response) -> Receipt | None:
    for name in (PAYMENT_RESPONSE_HEADER, X_PAYMENT_RESPONSE_HEADER):
        value = response.headers.get(name)
        if value is not None:
            return decode_payment_response(value)
    value = response.headers.get(PAYMENT_RECEIPT_HEADER)
    if value is not None:
        return parse_receipt(value)
    return None


def receipt_of(response: httpx.Response) -> Receipt | None:
    """The receipt of a paid response: the x402 ``SettleResponse`` (``PAYMENT-RESPONSE`` /
    ``X-PAYMENT-RESPONSE``) or the ``MppReceipt`` (``Payment-Receipt``); None when there is none.
    Raises :class:`~x402.MalformedPayment` for a receipt header that does not decode."""
    cached = response.extensions.get(RECEIPT_EXTENSION)
    if isinstance(cached, SettleResponse | MppReceipt):
        return cached
    return _parse_receipt(response)


def _payment_error(response: httpx.Response) -> Any:
    """The server's account of why a paid retry failed: a problem detail, a settle failure, or None."""
    try:
        receipt = _parse_receipt(response)
    except X402Error:
        receipt = None
    if isinstance(receipt, SettleResponse) and not receipt.success:
        return receipt
    if response.content and response.headers.get("content-type", "").startswith("application/problem+json"):
        try:
            return decode_problem(response.content)
        except X402Error:
            return None
    return None


def _settlement_pending(response: httpx.Response) -> bool:
    """Whether a refused paid request says its settlement is still pending (same credential may retry)."""
    if response.status_code != 402:
        return False
    error = _payment_error(response)
    code = getattr(error, "error_reason", None) or getattr(error, "invalid_reason", None)
    return code == _SETTLEMENT_PENDING


def _retry_after(response: httpx.Response, *, default: float, cap: float) -> float:
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value) if value else default
    except ValueError:  # an HTTP date: not worth parsing for a bounded wait
        seconds = default
    return min(max(seconds, 0.0), cap)


# ------------------------------------------------------------------------------------------- the auth


class PaymentAuth(httpx.Auth):
    """``httpx.Auth`` that pays 402 challenges (see the module docstring for the exact behaviour).

    ``prefer`` orders the protocols when a server offers several (default v2, MPP, v1); a wallet with a
    ``rank(offer)`` method orders the offers first (see :class:`Wallet`). By default (``remember=True``)
    the offer paid for ``(method, URL)`` is cached (x402 offers only: MPP challenges are single-use) and
    the next request to it is paid up front, saving the 402 round trip; if the server refuses it (its
    requirements changed), the 402 it answers with is paid as usual. A ``(method, URL)`` never seen
    priced is always sent unpaid first. ``remember=False`` always waits for the 402.

    When MPP is among the preferred protocols and the wallet lists ``mpp_methods``, every request carries
    ``Accept-Payment: <method/intent>, ...`` (as pympp's client sends it) unless the caller set one;
    ``accept_payment=False`` turns that off.

    ``settlement_retries`` (default 3) bounds how often a paid request answered ``settlement_pending`` is
    sent again with the same credential; each retry waits the answer's ``Retry-After`` (1 s when absent),
    at most ``max_retry_wait`` seconds. 0 turns the retries off.
    """

    requires_request_body = True  # the paid retry re-sends the body

    def __init__(
        self,
        wallet: Wallet,
        policy: SpendPolicy | None = None,
        *,
        prefer: Sequence[ProtocolName] = DEFAULT_PREFERENCE,
        remember: bool = True,
        accept_payment: bool = True,
        settlement_retries: int = 3,
        max_retry_wait: float = 10.0,
    ) -> None:
        self.wallet = wallet
        self.settlement_retries = max(0, settlement_retries)
        self.max_retry_wait = max_retry_wait
        self.policy = policy if policy is not None else SpendPolicy()
        self.prefer = tuple(prefer)
        self.remember = remember
        # Optional wallet members, looked up once rather than per offer.
        rank = getattr(wallet, "rank", None)
        self._wallet_rank: Callable[[Offer], int] | None = rank if callable(rank) else None
        # Announce only what the wallet pays and only when MPP is wanted: a server may filter its
        # challenges by this header, and a wrong value could hide the one offer we can pay.
        methods = ", ".join(dict.fromkeys(getattr(wallet, "mpp_methods", ())))
        self.accept_payment: str | None = (
            methods if methods and accept_payment and "mpp" in self.prefer else None
        )
        self._memory: OrderedDict[tuple[str, str], Offer] = OrderedDict()
        self._memory_lock = threading.Lock()

    # -- selection
    def _rank(self, offer: Offer) -> int:
        try:
            return self.prefer.index(offer.protocol)
        except ValueError:
            return len(self.prefer)

    def choose(self, offers: Iterable[Offer]) -> Offer:
        """The preferred payable offer that the policy allows; raise :class:`NoPayableOffer` when the wallet
        can pay none, :class:`SpendPolicyViolation` when the policy refuses all it could pay."""
        candidates = [o for o in offers if self._rank(o) < len(self.prefer)]
        wallet_rank = self._wallet_rank
        payable = sorted(
            (o for o in candidates if self.wallet.can_pay(o)),
            key=self._rank if wallet_rank is None else lambda o: (wallet_rank(o), self._rank(o)),
        )
        if not payable:
            kinds = sorted({f"{o.protocol}:{o.scheme}@{o.network}" for o in candidates})
            raise NoPayableOffer(f"no offer this wallet can pay among {kinds}")
        first_refusal: str | None = None
        for offer in payable:
            reason = self.policy.refusal(offer)
            if reason is None:
                return offer
            first_refusal = first_refusal or reason
        raise SpendPolicyViolation(first_refusal or "refused")

    # -- memory
    @staticmethod
    def _key(request: httpx.Request) -> tuple[str, str]:
        return (request.method, str(request.url.copy_with(fragment=None)))

    def _recall(self, request: httpx.Request) -> Offer | None:
        if not self.remember:
            return None
        with self._memory_lock:
            return self._memory.get(self._key(request))

    def _memorise(self, request: httpx.Request, offer: Offer | None) -> None:
        if not self.remember:
            return
        key = self._key(request)
        with self._memory_lock:
            if offer is None or offer.protocol == "mpp":
                self._memory.pop(key, None)
                return
            self._memory[key] = offer
            self._memory.move_to_end(key)
            while len(self._memory) > _REMEMBER_MAX:
                self._memory.popitem(last=False)

    # -- the flow
    def authorize(self, offer: Offer) -> tuple[Reservation, Credential]:
        """Reserve ``offer.amount`` in the policy (raising :class:`SpendPolicyViolation` before anything is
        signed), then sign; the caller commits or releases the reservation once the outcome is known. The
        HTTP flow uses it, and so do the other transports (:mod:`x402.client_mcp`, :mod:`x402.client_a2a`)."""
        reservation = self.policy.reserve(offer)
        try:
            return reservation, self.wallet.pay(offer)
        except BaseException:
            reservation.release()
            raise

    def _pay(self, request: httpx.Request, offer: Offer) -> Reservation:
        reservation, credential = self.authorize(offer)
        try:
            headers = payment_headers(offer, credential)
        except BaseException:
            reservation.release()
            raise
        for name in (*_PAYMENT_HEADERS, offer.challenge.header if offer.challenge else None):
            if name is not None and name in request.headers:
                del request.headers[name]
        request.headers.update(headers)
        return reservation

    def _finish(self, response: httpx.Response, offer: Offer, reservation: Reservation) -> bool:
        """Account for the answer to a paid request; True when it was accepted."""
        if response.status_code >= 400:
            reservation.release()
            error = _payment_error(response)
            if error is not None:
                response.extensions[PAYMENT_ERROR_EXTENSION] = error
            return False
        reservation.commit()
        response.extensions[OFFER_EXTENSION] = offer
        try:
            receipt = _parse_receipt(response)
        except X402Error:
            receipt = None
        if receipt is not None:
            response.extensions[RECEIPT_EXTENSION] = receipt
        return True

    def _send_paid(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, httpx.Response]:
        """Send a paid request; while its settlement is pending, the same credential again (bounded)."""
        response = yield request
        for _ in range(self.settlement_retries):
            if not _settlement_pending(response):
                break
            request.extensions[_WAIT] = _retry_after(response, default=1.0, cap=self.max_retry_wait)
            response = yield request
        return response

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.accept_payment is not None and ACCEPT_PAYMENT_HEADER not in request.headers:
            request.headers[ACCEPT_PAYMENT_HEADER] = self.accept_payment
        remembered = self._recall(request)
        if remembered is not None:
            reservation = self._pay(request, remembered)
            response = yield from self._send_paid(request)
            if self._finish(response, remembered, reservation):
                return
            self._memorise(request, None)
            if response.status_code != 402:
                return
            for name in (*_PAYMENT_HEADERS, AUTHORIZATION_HEADER):
                request.headers.pop(name, None)
        else:
            response = yield request
        if response.status_code != 402:
            return
        offers = offers_from_response(response)
        if not offers:
            return
        offer = self.choose(offers)
        reservation = self._pay(request, offer)
        response = yield from self._send_paid(request)
        if self._finish(response, offer, reservation):
            self._memorise(request, offer)

    # Thin drivers: like httpx's own, but the response body is read only for errors (a 402 carries the v1
    # offers, a refused payment its problem details), so paid downloads still stream.
    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.requires_request_body:
            request.read()
        flow = self.auth_flow(request)
        request = next(flow)
        while True:
            wait = request.extensions.pop(_WAIT, None)
            if wait:
                time.sleep(wait)
            response = yield request
            if response.status_code >= 400:
                response.read()
            try:
                request = flow.send(response)
            except StopIteration:
                break

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if self.requires_request_body:
            await request.aread()
        flow = self.auth_flow(request)
        request = next(flow)
        while True:
            wait = request.extensions.pop(_WAIT, None)
            if wait:
                await anyio.sleep(wait)
            response = yield request
            if response.status_code >= 400:
                await response.aread()
            try:
                request = flow.send(response)
            except StopIteration:
                break
