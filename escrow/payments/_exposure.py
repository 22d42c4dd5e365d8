"""How much of a payer's escrow a gateway may still promise: the arithmetic of the store's spend counters.

On-chain `check` sees one payment at a time; what a gateway has accepted but not yet settled is invisible to
it. So every accepted payment reserves its amount in the payment store, per (network, escrow, payer, token)
for the deposit and per grant epoch for the session key's budget, and every gateway sharing the store sees
the same counters.

Each pool has two monotone counters: `reserved` (accepted payments; given back only when a payment is not
charged: released, refused at settlement, dead-lettered) and `settled` (raised once per payment that landed,
after it landed). Pending spend is `reserved - settled`. A payment of `amount` is accepted only if

    reserved + amount <= available_on_chain + settled

taken atomically by `store.add_pending(reserved, amount, limit=...)`, where `settled` is read from the store
*before* the chain state. That order is what makes the check safe while settlements land concurrently: a
payment counted in `settled` had landed before the chain was read, so the chain figure already excludes
it; one that lands after the read is still inside `reserved - settled`. (A single pending counter that a
settler decrements would not do: a settlement landing between the chain read and the reservation would be
both dropped from the counter and still counted in the stale chain figure.)

What is available on chain:

- deposit: `depositOf - withdrawalOf.amount` (never below 0). A requested withdrawal counts as gone from the
  moment it is requested: once it matures, `withdraw` takes it whatever is still pending;
- budget: `budget - spent` of the grant's current epoch, where `spent` includes what this store's payments
  settled, hence `budget - (spent - settled)` on the reserved side.

What the counters cannot see, and is therefore credit the gateway extends (bounded by its per-payer credit
limit and by how soon it settles): spend by gateways on *other* stores (the deposit is one pool per payer,
not reserved per payee), a revocation or re-grant after verification, a withdrawal requested after
verification that matures (after `WITHDRAWAL_DELAY`) before the settler lands the payment.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["DepositAccounts", "available_deposit", "budget_limit", "deposit_accounts", "deposit_limit"]


class DepositAccounts(NamedTuple):
    """The store accounts of one (network, escrow, payer, token) deposit pool."""

    reserved: str
    settled: str


def deposit_accounts(chain_id: int, escrow: str, payer: str, token: str) -> DepositAccounts:
    base = f"escrow:{chain_id}:{escrow.lower()}:{payer.lower()}:{token.lower()}:deposit"
    return DepositAccounts(f"{base}:reserved", f"{base}:settled")


def available_deposit(deposit: int, withdrawal: int) -> int:
    """What the payer's deposit can still pay: a requested withdrawal is treated as already gone."""
    return max(0, deposit - withdrawal)


def deposit_limit(*, deposit: int, withdrawal: int, settled: int) -> int:
    """The `limit` for `add_pending(reserved, ...)`; `settled` must be read before `deposit`/`withdrawal`."""
    return available_deposit(deposit, withdrawal) + max(0, settled)


def budget_limit(*, budget: int, spent: int, settled: int) -> int:
    """The `limit` for the grant's `reserved` account; `settled` must be read before `spent`.

    `spent - settled` is what others (payer-side spend through other stores) took from this epoch's budget.
    """
    return budget - max(0, spent - max(0, settled))
