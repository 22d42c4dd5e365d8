"""MPP sessions paid from an orchestrator's smart account (real anvil, real AgentAccount and AgentChannels).

The owner key signs during the offline setup only (it is wrapped in a signer that counts its signatures);
afterwards the session key opens the channel (a session-key user operation sent by a bundler, or an
`openWithAuthorization` the owner signed in advance and a relayer sends), signs one voucher per call, tops
up, and the payee closes with the final voucher. Balances are checked to the base unit.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from escrow import (
    AccountChannelOpener,
    AgentAccount,
    AuthorizationChannelOpener,
    Bundler,
    Call,
    Chain,
    DevnetState,
    Erc20,
    PresignedChannelOpener,
    RevertError,
    SignedChannelOpen,
    SignedChannelTopUp,
    SignedSessionKeyInstall,
    TxSender,
    UserOpRejected,
    channel_session_calls,
    channel_session_policy,
    relay_channel_open,
    relay_channel_top_up,
    sign_channel_open,
    sign_channel_top_up,
    sign_session_key_install_offline,
)
from escrow.accounts._userop import SessionPolicyKind
from escrow.chain._abi import ContractAbi
from escrow.chain._artifacts import EscrowError
from escrow.payments._escrow import deploy_contract, escrow_artifact
from examples.subagent import build_app, with_sessions
from gateway import SessionPaywall, SessionRoute, charge
from tests.test_readme import _balance as _readme_balance
from tests.test_readme import _serve, blocks, workdir  # noqa: F401  (the fixture)
from x402 import Eip712Domain, LocalSigner, SpendPolicyViolation
from x402.client_session import SessionClient

pytestmark = [pytest.mark.chain]

UNIT = 10  # base units per metered unit; a call reserves 100 units at most (1,000)
FUNDS = 50_000  # USDC base units the account holds
DEPOSIT = 4_000
TOP_UP = 3_000


class CountingSigner(LocalSigner):
    """The owner key: counts what it signs, so a test can show it was not used after the setup."""

    signatures = 0

    def sign_hash(self, digest: bytes) -> bytes:
        type(self).signatures += 1
        return super().sign_hash(digest)


def _app() -> Starlette:
    async def meter(request: Request) -> JSONResponse:
        units = int(request.query_params.get("units", "1"))
        charge(request, units * UNIT)
        return JSONResponse({"units": units})

    return Starlette(routes=[Route("/meter", meter, methods=["GET", "POST"])])


@dataclass
class World:
    chain: Chain
    relayer: TxSender
    bundler: Bundler
    owner: CountingSigner
    key: LocalSigner
    account: AgentAccount
    channels: str
    payee: str
    usdc: Erc20
    http: httpx.AsyncClient
    paywall: SessionPaywall

    async def balance(self, who: str) -> int:
        return await self.usdc.balance_of(who)

    def domain(self, chain_id: int | None = None) -> Eip712Domain:
        d = self.chain.network.token_domain
        return Eip712Domain(d.name, d.version, chain_id or d.chain_id, d.verifying_contract)


async def _fresh(chain: Chain, wei: int = 10**20) -> str:
    key = "0x" + os.urandom(32).hex()
    await chain.rpc.request("anvil_setBalance", [LocalSigner(key).address, hex(wei)])
    return key


@asynccontextmanager
async def world(devnet: DevnetState, *, fee_payer: bool = False) -> AsyncIterator[World]:
    chain = Chain.from_devnet(devnet)
    try:
        relayer = TxSender(chain.rpc, await _fresh(chain), chain_id=devnet.chain_id)
        payee_key = await _fresh(chain)
        owner = CountingSigner.random()
        account = await AgentAccount.counterfactual(
            chain.rpc,
            factory=devnet.contracts["account_factory"],
            owner=owner.address,
            salt=int.from_bytes(os.urandom(8), "big"),
        )
        await chain.rpc.request("anvil_setBalance", [account.address, hex(10**18)])  # reimburses the bundler
        usdc = chain.token
        await relayer.transact(usdc.address, usdc.abi.encode("mint", account.address, FUNDS), gas=100_000)
        await account.deploy(relayer)  # anyone may: the owner is in the CREATE2 salt
        paywall = SessionPaywall.on_chain(
            _app(),
            chain,
            channels=devnet.contracts["channels"],
            payee_key=payee_key,
            routes={"/meter": SessionRoute(unit_price=UNIT, units=100, metered=True)},
            secret=b"k" * 32,
            fee_payer=fee_payer,
        )
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=paywall), base_url="http://sub-agent"
        ) as http:
            yield World(
                chain=chain,
                relayer=relayer,
                bundler=Bundler(chain.rpc, relayer, chain_id=devnet.chain_id),
                owner=owner,
                key=LocalSigner.random(),
                account=account,
                channels=devnet.contracts["channels"],
                payee=paywall.pay_to,
                usdc=usdc,
                http=http,
                paywall=paywall,
            )
    finally:
        await chain.aclose()


async def _install(w: World, *, payees: list[str], tmp_path: Path) -> None:
    """The offline setup: the owner signs the key's policy into a file; a relayer installs it."""
    now = await w.chain.rpc.block_timestamp()  # chain time: other suites may have moved it
    policy = channel_session_policy(
        channels=w.channels,
        token=w.usdc.address,
        payees=payees,
        max_deposit=DEPOSIT,
        key=w.key.address,
        valid_until=now + 3600,
        max_uses=10,
    )
    file = tmp_path / "install.json"
    sign_session_key_install_offline(
        w.owner,
        chain_id=w.chain.network.chain_id,
        account=w.account.address,
        key=w.key.address,
        policy=policy,
        deadline=now + 600,
    ).dump(file)
    await w.account.relay_install(SignedSessionKeyInstall.load(file), w.relayer)


