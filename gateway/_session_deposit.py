"""Server-submitted deposits (`methodDetails.feePayer: true`): the gateway relays the payer's signed
`openWithAuthorization` / `topUpWithAuthorization` and pays the gas.

Offered only when the paywall is built with `fee_payer=True`; the challenge then lists the credential types
`["authorization", "hash"]` (else `["hash"]`), and a credential of a type not listed is refused.

The relayer's gas is the attack surface, so before anything is sent:
- the authorization pays the escrow (`to`), and its nonce is the one the contract recomputes from this
  payee, this token and the credential's salt and signer (or channel, amount and top-up salt): a signature
  for any other channel, payee, token or escrow is refused with no chain call;
- a relayed open or top-up holds at least one request's maximum (or suggested deposit) on the dearest route
  (`least_deposit`): never gas for dust;
- an open names exactly the channel its fields make (`channelId` recomputed with this escrow and chain), and
  its opening voucher is signed by the channel's signer; a top-up's payer is the channel's payer;
- a deposit already relayed (same channel for an open, same nonce for a top-up) is not sent again, and a
  payer's relays are serialized (one open of a channel is one transaction; two deposits racing for money
  that funds one: the second is simulated after the first mined, refused, never sent); what is remembered
  of past relays is bounded (`RELAY_MEMORY`);
- it stays valid `RELAY_MIN_VALIDITY` (60 s) more: one expiring while it lands would revert on chain;
- the very call is simulated (`eth_call`): one that would revert (replayed, expired, unfunded, badly
  signed) costs one free call and is answered 409 `transaction-reverted`, never sent;
- a payer can still front-run its own relay (move its funds, or cancel the authorization, between the
  simulation and the send): the relay reverts at the gateway's expense. After one does, that payer's relays
  are refused (429 `deposit-cooldown`, no chain call) for `RELAY_COOLDOWN` seconds, in the store (a claim
  under `relay-cooldown:<payer>`) so every replica sharing it refuses them; the gas lost is counted
  (`relay_reverts`, `relay_reverted_gas`) and logged. So a payer costs at most one reverted relay per
  cool-down.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from escrow import ChainError, EscrowError, RevertError, TransactionFailed
from escrow.chain._rpc import ReceiptTimeout
from x402 import X402Error
from x402._session import DepositAuthorization, SessionAction, VoucherVerifier, channel_id

from ._channels import ChannelChain, RelayReverted
from ._pricing import Asset, to_atomic
from ._session_state import KeyedLocks, SessionProblem, SessionRoute
from ._store import ClaimLost, PaymentStore

__all__ = ["SessionDeposits"]

log = logging.getLogger("agentpay.gateway.session")


class SessionDeposits:
    """Mixed into `SessionPaywall`: the relayed (server-submitted) open and top-up."""

    chain: ChannelChain
    asset: Asset
    pay_to: str
    fee_payer: bool
    #: How many relayed nonces and transactions are remembered (a forgotten open is still never sent twice:
    #: the channel exists; a forgotten top-up's nonce is used, so its simulation refuses it).
    RELAY_MEMORY = 4096
    #: Seconds a relayed deposit must stay valid: one that expires while it lands would pass the simulation
    #: and revert on chain, at the gateway's expense.
    RELAY_MIN_VALIDITY = 60
    #: How long a payer's relay claim lives in the store (a relay waits at most 30 s for its receipt).
    RELAY_CLAIM_TTL = 60.0
    #: Seconds a payer's relays are refused after one of them reverted on chain (front-run by the payer).
    RELAY_COOLDOWN = 3600.0
    _relaying: KeyedLocks  # by payer
    _relayed: dict[str, str]  # deposit nonce -> the transaction that landed it (the latest RELAY_MEMORY)
    relay_transactions: deque[str]
    relay_gas: int
    relay_reverts: int
    relay_reverted_gas: int
    routes: dict[str, SessionRoute]

    if TYPE_CHECKING:  # provided by `SessionPaywall`, the class this is mixed into

        @property
        def store(self) -> PaymentStore: ...

    @property
    def credential_types(self) -> list[str]:
        """What the challenge lists, in order of preference (the draft's `methodDetails.credentialTypes`)."""
        return ["authorization", "hash"] if self.fee_payer else ["hash"]

    def _check_type(self, action: SessionAction) -> None:
        if action.action in ("open", "topUp") or action.deposit is not None or action.type != "hash":
            if action.type not in self.credential_types:
                raise SessionProblem(
                    "malformed-credential",
                    f"credential type {action.type!r} is not offered here (offered: {self.credential_types})",
                    base="https://paymentauth.org/problems/",
                )

    @property
    def least_deposit(self) -> int:
        """The least a relayed open or top-up must hold: the largest of the routes' one-request maximums and
        suggested deposits. The gateway pays the gas (about 190k an open, 60k a top-up): not for a channel too
        small to pay for a request on any route. Every route counts, not the one the credential came to, since
        a channel opened at the cheapest route pays the others too; and top-ups count, else a payer could
        burn the gateway's gas one atomic unit (its own, refunded at close) at a time."""
        least = 0
        for route in self.routes.values():
            most = to_atomic(route.unit_price, self.asset.decimals) * route.units
            suggested = route.suggested_deposit
            least = max(least, most, 0 if suggested is None else to_atomic(suggested, self.asset.decimals))
        return least

    async def _relay(
        self, action: SessionAction, deposit: DepositAuthorization, payer: str | None, *, minimum: int
    ) -> None:
        """Relay `deposit` for `action.channel` (`payer`: the open channel's payer, for a top-up)."""
        escrow, token, cid = self.chain.escrow.lower(), self.asset.address, action.channel
        if deposit.value < minimum:
            raise SessionProblem(
                "deposit-too-small", f"a deposit this gateway relays must hold at least {minimum}"
            )
        if deposit.valid_before < time.time() + self.RELAY_MIN_VALIDITY:
            raise SessionProblem(
                "deposit-expiring",
                f"a deposit this gateway relays must stay valid {self.RELAY_MIN_VALIDITY} s more",
            )
        if deposit.to.lower() != escrow:
            raise SessionProblem("invalid-signature", "the authorization pays another contract")
        expected = deposit.expected_nonce(payee=self.pay_to, token=token, channel=cid)
        if deposit.nonce.lower() != expected:
            raise SessionProblem(
                "invalid-signature", "the authorization is not for this channel, payee and token"
            )
        if deposit.kind == "open":
            made = channel_id(
                payer=deposit.payer,
                payee=self.pay_to,
                token=token,
                salt=deposit.salt,
                authorized_signer=deposit.authorized_signer,
                escrow=escrow,
                chain_id=self.chain.chain_id,
            )
            if made != cid:
                raise SessionProblem("channel-mismatch", "the authorization opens another channel")
            self._check_opening_voucher(action, deposit)  # the open's voucher, or the one it comes with
        elif payer is None or deposit.payer.lower() != payer.lower():
            raise SessionProblem("signer-mismatch", "only the channel's payer may top it up")
        # One relay at a time per payer (so per channel too): each is simulated after the previous one mined,
        # so two deposits racing for money that funds one never both pass the simulation and one revert. The
        # store's claim does the same across processes sharing it (the lock only queues this process's).
        async with self._relaying.hold(deposit.payer.lower()):
            key = "relay:" + deposit.payer.lower()
            holder = await self.store.claim(key, ttl=self.RELAY_CLAIM_TTL)
            if holder is None:
                raise SessionProblem(
                    "chain-unavailable", "another deposit of this payer is being relayed; retry", status=503
                )
            try:
                await self._not_cooling(key)
                await self._relay_held(action, deposit, cid)
            finally:
                with contextlib.suppress(ClaimLost):
                    await self.store.release(key, holder)

    async def _relay_held(self, action: SessionAction, deposit: DepositAuthorization, cid: str) -> None:
        """Relay `deposit` (its payer's claim held): unless it was relayed already, or its channel is open."""
        token = self.asset.address
        if deposit.nonce in self._relayed:
            return  # relayed already (the same credential again): never twice
        if deposit.kind == "open" and (await self.chain.channel(cid)).exists:
            return  # opened already (by this very authorization, or otherwise): nothing to send
        try:
            tx_hash, gas = await self.chain.relay_deposit(
                deposit, payee=self.pay_to, token=token, channel=cid
            )
        except RelayReverted as exc:  # passed the simulation, reverted on chain: the payer front-ran it
            self.relay_reverts += 1
            self.relay_reverted_gas += exc.gas_used
            log.warning(
                "relayed %s of %s by %s reverted on chain (%s, %d gas lost): its relays cool down %g s",
                deposit.kind,
                cid,
                deposit.payer,
                exc.tx_hash,
                exc.gas_used,
                self.RELAY_COOLDOWN,
            )
            await self.store.claim("relay-cooldown:" + deposit.payer.lower(), ttl=self.RELAY_COOLDOWN)
            raise SessionProblem(
                "transaction-reverted",
                f"the {deposit.kind} reverted on chain; this payer's deposits are not relayed for a while",
                status=409,
            ) from None
        except (RevertError, TransactionFailed) as exc:
            log.info("relayed %s of %s refused: %s", deposit.kind, cid, exc)
            raise SessionProblem(
                "transaction-reverted",
                f"the {deposit.kind} authorization was refused on chain",
                status=409,
            ) from None
        except ReceiptTimeout as exc:  # it may land: the payer's retry finds the channel or the nonce used
            log.warning("relayed %s of %s not mined in time: %s", deposit.kind, cid, exc)
            raise SessionProblem(
                "chain-unavailable", "the deposit is not mined yet; retry", status=503
            ) from None
        except (ChainError, EscrowError) as exc:
            log.warning("relaying %s of %s failed: %s", deposit.kind, cid, exc)
            raise SessionProblem(
                "chain-unavailable", "the chain is unreachable; retry later", status=503
            ) from None
        self._relayed[deposit.nonce] = tx_hash
        while len(self._relayed) > self.RELAY_MEMORY:
            del self._relayed[next(iter(self._relayed))]
        self.relay_transactions.append(tx_hash)
        self.relay_gas += gas

    async def _not_cooling(self, relay_key: str) -> None:
        """Refuse (no chain call) while the payer's cool-down claim lives: taken and at once released, else
        held by the revert that started it (the payer's relay claim is held: no other relay of it races)."""
        key = "relay-cooldown:" + relay_key.removeprefix("relay:")
        # A short probe: a process dying between claim and release blocks the payer seconds, not hours.
        probe = await self.store.claim(key, ttl=10.0)
        if probe is None:
            raise SessionProblem(
                "deposit-cooldown",
                "a deposit of this payer reverted on chain after its simulation: its deposits are not"
                " relayed for a while (send the deposit yourself, type hash)",
                status=429,
            )
        with contextlib.suppress(ClaimLost):
            await self.store.release(key, probe)

    def _check_opening_voucher(self, action: SessionAction, deposit: DepositAuthorization) -> None:
        """The voucher must be the channel's signer's before the gateway pays for the channel."""
        assert action.cumulative is not None and action.signature is not None
        signer = deposit.payer if int(deposit.authorized_signer, 16) == 0 else deposit.authorized_signer
        verifier = VoucherVerifier(
            chain_id=self.chain.chain_id,
            escrow=self.chain.escrow,
            channel=action.channel,
            signer=bytes.fromhex(signer[2:]),
        )
        try:
            ok = verifier.signed_by(action.cumulative, action.signature)
        except X402Error:
            ok = False
        if not ok:
            raise SessionProblem(
                "signer-mismatch", "the opening voucher is not signed by the channel's signer"
            )
