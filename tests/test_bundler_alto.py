"""The standard ERC-4337 rails on anvil with a real bundler (Alto from npm) and `AgentPaymaster`.

Session-key operations go through `eth_sendUserOperation`; an operation outside its key's policy is refused by
the bundler's own simulation and reported with the policy's name; sixteen operations on sixteen nonce lanes
land concurrently; an account holding no ETH pays its gas in USDC, and every balance moves by exactly what the
receipts say. The same sponsored flow runs through our self-bundler, with the same results.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import msgspec
import pytest
from eth_abi.abi import decode as abi_decode
from eth_account import Account
from eth_utils.crypto import keccak
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from escrow import DevnetState
from escrow.accounts._account import AgentAccount, ArgRule, CallPermission, SessionPolicy
from escrow.accounts._bundler_rpc import BundlerRpc, user_op_to_json
from escrow.accounts._paymaster import PaymasterRpc, SponsorService, paymaster_deposit, sponsored_spent
from escrow.accounts._self_bundler import Bundler as SelfBundler
from escrow.accounts._self_bundler import UserOpResult
from escrow.accounts._signers import OwnerKey, SessionKey
from escrow.accounts._userop import AccountError, Call, SessionPolicyKind, UserOpRejected
from escrow.chain._rpc import Rpc
from escrow.devnet._bundler import BundlerProcess, start_alto
from gateway._paymaster_app import paymaster_app
from tests.conftest import unavailable
from tests.test_account_env import ETH, AccountEnv, account_env, calldata
from x402 import LocalSigner

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

PRICE = 3_000 * 10**6  # USDC units per ETH, as the sponsor signs it
CAP = 5 * 10**6
_SPONSORED = "0x" + keccak(text="UserOperationSponsored(bytes32,address,uint256,uint256)").hex()
_CHARGED = "0x" + keccak(text="SponsoredGasCharged(bytes32,address,uint256,uint256)").hex()


@pytest.fixture(scope="module")
def alto(devnet: DevnetState) -> Iterator[BundlerProcess]:
    if devnet.backend != "anvil":
        unavailable("Alto runs against anvil")
    executor = Account.create()
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "anvil_setBalance",
        "params": [executor.address, hex(10**22)],
    }
    httpx.post(devnet.rpc_url, json=body, timeout=10).raise_for_status()
    bundler = start_alto(devnet.rpc_url, executor_key="0x" + bytes(executor.key).hex())
    try:
        yield bundler
    finally:
        bundler.stop()
    assert bundler.proc.poll() is not None, "no bundler left running"


@dataclass
class Rails:
    env: AccountEnv
    alto: BundlerRpc
    sponsor: SponsorService
    paymaster: str
    usdc: str

    async def usdc_of(self, who: str) -> int:
        value: int = await self.env.call(self.usdc, "balanceOf(address)", who)
        return value


@asynccontextmanager
async def rails(devnet: DevnetState, alto: BundlerProcess) -> AsyncIterator[Rails]:
    async with account_env(devnet) as env:
        client = BundlerRpc(alto.url, chain_id=devnet.chain_id, node=env.rpc)
        try:
            paymaster = devnet.contracts["paymaster"]
            sponsor = SponsorService(
                paymaster=paymaster,
                signer=LocalSigner(devnet.deployer.private_key),
                chain_id=devnet.chain_id,
                spend_limit=ETH // 10,
            )
            yield Rails(env, client, sponsor, paymaster, devnet.contracts["usdc"])
        finally:
            await client.aclose()


def usdc_policy(r: Rails, payee: str, **limits: int) -> SessionPolicy:
    return SessionPolicy(
        permissions=(
            CallPermission.to(
                r.usdc, "transfer(address,uint256)", ArgRule.one_of(0, [payee]), ArgRule.less_or_equal(1, CAP)
            ),
        ),
        gas_budget=ETH,
        **limits,
    )


def transfer(r: Rails, to: str, amount: int) -> Call:
    return Call(r.usdc, 0, calldata("transfer(address,uint256)", to, amount))


async def funded_account_with_key(r: Rails, payee: str) -> tuple[AgentAccount, OwnerKey, SessionKey]:
    account, owner = await r.env.new_account()
    await r.env.transact(r.usdc, "mint(address,uint256)", account.address, 1_000 * 10**6)
    key = SessionKey(LocalSigner.random())
    await account.install_session_key(key.address, usdc_policy(r, payee), owner=owner, bundler=r.alto)
    return account, owner, key


# ---------------------------------------------------------------------------------------------- bundler RPC


async def test_session_key_operation_lands_through_eth_send_user_operation(
    devnet: DevnetState, alto: BundlerProcess
) -> None:
    async with rails(devnet, alto) as r:
        assert await r.alto.supported_entry_points() == [devnet.contracts["entrypoint"]]
        payee = LocalSigner.random().address
        account, _owner, key = await funded_account_with_key(r, payee)
        result = await account.execute([transfer(r, payee, CAP)], signer=key, bundler=r.alto)
        assert result.success and result.sender == account.address
        assert await r.usdc_of(payee) == CAP
        by_hash = await r.alto.get_user_operation_by_hash(result.user_op_hash)
        assert by_hash is not None and by_hash["transactionHash"] == result.tx_hash
        receipt = await r.alto.get_user_operation_receipt(result.user_op_hash)
        assert receipt is not None and int(receipt["actualGasCost"], 16) == result.actual_gas_cost
        assert by_hash["userOperation"]["sender"] == account.address


async def test_operation_outside_the_policy_is_refused_by_the_bundlers_simulation(
    devnet: DevnetState, alto: BundlerProcess
) -> None:
    async with rails(devnet, alto) as r:
        payee, other = LocalSigner.random().address, LocalSigner.random().address
        account, _owner, key = await funded_account_with_key(r, payee)
        before = await account.lanes.next_nonce(0)
        # refused while the bundler estimates it (eth_estimateUserOperationGas)
        with pytest.raises(UserOpRejected) as info:
            await account.execute([transfer(r, payee, CAP + 1)], signer=key, bundler=r.alto)
        err = info.value
        assert err.violation is not None and err.violation.policy == SessionPolicyKind.ARGUMENT
        assert (err.violation.key, err.violation.rule_index) == (key.address, 1)
        assert err.code == "session_argument_rule" and err.reason.startswith("AA23")
        # refused by eth_sendUserOperation itself: gas of an allowed twin, a payee outside the allow-list
        good = await account.prepare([transfer(r, payee, 1)], signer=key, nonce=before, bundler=r.alto)
        bad = msgspec.structs.replace(
            good,
            call_data=good.call_data.replace(
                bytes.fromhex(payee[2:].lower()), bytes.fromhex(other[2:].lower())
            ),
        )
        bad = bad.signed(key, chain_id=r.env.chain_id, timestamp=await r.env.now())
        with pytest.raises(UserOpRejected) as info:
            await r.alto.send_user_operation(bad)
        err = info.value
        assert err.violation is not None and err.violation.policy == SessionPolicyKind.ARGUMENT
        assert err.violation.rule_index == 0 and err.code == "session_argument_rule"
        assert "argument rule 0" in str(err)
        assert await account.lanes.next_nonce(0) == before, "nothing consumed a nonce"
        assert await r.usdc_of(other) == 0


async def test_sixteen_operations_on_sixteen_lanes_land_concurrently(
    devnet: DevnetState, alto: BundlerProcess
) -> None:
    async with rails(devnet, alto) as r:
        account, owner = await r.env.new_account()
        key = SessionKey(LocalSigner.random())
        payees = [LocalSigner.random().address for _ in range(16)]
        policy = SessionPolicy(
            permissions=tuple(CallPermission.plain_transfer(p, value_limit=ETH) for p in payees),
            max_uses=16,
            gas_budget=ETH,
        )
        await account.install_session_key(key.address, policy, owner=owner, bundler=r.alto)
        results = await asyncio.gather(
            *(account.execute([Call(p, 1000 + i)], signer=key, bundler=r.alto) for i, p in enumerate(payees))
        )
        assert all(res.success for res in results)
        assert len({res.nonce >> 64 for res in results}) == 16, "every operation had a lane of its own"
        for i, p in enumerate(payees):
            assert await r.env.rpc.get_balance(p) == 1000 + i
        assert (await account.session_key(key.address)).uses == 16


# ---------------------------------------------------------------------------------------------- paymaster


async def _receipt_logs(rpc: Rpc, result: UserOpResult, topic: str) -> list[tuple[str, bytes]]:
    receipt = await rpc.get_receipt(result.tx_hash)
    assert receipt is not None
    return [
        (log.topics[1], bytes.fromhex(log.data[2:]))
        for log in receipt.logs
        if log.topics and log.topics[0] == topic and log.topics[1] == result.user_op_hash
    ]


@pytest.mark.parametrize("through", ["alto", "self-bundler"])
async def test_account_with_no_eth_pays_gas_in_the_token(
    devnet: DevnetState, alto: BundlerProcess, through: str
) -> None:
    async with rails(devnet, alto) as r:
        bundler = r.alto if through == "alto" else r.env.bundler
        assert isinstance(bundler, BundlerRpc | SelfBundler)
        owner = OwnerKey(LocalSigner.random())
        account = await AgentAccount.counterfactual(r.env.rpc, factory=r.env.factory, owner=owner.address)
        await r.env.transact(r.usdc, "mint(address,uint256)", account.address, 100 * 10**6)
        payee = LocalSigner.random().address
        key = SessionKey(LocalSigner.random())

        # 1. verifying mode: the sponsor deploys the account; it approves the paymaster, installs its key
        deposit = await paymaster_deposit(r.env.rpc, r.paymaster)
        approve = Call(r.usdc, 0, calldata("approve(address,uint256)", r.paymaster, 2**256 - 1))
        setup = await account.execute(
            [approve, account.install_call(key.address, usdc_policy(r, payee))],
            signer=owner,
            bundler=bundler,
            paymaster=r.sponsor,
        )
        assert setup.success and setup.deployed
        assert deposit - await paymaster_deposit(r.env.rpc, r.paymaster) == setup.actual_gas_cost
        ((_, charged),) = await _receipt_logs(r.env.rpc, setup, _CHARGED)
        cost, spent = abi_decode(["uint256", "uint256"], charged)
        assert spent == await sponsored_spent(r.env.rpc, r.paymaster, account.address) == cost
        assert setup.actual_gas_cost <= cost <= ETH // 10, "the limit counts at least what the sponsor paid"

        # 2. token mode: the session key pays 1 USDC to the payee, and the gas in USDC
        deposit = await paymaster_deposit(r.env.rpc, r.paymaster)
        usdc_before, pm_before = await r.usdc_of(account.address), await r.usdc_of(r.paymaster)
        result = await account.execute(
            [transfer(r, payee, 10**6)], signer=key, bundler=bundler, paymaster=r.sponsor.token(r.usdc, PRICE)
        )
        assert result.success
        ((_, sponsored),) = await _receipt_logs(r.env.rpc, result, _SPONSORED)
        token_amount, price = abi_decode(["uint256", "uint256"], sponsored)
        assert price == PRICE
        assert usdc_before - await r.usdc_of(account.address) == 10**6 + token_amount
        assert await r.usdc_of(r.paymaster) - pm_before == token_amount
        assert await r.usdc_of(payee) == 10**6
        assert deposit - await paymaster_deposit(r.env.rpc, r.paymaster) == result.actual_gas_cost
        floor = -(-result.actual_gas_cost * PRICE // 10**18)
        assert floor <= token_amount <= floor * 6 // 5, (
            "the gas, at the signed price, within the penalty bound"
        )
        assert await r.env.rpc.get_balance(account.address) == 0, "the account never held ETH"


async def test_the_erc7677_service_sponsors_what_a_4337_client_sends(
    devnet: DevnetState, alto: BundlerProcess
) -> None:
    async with rails(devnet, alto) as r:
        app = paymaster_app(r.sponsor)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pm")
        remote = PaymasterRpc("http://pm/", client=client)
        try:
            owner = OwnerKey(LocalSigner.random())
            account = await AgentAccount.counterfactual(r.env.rpc, factory=r.env.factory, owner=owner.address)
            payee = LocalSigner.random().address
            result = await account.execute([Call(payee, 0)], signer=owner, bundler=r.alto, paymaster=remote)
            assert result.success and result.deployed
            assert await r.env.rpc.get_balance(account.address) == 0

            op = await account.prepare([Call(payee, 0)], signer=owner, nonce=1 << 64)
            params = [user_op_to_json(op), devnet.contracts["entrypoint"], hex(devnet.chain_id), {}]

            async def rpc(method: str, params: object, status: int = 200) -> dict[str, object]:
                body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": params}
                resp = await client.post("/", json=body)
                assert resp.status_code == status
                reply: dict[str, object] = resp.json()
                return reply

            stub = (await rpc("pm_getPaymasterStubData", params))["result"]
            assert isinstance(stub, dict) and stub["paymaster"] == r.paymaster
            assert int(str(stub["paymasterVerificationGasLimit"]), 16) > 0
            assert (await rpc("pm_nope", params))["error"] == {
                "code": -32601,
                "message": "method not found: pm_nope",
            }
            wrong_chain = (await rpc("pm_getPaymasterData", [*params[:2], "0x1", {}]))["error"]
            assert isinstance(wrong_chain, dict) and wrong_chain["code"] == -32000
            assert wrong_chain["data"] == {"code": "paymaster_wrong_chain"}
            bad_mode = (await rpc("pm_getPaymasterData", [*params[:3], {"mode": "free"}]))["error"]
            assert isinstance(bad_mode, dict) and bad_mode["code"] == -32602
            bad_op = (await rpc("pm_getPaymasterData", [{"sender": "0x12"}, *params[1:]]))["error"]
            assert isinstance(bad_op, dict) and bad_op["code"] == -32602 and "nonce" in str(bad_op["message"])
            resp = await client.post("/", content=b"{not json")
            assert resp.status_code == 400 and resp.json()["error"]["code"] == -32700
            resp = await client.post("/", content=b"[" + b"0," * 40_000 + b"0]")
            assert resp.status_code == 413 and resp.headers["content-type"].startswith(
                "application/problem+json"
            )
            # a Content-Length int() cannot read ("\xb2" passes str.isdigit(); so do 5,000 digits): no 500
            for declared in (b"\xb2", b"9" * 5000):
                resp = await client.post("/", content=b"{", headers={"content-length": declared})
                assert resp.status_code in (400, 413), resp.text
        finally:
            await remote.aclose()
            await client.aclose()


@pytest.mark.parametrize("through", ["alto", "self-bundler"])
async def test_spend_limit_refusal_reads_the_same_through_both_bundlers(
    devnet: DevnetState, alto: BundlerProcess, through: str
) -> None:
    async with rails(devnet, alto) as r:
        bundler = r.alto if through == "alto" else r.env.bundler
        assert isinstance(bundler, BundlerRpc | SelfBundler)
        stingy = SponsorService(
            paymaster=r.paymaster,
            signer=LocalSigner(devnet.deployer.private_key),
            chain_id=devnet.chain_id,
            spend_limit=10**12,  # far below any operation's worst-case cost
        )
        owner = OwnerKey(LocalSigner.random())
        account = await AgentAccount.counterfactual(r.env.rpc, factory=r.env.factory, owner=owner.address)
        deposit = await paymaster_deposit(r.env.rpc, r.paymaster)
        with pytest.raises(UserOpRejected) as info:
            await account.execute([Call(owner.address, 0)], signer=owner, bundler=bundler, paymaster=stingy)
        assert info.value.code == "paymaster_spend_limit" and info.value.reason == "AA33 reverted"
        assert await paymaster_deposit(r.env.rpc, r.paymaster) == deposit, "the sponsor paid nothing"
        assert not await r.env.rpc.get_code(account.address), "the operation never ran"


@pytest.mark.parametrize("through", ["alto", "self-bundler"])
async def test_a_batch_is_atomic_through_both_bundlers(
    devnet: DevnetState, alto: BundlerProcess, through: str
) -> None:
    async with rails(devnet, alto) as r:
        bundler = r.alto if through == "alto" else r.env.bundler
        assert isinstance(bundler, BundlerRpc | SelfBundler)
        account, owner = await r.env.new_account()
        await r.env.transact(r.usdc, "mint(address,uint256)", account.address, 100)
        a, b, c = (LocalSigner.random().address for _ in range(3))
        # the third call exceeds the balance
        bad = [transfer(r, a, 10), transfer(r, b, 20), transfer(r, c, 1_000)]
        if through == "alto":  # a bundler refuses an operation whose calls revert in its simulation
            with pytest.raises(AccountError) as info:
                await account.execute(bad, signer=owner, bundler=bundler, call_gas_limit=300_000)
            assert info.value.code == "userop_calls_revert"
        else:  # our own relayer lands it with the given call gas, reverted as a whole
            failing = await account.execute(bad, signer=owner, bundler=bundler, call_gas_limit=300_000)
            assert not failing.success and failing.revert_reason
        assert [await r.usdc_of(w) for w in (a, b, c)] == [0, 0, 0], "none of the calls took effect"
        good = [transfer(r, a, 10), transfer(r, b, 20), transfer(r, c, 30)]
        ok = await account.execute(good, signer=owner, bundler=bundler)
        assert ok.success and [await r.usdc_of(w) for w in (a, b, c)] == [10, 20, 30]


async def test_fees_come_from_the_bundler_when_offered_else_from_the_node(
    devnet: DevnetState, alto: BundlerProcess
) -> None:
    async with rails(devnet, alto) as r:
        offered = await r.alto.suggest_fees()  # Alto's pimlico_getUserOperationGasPrice, "fast"
        reply = httpx.post(
            alto.url,
            json={"jsonrpc": "2.0", "id": 1, "method": "pimlico_getUserOperationGasPrice", "params": []},
        ).json()["result"]["fast"]
        assert offered == (int(reply["maxFeePerGas"], 16), int(reply["maxPriorityFeePerGas"], 16))

        # a standard bundler that offers no fee method ("method not found"): the node's base fee and tip
        async def no_such_method(request: Request) -> Response:
            body = {"jsonrpc": "2.0", "id": 1, "error": {"code": -32601, "message": "method not found"}}
            return JSONResponse(body)

        app = Starlette(routes=[Route("/", no_such_method, methods=["POST"])])
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bundler")
        plain = BundlerRpc("http://bundler/", chain_id=devnet.chain_id, node=r.env.rpc, client=client)
        head = await r.env.rpc.request("eth_getBlockByNumber", ["latest", False])
        tip = int(await r.env.rpc.request("eth_maxPriorityFeePerGas", []), 16)
        try:
            assert await plain.suggest_fees() == (2 * int(head["baseFeePerGas"], 16) + tip, tip)
        finally:
            await client.aclose()
