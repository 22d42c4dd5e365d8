"""The settler of x402 `exact` payments (EIP-3009 `transferWithAuthorization`), and the crash-test fault hook.

    settler = ExactSettler(store, ExactEvm(rpc, relayer), batch_size=64, max_age=0.5)
    await settler.run(stop)              # or step() in a supervised loop; drain() in tests

It drains the store's `exact` queue: lease a batch, look every authorization up on the token, send the
unused ones through the relayer (the `TxSender` puts them in one JSON-RPC batch with consecutive nonces),
wait for the receipts (one batched poll), record each outcome. A lease is the durable record of "being
settled": if this process dies after sending, the lease runs out and the item comes back.

Never twice: before anything is sent, `authorizationState(from, nonce)` is asked for the whole lease in one
round trip. A used authorization is not sent again; its `AuthorizationUsed(authorizer, nonce)` log names the
transaction, whose `Transfer` must be this very payment (`settled_elsewhere`, recorded with that hash), else
the payment is dead: the nonce paid something else, or the payer canceled it. A send whose receipt did not
arrive is remembered in the item's error (`settlement_pending: sent in 0x... sent in 0x...`, every fee-bumped
version the relayer broadcast); while any of them is still in the node's pool, nothing is re-sent.

Outcomes (`SettleOutcome.status`): `settled`, `settled_elsewhere`, `retry` (the chain could not be asked or
the transfer reverted while still valid: `mark_failed` with exponential backoff, never past the
authorization's `validBefore`), `dead` (the payee's loss, with a reason code; or, for `reconcile_items`,
`exact_never_settled`: nothing was charged).

`reconcile_items` is the record-only variant for payments a gateway was settling before answering (its
`exact:now` records, see `gateway._recovery`): it never sends, so a payment whose response never left is
never charged by recovery; an authorization still unused is looked at again once it can no longer land.

The loop (lease, batch, backoff, dead letters) is `escrow.payments._engine.SettlementEngine`; this module is
the `exact` part (`ExactSettlement`) and its reservation counters.

Relayer keys: `TxSender` counts its account nonce in process, so every process that settles needs its own
relayer key (several replicas sharing one would race on the account nonce).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from typing import TYPE_CHECKING, Final, Protocol

import msgspec

from x402 import Eip712Domain, ExactEvmPayload, Reason

from ..chain._rpc import ChainError, Receipt
from ._engine import EngineOptions, Job, Parties, SettlementEngine, SettleOutcome
from ._exact import AUTHORIZATION_USED_TOPIC, ExactEvm, authorization_state_calldata, has_transfer
from ._queue import SettlementQueue

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "KIND",
    "ExactPayment",
    "ExactSettlement",
    "ExactSettler",
    "ExactQueue",
    "decode_payment",
    "encode_payment",
    "exact_reservation",
    "fault_point",
    "pending_transaction",
    "pending_transactions",
    "unreserve_once",
]

KIND: Final = "exact"
NEVER_SETTLED: Final = "exact_never_settled"
_PENDING_TX = re.compile(r"sent in (0x[0-9a-fA-F]{64})")
_FOREVER: Final = 100 * 365 * 86400.0  # claim TTL of a once-marker: it outlives every payment
_FAULTS: Final = frozenset(filter(None, os.environ.get("AGENTPAY_FAULT", "").split(",")))


def fault_point(stage: str) -> None:
    """Crash here when `AGENTPAY_FAULT` names `stage` (comma-separated): test-only fault injection.

    The process SIGKILLs itself, as a power cut would: no `finally`, no flush, no lifespan shutdown. Stages:
    `after_verify` (claim taken, handler not run), `after_handler` (served, settlement recorded, nothing
    sent), `after_send` (transaction sent, outcome not recorded). Off unless the variable is set; the check
    is one lookup in an empty set.
    """
    if stage in _FAULTS:
        os.kill(os.getpid(), signal.SIGKILL)


class ExactPayment(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """What the settlement queue stores for an `exact` payment: the signed authorization and its token."""

    name: str
    version: str
    chain_id: int
    asset: str
    payload: ExactEvmPayload
    # The store counter holding this payment's amount against the payer's balance until it settles or is
    # given up on (`exact_reservation`); "" when the gateway reserved nothing.
    reserved: str = ""

    @property
    def domain(self) -> Eip712Domain:
        return Eip712Domain(self.name, self.version, self.chain_id, self.asset)


encode_payment = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(ExactPayment).decode


def decode_payment(raw: bytes) -> ExactPayment:
    return _decode(raw)


def pending_transactions(error: str | None) -> list[str]:
    """Every transaction a record's error says was sent and not yet seen mined (`sent in 0x...`)."""
    return _PENDING_TX.findall(error or "")


