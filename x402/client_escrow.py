"""A session-key wallet for :mod:`x402.client`: pays ``escrow`` offers (x402 v1/v2 and MPP ``evm``/``charge``
with an ``escrow`` credential) out of its owner's escrow deposit, within the grant it holds.

    wallet = EscrowWallet.from_grant(session_key, signed_grant)      # the owner's grant, as relayed
    auth = PaymentAuth(SessionKeyWallet(wallet, fallback=Eip3009Wallet(...)))  # escrow first, exact otherwise
    async with httpx.AsyncClient(auth=auth) as client: ...

(``SessionKeyAuth(wallet, fallback=...)`` is the same thing spelled shorter.) An orchestrator usually gets
all of this as one file from its owner (:class:`SessionWalletFile`, written by ``escrow.Chain.open_session``):

    wallet = SessionKeyWallet.load("orchestrator.session.json")
    auth = PaymentAuth(wallet, SpendPolicy(max_per_call="$0.002", total_budget="$0.05"))

``can_pay`` checks what the key can check offline (chain, escrow, token, per-call cap, payee list, window);
the grant's budget and revocation are the gateway's and the escrow's to enforce. Nonces count up from a
random word (:class:`~x402._escrow.NonceCounter`): concurrent calls never collide, and consecutive payments
share one storage word on chain.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import msgspec

from ._errors import NoPayableOffer, X402Error
from ._escrow import (
    ESCROW_DOMAIN_NAME,
    ESCROW_DOMAIN_VERSION,
    ESCROW_SCHEME,
    EscrowMppPayload,
    GrantMessage,
    NonceCounter,
    escrow_domain,
    sign_payment,
)
from ._evm_charge import did_pkh
from ._network import Amount, Network, to_atomic_units
from ._schemes import encode_scheme_payload
from ._signer import LocalSigner, Signer
from .client import EVM_CHARGE, Credential, Eip3009Wallet, Offer, PaymentAuth, SpendPolicy, Wallet

__all__ = ["EscrowWallet", "InvalidWalletFile", "SessionKeyAuth", "SessionKeyWallet", "SessionWalletFile"]

_DEFAULT_DEADLINE = 3600


class EscrowWallet:
    """Pays ``escrow`` offers with ``session`` for ``payer``'s grant on ``escrow`` (chain ``chain_id``)."""

    mpp_methods: Final[tuple[str, ...]] = (EVM_CHARGE,)

    def __init__(
        self,
        session: Signer,
        *,
        payer: str,
        chain_id: int,
        escrow: str,
        token: str,
        epoch: int = 1,
        max_per_call: Amount | None = None,
        payees: Sequence[str] = (),
        valid_after: int = 0,
        valid_until: int | None = None,
        nonces: NonceCounter | None = None,
        clock: Any = time.time,
        decimals: int = 6,
    ) -> None:
        self.session = session
        self.payer = payer
        self.chain_id = chain_id
        self.network = f"eip155:{chain_id}"
        self.escrow = escrow
        self.token = token
        self.epoch = epoch
        # `"$0.002"` or atomic units; `decimals` are the token's.
        self.max_per_call = None if max_per_call is None else to_atomic_units(max_per_call, decimals)
        self.payees = frozenset(p.lower() for p in payees)
        self.valid_after = valid_after
        self.valid_until = valid_until
        self.nonces = nonces or NonceCounter()
        self.clock = clock
        self.domain = escrow_domain(chain_id, escrow)

    @classmethod
    def from_grant(cls, session: Signer, grant: GrantMessage, *, chain_id: int, escrow: str) -> EscrowWallet:
        if grant.signer.lower() != session.address.lower():
            raise ValueError("the grant is for another session key")
        return cls(
            session,
            payer=grant.payer,
            chain_id=chain_id,
            escrow=escrow,
            token=grant.token,
            epoch=grant.epoch,
            max_per_call=grant.max_per_call,
            payees=grant.payees,
            valid_after=grant.valid_after,
            valid_until=grant.valid_until,
        )

    def _terms(self, offer: Offer) -> tuple[str, int] | None:
        """(escrow, deadlineSeconds) the offer names, if it is an escrow offer at all."""
        if offer.protocol == "mpp":
            details = (offer.request or {}).get("methodDetails")
            if offer.scheme != EVM_CHARGE or not isinstance(details, dict):
                return None
            if "escrow" not in (details.get("credentialTypes") or ()):
                return None
            escrow, seconds = details.get("escrowContract"), details.get("deadlineSeconds", _DEFAULT_DEADLINE)
        else:
            if offer.scheme != ESCROW_SCHEME:
                return None
            if offer.extra.get("name", ESCROW_DOMAIN_NAME) != ESCROW_DOMAIN_NAME:
                return None
            if offer.extra.get("version", ESCROW_DOMAIN_VERSION) != ESCROW_DOMAIN_VERSION:
                return None
            escrow, seconds = offer.extra.get("escrow"), offer.extra.get("deadlineSeconds", _DEFAULT_DEADLINE)
        if not isinstance(escrow, str) or not isinstance(seconds, int) or isinstance(seconds, bool):
            return None
        return escrow, seconds

    def can_pay(self, offer: Offer) -> bool:
        terms = self._terms(offer)
        if terms is None or terms[0].lower() != self.escrow.lower() or offer.network != self.network:
            return False
        if offer.asset.lower() != self.token.lower():
            return False
        if self.max_per_call is not None and offer.amount > self.max_per_call:
            return False
        if self.payees and offer.pay_to.lower() not in self.payees:
            return False
        now = self.clock()
        return self.valid_after <= now and (self.valid_until is None or now <= self.valid_until)

    def pay(self, offer: Offer) -> Credential:
        terms = self._terms(offer)
        if terms is None or not self.can_pay(offer):
            raise NoPayableOffer(f"this session key cannot pay {offer.scheme} on {offer.network}")
        deadline = int(self.clock()) + max(terms[1], 1)
        if self.valid_until is not None:
            deadline = min(deadline, self.valid_until)
        signed = sign_payment(
            self.session,
            self.domain,
            payer=self.payer,
            payee=offer.pay_to,
            token=offer.asset,
            amount=offer.amount,
            nonce=self.nonces.take(),
            deadline=deadline,
            epoch=self.epoch,
        )
        source = did_pkh(self.chain_id, self.payer)
        if offer.protocol == "mpp":
            mpp = EscrowMppPayload(signature=signed.signature, payment=signed.payment)
            return Credential(payload=encode_scheme_payload(mpp), source=source)
        return Credential(payload=encode_scheme_payload(signed), source=source)


