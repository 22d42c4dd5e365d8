"""Gas of one x402 `upto` settlement (Permit2 witness transfer through the upto proxy) beside one `exact`
settlement (EIP-3009 `transferWithAuthorization`), both from receipts on the devnet: same token, same
amount, a payee that already holds the token, a payer's first payment."""

from __future__ import annotations

import secrets
import time

from escrow import DevnetState
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._escrow import Erc20
from escrow.payments._exact import ExactEvm
from escrow.payments._upto import UptoChain
from x402 import Eip712Domain, LocalSigner
from x402._eip712 import sign_transfer_authorization
from x402._upto import PERMIT2_ADDRESS, sign_upto

MAXIMUM = 10_000
ACTUAL = 3_000


def _account() -> tuple[LocalSigner, str]:
    key = "0x" + secrets.token_hex(32)
    return LocalSigner(key), key


async def settle_gas(net: DevnetState) -> dict[str, int]:
    """{"upto_gas", "exact_gas"}: an `upto` charge of 3,000 of a signed 10,000, and an `exact` 3,000."""
    rpc = Rpc(net.rpc_url)
    try:
        usdc = Erc20(rpc, net.contracts["usdc"])
        (payer, payer_key), (facilitator, facilitator_key) = _account(), _account()
        pay_to = LocalSigner.random().address
        for who in (payer, facilitator):
            await rpc.request("anvil_setBalance", [who.address, hex(10**20)])
        minter = TxSender(rpc, payer_key, chain_id=net.chain_id)
        for calldata in (
            usdc.abi.encode("mint", payer.address, 100 * MAXIMUM),
            usdc.approve_calldata(PERMIT2_ADDRESS, 2**256 - 1),
            usdc.abi.encode("mint", pay_to, 1),  # the payee holds the token already
        ):
            await minter.transact(usdc.address, calldata, gas=100_000)
        relayer = TxSender(rpc, facilitator_key, chain_id=net.chain_id)
        now = int(time.time())
        permit = sign_upto(
            payer,
            chain_id=net.chain_id,
            token=usdc.address,
            maximum=MAXIMUM,
            pay_to=pay_to,
            facilitator=facilitator.address,
            deadline=now + 600,
            valid_after=0,
        )
        upto = await UptoChain(rpc, relayer).settle(permit, ACTUAL)
        domain = Eip712Domain(
            name=net.usdc_name,
            version=net.usdc_version,
            chain_id=net.chain_id,
            verifying_contract=usdc.address,
        )
        auth = sign_transfer_authorization(payer, domain, to=pay_to, value=ACTUAL, valid_before=now + 600)
        signature = bytes.fromhex(auth.signature.removeprefix("0x"))
        calldata = ExactEvm.calldata(auth.authorization, signature)
        exact = await relayer.transact(usdc.address, calldata, gas=200_000)
        assert await usdc.balance_of(pay_to) == 1 + 2 * ACTUAL  # both charged exactly the actual amount
        return {"upto_gas": int(upto.gas_used, 16), "exact_gas": int(exact.gas_used, 16)}
    finally:
        await rpc.aclose()