def pending_transaction(error: str | None) -> str:
    """The transaction a record's error says was sent and not yet seen mined (`sent in 0x...`), or ""."""
    found = _PENDING_TX.search(error or "")
    return found.group(1) if found else ""


class ExactQueue(SettlementQueue, Protocol):
    """The part of `gateway.PaymentStore` the exact settler uses: the queue, and the payer reservations."""

    async def sub_pending_once(self, marker: str, account: str, amount: int, *, ttl: float) -> bool: ...


def exact_reservation(chain_id: int, asset: str, payer: str) -> str:
    """The store counter of a payer's accepted-but-unsettled `exact` payments of one token on one chain."""
    return f"exact:{chain_id}:{asset.lower()}:{payer.lower()}:pending"


async def unreserve_once(store: ExactQueue, key: str, payment: ExactPayment) -> None:
    """Give back the reservation of the payment `key` once it is final (settled, or given up on).

    Whoever reports the outcome first (the gateway that settled it before serving, a settler, recovery)
    moves the counter; a permanent `<key>#unreserved` marker keeps a second report from moving it again,
    which would let the payer spend the same balance twice.
    """
    if not payment.reserved:
        return
    amount = int(payment.payload.authorization.value)
    # A marker claim that outlives any payment is as permanent as a finalized one; the store takes it and
    # moves the counter in one atomic step (one commit), so a crash cannot leave one without the other.
    await store.sub_pending_once(f"{key}#unreserved", payment.reserved, amount, ttl=_FOREVER)


Work = Job[ExactPayment]
Engine = SettlementEngine[ExactPayment, ExactQueue]


