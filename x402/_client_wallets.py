"""Wallets the payer signs with: the `Wallet` protocol and `Eip3009Wallet` (EIP-3009 `exact`, x402, MPP)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol, runtime_checkable

from ._client_offers import EVM_CHARGE, Credential, Offer
from ._eip712 import Eip712Domain, sign_transfer_authorization
from ._errors import MalformedPayment, NoPayableOffer
from ._evm_charge import EvmChargeRequest, MppAuthorizationPayload, decode_evm_charge_request, did_pkh
from ._mpp import challenge_hash, challenge_hash_pympp
from ._network import Network
from ._schemes import encode_scheme_payload
from ._signer import Signer

__all__ = [
    "Eip3009Wallet",
    "Wallet",
    "WalletSet",
]

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


class WalletSet:
    """Several wallets as one, e.g. one per network: an offer is paid by the first member that can pay it.

    ``networks`` (CAIP-2 ids) is the order in which the set prefers to pay when a server offers several
    networks; without it, the members' order decides (the network of the first member that can pay an
    offer). A member's own ``rank`` breaks ties within a network. :class:`PaymentAuth` falls back to the
    next network when a server refuses a payment for lack of funds (balance, deposit, grant).
    """

    def __init__(self, wallets: Sequence[Wallet], *, networks: Sequence[str] | None = None) -> None:
        if not wallets:
            raise ValueError("a WalletSet needs at least one wallet")
        self.wallets = tuple(wallets)
        self.networks = None if networks is None else tuple(networks)
        self.mpp_methods: tuple[str, ...] = tuple(
            dict.fromkeys(m for w in self.wallets for m in getattr(w, "mpp_methods", ()))
        )

    def _member(self, offer: Offer) -> tuple[int, Wallet] | None:
        for index, wallet in enumerate(self.wallets):
            if wallet.can_pay(offer):
                return index, wallet
        return None

    def can_pay(self, offer: Offer) -> bool:
        return self._member(offer) is not None

    def rank(self, offer: Offer) -> int:
        found = self._member(offer)
        if found is None:
            return 1 << 30
        index, wallet = found
        if self.networks is not None:
            order = (
                self.networks.index(offer.network) if offer.network in self.networks else len(self.networks)
            )
        else:
            order = index
        own = getattr(wallet, "rank", None)
        return order * 1000 + (min(int(own(offer)), 999) if callable(own) else 0)

    def pay(self, offer: Offer) -> Credential:
        found = self._member(offer)
        if found is None:
            raise NoPayableOffer(f"no wallet of this set can pay {offer.scheme} on {offer.network}")
        return found[1].pay(offer)