async def _calls(client: SessionClient, units: list[int], *, before: int = 0) -> int:
    """Pay one call per entry of `units`; the receipts' `spent` is cumulative over the channel."""
    charged = before
    for n in units:
        r = await client.request("GET", f"/meter?units={n}")
        assert r.status_code == 200, r.text
        charged += n * UNIT
        assert client.receipts[-1].spent == str(charged)
    return charged - before


@pytest.mark.anyio
async def test_session_key_opens_tops_up_and_closes_from_the_account(
    devnet: DevnetState, tmp_path: Path
) -> None:
    async with world(devnet) as w:
        await _install(w, payees=[w.payee], tmp_path=tmp_path)
        signed_by_owner = CountingSigner.signatures
        opener = AccountChannelOpener(w.account, w.key, bundler=w.bundler)
        client = SessionClient(
            w.http, signer=w.key, opener=opener, deposit=DEPOSIT, max_voucher_step=100 * UNIT
        )
        payee_before = await w.balance(w.payee)

        charged = await _calls(client, [i % 7 for i in range(12)] + [100, 100, 100])
        ch = client.channel("/meter")
        assert ch is not None
        info = await w.paywall.chain.channel(ch.channel)
        # the account is the payer, the session key signs the vouchers; the relayer sent the transaction
        assert (info.payer.lower(), info.authorized_signer.lower()) == (
            w.account.address.lower(),
            w.key.address.lower(),
        )
        assert (info.deposit, info.settled) == (DEPOSIT, 0)
        assert await w.balance(w.account.address) == FUNDS - DEPOSIT

        # the next call's maximum no longer fits in the deposit: refused before anything is signed
        with pytest.raises(SpendPolicyViolation):
            await client.request("GET", "/meter?units=1")
        receipt = await client.top_up("/meter", TOP_UP)
        assert receipt is not None and receipt.channel_id == ch.channel
        assert (await w.paywall.chain.channel(ch.channel)).deposit == DEPOSIT + TOP_UP
        charged += await _calls(client, [5, 0, 9], before=charged)

        before_close = await w.balance(w.account.address)
        closed = await client.close("/meter")
        assert closed is not None and closed.tx_hash and closed.spent == str(charged)
        # the refund is both deposits less exactly what was charged
        assert await w.balance(w.account.address) - before_close == DEPOSIT + TOP_UP - charged
        # the payee got exactly the charges; the account got the rest of both deposits back
        assert await w.balance(w.payee) - payee_before == charged
        assert await w.balance(w.account.address) == FUNDS - charged
        assert await w.balance(w.channels) >= 0
        final = await w.paywall.chain.channel(ch.channel)
        assert final.finalized and final.settled == charged
        # two user operations (open, top-up) and not one owner signature since the setup
        assert len(opener.operations) == 2
        assert CountingSigner.signatures == signed_by_owner