class ExactSettlement:
    """The `exact` part of the settlement engine: look authorizations up on the token, send the unused ones
    one transfer each, judge the receipts (a `SchemeSettlement`)."""

    name = KIND
    malformed = "exact_payment_malformed"

    def __init__(self, exact: ExactEvm, *, expiry_margin: float, lookback_blocks: int) -> None:
        self.exact = exact
        self.rpc = exact.relayer.rpc  # everything after verification goes where the relayer sends
        self.expiry_margin = expiry_margin  # a transfer must be mined before validBefore: keep this much
        self.lookback_blocks = lookback_blocks
        self.sent = 0  # transactions this settler broadcast
        self.batches: list[int] = []  # transactions per batch

    def decode(self, raw: bytes) -> ExactPayment:
        return decode_payment(raw)

    async def submit(self, engine: Engine, jobs: list[Work]) -> list[SettleOutcome]:
        out: list[SettleOutcome] = []
        fresh = await self._check_chain(engine, await self._this_chain(engine, jobs, out), out)
        now = engine.clock()
        to_send: list[Work] = []
        for w in fresh:
            if int(w[1].payload.authorization.valid_before) - self.expiry_margin <= now:
                out.append(
                    await self._dead(engine, w, Reason.VALID_BEFORE, "the authorization expired unsettled")
                )
            elif int(w[1].payload.authorization.valid_after) >= now:
                out.append(await engine.retry(w, "exact_not_yet_valid: waiting for validAfter"))
            else:
                to_send.append(w)
        to_send = await self._skip_pending(engine, to_send, out)
        if to_send:
            out.extend(await self._send(engine, to_send))
        return out

    async def reconcile(self, engine: Engine, jobs: list[Work]) -> list[SettleOutcome]:
        out: list[SettleOutcome] = []
        fresh = await self._check_chain(engine, await self._this_chain(engine, jobs, out), out)
        out.extend([await self._unsent(engine, w) for w in fresh])
        return out

    async def _this_chain(self, engine: Engine, jobs: list[Work], out: list[SettleOutcome]) -> list[Work]:
        work: list[Work] = []
        for w in jobs:
            if w[1].chain_id != self.exact.relayer.chain_id:
                out.append(await self._dead(engine, w, "exact_wrong_chain", "not this relayer's chain"))
            else:
                work.append(w)
        return work

    async def _check_chain(self, engine: Engine, work: list[Work], out: list[SettleOutcome]) -> list[Work]:
        """Record the items whose authorization the token already used; return the unused ones."""
        if not work:
            return []
        calls = [
            (
                "eth_call",
                [{"to": p.asset, "data": _hex(authorization_state_calldata(*_who(p)))}, "latest"],
            )
            for _, p in work
        ]
        try:
            states = await self.rpc.batch(calls)
        except ChainError as exc:
            out.extend([await engine.retry(w, f"{exc.code}: asking the token: {exc}") for w in work])
            return []
        unused: list[Work] = []
        used: list[Work] = []
        for w, state in zip(work, states, strict=True):
            if isinstance(state, ChainError):
                out.append(await engine.retry(w, f"{state.code}: asking the token: {state}"))
            elif isinstance(state, str) and int(state, 16) != 0:
                used.append(w)
            else:
                unused.append(w)
        if used:
            out.extend(await self._already_used(engine, used))
        return unused

    async def _already_used(self, engine: Engine, used: list[Work]) -> list[SettleOutcome]:
        """Find the transaction that used each authorization; settled there if it paid this very transfer."""
        try:
            head = int(await self.rpc.request("eth_blockNumber", []), 16)
            start = hex(max(0, head - self.lookback_blocks))
            found = await self.rpc.batch(
                [
                    (
                        "eth_getLogs",
                        [
                            {
                                "address": p.asset,
                                "fromBlock": start,
                                "toBlock": "latest",
                                "topics": [AUTHORIZATION_USED_TOPIC, _topic(_who(p)[0]), _who(p)[1].lower()],
                            }
                        ],
                    )
                    for _, p in used
                ]
            )
            hashes = [
                logs[-1]["transactionHash"] if isinstance(logs, list) and logs else None for logs in found
            ]
            lookups = [h for h in hashes if h is not None]
            # An empty JSON-RPC batch is an invalid request: all canceled means nothing to look up.
            receipts = (
                await self.rpc.batch([("eth_getTransactionReceipt", [h]) for h in lookups]) if lookups else []
            )
        except ChainError as exc:
            return [
                await engine.retry(w, f"{exc.code}: looking up the earlier transfer: {exc}") for w in used
            ]
        by_hash = dict(zip(lookups, receipts, strict=True))
        out = []
        for w, (logs, tx_hash) in zip(used, zip(found, hashes, strict=True), strict=True):
            if isinstance(logs, ChainError):
                out.append(await engine.retry(w, f"{logs.code}: looking up the earlier transfer: {logs}"))
                continue
            raw = by_hash.get(tx_hash) if tx_hash else None
            if tx_hash is None:
                out.append(
                    await self._dead(
                        engine, w, "exact_authorization_canceled", "used with no transfer logged"
                    )
                )
            elif not isinstance(raw, dict):
                out.append(await engine.retry(w, f"chain_error: no receipt for {tx_hash} yet"))
            elif has_transfer(msgspec.convert(raw, Receipt), w[1].asset, w[1].payload.authorization):
                out.extend(await engine.settled([w], tx_hash, "settled_elsewhere"))
            else:
                detail = f"the nonce paid another transfer in {tx_hash}"
                out.append(await self._dead(engine, w, "exact_nonce_reused", detail))
        return out

    async def _skip_pending(self, engine: Engine, work: list[Work], out: list[SettleOutcome]) -> list[Work]:
        """Keep back items whose earlier transaction (any fee-bumped version) is still in the node's pool.

        One mined since the token was asked (`_check_chain`) is asked about again: sending it blindly would
        race the very transaction that just paid it."""
        earlier = [(w, h) for w in work for h in _PENDING_TX.findall(w[0].error or "")]
        if not earlier:
            return work
        try:
            txs = await self.rpc.batch([("eth_getTransactionByHash", [h]) for _, h in earlier])
        except ChainError as exc:
            waiting = {id(w): w for w, _ in earlier}
            out.extend(
                [
                    await engine.retry(w, f"{exc.code}: asking for its transaction: {exc}")
                    for w in waiting.values()
                ]
            )
            return [w for w in work if id(w) not in waiting]
        held: set[int] = set()
        mined: dict[int, Work] = {}
        for (w, _), tx in zip(earlier, txs, strict=True):
            if isinstance(tx, ChainError) or (isinstance(tx, dict) and tx.get("blockNumber") is None):
                held.add(id(w))
            elif isinstance(tx, dict):
                mined[id(w)] = w
        for w in work:
            if id(w) in held:
                sent = " ".join(f"sent in {h}" for h in _PENDING_TX.findall(w[0].error or ""))
                out.append(await engine.retry(w, f"settlement_pending: {sent}, not mined yet"))
        again = [w for key, w in mined.items() if key not in held]
        unused = await self._check_chain(engine, again, out) if again else []  # reverted: sent again below
        return [w for w in work if id(w) not in held and id(w) not in mined] + unused

    async def _send(self, engine: Engine, work: list[Work]) -> list[SettleOutcome]:
        relayer = self.exact.relayer
        results: list[str | BaseException] = []
        for _, p in work:
            # One at a time, so the node sees them in nonce order: anvil's automine can strand a transaction
            # that arrives before its predecessor (foundry-rs/foundry#10122), and a JSON-RPC batch of raw
            # transactions may be applied out of order. The receipts are still awaited together.
            data, gas = self.exact.transfer(p.payload)
            try:
                results.append(await relayer.send(p.asset, data, gas=gas))
            except ChainError as exc:
                results.append(exc)
        fault_point("after_send")
        self.batches.append(len(work))
        out: list[SettleOutcome] = []
        sent: list[tuple[Work, str]] = []
        for w, result in zip(work, results, strict=True):
            if isinstance(result, ChainError):
                out.append(await engine.retry(w, f"{result.code}: sending: {result}"))
            elif isinstance(result, BaseException):
                raise result
            else:
                sent.append((w, result))
        self.sent += len(sent)
        receipts = await asyncio.gather(
            *(relayer.wait_for_receipt(h, timeout=engine.receipt_timeout) for _, h in sent),
            return_exceptions=True,
        )
        reverted: list[tuple[Work, str]] = []
        for (w, tx_hash), receipt in zip(sent, receipts, strict=True):
            if isinstance(receipt, ChainError):  # may land yet: remember the hashes, never send blindly again
                hashes = " ".join(f"sent in {h}" for h in relayer.hashes(tx_hash))
                out.append(await engine.retry(w, f"settlement_pending: {hashes} ({receipt.code})"))
            elif isinstance(receipt, BaseException):
                raise receipt
            elif not receipt.ok:
                reverted.append((w, tx_hash))
            elif has_transfer(receipt, w[1].asset, w[1].payload.authorization):
                landed = receipt.transaction_hash  # a fee-bumped replacement of tx_hash, maybe
                replaced = tuple(h for h in relayer.hashes(tx_hash) if h != landed)
                gas = int(receipt.gas_used, 16)  # this transfer's own: `agentpay_settlement_gas_total`
                out.extend(await engine.settled([w], landed, "settled", gas=gas, replaced=replaced))
            else:
                detail = f"in {tx_hash}"
                out.append(await self._dead(engine, w, "invalid_exact_evm_transfer_event_mismatch", detail))
        if reverted:
            # Someone may have used the authorization first (then it is settled there); else retry it.
            still = await self._check_chain(engine, [w for w, _ in reverted], out)
            for w in still:
                tx_hash = next(h for r, h in reverted if r is w)
                out.append(await engine.retry(w, f"{Reason.TRANSACTION_FAILED}: {tx_hash} reverted"))
        return out

    # -- outcomes ------------------------------------------------------------------------------------------

    async def _unsent(self, engine: Engine, w: Work) -> SettleOutcome:
        """Reconciling: unused on chain. Final once it can no longer land; until then look again later."""
        valid_before = int(w[1].payload.authorization.valid_before)
        if valid_before <= engine.clock():
            detail = "the authorization expired unused: nothing was charged"
            return await self._dead(engine, w, NEVER_SETTLED, detail)
        error = "exact_unsettled: not on chain; final once the authorization expires"
        sent = pending_transaction(w[0].error)
        if sent:  # kept, so the same credential presented again waits for it rather than sending again
            error += f" (sent in {sent})"
        await engine.store.mark_failed(
            w[0].key, error=error, retry_at=valid_before + 1.0, lease=w[0].lease_token
        )
        return engine.outcome(w, "retry", code="exact_unsettled")

    async def _dead(self, engine: Engine, w: Work, code: str, detail: str) -> SettleOutcome:
        auth = w[1].payload.authorization
        who = f"{auth.value} of {w[1].asset} from {auth.from_} to {auth.to} (nonce {auth.nonce})"
        return await engine.dead(w, code, detail if code == NEVER_SETTLED else f"{detail}: lost {who}")

    def retry_at(self, engine: Engine, payment: ExactPayment, *, delay: float) -> float:
        now, last = engine.clock(), int(payment.payload.authorization.valid_before) - self.expiry_margin
        return max(now + min(engine.retry_base, delay), min(now + delay, last))  # one try before it expires

    def gives_up(self, payment: ExactPayment, now: float) -> bool:
        return False  # an expired authorization is dead before sending, with its own code (`_send`)

    async def on_settled(self, engine: Engine, job: Work) -> None:
        await unreserve_once(engine.store, job[0].key, job[1])

    async def on_dead(self, engine: Engine, job: Work, *, recorded: bool) -> None:
        await unreserve_once(engine.store, job[0].key, job[1])

    def parties(self, payment: ExactPayment) -> Parties:
        auth = payment.payload.authorization
        return Parties(int(auth.value), auth.from_, auth.to)


