"""Bindings of `AgentEscrow` (and the ERC-20 calls around it), built from the compiled artifact's ABI.

`ContractAbi` (in `escrow.chain`) decodes the artifact's ABI once; `AgentEscrow`
wraps the calls a gateway, a settler and an owner need over the async `Rpc`/`TxSender` of `escrow.chain._rpc`.
Events come back decoded from receipts (`decode_logs`) and from `eth_getLogs` (`logs`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_utils.address import to_checksum_address

from x402._escrow import EscrowPayload, EscrowPayment

from ..chain._abi import ContractAbi, EscrowEvent, abi_type
from ..chain._artifacts import Artifact, ArtifactError, EscrowError, load_artifact
from ..chain._rpc import Log, Receipt, Rpc
from ._packed import pack_batch

__all__ = [
    "AgentEscrow",
    "ContractAbi",
    "Erc20",
    "EscrowEvent",
    "GrantInfo",
    "deploy_contract",
    "escrow_artifact",
    "payment_tuple",
    "topic_address",
]

_ZERO: Final = "0x" + "00" * 20


def _repo_out(name: str) -> Artifact:
    # Development fallback until `node contracts/build.mjs` has written escrow/artifacts/<name>.json:
    # forge's output in a source checkout has the same ABI and bytecode.
    path = Path(__file__).resolve().parents[2] / "contracts" / "out" / f"{name}.sol" / f"{name}.json"
    try:
        raw = msgspec.json.decode(path.read_bytes())
    except OSError:
        raise ArtifactError(f"no artifact {name!r} (build the contracts)", code="artifact_missing") from None
    return Artifact(
        contract_name=name,
        abi=raw["abi"],
        bytecode=raw["bytecode"]["object"],
        deployed_bytecode=raw["deployedBytecode"]["object"],
    )


@functools.cache
def escrow_artifact(name: str = "AgentEscrow") -> Artifact:
    try:
        return load_artifact(name)
    except ArtifactError:
        return _repo_out(name)


@functools.cache
def _escrow_abi() -> ContractAbi:
    return ContractAbi(escrow_artifact().abi)


@functools.cache
def _erc20_abi() -> ContractAbi:
    return ContractAbi(load_artifact("TestUSDC").abi)


class GrantInfo(msgspec.Struct, frozen=True, kw_only=True):
    """`IAgentEscrow.GrantInfo`: a revoked (or never issued) grant has `token == 0x0`."""

    token: str
    epoch: int
    valid_after: int
    valid_until: int
    max_per_call: int
    budget: int
    spent: int
    payee_count: int

    @property
    def live(self) -> bool:
        return self.token != _ZERO

    @property
    def remaining(self) -> int:
        return self.budget - self.spent


def payment_tuple(payment: EscrowPayment) -> tuple[Any, ...]:
    return (
        payment.payer,
        payment.payee,
        payment.token,
        int(payment.amount),
        int(payment.nonce),
        int(payment.deadline),
        payment.epoch,
    )


def _sig(payload: EscrowPayload) -> bytes:
    return bytes.fromhex(payload.signature[2:])


async def deploy_contract(
    rpc: Rpc, private_key: str, artifact: Artifact, args: Sequence[Any] = (), *, gas: int = 8_000_000
) -> str:
    """Deploy `artifact` from the key's account (not through a `TxSender`: it only calls existing
    contracts); returns the checksummed address."""
    account = Account.from_key(private_key)
    types = [abi_type(i) for i in artifact.constructor_inputs]
    initcode = bytes.fromhex(artifact.bytecode[2:]) + abi_encode(types, list(args))
    price = await rpc.gas_price()
    tx = {
        "type": 2,
        "chainId": await rpc.chain_id(),
        "nonce": await rpc.get_transaction_count(account.address, "pending"),
        "data": initcode,
        "gas": gas,
        "maxFeePerGas": 2 * price + 10**9,
        "maxPriorityFeePerGas": 10**9,
        "value": 0,
    }
    tx_hash = await rpc.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
    await rpc.wait_for_receipt(tx_hash)
    raw = await rpc.request("eth_getTransactionReceipt", [tx_hash])
    address = raw.get("contractAddress") if isinstance(raw, dict) and raw.get("status") == "0x1" else None
    if not address:
        raise EscrowError(f"deployment of {artifact.contract_name} failed", code="deploy_failed")
    return str(to_checksum_address(address))


class AgentEscrow:
    """Calls on one deployed `AgentEscrow`."""

    def __init__(self, rpc: Rpc, address: str) -> None:
        self.rpc = rpc
        self.address = to_checksum_address(address)
        self.abi = _escrow_abi()

    @classmethod
    async def deploy(cls, rpc: Rpc, private_key: str, *, withdrawal_delay: int = 900) -> AgentEscrow:
        return cls(rpc, await deploy_contract(rpc, private_key, escrow_artifact(), [withdrawal_delay]))

    async def _view(self, name: str, *args: Any, block: str = "latest") -> tuple[Any, ...]:
        return self.abi.decode(
            name, await self.rpc.call(self.address, self.abi.encode(name, *args), block=block)
        )

    # -- views ---------------------------------------------------------------------------------------------

    async def grant_of(self, payer: str, signer: str) -> GrantInfo:
        (info,) = await self._view("grantOf", payer, signer)
        return self.grant_info(info)

    @staticmethod
    def grant_info(info: Sequence[Any]) -> GrantInfo:
        """`GrantInfo` from the decoded `grantOf` tuple."""
        return GrantInfo(
            token=to_checksum_address(info[0]),
            epoch=info[1],
            valid_after=info[2],
            valid_until=info[3],
            max_per_call=info[4],
            budget=info[5],
            spent=info[6],
            payee_count=info[7],
        )

    async def deposit_of(self, payer: str, token: str) -> int:
        return int((await self._view("depositOf", payer, token))[0])

    async def withdrawal_of(self, payer: str, token: str) -> tuple[int, int]:
        """The payer's requested withdrawal of `token`: (amount, readyAt), zeros if none."""
        amount, ready_at = await self._view("withdrawalOf", payer, token)
        return int(amount), int(ready_at)

    async def read_many(self, calls: Sequence[tuple[str, Sequence[Any]]]) -> list[tuple[Any, ...]]:
        """Several views in one `eth_call` (the escrow's `multicall`), so they all see the same block."""
        data = self.abi.encode("multicall", [self.abi.encode(name, *args) for name, args in calls])
        (results,) = self.abi.decode("multicall", await self.rpc.call(self.address, data))
        return [self.abi.decode(name, raw) for (name, _), raw in zip(calls, results, strict=True)]

    async def nonce_used(self, signer: str, nonce: int) -> bool:
        return bool((await self._view("nonceUsed", signer, nonce))[0])

    async def is_payee_allowed(self, payer: str, signer: str, payee: str) -> bool:
        return bool((await self._view("isPayeeAllowed", payer, signer, payee))[0])

    async def check(self, payload: EscrowPayload) -> tuple[int, str]:
        """What `settle` would decide for this payment now (`Reason` value) and who signed it."""
        reason, signer = await self._view("check", payment_tuple(payload.payment), _sig(payload))
        return int(reason), to_checksum_address(signer)

    async def hash_payment(self, payment: EscrowPayment) -> bytes:
        return bytes((await self._view("hashPayment", payment_tuple(payment)))[0])

    async def withdrawal_delay(self) -> int:
        return int((await self._view("WITHDRAWAL_DELAY"))[0])

    # -- calldata (anyone may send these) ------------------------------------------------------------------

    def settle_calldata(self, payloads: Sequence[EscrowPayload]) -> bytes:
        """The batch as `settlePacked` (a third of the call data, the cheaper call), or as the ABI `settle`
        when a value does not fit the packing (see `escrow.payments._packed`): same checks, same events."""
        batch = pack_batch(payloads)
        if batch is not None:
            return self.abi.encode("settlePacked", batch)
        return self.abi_settle_calldata(payloads)

    def abi_settle_calldata(self, payloads: Sequence[EscrowPayload]) -> bytes:
        """The batch as the ABI-encoded `settle` (every value fits)."""
        return self.abi.encode(
            "settle", [payment_tuple(p.payment) for p in payloads], [_sig(p) for p in payloads]
        )

    def settle_metered_calldata(self, payloads: Sequence[EscrowPayload], actuals: Sequence[int]) -> bytes:
        """`settleMetered`: entry i pays `actuals[i]` (at most its signed amount). Below the maximum only
        the payee or an operator it allowed (`set_settler_calldata`) may send this."""
        return self.abi.encode(
            "settleMetered",
            [payment_tuple(p.payment) for p in payloads],
            [int(a) for a in actuals],
            [_sig(p) for p in payloads],
        )

    def set_settler_calldata(self, operator: str, allowed: bool = True) -> bytes:
        """Sent by a payee: lets `operator` settle its metered payments below their maximum."""
        return self.abi.encode("setSettler", operator, allowed)

    async def is_settler(self, payee: str, operator: str) -> bool:
        return bool((await self._view("isSettler", payee, operator))[0])

    def settle_one_calldata(self, payload: EscrowPayload) -> bytes:
        return self.abi.encode("settleOne", payment_tuple(payload.payment), _sig(payload))

    # -- events --------------------------------------------------------------------------------------------

    def decode_logs(self, receipt: Receipt) -> list[EscrowEvent]:
        block = int(receipt.block_number, 16)
        out = []
        for log in receipt.logs:
            if log.address.lower() != self.address.lower():
                continue
            event = self.abi.decode_log(log, block=block, tx_hash=receipt.transaction_hash)
            if event is not None:
                out.append(event)
        return out

    async def logs(
        self,
        names: Sequence[str],
        *,
        from_block: int,
        to_block: int | str = "latest",
        topics: Sequence[Any] = (),
    ) -> list[EscrowEvent]:
        """`eth_getLogs` for events `names` (extra indexed `topics` filter after the event topic)."""
        first: Any = [self.abi.topics[n] for n in names]
        end = to_block if isinstance(to_block, str) else hex(to_block)
        raw = await self.rpc.request(
            "eth_getLogs",
            [
                {
                    "address": self.address,
                    "fromBlock": hex(from_block),
                    "toBlock": end,
                    "topics": [first, *topics],
                }
            ],
        )
        out = []
        for entry in raw:
            log = Log(address=entry["address"], topics=entry["topics"], data=entry["data"])
            event = self.abi.decode_log(
                log, block=int(entry["blockNumber"], 16), tx_hash=entry["transactionHash"]
            )
            if event is not None:
                out.append(event)
        return out


def topic_address(address: str) -> str:
    return "0x" + "00" * 12 + address[2:].lower()


class Erc20:
    """The ERC-20 calls the owner helpers and tests need (TestUSDC's ABI)."""

    def __init__(self, rpc: Rpc, address: str) -> None:
        self.rpc = rpc
        self.address = to_checksum_address(address)
        self.abi = _erc20_abi()

    async def balance_of(self, owner: str) -> int:
        data = await self.rpc.call(self.address, self.abi.encode("balanceOf", owner))
        return int(self.abi.decode("balanceOf", data)[0])

    async def nonces(self, owner: str) -> int:
        data = await self.rpc.call(self.address, self.abi.encode("nonces", owner))
        return int(self.abi.decode("nonces", data)[0])

    def approve_calldata(self, spender: str, amount: int) -> bytes:
        return self.abi.encode("approve", spender, amount)

    def transfer_calldata(self, to: str, amount: int) -> bytes:
        return self.abi.encode("transfer", to, amount)
