"""`python -m tests.bench.session_open`: gas to open and top up an MPP session channel, by payer kind.

On a fresh anvil devnet, a channel of AgentChannels is opened and topped up:

- by an EOA that sends its own `approve` + `open` (`eoa_*`, the two transactions summed);
- by an `AgentAccount`'s session key: one user operation `[approve, open]` (or `[approve, topUp]`) under
  `channel_session_policy`, in a bundle of one sent by our bundler (`userop_*`, the `handleOps` transaction's
  gasUsed);
- relayed, with an EIP-3009 `ReceiveWithAuthorization` signed by an EOA (`relayed_eoa_*`) or by the account's
  owner through ERC-1271 / ERC-7739 (`relayed_account_*`): one `openWithAuthorization` /
  `topUpWithAuthorization` transaction a relayer sends.

Every figure is a receipt's gasUsed (21k intrinsic cost and calldata included). The last line is one JSON
object.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from escrow import (
    AccountChannelOpener,
    AgentAccount,
    Bundler,
    Chain,
    Devnet,
    DevnetState,
    TxSender,
    channel_session_policy,
    relay_channel_open,
    relay_channel_top_up,
    sign_channel_open,
    sign_channel_top_up,
    sign_session_key_install_offline,
)
from gateway import EoaChannelOpener
from x402 import LocalSigner
from x402._session import channel_id

DEPOSIT, TOP_UP = 100_000, 50_000


async def _key(chain: Chain, usdc: int = 0) -> str:
    key = "0x" + os.urandom(32).hex()
    address = LocalSigner(key).address
    await chain.rpc.request("anvil_setBalance", [address, hex(10**20)])
    if usdc:
        token = chain.token
        await chain.relayer.transact(token.address, token.abi.encode("mint", address, usdc), gas=100_000)
    return key


def _salt() -> str:
    return "0x" + os.urandom(32).hex()


async def _measure(state: DevnetState) -> dict[str, Any]:
    chain = Chain.from_devnet(state)
    out: dict[str, Any] = {}
    try:
        channels, token, payee = (
            state.contracts["channels"],
            chain.network.token,
            LocalSigner.random().address,
        )
        domain, key = chain.network.token_domain, LocalSigner.random()

        # EOA: approve + open, approve + topUp, each two transactions of its own
        eoa = TxSender(chain.rpc, await _key(chain, DEPOSIT + TOP_UP), chain_id=state.chain_id)
        opener = EoaChannelOpener(eoa, token)
        salt = _salt()
        await opener.open(
            escrow=channels, payee=payee, token=token, deposit=DEPOSIT, salt=salt, signer=key.address
        )
        cid = _channel_id(chain, channels, eoa.address, payee, token, salt, key.address)
        open_gas, approve = opener.gas, await _last_approve_gas(chain, eoa.address)
        await opener.top_up(escrow=channels, channel=cid, amount=TOP_UP)
        approve = await _last_approve_gas(chain, eoa.address)
        out["eoa_open"] = open_gas + approve
        out["eoa_top_up"] = opener.gas - open_gas + await _last_approve_gas(chain, eoa.address)

        # smart account, session key, one user operation each
        owner = LocalSigner.random()
        account = await AgentAccount.counterfactual(
            chain.rpc, factory=chain.network.account_factory, owner=owner.address, salt=int(time.time())
        )
        await chain.relayer.transact(
            token, chain.token.abi.encode("mint", account.address, 10**7), gas=100_000
        )
        await chain.rpc.request("anvil_setBalance", [account.address, hex(10**18)])
        await account.deploy(chain.relayer)
        policy = channel_session_policy(
            channels=channels, token=token, payees=[payee], max_deposit=DEPOSIT, key=key.address
        )
        approval = sign_session_key_install_offline(
            owner,
            chain_id=state.chain_id,
            account=account.address,
            key=key.address,
            policy=policy,
            deadline=int(time.time()) + 600,
        )
        await account.relay_install(approval, chain.relayer)
        bundler = Bundler(chain.rpc, chain.relayer, chain_id=state.chain_id)
        ops = AccountChannelOpener(account, key, bundler=bundler)
        salt = _salt()
        tx = await ops.open(
            escrow=channels, payee=payee, token=token, deposit=DEPOSIT, salt=salt, signer=key.address
        )
        out["userop_open"] = await _gas(chain, tx)
        cid = _channel_id(chain, channels, account.address, payee, token, salt, key.address)
        out["userop_top_up"] = await _gas(
            chain, await ops.top_up(escrow=channels, channel=cid, amount=TOP_UP)
        )

        # relayed: the payer signs, a relayer sends
        for kind, payer_key, account_address in (
            ("relayed_eoa", LocalSigner(await _key(chain, DEPOSIT + TOP_UP)), None),
            ("relayed_account", owner, account.address),
        ):
            signed = sign_channel_open(
                payer_key,
                domain,
                channels=channels,
                payee=payee,
                deposit=DEPOSIT,
                salt=_salt(),
                authorized_signer=key.address,
                valid_before=int(time.time()) + 600,
                account=account_address,
            )
            out[f"{kind}_open"] = int((await relay_channel_open(chain.relayer, signed)).gas_used, 16)
            more = sign_channel_top_up(
                payer_key,
                domain,
                channels=channels,
                channel=signed.channel_id,
                amount=TOP_UP,
                valid_before=int(time.time()) + 600,
                account=account_address,
            )
            out[f"{kind}_top_up"] = int((await relay_channel_top_up(chain.relayer, more)).gas_used, 16)
    finally:
        await chain.aclose()
    return out


async def _gas(chain: Chain, tx: str) -> int:
    receipt = await chain.rpc.request("eth_getTransactionReceipt", [tx])
    return int(receipt["gasUsed"], 16)


async def _last_approve_gas(chain: Chain, sender: str) -> int:
    """gasUsed of the sender's latest `approve` (the transaction before its last one)."""
    nonce = int(await chain.rpc.request("eth_getTransactionCount", [sender, "latest"]), 16)
    block = int(await chain.rpc.request("eth_blockNumber", []), 16)
    for number in range(block, max(block - 20, 0), -1):
        data = await chain.rpc.request("eth_getBlockByNumber", [hex(number), True])
        for tx in data["transactions"]:
            if tx["from"].lower() == sender.lower() and int(tx["nonce"], 16) == nonce - 2:
                return await _gas(chain, tx["hash"])
    raise RuntimeError("approve transaction not found")


def _channel_id(
    chain: Chain, channels: str, payer: str, payee: str, token: str, salt: str, signer: str
) -> str:
    return channel_id(
        payer=payer,
        payee=payee,
        token=token,
        salt=salt,
        authorized_signer=signer,
        escrow=channels,
        chain_id=chain.network.chain_id,
    )


def main() -> None:
    with Devnet() as state:
        result = asyncio.run(_measure(state))
    for key, value in result.items():
        print(f"{key}: {value}")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
