"""User operations and session-key types without a chain: encodings, signature formats, revert decoding,
nonce-lane allocation, policy validation and the offline approval files."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak

from escrow.accounts._account import (
    UNLIMITED_GAS_BUDGET,
    ArgCondition,
    ArgRule,
    CallPermission,
    SessionPolicy,
    SignedSessionKeyInstall,
    SignedSessionKeyRevoke,
    abi_word,
    sign_install_offline,
    sign_revoke_offline,
)
from escrow.accounts._signers import NonceLanes, OwnerKey, SessionKey
from escrow.accounts._userop import (
    BATCH_MODE,
    Call,
    PackedUserOperation,
    PolicyViolation,
    SessionPolicyKind,
    UserOpRejected,
    decode_handle_ops_error,
    encode_execute,
    personal_digest,
)
from escrow.chain._rpc import Rpc
from x402 import LocalSigner, recover_hash

ADDR = "0x" + "11" * 20


def test_encode_execute_is_an_erc7821_batch() -> None:
    calls = [Call(ADDR, 5, b"\xab\xcd"), Call("0x" + "22" * 20)]
    data = encode_execute(calls)
    assert data[:4] == keccak(text="execute(bytes32,bytes)")[:4]
    mode, batch = abi_decode(["bytes32", "bytes"], data[4:])
    assert mode == BATCH_MODE
    (decoded,) = abi_decode(["(address,uint256,bytes)[]"], batch)
    assert [(t.lower(), v, d) for t, v, d in decoded] == [(ADDR, 5, b"\xab\xcd"), ("0x" + "22" * 20, 0, b"")]
    with pytest.raises(ValueError):
        encode_execute([])


def _op() -> PackedUserOperation:
    return PackedUserOperation(
        sender=ADDR,
        nonce=(7 << 64) | 3,
        call_data=b"\x01",
        verification_gas_limit=100,
        call_gas_limit=200,
        pre_verification_gas=50,
        max_fee_per_gas=10,
        max_priority_fee_per_gas=1,
    )


def test_gas_fields_pack_and_cost() -> None:
    op = _op()
    assert op.account_gas_limits == (100).to_bytes(16, "big") + (200).to_bytes(16, "big")
    assert op.gas_fees == (1).to_bytes(16, "big") + (10).to_bytes(16, "big")
    assert op.nonce_key == 7
    assert op.max_cost == 350 * 10
    paid = PackedUserOperation(
        **{
            **{f: getattr(op, f) for f in op.__struct_fields__},
            "paymaster_and_data": bytes(20) + _u128(30) + _u128(40),
        }
    )
    assert paid.max_cost == 420 * 10
    with pytest.raises(ValueError):
        _ = PackedUserOperation(sender=ADDR, nonce=0, call_gas_limit=2**128).account_gas_limits


def _u128(n: int) -> bytes:
    return n.to_bytes(16, "big")


def test_owner_and_session_signature_formats() -> None:
    owner = OwnerKey(LocalSigner.random())
    session_signer = LocalSigner.random()
    session = SessionKey(session_signer, interval=3600)
    op = _op()
    digest = op.hash(chain_id=31337)

    signed = op.signed(owner, chain_id=31337, timestamp=0)
    assert len(signed.signature) == 65
    assert recover_hash(personal_digest(digest), signed.signature) == owner.address

    signed = op.signed(session, chain_id=31337, timestamp=7200 * 1000 + 5)
    sig = signed.signature
    assert len(sig) == 91
    assert "0x" + sig[:20].hex() == session.address.lower()
    assert int.from_bytes(sig[20:26], "big") == 2000  # the window holding the timestamp
    assert recover_hash(personal_digest(digest), sig[26:]) == session.address
    assert SessionKey(session_signer).sign_user_op(digest, timestamp=123)[20:26] == bytes(6)


def _failed_op_with_revert(inner: bytes, index: int = 2) -> bytes:
    return keccak(text="FailedOpWithRevert(uint256,string,bytes)")[:4] + abi_encode(
        ["uint256", "string", "bytes"], [index, "AA23 reverted", inner]
    )


def test_decode_failed_ops_and_policy_violations() -> None:
    failed = keccak(text="FailedOp(uint256,string)")[:4] + abi_encode(
        ["uint256", "string"], [1, "AA24 signature error"]
    )
    assert decode_handle_ops_error(failed) == (1, "AA24 signature error", b"")
    inner = keccak(text="SessionKeyPolicyViolation(address,uint8,uint256,uint256)")[:4] + abi_encode(
        ["address", "uint8", "uint256", "uint256"], [ADDR, 3, 2, 1]
    )
    assert decode_handle_ops_error(_failed_op_with_revert(inner)) == (2, "AA23 reverted", inner)
    assert decode_handle_ops_error(b"\x00\x01") is None
    assert decode_handle_ops_error(failed[:10]) is None

    from escrow.accounts._userop import _decode_violation

    violation = _decode_violation(inner)
    assert violation == PolicyViolation(
        key="0x1111111111111111111111111111111111111111",
        policy=SessionPolicyKind.ARGUMENT,
        call_index=2,
        rule_index=1,
    )
    err = UserOpRejected("AA23 reverted", inner=inner, violation=violation)
    assert err.code == "session_argument_rule" and "argument rule 1" in str(err)
    assert UserOpRejected("AA24 signature error").code == "userop_signature_invalid"
    assert UserOpRejected("AA25 invalid account nonce").code == "userop_nonce_invalid"
    assert UserOpRejected("AA99 something").code == "userop_rejected"
    assert {k.code for k in SessionPolicyKind} >= {"session_gas_budget", "session_key_not_installed"}


def test_abi_words() -> None:
    assert abi_word(5) == "0x" + "00" * 31 + "05"
    assert abi_word(True) == abi_word(1)
    assert abi_word(ADDR) == "0x" + "00" * 12 + "11" * 20
    assert abi_word(b"\xab\xcd") == "0x" + "abcd" + "00" * 30
    assert abi_word("0x" + "ff" * 32) == "0x" + "ff" * 32
    for bad in (-1, 2**256, "0x1234", b"\x00" * 33):
        with pytest.raises(ValueError):
            abi_word(bad)


def test_rules_and_policies_validate() -> None:
    rule = ArgRule.less_or_equal(1, 100)
    assert (rule.condition, rule.offset) == (ArgCondition.LESS_OR_EQUAL, 32)
    with pytest.raises(ValueError):
        ArgRule(condition=ArgCondition.EQUAL, offset=0, values=())
    with pytest.raises(ValueError):
        ArgRule(condition=ArgCondition.ONE_OF, offset=0, values=())
    with pytest.raises(ValueError):
        ArgRule(condition=ArgCondition.EQUAL, offset=2**32, values=(abi_word(1),))
    permission = CallPermission.to(ADDR, "transfer(address,uint256)", rule)
    assert permission.selector == "0xa9059cbb"
    assert CallPermission.to(ADDR, "0xA9059CBB").selector == "0xa9059cbb"
    with pytest.raises(ValueError):
        SessionPolicy(permissions=(), gas_budget=1)
    with pytest.raises(ValueError):
        SessionPolicy(permissions=(permission,), interval=60, gas_budget=1)
    with pytest.raises(ValueError):
        SessionPolicy(permissions=(permission,), valid_after=10, valid_until=5, gas_budget=1)
    # No implicit "unlimited" gas: a budget is required, nonzero, and fits uint128.
    for budget in (0, -1, 2**128):
        with pytest.raises(ValueError, match="gas_budget"):
            SessionPolicy(permissions=(permission,), gas_budget=budget)
    with pytest.raises(TypeError, match="gas_budget"):
        SessionPolicy(permissions=(permission,))  # type: ignore[call-arg]
    policy = SessionPolicy(
        permissions=(permission,), interval=60, max_uses_per_interval=3, gas_budget=UNLIMITED_GAS_BUDGET
    )
    assert SessionPolicy.from_abi(_roundtrip(policy.abi())) == policy


def _roundtrip(value: tuple[Any, ...]) -> Any:
    kind = (
        "(uint48,uint48,uint32,uint48,uint32,uint128,(address,bytes4,uint128,(uint8,uint32,bytes32[])[])[])"
    )
    return abi_decode([kind], abi_encode([kind], [value]))[0]


def test_offline_files_round_trip(tmp_path: Path) -> None:
    owner = LocalSigner.random()
    policy = SessionPolicy(
        permissions=(CallPermission.to(ADDR, "pay(address,uint256)", ArgRule.one_of(0, [ADDR, 7])),),
        valid_until=2**40,
        gas_budget=10**16,
    )
    signed = sign_install_offline(
        owner, chain_id=1, account=ADDR, key=ADDR, policy=policy, deadline=99, nonce=2**130
    )
    signed.dump(tmp_path / "a.json")
    text = (tmp_path / "a.json").read_text()
    assert '"type": "installSessionKey"' in text and '"maxUsesPerInterval"' in text
    assert SignedSessionKeyInstall.load(tmp_path / "a.json") == signed
    revoke = sign_revoke_offline(owner, chain_id=1, account=ADDR, key=ADDR, deadline=99)
    revoke.dump(tmp_path / "r.json")
    assert SignedSessionKeyRevoke.load(tmp_path / "r.json") == revoke
    from escrow.accounts._userop import AccountError

    with pytest.raises(AccountError) as info:
        SignedSessionKeyRevoke.load(tmp_path / "a.json")  # an install file is not a revoke
    assert info.value.code == "approval_file_invalid"
    with pytest.raises(AccountError):
        SignedSessionKeyInstall.load(tmp_path / "missing.json")


class _FakeEntryPoint:
    """`getNonce` over an in-memory table: enough for `NonceLanes`."""

    def __init__(self) -> None:
        self.sequence: dict[int, int] = {}
        self.reads = 0

    async def call(self, to: str, data: bytes, **_: Any) -> bytes:
        self.reads += 1
        _sender, key = abi_decode(["address", "uint192"], data[4:])
        await asyncio.sleep(0)
        nonce: int = (key << 64) | self.sequence.get(key, 0)
        return nonce.to_bytes(32, "big")


@pytest.mark.anyio
async def test_nonce_lanes_are_exclusive_and_reused() -> None:
    ep = _FakeEntryPoint()
    lanes = NonceLanes(cast(Rpc, ep), ADDR, prefix=5)
    held: list[int] = []

    async def work(i: int) -> int:
        async with lanes.lane() as lane:
            held.append(lane.key)
            assert lane.key >> 32 == 5
            await asyncio.sleep(0.01)
            ep.sequence[lane.key] = ep.sequence.get(lane.key, 0) + 1
            lane.used()
            return lane.key

    keys = await asyncio.gather(*(work(i) for i in range(16)))
    assert len(set(keys)) == 16
    reads = ep.reads
    # Reuse: the lowest free lane, with its sequence tracked locally (no new read).
    async with lanes.lane() as lane:
        assert lane.key == (5 << 32) and lane.nonce == (lane.key << 64) | 1
        lane.unused()
    async with lanes.lane() as lane:
        assert lane.nonce & (2**64 - 1) == 1  # not consumed: same sequence again
    assert ep.reads == reads
    async with lanes.lane() as lane:  # fate unknown last time: read again
        pass
    assert ep.reads == reads + 1


@pytest.mark.anyio
async def test_nonce_lanes_wait_when_all_are_busy() -> None:
    lanes = NonceLanes(cast(Rpc, _FakeEntryPoint()), ADDR, max_lanes=2)
    order: list[str] = []

    async def hold(name: str, delay: float) -> None:
        async with lanes.lane() as lane:
            order.append(f"{name}:{lane.key}")
            await asyncio.sleep(delay)
            lane.used()

    await asyncio.gather(hold("a", 0.02), hold("b", 0.02), hold("c", 0))
    assert order[:2] == ["a:0", "b:1"] and order[2] in ("c:0", "c:1")
