"""Gas per payment of batched escrow settlement, from receipts, beside one EIP-3009 transfer per call.

    python -m tests.bench.escrow_gas

Starts a devnet, deploys AgentEscrow, grants a session key and settles batches of 1, 8, 32 and 128 payments
(sequential nonces, spread over 4 payees that already hold the token, as sub-agents in steady state do;
then all to one payee), sent as the settler sends them: `settlePacked`.
Prints one JSON object on its last line.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from escrow import Devnet, DevnetState
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._escrow import AgentEscrow, Erc20
from escrow.payments._exact import ExactEvm
from escrow.payments._grants import deposit, relay_grant, sign_grant_offline
from x402 import Eip712Domain, LocalSigner, sign_transfer_authorization
from x402._escrow import NonceCounter, escrow_domain, sign_payment

BATCHES = (1, 8, 32, 128)
PAYEES = 4
PRICE = 1_000


def _key(signer: LocalSigner) -> str:
    return "0x" + signer._key.secret.hex()


async def bench(net: DevnetState) -> dict[str, Any]:
    rpc = Rpc(net.rpc_url)
    try:
        owner, relayer, session = LocalSigner.random(), LocalSigner.random(), LocalSigner.random()
        for who in (owner, relayer):
            await rpc.request("anvil_setBalance", [who.address, hex(10**21)])
        escrow = await AgentEscrow.deploy(rpc, _key(relayer), withdrawal_delay=900)
        usdc = Erc20(rpc, net.contracts["usdc"])
        owner_tx = TxSender(rpc, _key(owner), chain_id=net.chain_id)
        relay_tx = TxSender(rpc, _key(relayer), chain_id=net.chain_id)
        await owner_tx.transact(usdc.address, usdc.abi.encode("mint", owner.address, 10**12), gas=100_000)
        await deposit(escrow, owner_tx, usdc.address, 10**11)
        payees = [LocalSigner.random().address for _ in range(PAYEES)]
        signed = sign_grant_offline(
            owner,
            chain_id=net.chain_id,
            escrow=escrow.address,
            signer=session.address,
            token=usdc.address,
            max_per_call=PRICE,
            budget=10**10,
            valid_until=int(time.time()) + 86_400,
            payees=payees,
        )
        await relay_grant(escrow, relay_tx, signed)
        domain = escrow_domain(net.chain_id, escrow.address)
        nonces = NonceCounter()
        deadline = int(time.time()) + 3600

        async def settle(n: int) -> int:
            payloads = [
                sign_payment(
                    session,
                    domain,
                    payer=owner.address,
                    payee=payees[i % len(payees)],
                    token=usdc.address,
                    amount=PRICE,
                    nonce=nonces.take(),
                    deadline=deadline,
                    epoch=1,
                )
                for i in range(n)
            ]
            receipt = await relay_tx.transact(
                escrow.address, escrow.settle_calldata(payloads), gas=30_000_000
            )
            assert not any(e.name == "PaymentFailed" for e in escrow.decode_logs(receipt))
            return int(receipt.gas_used, 16)

        await settle(PAYEES)  # warm-up: payees hold a balance, the nonce word is in use
        per_payment = {str(n): round((await settle(n)) / n) for n in BATCHES}
        spread = payees[:]
        del payees[1:]  # the same batches all to one payee: one payout transfer per batch
        one_payee = {str(n): round((await settle(n)) / n) for n in BATCHES}
        payees[:] = spread

        # One EIP-3009 transferWithAuthorization per call, to a payee that already holds the token.
        payer = LocalSigner.random()
        await owner_tx.transact(usdc.address, usdc.transfer_calldata(payer.address, 10 * PRICE), gas=100_000)
        token_domain = Eip712Domain(net.usdc_name, net.usdc_version, net.chain_id, usdc.address)
        exact = ExactEvm(rpc, relay_tx)
        auth = sign_transfer_authorization(
            payer, token_domain, to=payees[0], value=PRICE, valid_before=int(time.time()) + 600
        )
        tx_hash = await exact.settle(token_domain, auth)
        receipt = await rpc.wait_for_receipt(tx_hash)
        return {
            "escrow_gas_per_payment": per_payment,
            "escrow_gas_per_payment_one_payee": one_payee,
            "eip3009_gas_per_payment": int(receipt.gas_used, 16),
            "payees": PAYEES,
            "goals": {  # issue 15
                "batch32_4_payees_le_16k": per_payment["32"] <= 16_000,
                "batch32_1_payee_le_15k": one_payee["32"] <= 15_000,
                "batch128_le_13k": max(per_payment["128"], one_payee["128"]) <= 13_000,
            },
        }
    finally:
        await rpc.aclose()


def main() -> None:
    with Devnet() as net:
        result = asyncio.run(bench(net))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
