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
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Sequence
from typing import Any

import anyio
import httpx

from ._client_offers import (
    _PAYMENT_HEADERS,
    _REMEMBER_MAX,
    _SETTLEMENT_PENDING,
    _WAIT,
    ACCEPT_PAYMENT_HEADER,
    DEFAULT_PREFERENCE,
    EVM_CHARGE,
    OFFER_EXTENSION,
    PAYMENT_ERROR_EXTENSION,
    RECEIPT_EXTENSION,
    Credential,
    Offer,
    ProtocolName,
    Receipt,
    offers_from_payment_required,
    offers_from_response,
    payment_headers,
)
from ._client_policy import Reservation, SpendPolicy
from ._client_wallets import Eip3009Wallet, Wallet, WalletSet
from ._codec import PAYMENT_RESPONSE_HEADER, X_PAYMENT_RESPONSE_HEADER, decode_payment_response
from ._errors import NoPayableOffer, SpendPolicyViolation, X402Error
from ._mpp import AUTHORIZATION_HEADER, PAYMENT_RECEIPT_HEADER, MppReceipt, decode_problem
from ._mpp_header import parse_receipt
from ._types import SettleResponse

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
    "WalletSet",
    "offers_from_payment_required",
    "offers_from_response",
    "payment_headers",
    "receipt_of",
]

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


#: Refusals that say the payer cannot pay on this network (balance, deposit, grant), not that the payment is
#: wrong: the payer may try another network the server offers.
_NO_FUNDS = frozenset(
    {
        "insufficient_funds",
        "insufficient_funds_pending",
        "invalid_exact_evm_insufficient_balance",
        "escrow_insufficient_deposit",
        "escrow_budget_exceeded",
        "escrow_grant_not_found",
        "escrow_grant_revoked",
        "escrow_grant_expired",
        "permit2_insufficient_balance",
    }
)


def _no_funds(response: httpx.Response) -> bool:
    """Whether a refused paid request says the payer lacks the funds on that network."""
    if response.status_code != 402:
        return False
    error = _payment_error(response)
    code = getattr(error, "error_reason", None) or getattr(error, "invalid_reason", None)
    return code in _NO_FUNDS


def _retry_after(response: httpx.Response, *, default: float, cap: float) -> float:
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value) if value else default
    except ValueError:  # an HTTP date: not worth parsing for a bounded wait
        seconds = default
    return min(max(seconds, 0.0), cap)


def _drop_credentials(request: httpx.Request) -> None:
    for name in (*_PAYMENT_HEADERS, AUTHORIZATION_HEADER):
        request.headers.pop(name, None)


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

    Several networks: ``networks`` (CAIP-2 ids, ``["eip155:8453", "eip155:42161"]``) are the networks to
    pay on, in order of preference; offers on others are not paid. This order comes before the wallet's
    ``rank`` and the protocol preference. A network whose ``SpendPolicy`` budget is used up is skipped, and
    when the server refuses a payment for lack of funds there (balance, deposit, grant), the next network
    it offers is paid instead (each network at most once per request; nothing was charged on the refused
    one).
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
        networks: Sequence[str] | None = None,
    ) -> None:
        self.wallet = wallet
        self.networks = None if networks is None else tuple(networks)
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

    def _network_rank(self, offer: Offer) -> int:
        networks = self.networks
        return 0 if networks is None else networks.index(offer.network)

    def choose(self, offers: Iterable[Offer]) -> Offer:
        """The preferred payable offer that the policy allows; raise :class:`NoPayableOffer` when the wallet
        can pay none, :class:`SpendPolicyViolation` when the policy refuses all it could pay."""
        networks = self.networks
        candidates = [
            o
            for o in offers
            if self._rank(o) < len(self.prefer) and (networks is None or o.network in networks)
        ]
        wallet_rank = self._wallet_rank
        payable = sorted(
            (o for o in candidates if self.wallet.can_pay(o)),
            key=(lambda o: (self._network_rank(o), self._rank(o)))
            if wallet_rank is None
            else lambda o: (self._network_rank(o), wallet_rank(o), self._rank(o)),
        )
        if not payable:
            kinds = sorted({f"{o.protocol}:{o.scheme}@{o.network}" for o in candidates})
            raise NoPayableOffer(f"no offer this wallet can pay among {kinds}")
        first_refusal: str | None = None
        for offer in payable:
            reason = self.policy.refusal(offer) or self.policy.network_refusal(offer)
            if reason is None:
                return offer
            first_refusal = first_refusal or reason
        raise SpendPolicyViolation(first_refusal or "refused")

    # -- memory
    @staticmethod
    def _key(request: httpx.Request) -> tuple[str, str]:
        # `copy_with` parses the URL again (as much work as the rest of the flow): only when there is a
        # fragment to drop.
        text = str(request.url)
        return (request.method, str(request.url.copy_with(fragment=None)) if "#" in text else text)

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
        response.extensions[OFFER_EXTENSION] = offer
        try:
            receipt = _parse_receipt(response)
        except X402Error:
            receipt = None
        # A metered payment (upto, metered escrow) is charged what its receipt says, at most the maximum held.
        actual = getattr(receipt, "amount", None)
        ok = isinstance(actual, str) and actual.isascii() and actual.isdigit() and len(actual) <= 78
        reservation.commit(int(actual) if ok and isinstance(actual, str) else None)
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
        tried: set[str] = set()  # networks the server refused for lack of funds, this request
        remembered = self._recall(request)
        if remembered is not None and self.policy.network_refusal(remembered) is not None:
            remembered = None  # its network's budget is used up: choose again among what the server offers
        if remembered is not None:
            reservation = self._pay(request, remembered)
            response = yield from self._send_paid(request)
            if self._finish(response, remembered, reservation):
                return
            self._memorise(request, None)
            if response.status_code != 402:
                return
            if _no_funds(response):
                tried.add(remembered.network)
            _drop_credentials(request)
        else:
            response = yield request
        if response.status_code != 402:
            return
        while True:
            offers = [o for o in offers_from_response(response) if o.network not in tried]
            if not offers:
                return
            if tried:  # falling back: when no other network can be paid, the last refusal stands
                try:
                    offer = self.choose(offers)
                except (NoPayableOffer, SpendPolicyViolation):
                    return
            else:
                offer = self.choose(offers)
            reservation = self._pay(request, offer)
            response = yield from self._send_paid(request)
            if self._finish(response, offer, reservation):
                self._memorise(request, offer)
                return
            if not _no_funds(response):
                return
            tried.add(offer.network)
            _drop_credentials(request)

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
