"""Session keys that can only pay through the escrow: grants, verification, the batching settler and the
`escrow` scheme end to end, against anvil with the real AgentEscrow and TestUSDC. Nothing is mocked.

Each test makes its own session key, grant and payees (counterfactual addresses: no code, no balance), so
balances are asserted as changes and tests never share a budget.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from escrow import DevnetState, EscrowError
from escrow.chain._rpc import RevertError, Rpc, TxSender
from escrow.payments._escrow import AgentEscrow, Erc20
from escrow.payments._escrow_verify import (
    EscrowClaim,
    EscrowRejected,
    EscrowVerifier,
    GrantCache,
    accounts_for,
)
from escrow.payments._exact import ExactEvm
from escrow.payments._grants import (
    SignedGrant,
    SignedRevoke,
    deposit,
    relay_deposit,
    relay_grant,
    relay_revoke,
    sign_deposit_authorization,
    sign_deposit_permit,
    sign_grant_offline,
    sign_revoke_offline,
)
from escrow.payments._settler import EscrowSettler, encode_claim
from gateway import Asset, ExactScheme, MemoryStore, PaymentMiddleware, Settlement
from gateway._escrow_scheme import EscrowScheme
from tests.conftest import unavailable
from x402 import Eip712Domain, LocalSigner
from x402._escrow import (
    EscrowCode,
    EscrowPayload,
    GrantMessage,
    escrow_domain,
    payment_digest,
    sign_grant,
    sign_payment,
)
from x402._keccak import keccak256 as keccak
from x402.client import receipt_of
from x402.client_escrow import EscrowWallet, SessionKeyAuth

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

PRICE = 1_000  # $0.001
DEPOSIT = 10_000 * 10**6


@dataclass
class Env:
    rpc_url: str
    chain_id: int
    escrow: str
    usdc: str
    asset: Asset
    owner: LocalSigner  # the payer: an EOA whose key would stay offline
    relayer: str  # private keys below: each actor sends from its own account
    settler_a: str
    settler_b: str
    gateway_key: str

    def usdc_domain(self) -> Eip712Domain:
        return Eip712Domain(self.asset.name, self.asset.version, self.chain_id, self.usdc)


def _fund(rpc: Rpc, address: str) -> Any:
    return rpc.request("anvil_setBalance", [address, hex(10**21)])


@pytest.fixture(scope="module")
def env(devnet: DevnetState) -> Iterator[Env]:
    if devnet.backend != "anvil":
        unavailable("the escrow suite funds fresh accounts with anvil_setBalance")
    keys = [LocalSigner.random() for _ in range(5)]
    secrets = ["0x" + k._key.secret.hex() for k in keys]

    async def setup() -> tuple[str, LocalSigner]:
        rpc = Rpc(devnet.rpc_url)
        try:
            for key in keys:
                await _fund(rpc, key.address)
            escrow = await AgentEscrow.deploy(rpc, secrets[1], withdrawal_delay=900)
            owner = LocalSigner.random()
            await _fund(rpc, owner.address)
            owner_tx = TxSender(rpc, "0x" + owner._key.secret.hex(), chain_id=devnet.chain_id)
            usdc = Erc20(rpc, devnet.contracts["usdc"])
            await owner_tx.transact(
                usdc.address, usdc.abi.encode("mint", owner.address, 2 * DEPOSIT), gas=100_000
            )
            await deposit(escrow, owner_tx, usdc.address, DEPOSIT)
            return escrow.address, owner
        finally:
            await rpc.aclose()

    address, owner = asyncio.run(setup())
    asset = Asset(
        address=devnet.contracts["usdc"],
        chain_id=devnet.chain_id,
        name=devnet.usdc_name,
        version=devnet.usdc_version,
        decimals=devnet.usdc_decimals,
    )
    yield Env(
        rpc_url=devnet.rpc_url,
        chain_id=devnet.chain_id,
        escrow=address,
        usdc=devnet.contracts["usdc"],
        asset=asset,
        owner=owner,
        relayer=secrets[0],
        settler_a=secrets[2],
        settler_b=secrets[3],
        gateway_key=secrets[4],
    )


def _key(signer: LocalSigner) -> str:
    return "0x" + signer._key.secret.hex()


class Chain:
    """Per-test handles (an Rpc is bound to the test's event loop)."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.rpc = Rpc(env.rpc_url)
        self.escrow = AgentEscrow(self.rpc, env.escrow)
        self.usdc = Erc20(self.rpc, env.usdc)
        self.owner_tx = TxSender(self.rpc, _key(env.owner), chain_id=env.chain_id)
        self.relayer = TxSender(self.rpc, env.relayer, chain_id=env.chain_id)

    def sender(self, key: str) -> TxSender:
        return TxSender(self.rpc, key, chain_id=self.env.chain_id)

    async def new_grant(
        self,
        *,
        max_per_call: int = 10 * PRICE,
        budget: int = 1_000 * PRICE,
        payees: list[str] | None = None,
        valid_until: int | None = None,
        valid_after: int = 0,
    ) -> tuple[LocalSigner, GrantMessage]:
        """A fresh session key, granted by the owner offline and relayed by someone else."""
        session = LocalSigner.random()
        signed = sign_grant_offline(
            self.env.owner,
            chain_id=self.env.chain_id,
            escrow=self.env.escrow,
            signer=session.address,
            token=self.env.usdc,
            max_per_call=max_per_call,
            budget=budget,
            valid_after=valid_after,
            valid_until=valid_until or int(time.time()) + 86_400,
            payees=payees or [],
        )
        await relay_grant(self.escrow, self.relayer, signed)
        return session, signed.grant

    def sign(
        self, session: LocalSigner, g: GrantMessage, payee: str, amount: int = PRICE, *, nonce: int, **kw: Any
    ) -> EscrowPayload:
        return sign_payment(
            session,
            escrow_domain(self.env.chain_id, self.env.escrow),
            payer=g.payer,
            payee=payee,
            token=self.env.usdc,
            amount=amount,
            nonce=nonce,
            deadline=kw.get("deadline", int(time.time()) + 3600),
            epoch=kw.get("epoch", g.epoch),
        )

    async def aclose(self) -> None:
        await self.rpc.aclose()


@pytest.fixture
async def chain(env: Env) -> Any:
    c = Chain(env)
    yield c
    await c.aclose()


def payee() -> str:
    """A sub-agent's counterfactual smart-account address (not deployed: any fresh address)."""
    return LocalSigner.random().address


# ----------------------------------------------------------------------------------------- owner side


async def test_owner_signs_offline_someone_else_relays(chain: Chain, tmp_path: Path) -> None:
    env = chain.env
    session = LocalSigner.random()
    subs = [payee(), payee()]
    signed = sign_grant_offline(
        env.owner,
        chain_id=env.chain_id,
        escrow=env.escrow,
        signer=session.address,
        token=env.usdc,
        max_per_call=5 * PRICE,
        budget=50 * PRICE,
        valid_until=int(time.time()) + 3600,
        payees=subs,
    )
    signed.dump(tmp_path / "grant.json")  # the offline machine's output
    loaded = SignedGrant.load(tmp_path / "grant.json")
    assert loaded == signed
    receipt = await relay_grant(chain.escrow, chain.relayer, loaded)
    assert chain.relayer.address != env.owner.address and receipt.ok
    info = await chain.escrow.grant_of(env.owner.address, session.address)
    assert (info.epoch, info.budget, info.max_per_call, info.payee_count, info.spent) == (
        1,
        50 * PRICE,
        5 * PRICE,
        2,
        0,
    )
    assert await chain.escrow.is_payee_allowed(env.owner.address, session.address, subs[1])
    assert not await chain.escrow.is_payee_allowed(env.owner.address, session.address, payee())
    # A signed grant is single use: relaying it again fails on the epoch.
    with pytest.raises(RevertError):
        await relay_grant(chain.escrow, chain.relayer, loaded)
    # Our digest is the contract's.
    payment = chain.sign(session, loaded.grant, subs[0], nonce=7).payment
    assert await chain.escrow.hash_payment(payment) == payment_digest(
        escrow_domain(env.chain_id, env.escrow), payment
    )
    # Revocation, also signed offline and relayed.
    revoke = sign_revoke_offline(
        env.owner, chain_id=env.chain_id, escrow=env.escrow, signer=session.address, epoch=1
    )
    revoke.dump(tmp_path / "revoke.json")
    await relay_revoke(chain.escrow, chain.relayer, SignedRevoke.load(tmp_path / "revoke.json"))
    info = await chain.escrow.grant_of(env.owner.address, session.address)
    assert not info.live and info.epoch == 1


@pytest.mark.parametrize("revoke_first", [True, False])
async def test_signed_revoke_beats_a_presigned_renewal_in_either_relay_order(
    chain: Chain, tmp_path: Path, revoke_first: bool
) -> None:
    """Issue 9 item 8: the owner signed a renewal (epoch 2) that someone else holds, then revokes through 2.
    Whichever file a relayer submits first, the key ends revoked and its payments are refused."""
    env = chain.env
    session = LocalSigner.random()
    common: dict[str, Any] = {
        "chain_id": env.chain_id,
        "escrow": env.escrow,
        "signer": session.address,
        "token": env.usdc,
        "max_per_call": 5 * PRICE,
        "budget": 50 * PRICE,
        "valid_until": int(time.time()) + 3600,
    }
    await relay_grant(chain.escrow, chain.relayer, sign_grant_offline(env.owner, epoch=1, **common))
    sign_grant_offline(env.owner, epoch=2, **common).dump(tmp_path / "renewal.json")
    sign_revoke_offline(
        env.owner, chain_id=env.chain_id, escrow=env.escrow, signer=session.address, epoch=2
    ).dump(tmp_path / "revoke.json")
    renewal = SignedGrant.load(tmp_path / "renewal.json")
    revoke = SignedRevoke.load(tmp_path / "revoke.json")

    if revoke_first:
        await relay_revoke(chain.escrow, chain.relayer, revoke)
        stale = keccak(b"EscrowStaleEpoch(address,address,uint32,uint32)")[:4].hex()
        with pytest.raises(RevertError, match=stale):  # current epoch 2, renewal names 2
            await relay_grant(chain.escrow, chain.relayer, renewal)
    else:
        await relay_grant(chain.escrow, chain.relayer, renewal)
        await relay_revoke(chain.escrow, chain.relayer, revoke)
    info = await chain.escrow.grant_of(env.owner.address, session.address)
    assert not info.live and info.epoch == 2
    for epoch in (1, 2):
        reason, _ = await chain.escrow.check(
            chain.sign(session, renewal.grant, payee(), nonce=epoch, epoch=epoch)
        )
        assert reason != 0


def test_epochs_outside_uint32_are_refused_before_signing() -> None:
    owner = LocalSigner.random()
    for epoch in (0, 2**32):
        with pytest.raises(EscrowError) as info:
            sign_revoke_offline(owner, chain_id=1, escrow=owner.address, signer=owner.address, epoch=epoch)
        assert info.value.code == "invalid_epoch"


async def test_relayed_deposits(chain: Chain) -> None:
    env = chain.env
    funder = LocalSigner.random()
    minter = chain.sender(env.relayer)
    await minter.transact(env.usdc, chain.usdc.abi.encode("mint", funder.address, 5 * PRICE), gas=100_000)
    signed = sign_deposit_authorization(
        funder, env.usdc_domain(), escrow=env.escrow, amount=2 * PRICE, valid_before=int(time.time()) + 600
    )
    await relay_deposit(chain.escrow, chain.relayer, signed)
    permit = sign_deposit_permit(
        funder,
        env.usdc_domain(),
        escrow=env.escrow,
        amount=3 * PRICE,
        permit_nonce=0,
        deadline=int(time.time()) + 600,
    )
    await relay_deposit(chain.escrow, chain.relayer, permit)
    assert await chain.escrow.deposit_of(funder.address, env.usdc) == 5 * PRICE
    assert await chain.usdc.balance_of(funder.address) == 0


# ------------------------------------------------------------------------------------- what it cannot do


async def test_session_key_cannot_move_funds_any_other_way(chain: Chain) -> None:
    env = chain.env
    session, g = await chain.new_grant()
    escrow = chain.escrow
    await _fund(chain.rpc, session.address)

    async def call(data: bytes) -> None:
        await chain.rpc.call(escrow.address, data, sender=session.address)

    for data in (
        escrow.abi.encode("withdraw", env.usdc),
        escrow.abi.encode("requestWithdrawal", env.usdc, PRICE),
        escrow.abi.encode("withdrawOwed", env.usdc, session.address),
        escrow.abi.encode("grant", session.address, (env.usdc, 10**12, 10**12, 0, 2**32 - 1), []),
        escrow.abi.encode("revoke", session.address, 1),  # only touches the key's own (empty) grants
    ):
        try:
            await call(data)
        except RevertError:
            continue
        # revoke by the key is a no-op on the owner's grant; everything else must revert
        assert data[:4] == escrow.abi.functions["revoke"].selector
    # A grant "from" the owner signed by the session key is not the owner's signature.
    forged = GrantMessage(
        payer=env.owner.address,
        signer=session.address,
        token=env.usdc,
        max_per_call=10**12,
        budget=10**12,
        valid_after=0,
        valid_until=2**32 - 1,
        epoch=2,
    )
    sig = sign_grant(session, escrow_domain(env.chain_id, env.escrow), forged)
    with pytest.raises(RevertError):
        await call(
            escrow.abi.encode(
                "grantWithSig",
                forged.payer,
                forged.signer,
                (env.usdc, 10**12, 10**12, 0, 2**32 - 1),
                [],
                2,
                sig,
            )
        )
    info = await escrow.grant_of(env.owner.address, session.address)
    assert info.epoch == 1 and info.live and info.budget == g.budget


async def test_each_refusal_has_its_own_code(chain: Chain) -> None:
    env = chain.env
    allowed = payee()
    verifier = EscrowVerifier(
        chain.escrow, chain_id=env.chain_id, cache=GrantCache(chain.escrow, poll_interval=0)
    )
    now = time.time()

    async def refusal(payload: EscrowPayload, pay_to: str | None = None, amount: int | None = None) -> str:
        with pytest.raises(EscrowRejected) as info:
            await verifier.verify(
                payload,
                pay_to=pay_to or payload.payment.payee,
                amount=int(payload.payment.amount) if amount is None else amount,
                token=env.usdc,
                now=time.time(),
            )
        return info.value.code

    session, g = await chain.new_grant(max_per_call=5 * PRICE, budget=8 * PRICE, payees=[allowed])
    ok = chain.sign(session, g, allowed, 5 * PRICE, nonce=1)
    assert (
        await verifier.verify(ok, pay_to=allowed, amount=5 * PRICE, token=env.usdc, now=now)
    ).signer == session.address
    assert await refusal(chain.sign(session, g, allowed, 6 * PRICE, nonce=2)) == EscrowCode.AMOUNT_EXCEEDS_CAP
    assert await refusal(chain.sign(session, g, payee(), PRICE, nonce=3)) == EscrowCode.PAYEE_NOT_ALLOWED
    assert (
        await refusal(chain.sign(session, g, allowed, nonce=4, deadline=int(now) - 1))
        == EscrowCode.DEADLINE_EXPIRED
    )
    assert await refusal(chain.sign(session, g, allowed, nonce=5, epoch=2)) == EscrowCode.GRANT_NOT_FOUND
    assert await refusal(ok, pay_to=payee()) == EscrowCode.RECIPIENT_MISMATCH
    assert await refusal(ok, amount=PRICE) == EscrowCode.AMOUNT_MISMATCH
    forged = EscrowPayload(
        signature=ok.signature, payment=msgspec.structs.replace(ok.payment, amount=str(4 * PRICE))
    )
    assert await refusal(forged) in (EscrowCode.GRANT_NOT_FOUND, EscrowCode.INVALID_SIGNATURE)
    # Nonce used: settle one, present it again.
    settler = EscrowSettler(MemoryStore(), chain.sender(env.settler_a))
    claim = EscrowClaim(chain_id=env.chain_id, escrow=env.escrow, signer=session.address, payload=ok)
    assert (await settler.settle_now(claim))[1] == ""
    assert await refusal(ok) == EscrowCode.NONCE_USED
    # Budget: 5 of 8 spent; 4 more is over it (3 fits).
    assert await refusal(chain.sign(session, g, allowed, 4 * PRICE, nonce=6)) == EscrowCode.BUDGET_EXCEEDED
    # Expired grant (a window that already ended), and one not yet valid.
    s2, g2 = await chain.new_grant(valid_after=int(now) - 100, valid_until=int(now) - 10)
    assert await refusal(chain.sign(s2, g2, allowed, nonce=1)) == EscrowCode.GRANT_EXPIRED
    s3, g3 = await chain.new_grant(valid_after=int(now) + 10_000, valid_until=int(now) + 20_000)
    assert await refusal(chain.sign(s3, g3, allowed, nonce=1)) == EscrowCode.GRANT_NOT_YET_VALID
    # Revoked: seen by the next verification (poll_interval=0 here; one interval in general).
    s4, g4 = await chain.new_grant()
    p4 = chain.sign(s4, g4, allowed, nonce=1)
    await verifier.verify(p4, pay_to=allowed, amount=PRICE, token=env.usdc, now=time.time())
    await relay_revoke(
        chain.escrow,
        chain.relayer,
        sign_revoke_offline(env.owner, chain_id=env.chain_id, escrow=env.escrow, signer=s4.address, epoch=1),
    )
    assert await refusal(p4) == EscrowCode.GRANT_REVOKED
    # Another token than the grant's.
    other = msgspec.structs.replace(p4.payment, token=payee())
    assert await refusal(EscrowPayload(signature=p4.signature, payment=other)) == EscrowCode.TOKEN_MISMATCH


async def test_revocation_is_seen_within_one_poll_interval_from_the_cache(chain: Chain) -> None:
    env = chain.env
    sub = payee()
    ticks = [0.0]
    cache = GrantCache(chain.escrow, poll_interval=10.0, clock=lambda: ticks[0])
    verifier = EscrowVerifier(chain.escrow, chain_id=env.chain_id, cache=cache, simulate=False)
    session, g = await chain.new_grant()
    await verifier.verify(
        chain.sign(session, g, sub, nonce=1), pay_to=sub, amount=PRICE, token=env.usdc, now=time.time()
    )
    await revoke_offline(chain, session)
    ticks[0] = 10.0  # one poll interval later (the cache's own clock)
    with pytest.raises(EscrowRejected) as info:
        await verifier.verify(
            chain.sign(session, g, sub, nonce=2), pay_to=sub, amount=PRICE, token=env.usdc, now=time.time()
        )
    assert info.value.code == EscrowCode.GRANT_REVOKED


async def revoke_offline(chain: Chain, session: LocalSigner, epoch: int = 1) -> None:
    env = chain.env
    signed = sign_revoke_offline(
        env.owner, chain_id=env.chain_id, escrow=env.escrow, signer=session.address, epoch=epoch
    )
    await relay_revoke(chain.escrow, chain.relayer, signed)


# ------------------------------------------------------------------------------------------- the settler


def _item(store_key: str, claim: EscrowClaim, created_at: float | None = None) -> Settlement:
    p = claim.payload.payment
    return Settlement(
        key=store_key,
        kind="escrow",
        payload=encode_claim(claim),
        payer=p.payer,
        amount=int(p.amount),
        created_at=time.time() if created_at is None else created_at,
    )


async def test_same_payment_twice_or_by_two_settlers_pays_once(chain: Chain) -> None:
    env = chain.env
    sub = payee()
    session, g = await chain.new_grant()
    payloads = [chain.sign(session, g, sub, PRICE * (i + 1), nonce=1000 + i) for i in range(5)]
    claims = [
        EscrowClaim(chain_id=env.chain_id, escrow=env.escrow, signer=session.address, payload=p)
        for p in payloads
    ]
    # Two stores (two gateways that both accepted the same signed payments) and two settlers, at once.
    stores = [MemoryStore(), MemoryStore()]
    for store in stores:
        for i, claim in enumerate(claims):
            await store.enqueue(_item(f"k{i}", claim))
        await store.enqueue(_item("k0-again", claims[0]))  # and once more within one store
    settlers = [
        EscrowSettler(stores[0], chain.sender(env.settler_a)),
        EscrowSettler(stores[1], chain.sender(env.settler_b)),
    ]
    before = await chain.usdc.balance_of(sub)
    results = await asyncio.gather(*(s.drain() for s in settlers))
    paid = sum(int(p.payment.amount) for p in payloads)
    assert await chain.usdc.balance_of(sub) - before == paid
    outcomes = [o for batch in results for o in batch]
    assert len(outcomes) == 12
    assert {o.status for o in outcomes} <= {"settled", "settled_elsewhere"}
    assert sum(o.status == "settled" for o in outcomes) == 5  # each payment paid by exactly one transaction
    for store in stores:
        for key in ("k0", "k1", "k2", "k3", "k4", "k0-again"):
            item = await store.get_settlement(key)
            assert item is not None and item.state == "settled" and item.tx_hash
    # A nonce reused for a different payment: the second one is lost, and says so.
    store = MemoryStore()
    reused = chain.sign(session, g, payee(), PRICE, nonce=1000)
    await store.enqueue(
        _item(
            "reused",
            EscrowClaim(chain_id=env.chain_id, escrow=env.escrow, signer=session.address, payload=reused),
        )
    )
    (outcome,) = await EscrowSettler(store, chain.sender(env.settler_a)).drain()
    assert (outcome.status, outcome.code) == ("dead", EscrowCode.NONCE_REUSED)
    item = await store.get_settlement("reused")
    assert (
        item is not None and item.state == "dead" and (item.error or "").startswith(EscrowCode.NONCE_REUSED)
    )


async def test_settler_retries_when_the_chain_is_down(chain: Chain) -> None:
    env = chain.env
    sub = payee()
    session, g = await chain.new_grant()
    store = MemoryStore()
    claim = EscrowClaim(
        chain_id=env.chain_id,
        escrow=env.escrow,
        signer=session.address,
        payload=chain.sign(session, g, sub, nonce=1),
    )
    await store.enqueue(_item("k", claim))
    down = Rpc("http://127.0.0.1:9/")  # nothing listens there
    settler = EscrowSettler(store, TxSender(down, env.settler_a, chain_id=env.chain_id), retry_base=0.0)
    (outcome,) = await settler.drain()
    assert outcome.status == "retry" and outcome.code == "chain_unreachable"
    item = await store.get_settlement("k")
    assert item is not None and item.state == "failed" and item.retry_at is not None
    await down.aclose()
    (outcome,) = await EscrowSettler(store, chain.sender(env.settler_a)).drain()
    assert outcome.status == "settled"
    assert await chain.usdc.balance_of(sub) == PRICE


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    amounts=st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=12),
    duplicates=st.lists(st.integers(min_value=0, max_value=11), max_size=4),
    budget=st.integers(min_value=1, max_value=40),
)
async def test_settlement_never_pays_past_cap_or_budget_nor_twice(
    chain: Chain, amounts: list[int], duplicates: list[int], budget: int
) -> None:
    env = chain.env
    cap = 5
    subs = [payee(), payee()]
    session, g = await chain.new_grant(max_per_call=cap * PRICE, budget=budget * PRICE)
    payloads = [chain.sign(session, g, subs[i % 2], a * PRICE, nonce=i) for i, a in enumerate(amounts)]
    batch = payloads + [payloads[d] for d in duplicates if d < len(payloads)]
    store = MemoryStore()
    for i, p in enumerate(batch):
        claim = EscrowClaim(chain_id=env.chain_id, escrow=env.escrow, signer=session.address, payload=p)
        await store.enqueue(_item(f"k{i}", claim, created_at=float(i)))
    outcomes = await EscrowSettler(store, chain.sender(env.settler_a), batch_size=64).drain()
    # The model: in order, each distinct payment pays if within cap and what is left of the budget.
    left, expected = budget, [0, 0]
    for i, a in enumerate(amounts):
        if a <= cap and a <= left:
            left -= a
            expected[i % 2] += a * PRICE
    assert [await chain.usdc.balance_of(s) for s in subs] == expected
    codes = {o.code for o in outcomes if o.status == "dead"}
    assert codes <= {EscrowCode.AMOUNT_EXCEEDS_CAP, EscrowCode.BUDGET_EXCEEDED}
    paid = [o for o in outcomes if o.status == "settled"]
    assert sum(o.amount for o in paid) == sum(expected)  # duplicates reconcile as settled_elsewhere
    info = await chain.escrow.grant_of(env.owner.address, session.address)
    assert info.spent == sum(expected) <= budget * PRICE


