"""MPP session channels opened from an `AgentAccount` by its session key, with the owner key offline.

    policy = channel_session_policy(channels=..., token=usdc, payees=[sub_agent], max_deposit=..., key=key)
    # the owner signs `policy` for `key` offline (sign_session_key_install_offline); a relayer installs it
    opener = AccountChannelOpener(account, key_signer, bundler=bundler)
    client = SessionClient(http, signer=key_signer, opener=opener, deposit=..., max_voucher_step=...)

The session key signs a user operation running `token.approve(channels, d)` then `channels.open(payee, token,
d, salt, key, [], [])` (or `topUp`), and the bundler's relayer sends it; the key then signs the channel's
vouchers as its `authorizedSigner`. The policy allows exactly those calls, so the key can put the account's
money only into channels to the allowed payees, each holding at most `max_deposit`, with itself as the voucher
signer and no revenue splits; and it can ask to close and withdraw them, which only returns money to the
account. It can never transfer tokens anywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from eth_utils.address import to_checksum_address

from x402 import Signer

from ..chain._abi import ContractAbi
from ..chain._artifacts import load_artifact
from ._account import AgentAccount
from ._bundler_rpc import UserOpSubmitter
from ._policy import ArgRule, CallPermission, SessionPolicy
from ._signers import SessionKey
from ._userop import Call
from ._userop_fill import Sponsor

__all__ = ["AccountChannelOpener", "channel_session_calls", "channel_session_policy"]

OPEN: Final = "open(address,address,uint128,bytes32,address,address[],uint16[])"
TOP_UP: Final = "topUp(bytes32,uint128)"
APPROVE: Final = "approve(address,uint256)"

# `open`'s head is seven words; with both split arrays empty the standard encoding puts their offsets at
# 224 and 256 and a zero length at each. Pinning all four words means no encoding with splits can pass.
_SPLITS_EMPTY: Final = (
    ArgRule.equal(5, 7 * 32),
    ArgRule.equal(6, 8 * 32),
    ArgRule.equal(7, 0),
    ArgRule.equal(8, 0),
)


def _abis() -> tuple[ContractAbi, ContractAbi]:
    return ContractAbi(load_artifact("AgentChannels").abi), ContractAbi(load_artifact("TestUSDC").abi)


def channel_session_policy(
    *,
    channels: str,
    token: str,
    payees: Sequence[str],
    max_deposit: int,
    key: str,
    valid_after: int = 0,
    valid_until: int = 0,
    max_uses: int = 0,
    gas_budget: int = 10**17,
) -> SessionPolicy:
    """The session-key policy that lets `key` open and top up AgentChannels channels from the account.

    Allowed, each call capped at `max_deposit` base units: `token.approve(channels, ...)`;
    `channels.open(payee in payees, token, deposit, any salt, authorizedSigner == key, no splits)`;
    `channels.topUp(any channel, ...)` (the contract lets only the channel's payer top up, so only the
    account's own channels); `requestClose` / `withdraw` (which only pay the account back). `max_uses` bounds
    the number of operations (0: unlimited) and `gas_budget` the wei they may commit. A batch may repeat a
    call, so the account's balance, not the cap, bounds one operation: fund the account with what the key may
    put into channels.
    """
    if not payees:
        raise ValueError("a channel policy needs at least one payee")
    channels, token = to_checksum_address(channels), to_checksum_address(token)
    return SessionPolicy(
        valid_after=valid_after,
        valid_until=valid_until,
        max_uses=max_uses,
        gas_budget=gas_budget,
        permissions=(
            CallPermission.to(
                token, APPROVE, ArgRule.equal(0, channels), ArgRule.less_or_equal(1, max_deposit)
            ),
            CallPermission.to(
                channels,
                OPEN,
                ArgRule.one_of(0, [to_checksum_address(p) for p in payees]),
                ArgRule.equal(1, token),
                ArgRule.less_or_equal(2, max_deposit),
                ArgRule.equal(4, to_checksum_address(key)),
                *_SPLITS_EMPTY,
            ),
            CallPermission.to(channels, TOP_UP, ArgRule.less_or_equal(1, max_deposit)),
            CallPermission.to(channels, "requestClose(bytes32)"),
            CallPermission.to(channels, "withdraw(bytes32)"),
        ),
    )


def channel_session_calls(
    *,
    channels: str,
    token: str,
    amount: int,
    payee: str = "",
    salt: str = "",
    signer: str = "",
    channel: str = "",
) -> list[Call]:
    """The batch that opens a channel (`payee`, `salt`, `signer`) or tops one up (`channel`): approve, then
    `open` or `topUp`, atomically."""
    abi, erc20 = _abis()
    channels = to_checksum_address(channels)
    approve = Call(to_checksum_address(token), 0, erc20.encode("approve", channels, amount))
    if channel:
        return [approve, Call(channels, 0, abi.encode("topUp", bytes.fromhex(channel[2:]), amount))]
    data = abi.encode(
        "open",
        to_checksum_address(payee),
        to_checksum_address(token),
        amount,
        bytes.fromhex(salt[2:]),
        to_checksum_address(signer),
        [],
        [],
    )
    return [approve, Call(channels, 0, data)]


class AccountChannelOpener:
    """`x402.client_session.ChannelOpener` for an `AgentAccount` payer: its session key signs a user
    operation that opens (or tops up) the channel, and `bundler` sends it (the bundler's relayer pays the gas,
    reimbursed by the account or sponsored by `paymaster`). The owner key is not needed.

    `interval` is the key's rate-limit interval, if its policy has one. `gas` sums the gas of the operations
    (as the EntryPoint accounted it).
    """

    def __init__(
        self,
        account: AgentAccount,
        key: Signer,
        *,
        bundler: UserOpSubmitter,
        paymaster: Sponsor | None = None,
        interval: int = 0,
    ) -> None:
        self.account = account
        self.key = SessionKey(key, interval=interval)
        self.bundler = bundler
        self.paymaster = paymaster
        self.gas = 0
        self.operations: list[str] = []  # the user operation hashes, in order

    @property
    def payer(self) -> str:
        return self.account.address

    async def _run(self, calls: list[Call]) -> str:
        result = await self.account.execute(
            calls, signer=self.key, bundler=self.bundler, paymaster=self.paymaster
        )
        result.raise_for_status()
        self.gas += result.actual_gas_used
        self.operations.append(result.user_op_hash)
        return result.tx_hash

    async def open(self, *, escrow: str, payee: str, token: str, deposit: int, salt: str, signer: str) -> str:
        """Open the channel with `signer` (the key) as `authorizedSigner`; returns the bundle transaction."""
        return await self._run(
            channel_session_calls(
                channels=escrow, token=token, amount=deposit, payee=payee, salt=salt, signer=signer
            )
        )

    async def top_up(self, *, escrow: str, channel: str, amount: int, token: str = "") -> str:
        """Add `amount` to the account's channel (approve + `topUp` in one operation)."""
        token = token or await _channel_token(self.account, escrow, channel)
        return await self._run(
            channel_session_calls(channels=escrow, token=token, amount=amount, channel=channel)
        )


async def _channel_token(account: AgentAccount, escrow: str, channel: str) -> str:
    abi, _ = _abis()
    data = await account.rpc.call(escrow, abi.encode("getChannel", bytes.fromhex(channel[2:])))
    ((_payer, _at, _finalized, _payee, token, *_rest),) = abi.decode("getChannel", data)
    return to_checksum_address(str(token))