_DEFAULTS: Final[EngineOptions] = {"kind": KIND, "batch_size": 64, "max_age": 0.5, "retry_cap": 60.0}


class ExactSettler(SettlementEngine[ExactPayment, ExactQueue]):
    """Settles `exact` payments from a store queue through `exact.relayer`, batching the sends."""

    def __init__(
        self,
        store: ExactQueue,
        exact: ExactEvm,
        *,
        expiry_margin: float = 6.0,
        lookback_blocks: int = 500_000,
        **options: Unpack[EngineOptions],
    ) -> None:
        self.part = ExactSettlement(exact, expiry_margin=expiry_margin, lookback_blocks=lookback_blocks)
        settings: EngineOptions = {**_DEFAULTS, **options}
        super().__init__(store, self.part, **settings)
        self.exact = exact
        self.rpc = self.part.rpc
        self.expiry_margin = expiry_margin
        self.lookback_blocks = lookback_blocks
        self.batches = self.part.batches  # transactions per batch

    @property
    def sent(self) -> int:
        """Transactions this settler broadcast."""
        return self.part.sent


def _who(payment: ExactPayment) -> tuple[str, str]:
    auth = payment.payload.authorization
    return auth.from_, auth.nonce


def _topic(address: str) -> str:
    return "0x" + "00" * 12 + address[2:].lower()


def _hex(data: bytes) -> str:
    return "0x" + data.hex()