# ---------------------------------------------------------------------------------------- through HTTP


class SubAgent:
    """One sub-agent: its own gateway (store, verifier, settler) in front of a Starlette app."""

    def __init__(
        self, chain: Chain, *, settler_key: str, credit_limit: int = 10**12, price: int = PRICE
    ) -> None:
        env = chain.env
        self.address = payee()
        self.store = MemoryStore()
        self.served = 0
        self.settler = EscrowSettler(self.store, chain.sender(settler_key), batch_size=32, max_age=3600)
        verifier = EscrowVerifier(
            chain.escrow, chain_id=env.chain_id, cache=GrantCache(chain.escrow, poll_interval=0.5)
        )
        self.scheme = EscrowScheme(verifier, self.store, self.settler, credit_limit=credit_limit)
        exact = ExactScheme(ExactEvm(chain.rpc, chain.sender(env.gateway_key)))

        async def work(request: Request) -> JSONResponse:
            self.served += 1
            return JSONResponse({"ok": True})

        app = Starlette(routes=[Route("/work", work)])
        self.app = PaymentMiddleware(
            app,
            routes={"GET /work": price},
            schemes=[exact, self.scheme],
            pay_to=self.address,
            asset=env.asset,
            store=self.store,
            settle="deferred",
        )

    def client(self, auth: httpx.Auth) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://sub", auth=auth
        )