@pytest.mark.anyio
async def test_a_key_whose_policy_does_not_allow_the_open_is_refused(
    devnet: DevnetState, tmp_path: Path
) -> None:
    async with world(devnet) as w:
        other_payee = LocalSigner.random().address
        await _install(w, payees=[other_payee], tmp_path=tmp_path)  # not this sub-agent
        client = SessionClient(
            w.http,
            signer=w.key,
            opener=AccountChannelOpener(w.account, w.key, bundler=w.bundler),
            deposit=DEPOSIT,
            max_voucher_step=100 * UNIT,
        )
        with pytest.raises(UserOpRejected) as refused:
            await client.request("GET", "/meter?units=1")
        assert refused.value.violation is not None
        assert refused.value.violation.policy == SessionPolicyKind.ARGUMENT

        def open_calls(**kw: object) -> list[Call]:
            args: dict[str, object] = {
                "channels": w.channels,
                "token": w.usdc.address,
                "amount": DEPOSIT,
                "payee": other_payee,
                "salt": "0x" + os.urandom(32).hex(),
                "signer": w.key.address,
            }
            return channel_session_calls(**{**args, **kw})

        key = AccountChannelOpener(w.account, w.key, bundler=w.bundler).key
        abi = ContractAbi(escrow_artifact("AgentChannels").abi)
        refusals = {
            "another voucher signer": open_calls(signer=LocalSigner.random().address),
            "above the cap": open_calls(amount=DEPOSIT + 1),
            "another token": [
                open_calls()[0],
                Call(
                    w.channels,
                    0,
                    abi.encode(
                        "open", other_payee, w.relayer.address, DEPOSIT, bytes(32), w.key.address, [], []
                    ),
                ),
            ],
            "a transfer": [Call(w.usdc.address, 0, w.usdc.abi.encode("transfer", w.key.address, 1))],
        }
        for what, calls in refusals.items():
            with pytest.raises(UserOpRejected) as refused:
                await w.account.execute(calls, signer=key, bundler=w.bundler, call_gas_limit=500_000)
            assert refused.value.violation is not None, what
            assert refused.value.violation.policy in (SessionPolicyKind.ARGUMENT, SessionPolicyKind.CALL), (
                what
            )
        # splits would divert the payee's share: an `open` with splits fails the pinned-empty-array rules
        with_splits = abi.encode(
            "open", other_payee, w.usdc.address, DEPOSIT, bytes(32), w.key.address, [w.key.address], [9_000]
        )
        with pytest.raises(UserOpRejected) as refused:
            await w.account.execute(
                [open_calls()[0], Call(w.channels, 0, with_splits)],
                signer=key,
                bundler=w.bundler,
                call_gas_limit=500_000,
            )
        assert refused.value.violation is not None
        assert refused.value.violation.policy == SessionPolicyKind.ARGUMENT
        assert await w.balance(w.account.address) == FUNDS  # nothing left the account


