"""What `PaymentMiddleware(chain=...)` runs for a chain: its schemes, their settlers, and recovery.

    payments = ChainPayments(chain, ("exact", "escrow"), store=placeholder, claim_ttl=300)
    payments.schemes            # offered by the paywall from the start
    await payments.start(store) # lifespan startup, once the real store is open: recovery pass, settler loops
    await payments.stop()       # lifespan shutdown: the settlers flush what they hold

The schemes exist before the store is open (the paywall needs them to price and challenge), so they are
built on the middleware's placeholder store and re-pointed at the real one when it opens, before anything
is written.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from escrow import Chain, EscrowSettler, ExactSettler
from escrow.payments._upto import UptoChain
from x402 import Amount

from ._errors import ConfigurationError
from ._escrow_scheme import EscrowScheme
from ._exact import ExactScheme
from ._pricing import Asset
from ._recovery import Reconciler, Recovery
from ._scheme import Scheme
from ._store import PaymentStore
from ._upto import UptoScheme

__all__ = ["SCHEME_NAMES", "ChainPayments", "SettlementOptions", "chain_asset"]

#: `upto` (x402, Permit2) needs Permit2 and the upto proxy at their canonical addresses: named, never default.
SCHEME_NAMES = ("exact", "escrow", "upto")


class SettlementOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Settlement knobs of `PaymentMiddleware(chain=...)`; the defaults suit a real chain.

    `credit_limit` is the most this gateway serves one payer through the escrow before it settles that
    payer's next payment before responding (`"$10"`, or atomic units).
    """

    batch_size: int = 64  # payments per settlement transaction
    max_age: float = 0.5  # the longest a queued payment waits for its batch to fill
    lease_seconds: float = 120.0  # a settler's hold on a batch; after it, a crashed settler's work is retried
    retry_cap: float = 60.0  # longest backoff between retries while the chain is unreachable
    recover_every: float = 5.0  # how often open in-flight records are reconciled
    credit_limit: Amount = "$10"


def chain_asset(chain: Chain) -> Asset:
    """The chain's payment token as the gateway prices in it."""
    n = chain.network
    return Asset(
        address=n.token,
        chain_id=n.chain_id,
        name=n.token_name,
        version=n.token_version,
        decimals=n.token_decimals,
        symbol=n.token_symbol,
    )


class ChainPayments:
    """The schemes named in `names` on `chain`, with the settlers and recovery they need (module doc)."""

    def __init__(
        self,
        chain: Chain,
        names: Sequence[str] | None,
        *,
        store: PaymentStore,
        claim_ttl: float,
        options: SettlementOptions | None = None,
        qualify: bool = False,
    ) -> None:
        self.chain = chain
        self.network = chain.network.network
        # Several chains share one store: each chain's settlers drain their own queue kinds (`exact@8453`),
        # so no settler ever leases another chain's payment. One chain (or the first of several) keeps the
        # plain kinds, so a store written by a one-chain gateway is drained as before.
        self.suffix = f"@{chain.network.chain_id}" if qualify else ""
        self.options = options = options or SettlementOptions()
        self.claim_ttl = claim_ttl
        default = ("exact", "escrow") if chain.network.escrow else ("exact",)
        wanted = tuple(names) if names is not None else default
        unknown = [name for name in wanted if name not in SCHEME_NAMES]
        if unknown or not wanted:
            raise ConfigurationError(f"schemes must be among {SCHEME_NAMES}, got {list(wanted)}")
        if "escrow" in wanted and not chain.network.escrow:
            raise ConfigurationError(
                f"{chain.network.network} has no escrow: the escrow scheme is unavailable"
            )
        if not chain.has_relayer:
            raise ConfigurationError("a paywall settles payments: build its Chain with a relayer key")
        tuning = {
            "batch_size": options.batch_size,
            "max_age": options.max_age,
            "lease_seconds": options.lease_seconds,
            "retry_cap": options.retry_cap,
        }
        suffix = self.suffix
        self.schemes: list[Scheme] = []
        self.exact_settler: ExactSettler | None = None
        self.escrow_settler: EscrowSettler | None = None
        self.escrow_scheme: EscrowScheme | None = None
        # The relayer key settles `upto` too: it is the `facilitatorAddress` the offer advertises.
        self.upto_scheme = (
            UptoScheme(UptoChain(chain.rpc, chain.relayer), kind="upto" + suffix)
            if "upto" in wanted
            else None
        )
        if "exact" in wanted:
            self.exact_settler = chain.exact_settler(store, kind="exact" + suffix, **tuning)
        if "escrow" in wanted:
            self.escrow_settler = chain.escrow_settler(store, kind="escrow" + suffix, **tuning)
            self.escrow_scheme = EscrowScheme(
                chain.escrow_verifier(),
                store,
                self.escrow_settler,
                credit_limit=chain.network.atomic(options.credit_limit),
                claim_ttl=claim_ttl,
            )
        for name in wanted:  # in the caller's order: the paywall offers them so
            self.schemes.append(self._scheme(name))
        self.recovery: Recovery | None = None

    def _scheme(self, name: str) -> Scheme:
        if name == "exact":
            return ExactScheme(self.chain.exact(), kind="exact" + self.suffix)
        scheme = self.escrow_scheme if name == "escrow" else self.upto_scheme
        assert scheme is not None
        return scheme

    @property
    def settlers(self) -> dict[str, ExactSettler | EscrowSettler]:
        """The running settlers by scheme name (an operator's view: `batches`, `paid`)."""
        out: dict[str, ExactSettler | EscrowSettler] = {}
        if self.exact_settler is not None:
            out["exact"] = self.exact_settler
        if self.escrow_settler is not None:
            out["escrow"] = self.escrow_settler
        return out

    async def start(self, store: PaymentStore) -> None:
        """Point everything at the open `store`, then one recovery pass and the settler loops (idempotent)."""
        if self.recovery is not None:
            return
        for settler in self.settlers.values():
            settler.store = store
        if self.escrow_scheme is not None:
            self.escrow_scheme.store = store
        reconcilers: dict[str, Reconciler] = {}
        if self.exact_settler is not None:
            reconcilers[self.exact_settler.kind] = self.exact_settler
        if self.escrow_scheme is not None:
            reconcilers[self.escrow_scheme.kind] = self.escrow_scheme
        if self.upto_scheme is not None:
            self.upto_scheme.store = store
            reconcilers[self.upto_scheme.kind] = self.upto_scheme
        self.recovery = Recovery(
            store,
            settlers=list(self.settlers.values()),
            reconcilers=reconcilers,
            claim_ttl=self.claim_ttl,
            interval=self.options.recover_every,
        )
        await self.recovery.start()

    async def stop(self) -> None:
        """Stop the loops; each settler flushes what it holds first."""
        recovery, self.recovery = self.recovery, None
        if recovery is not None:
            await recovery.stop()