def wallet(chain: Chain, session: LocalSigner, g: GrantMessage) -> EscrowWallet:
    return EscrowWallet.from_grant(session, g, chain_id=chain.env.chain_id, escrow=chain.env.escrow)


async def test_orchestrator_pays_200_calls_across_three_subagents(chain: Chain) -> None:
    env = chain.env
    subs = [SubAgent(chain, settler_key=k) for k in (env.settler_a, env.settler_b, env.gateway_key)]
    session, g = await chain.new_grant(
        max_per_call=PRICE, budget=500 * PRICE, payees=[s.address for s in subs]
    )
    auth = SessionKeyAuth(wallet(chain, session, g))
    clients = [s.client(auth) for s in subs]
    before = [await chain.usdc.balance_of(s.address) for s in subs]

    async def one(i: int) -> httpx.Response:
        return await clients[i % 3].get("/work")

    responses = []
    for start in range(0, 200, 25):  # 25 concurrent calls at a time
        responses += await asyncio.gather(*(one(i) for i in range(start, start + 25)))
    assert [r.status_code for r in responses] == [200] * 200
    assert all(receipt_of(r) is not None for r in responses)
    # MPP works too (same scheme, the `evm`/`charge` challenge with an escrow credential).
    mpp = SessionKeyAuth(wallet(chain, session, g), prefer=("mpp",))
    async with subs[0].client(mpp) as c:
        paid = await c.get("/work")
        assert paid.status_code == 200, paid.text
    for c in clients:
        await c.aclose()
    outcomes = [await s.settler.drain() for s in subs]
    for sub, out, was in zip(subs, outcomes, before, strict=True):
        assert {o.status for o in out} == {"settled"}
        assert await chain.usdc.balance_of(sub.address) - was == sub.served * PRICE
        assert all(n <= 32 for n, _ in sub.settler.batches) and len(sub.settler.batches) >= 3
        stats = await sub.store.stats()
        assert stats.settled == sub.served and stats.dead == 0
    assert sum(s.served for s in subs) == 201
    gas = sum(s.settler.gas_used for s in subs) / 201
    assert gas < 25_000, gas