@pytest.mark.anyio
async def test_owner_signed_open_is_relayed_and_cannot_be_replayed(
    devnet: DevnetState, tmp_path: Path
) -> None:
    async with world(devnet) as w:
        domain, now = w.domain(), await w.chain.rpc.block_timestamp()
        salt = "0x" + os.urandom(32).hex()
        # offline: the owner signs the open and one top-up of a channel it has computed the id of
        signed = sign_channel_open(
            w.owner,
            domain,
            channels=w.channels,
            payee=w.payee,
            deposit=DEPOSIT,
            salt=salt,
            authorized_signer=w.key.address,
            valid_before=now + 3600,
            account=w.account.address,
        )
        top_up = sign_channel_top_up(
            w.owner,
            domain,
            channels=w.channels,
            channel=signed.channel_id,
            amount=TOP_UP,
            valid_before=now + 3600,
            account=w.account.address,
        )
        signed.dump(tmp_path / "open.json")
        top_up.dump(tmp_path / "top-up.json")

        # the same open, signed for another chain: the client refuses to relay it, and the token refuses it
        # if the file is forged to name this chain
        elsewhere = sign_channel_open(
            w.owner,
            w.domain(chain_id=domain.chain_id + 1),
            channels=w.channels,
            payee=w.payee,
            deposit=DEPOSIT,
            salt=salt,
            authorized_signer=w.key.address,
            valid_before=now + 3600,
            account=w.account.address,
        )
        signed_by_owner = CountingSigner.signatures  # the owner is offline from here on
        with pytest.raises(EscrowError):
            await relay_channel_open(w.relayer, elsewhere)
        forged = SignedChannelOpen(**{**_fields(elsewhere), "chain_id": domain.chain_id})
        with pytest.raises(RevertError):
            await relay_channel_open(w.relayer, forged)
        # on another channel: another salt, signer or payee (the nonce is the channel's terms) ...
        for change in (
            {"salt": "0x" + os.urandom(32).hex()},
            {"authorized_signer": w.owner.address},
            {"payee": w.relayer.address},
        ):
            with pytest.raises(RevertError):
                await relay_channel_open(w.relayer, SignedChannelOpen(**{**_fields(signed), **change}))
        # ... or another channels contract (only the contract the payer named may redeem it)
        second = await deploy_contract(
            w.chain.rpc, devnet.deployer.private_key, escrow_artifact("AgentChannels")
        )
        with pytest.raises(RevertError):
            await relay_channel_open(w.relayer, SignedChannelOpen(**{**_fields(signed), "channels": second}))
        assert await w.balance(w.account.address) == FUNDS

        # the relayer sends the real one: the payer sends no transaction
        await relay_channel_open(w.relayer, SignedChannelOpen.load(tmp_path / "open.json"))
        with pytest.raises(RevertError):  # the same authorization twice
            await relay_channel_open(w.relayer, signed)
        assert await w.balance(w.account.address) == FUNDS - DEPOSIT

        client = SessionClient(
            w.http, signer=w.key, opener=_NoOpener(), deposit=DEPOSIT, max_voucher_step=100 * UNIT
        )
        client.adopt(
            channel=signed.channel_id,
            payee=w.payee,
            escrow=w.channels,
            token=w.usdc.address,
            chain_id=domain.chain_id,
            deposit=DEPOSIT,
        )
        payee_before = await w.balance(w.payee)
        charged = await _calls(client, [3, 100, 100, 100])  # 3,030: the next maximum no longer fits
        # the top-up is bound to this channel: relayed for another one it is refused
        with pytest.raises(RevertError):
            await relay_channel_top_up(
                w.relayer, SignedChannelTopUp(**{**_fields(top_up), "channel_id": "0x" + "11" * 32})
            )
        receipt = await relay_channel_top_up(w.relayer, SignedChannelTopUp.load(tmp_path / "top-up.json"))
        await client.top_up("/meter", TOP_UP, hash=receipt.transaction_hash)
        with pytest.raises(RevertError):
            await relay_channel_top_up(w.relayer, top_up)
        charged += await _calls(client, [7, 100, 100, 1], before=charged)
        closed = await client.close("/meter")
        assert closed is not None and closed.spent == str(charged)
        assert await w.balance(w.payee) - payee_before == charged
        assert await w.balance(w.account.address) == FUNDS - charged
        assert CountingSigner.signatures == signed_by_owner


