"""`SpendPolicy`: what the payer may spend (per call, in total, per payee, per network), reserved
atomically before anything is signed."""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping

from ._client_offers import Offer
from ._errors import SpendPolicyViolation
from ._network import Amount, to_atomic_units

__all__ = [
    "Reservation",
    "SpendPolicy",
]

# -------------------------------------------------------------------------------------------- policy


class Reservation:
    """Budget held for one payment until the outcome is known; commit or release exactly once."""

    __slots__ = ("_done", "_policy", "amount", "network", "payee")

    def __init__(self, policy: SpendPolicy, payee: str, amount: int, network: str = "") -> None:
        self._policy = policy
        self.payee = payee
        self.amount = amount
        self.network = network
        self._done = False

    def commit(self, actual: int | None = None) -> None:
        """Count the payment as spent: `actual` (a metered charge, at most the maximum held) or all of it."""
        if not self._done:
            self._done = True
            self._policy._settle(self, spent=True, actual=actual)

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
    - ``per_network_budget``: reserved + spent on each network (CAIP-2, ``"eip155:8453"``): one limit
      for every network, or a mapping network -> limit (networks not in the mapping are then unlimited by
      this rule). Like the total, it holds the maximum of a metered payment and keeps what was charged;
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
        per_network_budget: Amount | Mapping[str, Amount] | None = None,
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
        self.per_network_budget: int | dict[str, int] | None = (
            {k: to_atomic_units(v, decimals) for k, v in per_network_budget.items()}
            if isinstance(per_network_budget, Mapping)
            else atomic(per_network_budget)
        )
        self.allowed_assets = None if allowed_assets is None else {a.lower() for a in allowed_assets}
        self.allowed_payees = None if allowed_payees is None else {p.lower() for p in allowed_payees}
        self.allowed_networks = None if allowed_networks is None else set(allowed_networks)
        self._lock = threading.Lock()
        self._spent = 0
        self._reserved = 0
        self._spent_by: dict[str, int] = {}
        self._reserved_by: dict[str, int] = {}
        self._spent_on: dict[str, int] = {}
        self._reserved_on: dict[str, int] = {}

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

    def spent_on(self, network: str) -> int:
        """What has been spent on `network` (CAIP-2) so far."""
        with self._lock:
            return self._spent_on.get(network, 0)

    def spent_by_network(self) -> dict[str, int]:
        """What has been spent on each network so far."""
        with self._lock:
            return dict(self._spent_on)

    # -- checks
    def _network_limit(self, network: str) -> int | None:
        if isinstance(self.per_network_budget, dict):
            return self.per_network_budget.get(network)
        return self.per_network_budget

    def _network_refusal(self, network: str, amount: int) -> str | None:
        # Called with the lock held.
        limit = self._network_limit(network)
        used = self._spent_on.get(network, 0) + self._reserved_on.get(network, 0)
        if limit is not None and used + amount > limit:
            return f"budget {limit} on network {network} would be exceeded (used {used}, asked {amount})"
        return None

    def network_refusal(self, offer: Offer) -> str | None:
        """Why the budget of ``offer.network`` has no room for it now (None: it has). A payer choosing among
        networks skips one whose budget is used up; :meth:`reserve` decides atomically."""
        with self._lock:
            return self._network_refusal(offer.network, offer.amount)

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
            network = offer.network
            refused = self._network_refusal(network, amount)
            if refused is not None:
                raise SpendPolicyViolation(refused)
            self._reserved += amount
            self._reserved_by[payee] = self._reserved_by.get(payee, 0) + amount
            self._reserved_on[network] = self._reserved_on.get(network, 0) + amount
        return Reservation(self, payee, amount, network)

    def _settle(self, reservation: Reservation, *, spent: bool, actual: int | None = None) -> None:
        payee, amount, network = reservation.payee, reservation.amount, reservation.network
        # A metered payment spends what it was charged; never more than was held (the signed maximum).
        charged = amount if actual is None else max(0, min(actual, amount))
        with self._lock:
            self._reserved -= amount
            left = self._reserved_by.get(payee, 0) - amount
            if left:
                self._reserved_by[payee] = left
            else:
                self._reserved_by.pop(payee, None)
            left = self._reserved_on.get(network, 0) - amount
            if left:
                self._reserved_on[network] = left
            else:
                self._reserved_on.pop(network, None)
            if spent:
                self._spent += charged
                self._spent_by[payee] = self._spent_by.get(payee, 0) + charged
                self._spent_on[network] = self._spent_on.get(network, 0) + charged