async def test_fifty_concurrent_calls_cannot_overspend_the_budget(chain: Chain) -> None:
    env = chain.env
    sub = SubAgent(chain, settler_key=env.settler_a)
    session, g = await chain.new_grant(max_per_call=PRICE, budget=10 * PRICE)
    async with sub.client(SessionKeyAuth(wallet(chain, session, g))) as c:
        responses = await asyncio.gather(*(c.get("/work") for _ in range(50)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) == 10 and codes.count(402) == 40
    refused = [r for r in responses if r.status_code == 402]
    assert all(EscrowCode.BUDGET_EXCEEDED in (r.text + str(r.headers)) for r in refused)
    out = await sub.settler.drain()
    assert [o.status for o in out] == ["settled"] * 10
    assert await chain.usdc.balance_of(sub.address) == 10 * PRICE


async def test_revoked_between_verify_and_settle_is_reported_not_paid(chain: Chain) -> None:
    env = chain.env
    sub = SubAgent(chain, settler_key=env.settler_a)
    session, g = await chain.new_grant()
    async with sub.client(SessionKeyAuth(wallet(chain, session, g))) as c:
        assert [(await c.get("/work")).status_code for _ in range(3)] == [200] * 3
    await revoke_offline(chain, session)
    out = await sub.settler.drain()
    assert [(o.status, o.code) for o in out] == [("dead", EscrowCode.GRANT_REVOKED)] * 3
    assert await chain.usdc.balance_of(sub.address) == 0
    dead = await sub.store.dead_letters(kind="escrow")
    assert len(dead) == 3 and all((d.error or "").startswith(EscrowCode.GRANT_REVOKED) for d in dead)
    # The loss is visible, and the reservations are back (nothing pending against the payer).
    credit, reserved, _ = accounts_for(env.chain_id, env.escrow, g.payer, session.address, 1)
    assert await sub.store.get_pending(credit) == 0 and await sub.store.get_pending(reserved) == 0


async def test_two_gateways_racing_one_budget_lose_at_most_their_credit(chain: Chain) -> None:
    env = chain.env
    limit = 4 * PRICE
    a = SubAgent(chain, settler_key=env.settler_a, credit_limit=limit)
    b = SubAgent(chain, settler_key=env.settler_b, credit_limit=limit)
    session, g = await chain.new_grant(max_per_call=PRICE, budget=10 * PRICE)
    auth = SessionKeyAuth(wallet(chain, session, g))
    served = {"a": 0, "b": 0}
    async with a.client(auth) as ca, b.client(auth) as cb:
        # A serves on credit; B serves on credit too, then settles before serving once past its limit,
        # draining the budget that A's unsettled calls were counting on.
        for _ in range(4):
            served["a"] += (await ca.get("/work")).status_code == 200
        for _ in range(8):
            served["b"] += (await cb.get("/work")).status_code == 200
    out_b = await b.settler.drain()  # B's batch lands first ...
    out_a = await a.settler.drain()  # ... so A's unsettled calls find the budget spent
    got_a, got_b = [await chain.usdc.balance_of(s.address) for s in (a, b)]
    assert got_a + got_b <= 10 * PRICE  # the escrow never pays past the budget
    lost_a = served["a"] * PRICE - got_a
    lost_b = served["b"] * PRICE - got_b
    assert 0 <= lost_a <= limit and 0 <= lost_b <= limit
    assert lost_a > 0  # A lost the race ...
    dead = await a.store.dead_letters(kind="escrow")
    assert sum(d.amount for d in dead) == lost_a  # ... and says so, with the code
    assert all((d.error or "").startswith(EscrowCode.BUDGET_EXCEEDED) for d in dead)
    assert {o.code for o in out_a if o.status == "dead"} == {EscrowCode.BUDGET_EXCEEDED}
    assert all(o.status == "settled" for o in out_b)


async def test_a_replayed_payment_is_served_once(chain: Chain) -> None:
    sub = SubAgent(chain, settler_key=chain.env.settler_a)
    session, g = await chain.new_grant()
    async with sub.client(SessionKeyAuth(wallet(chain, session, g))) as c:
        paid = await c.get("/work")
    assert paid.status_code == 200
    header = {"PAYMENT-SIGNATURE": paid.request.headers["PAYMENT-SIGNATURE"]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sub.app), base_url="http://sub") as raw:
        again = await asyncio.gather(*(raw.get("/work", headers=header) for _ in range(5)))
    assert [r.status_code for r in again] == [402] * 5 and sub.served == 1
    (outcome,) = await sub.settler.drain()
    assert outcome.status == "settled" and await chain.usdc.balance_of(sub.address) == PRICE
    credit, reserved, settled = accounts_for(
        chain.env.chain_id, chain.env.escrow, g.payer, session.address, 1
    )
    assert [await sub.store.get_pending(a) for a in (credit, reserved, settled)] == [0, PRICE, PRICE]