@pytest.mark.anyio
async def test_the_gateway_relays_the_owner_signed_open_and_top_up_of_the_account(
    devnet: DevnetState, tmp_path: Path
) -> None:
    async with world(devnet, fee_payer=True) as w:
        domain, now = w.domain(), await w.chain.rpc.block_timestamp()
        terms = {"channels": w.channels, "valid_before": now + 3600, "account": w.account.address}
        signed = sign_channel_open(
            w.owner,
            domain,
            payee=w.payee,
            deposit=DEPOSIT,
            salt="0x" + os.urandom(32).hex(),
            authorized_signer=w.key.address,
            **terms,
        )
        top_up = sign_channel_top_up(w.owner, domain, channel=signed.channel_id, amount=TOP_UP, **terms)
        signed.dump(tmp_path / "open.json")
        top_up.dump(tmp_path / "top-up.json")
        signed_by_owner = CountingSigner.signatures  # the owner is offline from here on
        opener = PresignedChannelOpener(
            SignedChannelOpen.load(tmp_path / "open.json"),
            [SignedChannelTopUp.load(tmp_path / "top-up.json")],
        )
        client = SessionClient(
            w.http, signer=w.key, opener=opener, deposit=DEPOSIT, max_voucher_step=100 * UNIT
        )
        payee_before = await w.balance(w.payee)
        charged = await _calls(client, [3, 100, 100, 100])  # the first 402 opens the file's channel
        assert client.channel("/meter") is not None and client.channel("/meter").channel == signed.channel_id
        await client.top_up("/meter", TOP_UP)  # relayed by the gateway from the owner's file
        charged += await _calls(client, [7, 100, 100, 1], before=charged)
        closed = await client.close("/meter")
        assert closed is not None and closed.spent == str(charged)
        assert await w.balance(w.payee) - payee_before == charged
        assert await w.balance(w.account.address) == FUNDS - charged
        assert len(w.paywall.relay_transactions) == 2 and CountingSigner.signatures == signed_by_owner


@pytest.mark.anyio
async def test_a_payer_with_no_gas_opens_and_tops_up_through_a_relayer(devnet: DevnetState) -> None:
    async with world(devnet) as w:
        payer = LocalSigner.random()  # holds USDC and no ETH: it never sends a transaction
        await w.relayer.transact(w.usdc.address, w.usdc.abi.encode("mint", payer.address, FUNDS), gas=100_000)
        opener = AuthorizationChannelOpener(w.relayer, payer, w.domain())
        client = SessionClient(
            w.http, signer=w.key, opener=opener, deposit=DEPOSIT, max_voucher_step=100 * UNIT
        )
        payee_before = await w.balance(w.payee)
        charged = await _calls(client, [100, 100, 100, 2])
        await client.top_up("/meter", TOP_UP)
        charged += await _calls(client, [100, 4], before=charged)
        closed = await client.close("/meter")
        assert closed is not None and closed.spent == str(charged)
        assert await w.balance(w.payee) - payee_before == charged
        assert await w.balance(payer.address) == FUNDS - charged
        assert await w.chain.rpc.request("eth_getTransactionCount", [payer.address, "latest"]) == "0x0"
        assert await w.chain.rpc.get_balance(payer.address) == 0
        assert opener.gas > 0  # paid by the relayer


def _fields(signed: SignedChannelOpen | SignedChannelTopUp) -> dict[str, object]:
    return {name: getattr(signed, name) for name in signed.__struct_fields__}


class _NoOpener:
    """The channel was opened from a file: the client must never open or top up by itself."""

    payer = "0x" + "00" * 20

    async def open(self, **kw: object) -> str:
        raise AssertionError("the channel is already open")

    async def top_up(self, **kw: object) -> str:
        raise AssertionError("top-ups are relayed from the owner's files")


@pytest.mark.usefixtures("workdir")  # a fresh directory holding .agentpay/devnet.json, as a user has
def test_readme_session_block_runs_against_the_example_sub_agent(
    devnet: DevnetState, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's smart-account session block, as a user runs it, against `examples.subagent`."""
    (block,) = [b for b in blocks("python") if "AccountChannelOpener" in b]
    payee = devnet.accounts[2]
    chain = Chain.from_devnet(devnet)
    app = with_sessions(
        build_app(chain, pay_to=payee.address, store="memory://"),
        chain,
        channels=devnet.contracts["channels"],
        payee_key=payee.private_key,
        secret="r" * 64,
    )
    before = _readme_balance(devnet, payee.address)
    server, thread, url = _serve(app)
    try:
        pointed = block.replace("http://127.0.0.1:8402", url)
        assert pointed != block
        exec(compile(pointed, "README.md (smart-account session)", "exec"), {"__name__": "readme_session"})
        printed = capsys.readouterr().out
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert "paid 800 over channel 0x" in printed, printed
    assert _readme_balance(devnet, payee.address) - before == 800