class InvalidWalletFile(X402Error):
    """A session wallet file that cannot be read, or whose grant is not for its session key."""

    default_code = "invalid_wallet_file"
    default_status = 400


class SessionWalletFile(msgspec.Struct, frozen=True, kw_only=True):
    """What an owner hands an orchestrator (`orchestrator.session.json`; keep it private: it holds a key).

    `session_key`: the hot key (hex); `grant`: the escrow grant its owner signed for it (its `payer` is whose
    deposit pays); `network`: the chain, escrow and token it pays on; `fallback_key` (optional): a small
    EOA wallet that pays `exact` offers where the escrow is not accepted.
    """

    network: Network
    session_key: str
    grant: GrantMessage
    fallback_key: str = ""
    version: int = 1

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=2)

    def dump(self, path: str | Path) -> None:
        """Write atomically, readable by its owner only."""
        target = Path(path)
        partial = target.with_name(target.name + ".tmp")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(self.to_json() + b"\n")
        partial.replace(target)

    @classmethod
    def load(cls, path: str | Path) -> SessionWalletFile:
        try:
            return msgspec.json.decode(Path(path).read_bytes(), type=cls)
        except OSError as exc:
            raise InvalidWalletFile(f"cannot read the wallet file {path}: {exc.strerror}") from None
        except msgspec.DecodeError as exc:
            raise InvalidWalletFile(f"invalid wallet file {path}: {exc}") from None
        except X402Error as exc:  # e.g. its network description contradicts itself
            raise InvalidWalletFile(f"invalid wallet file {path}: {exc.message}") from None


class SessionKeyWallet:
    """The escrow wallet first, ``fallback`` (e.g. an :class:`~x402.client.Eip3009Wallet`) for what the
    session key cannot pay.

    ``rank`` puts every offer the session key can pay before every other one, whatever its protocol, so
    :class:`~x402.client.PaymentAuth` pays through the escrow whenever the key and the spend policy allow
    it; when the policy refuses every escrow offer, the fallback's offers are next in line.
    """

    def __init__(self, escrow: EscrowWallet, fallback: Wallet | None = None) -> None:
        self.escrow = escrow
        self.fallback = fallback
        methods = (*escrow.mpp_methods, *getattr(fallback, "mpp_methods", ()))
        self.mpp_methods: tuple[str, ...] = tuple(dict.fromkeys(methods))

    @classmethod
    def from_file(cls, file: SessionWalletFile) -> SessionKeyWallet:
        network = file.network
        if not network.escrow:
            raise InvalidWalletFile(f"the wallet's network {network.network} names no escrow")
        try:
            session = LocalSigner(file.session_key)
            escrow = EscrowWallet.from_grant(
                session, file.grant, chain_id=network.chain_id, escrow=network.escrow
            )
            fallback = (
                Eip3009Wallet.for_network(LocalSigner(file.fallback_key), network)
                if file.fallback_key
                else None
            )
        except ValueError as exc:  # a malformed key, or a grant for another key
            raise InvalidWalletFile(f"invalid wallet file: {exc}") from None
        return cls(escrow, fallback)

    @classmethod
    def load(cls, path: str | Path) -> SessionKeyWallet:
        """The wallet an owner wrote with `SessionWalletFile.dump` (see `escrow.Chain.open_session`)."""
        return cls.from_file(SessionWalletFile.load(path))

    @property
    def address(self) -> str:
        """Whose money pays: the grant's payer (the owner's account)."""
        return self.escrow.payer

    def can_pay(self, offer: Offer) -> bool:
        return self.escrow.can_pay(offer) or (self.fallback is not None and self.fallback.can_pay(offer))

    def rank(self, offer: Offer) -> int:
        return 0 if self.escrow.can_pay(offer) else 1

    def pay(self, offer: Offer) -> Credential:
        if self.escrow.can_pay(offer) or self.fallback is None:
            return self.escrow.pay(offer)
        return self.fallback.pay(offer)


class SessionKeyAuth(PaymentAuth):
    """``PaymentAuth(SessionKeyWallet(wallet, fallback), policy, **kwargs)``: nothing more (the escrow-first
    choice is :meth:`SessionKeyWallet.rank`, which :class:`~x402.client.PaymentAuth` honours)."""

    def __init__(
        self,
        wallet: EscrowWallet,
        policy: SpendPolicy | None = None,
        *,
        fallback: Wallet | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(SessionKeyWallet(wallet, fallback), policy, **kwargs)
        self.escrow_wallet = wallet
