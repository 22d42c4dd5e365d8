"""Paid A2A tasks on anvil: `examples.a2a_agent` under uvicorn, driven by a2a-sdk's own client, paid by
`x402.client_a2a.A2aPayer`: the task completes with the payment settled exactly once; replays, tampered
and malformed payloads end the task `failed` with the extension's error code, never an internal error."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from a2a.client import Client, ClientConfig, create_client
from a2a.types import TaskState
from a2a.utils.errors import UnsupportedOperationError

from escrow import Chain as EscrowChain
from escrow import DevnetState
from examples.a2a_agent import build_app
from gateway import MemoryStore
from tests._gateways import Chain, key_hex
from tests._serving import serving
from x402 import (
    A2A_X402_ERROR,
    A2A_X402_EXTENSIONS,
    A2A_X402_PAYLOAD,
    A2A_X402_RECEIPTS,
    A2A_X402_STATUS,
    A2A_X402_V01,
    A2A_X402_V02,
    SettleResponse,
    SpendPolicyViolation,
)
from x402.client import PaymentAuth, SpendPolicy
from x402.client_a2a import A2aPayer, task_metadata
from x402.client_escrow import SessionKeyWallet

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

PRICE = 2000  # $0.002


@dataclass
class Env:
    chain: Chain
    url: str
    payee: str
    auth: PaymentAuth
    store: MemoryStore
    http: httpx.AsyncClient
    client: Client


@pytest.fixture
async def env(devnet: DevnetState) -> AsyncIterator[Env]:
    chain = Chain(devnet)
    payer, payee, relayer = await chain.key(), await chain.key(), await chain.key()
    await chain.mint(payer.address, 1_000_000)
    store = MemoryStore()
    relayer_key = "0x" + relayer._key.secret.hex()
    auth = PaymentAuth(chain.wallet(payer), SpendPolicy(max_per_call=10_000, total_budget=100_000))

    def build(base: str) -> object:
        network = EscrowChain.from_devnet(devnet, relayer=relayer_key)
        return build_app(network, base + "/", pay_to=payee.address, store=store)

    try:
        async with serving(build) as base, httpx.AsyncClient(timeout=30) as http:
            config = ClientConfig(streaming=False, httpx_client=http)
            client = await create_client(base, client_config=config)
            yield Env(chain, base, payee.address, auth, store, http, client)
    finally:
        await chain.aclose()


async def test_card_declares_both_extension_uris_and_echoes_activation(env: Env) -> None:
    card = (await env.http.get(env.url + "/.well-known/agent-card.json")).json()
    declared = {e["uri"]: e.get("required") for e in card["capabilities"]["extensions"]}
    assert declared == {A2A_X402_V01: True, A2A_X402_V02: True}
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "SendMessage",
        "params": {"message": {"messageId": "m1", "role": "ROLE_USER", "parts": [{"text": "a b c"}]}},
    }
    headers = {"A2A-Extensions": A2A_X402_V02, "A2A-Version": "1.0"}
    response = await env.http.post(env.url + "/", json=body, headers=headers)
    assert response.headers["a2a-extensions"] == A2A_X402_V02
    status = response.json()["result"]["task"]["status"]
    assert status["state"] == "TASK_STATE_INPUT_REQUIRED"
    assert status["message"]["metadata"][A2A_X402_STATUS] == "payment-required"


async def test_paid_task_completes_and_settles_exactly_once(env: Env) -> None:
    before = await env.chain.balance(env.payee)
    paid = await A2aPayer(env.auth).send_text(env.client, "one two three four")
    assert paid.completed, paid.task
    assert paid.answer == "4 words"
    assert isinstance(paid.receipt, SettleResponse) and paid.receipt.success and paid.receipt.transaction
    meta = task_metadata(paid.task)
    assert meta[A2A_X402_STATUS] == "payment-completed" and len(meta[A2A_X402_RECEIPTS]) == 1
    assert await env.chain.balance(env.payee) - before == PRICE
    stats = await env.store.stats()
    assert stats.settled == 1
    assert env.auth.policy.spent == PRICE


async def test_replayed_payment_fails_the_task_and_charges_once(env: Env) -> None:
    """A payload that paid one task, presented on a second task: DUPLICATE_NONCE, nothing charged twice."""
    before = await env.chain.balance(env.payee)
    payer = A2aPayer(env.auth)
    captured: list[tuple[dict[str, object], str, str]] = []
    original = payer._send

    async def spy(client: Client, message: object) -> object:
        from google.protobuf.json_format import MessageToDict

        meta = MessageToDict(message.metadata) if message.HasField("metadata") else {}  # type: ignore[attr-defined]
        if A2A_X402_PAYLOAD in meta:
            captured.append((meta, message.task_id, message.context_id))  # type: ignore[attr-defined]
        return await original(client, message)  # type: ignore[arg-type]

    payer._send = spy  # type: ignore[method-assign]
    assert (await payer.send_text(env.client, "first task")).completed
    ((payment, first_id, first_context),) = captured

    # A second task; answer its payment-required with the first task's payment.
    from a2a.helpers.proto_helpers import new_text_part
    from a2a.types import Message, Role

    second = await original(
        env.client, Message(message_id="m-2", role=Role.ROLE_USER, parts=[new_text_part("second task")])
    )
    assert second.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
    replay = Message(
        message_id="m-3",
        role=Role.ROLE_USER,
        task_id=second.id,
        context_id=second.context_id,
        parts=[new_text_part("payment")],
        metadata=payment,
    )
    failed = await original(env.client, replay)
    assert failed.status.state == TaskState.TASK_STATE_FAILED
    meta = task_metadata(failed)
    assert meta[A2A_X402_STATUS] == "payment-failed" and meta[A2A_X402_ERROR] == "DUPLICATE_NONCE"
    assert meta[A2A_X402_RECEIPTS][0]["success"] is False
    assert not failed.artifacts  # no work delivered unpaid

    # The same payment again on the task it already paid: that task is over; nothing runs or settles again.
    again = Message(
        message_id="m-4",
        role=Role.ROLE_USER,
        task_id=first_id,
        context_id=first_context,
        parts=[new_text_part("payment")],
        metadata=payment,
    )
    with pytest.raises(UnsupportedOperationError, match="terminal state"):
        await original(env.client, again)
    assert await env.chain.balance(env.payee) - before == PRICE
    assert (await env.store.stats()).settled == 1


@pytest.mark.parametrize(
    "payload",
    [{"x402Version": 2}, "not an object", {"x402Version": 2, "accepted": {}, "payload": {}}],
)
async def test_malformed_payload_fails_the_task_cleanly(env: Env, payload: object) -> None:
    from a2a.helpers.proto_helpers import new_text_part
    from a2a.types import Message, Role

    payer = A2aPayer(env.auth)
    first = await payer._send(
        env.client, Message(message_id="m-a", role=Role.ROLE_USER, parts=[new_text_part("some text")])
    )
    bad = Message(
        message_id="m-b",
        role=Role.ROLE_USER,
        task_id=first.id,
        context_id=first.context_id,
        parts=[new_text_part("payment")],
        metadata={A2A_X402_STATUS: "payment-submitted", A2A_X402_PAYLOAD: payload},
    )
    failed = await payer._send(env.client, bad)
    assert failed.status.state == TaskState.TASK_STATE_FAILED
    assert task_metadata(failed)[A2A_X402_STATUS] == "payment-failed"
    assert not failed.artifacts


async def test_policy_refuses_before_signing(env: Env) -> None:
    tight = PaymentAuth(env.auth.wallet, SpendPolicy(max_per_call=PRICE - 1))
    with pytest.raises(SpendPolicyViolation, match="max_per_call"):
        await A2aPayer(tight).send_text(env.client, "too expensive")
    assert tight.policy.reserved == tight.policy.spent == 0
    assert A2A_X402_EXTENSIONS  # both URIs requested by the payer's context


async def test_the_orchestrators_session_wallet_pays_a_task_through_the_escrow(
    env: Env, devnet: DevnetState, tmp_path: Path
) -> None:
    """The same session-key wallet file `agentpay mcp` serves pays an A2A task, from the owner's deposit."""
    owner = await env.chain.key()
    await env.chain.mint(owner.address, 1_000_000)
    path = tmp_path / "orchestrator.session.json"
    async with EscrowChain.from_devnet(devnet, relayer=key_hex(await env.chain.key())) as owner_side:
        file = await owner_side.open_session(owner, max_per_call="$0.005", budget="$0.05", deposit="$0.1")
        file.dump(path)
        before = await owner_side.escrow.deposit_of(owner.address, devnet.contracts["usdc"])
        wallet = SessionKeyWallet.load(path)
        auth = PaymentAuth(wallet, SpendPolicy(max_per_call="$0.005", total_budget="$0.05"))
        paid = await A2aPayer(auth).send_text(env.client, "paid from the escrow")
        assert paid.completed and paid.answer == "4 words"
        assert paid.offer is not None and paid.offer.scheme == "escrow"
        assert isinstance(paid.receipt, SettleResponse) and paid.receipt.success
        after = await owner_side.escrow.deposit_of(owner.address, devnet.contracts["usdc"])
    assert before - after == PRICE
