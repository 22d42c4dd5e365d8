"""The owner's side of the demo: the orchestrator's money lives in an `AgentAccount` whose owner key stays
offline; the owner signs files, and a relayer (who gains nothing and can change nothing) sends them.

    files = sign_offline(owner, out_dir, chain_id=..., account=account.address, key=session.address, ...)
    await relay(files, account=account, escrow=escrow, relayer=relayer)

The files:

- `install-session-key.json`: the account installs the orchestrator's hot key with a call policy that allows
  escrow top-ups only: `usdc.approve(escrow, amount <= cap)` and `escrow.deposit(usdc, amount <= cap)`, a few
  times, within a window and a gas budget;
- `escrow-deposit.json`: an EIP-3009 `ReceiveWithAuthorization` moving USDC from the account into its escrow
  deposit (only the escrow can redeem it);
- `escrow-grant.json`: the account's escrow grant to the same key: per-call cap, budget, window, and the
  sub-agents it may pay.

The account signs the last two as a contract (ERC-1271): the owner signs their ERC-7739 nested form offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from escrow import (
    AgentAccount,
    AgentEscrow,
    ArgRule,
    Call,
    CallPermission,
    Erc20,
    SessionPolicy,
    SignedDeposit,
    SignedGrant,
    SignedSessionKeyInstall,
    TxSender,
    relay_deposit,
    relay_grant,
    sign_deposit_authorization,
    sign_grant_offline,
)
from escrow import sign_session_key_install_offline as sign_install_offline
from x402 import Eip712Domain, Signer

__all__ = ["GrantTerms", "OfflineFiles", "relay", "sign_offline", "top_up_calls", "top_up_policy"]


@dataclass(frozen=True)
class GrantTerms:
    """What the owner lets the hot key spend through the escrow."""

    max_per_call: int
    budget: int
    valid_after: int
    valid_until: int
    payees: tuple[str, ...]


@dataclass(frozen=True)
class OfflineFiles:
    install: Path
    deposit: Path
    grant: Path


def top_up_policy(*, usdc: str, escrow: str, cap: int, valid_until: int, max_uses: int) -> SessionPolicy:
    """The account-level policy of the hot key: top up the escrow deposit, `cap` at most per call, and
    nothing else (no transfer, no withdrawal, no grant): the money only leaves as the escrow grant allows."""
    return SessionPolicy(
        valid_until=valid_until,
        max_uses=max_uses,
        gas_budget=10**17,  # 0.1 ETH of worst-case UserOperation cost, then the key needs the owner again
        permissions=(
            CallPermission.to(
                usdc, "approve(address,uint256)", ArgRule.equal(0, escrow), ArgRule.less_or_equal(1, cap)
            ),
            CallPermission.to(
                escrow, "deposit(address,uint256)", ArgRule.equal(0, usdc), ArgRule.less_or_equal(1, cap)
            ),
        ),
    )


def top_up_calls(usdc: Erc20, escrow: AgentEscrow, amount: int) -> list[Call]:
    """One atomic top-up: approve the escrow, then deposit (the batch the hot key's policy allows)."""
    return [
        Call(usdc.address, 0, usdc.approve_calldata(escrow.address, amount)),
        Call(escrow.address, 0, escrow.abi.encode("deposit", usdc.address, amount)),
    ]


def sign_offline(
    owner: Signer,
    out_dir: Path,
    *,
    chain_id: int,
    account: str,
    key: str,
    policy: SessionPolicy,
    usdc_domain: Eip712Domain,
    escrow: str,
    deposit: int,
    grant: GrantTerms,
    now: int,
) -> OfflineFiles:
    """Everything the owner signs, written to `out_dir`; no node is involved, only the owner key and facts
    known in advance (the account's counterfactual address, the contracts' addresses, the hot key)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = OfflineFiles(
        install=out_dir / "install-session-key.json",
        deposit=out_dir / "escrow-deposit.json",
        grant=out_dir / "escrow-grant.json",
    )
    sign_install_offline(
        owner, chain_id=chain_id, account=account, key=key, policy=policy, deadline=now + 3600
    ).dump(files.install)
    sign_deposit_authorization(
        owner, usdc_domain, escrow=escrow, amount=deposit, valid_before=now + 3600, account=account
    ).dump(files.deposit)
    sign_grant_offline(
        owner,
        account=account,
        chain_id=chain_id,
        escrow=escrow,
        signer=key,
        token=usdc_domain.verifying_contract,
        max_per_call=grant.max_per_call,
        budget=grant.budget,
        valid_after=grant.valid_after,
        valid_until=grant.valid_until,
        payees=list(grant.payees),
    ).dump(files.grant)
    return files


async def relay(
    files: OfflineFiles, *, account: AgentAccount, escrow: AgentEscrow, relayer: TxSender
) -> SignedGrant:
    """Deploy the account if needed (anyone may), then send the three files; returns the grant as relayed."""
    await account.deploy(relayer)  # ERC-1271 needs the account's code on chain
    await account.relay_install(SignedSessionKeyInstall.load(files.install), relayer)
    await relay_deposit(escrow, relayer, SignedDeposit.load(files.deposit))
    grant: SignedGrant = SignedGrant.load(files.grant)
    await relay_grant(escrow, relayer, grant)
    return grant
