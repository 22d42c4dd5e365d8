"""`Chain`: one network as agentpay uses it: its description, a node client, and the key that pays gas.

    chain = Chain.from_devnet(".agentpay/devnet.json", relayer=3)     # a devnet, account 3 relays
    chain = Chain("base.toml", relayer_key=os.environ["RELAYER_KEY"])  # a network description file
    chain = await Chain.connect(rpc_url, token=usdc, relayer_key=key)  # the token's domain read from the node
    app = PaymentMiddleware(api, routes={"GET /hello": "$0.001"}, chain=chain, pay_to=my_account)

The gateway takes its schemes (`exact`, and `escrow` when the network has an escrow), its settlers and its
recovery from here; an owner opens session keys for orchestrators with `open_session`. Addresses and the
token's EIP-712 domain come from the `Network` description only, never from the call sites.
"""

from __future__ import annotations

import os
import secrets
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from eth_abi.exceptions import DecodingError

from x402 import Amount, GrantMessage, InvalidNetwork, LocalSigner, Network, Signer
from x402.client_escrow import SessionWalletFile

from .chain._artifacts import EscrowError
from .chain._rpc import Rpc, TxSender
from .devnet._devnet import DevnetAccount, DevnetChain, DevnetState, anvil_accounts
from .payments._escrow import AgentEscrow, Erc20
from .payments._escrow_verify import EscrowVerifier, GrantCache
from .payments._exact import ExactEvm
from .payments._exact_settler import ExactQueue, ExactSettler
from .payments._grants import relay_deposit, relay_grant, sign_deposit_authorization, sign_grant_offline
from .payments._settler import EscrowSettler
from .payments._settler import SettlementQueue as EscrowQueue

__all__ = [
    "Chain",
    "ChainConfigError",
    "load_network",
    "network_of_devnet",
    "resolve_key_reference",
    "write_devnet_networks",
]


class ChainConfigError(EscrowError):
    """A chain that cannot be set up as asked (no network description, no relayer key, no escrow)."""

    status_hint = 500  # the operator's configuration, never the payer's fault

    def __init__(self, message: str, *, code: str = "chain_config_error") -> None:
        super().__init__(message, code=code)


def network_of_devnet(
    state: DevnetState | DevnetChain, *, chain: int | str | None = None, settlement_key: str = ""
) -> Network:
    """The network description of a running devnet chain (its token, escrow, factory, EntryPoint, ...):
    `state`'s first chain, or the one `chain` names (chain id, CAIP-2 id or label), or a `DevnetChain`."""
    one = state if isinstance(state, DevnetChain) else state.chain(chain) if chain is not None else state
    contracts = one.contracts
    return Network(
        network=one.network,
        chain_id=one.chain_id,
        rpc_url=one.rpc_url,
        token=contracts["usdc"],
        token_name=one.usdc_name,
        token_version=one.usdc_version,
        token_decimals=one.usdc_decimals,
        escrow=contracts.get("escrow", ""),
        account_factory=contracts.get("account_factory", ""),
        entrypoint=contracts.get("entrypoint", ""),
        channels=contracts.get("channels", ""),
        paymaster=contracts.get("paymaster", ""),
        settlement_key=settlement_key,
    )


def write_devnet_networks(
    state: DevnetState, state_path: str | Path, *, settlement_key: str = "devnet:3"
) -> DevnetState:
    """Write one network description per chain next to the devnet state file (`devnet.json` ->
    `devnet.base.network.json`, `devnet.31337.network.json`) and return `state` with each chain's
    `network_file` set. `settlement_key` is the reference each file names (default devnet account 3, the
    relayer `Chain.from_devnet` picks)."""
    base = Path(state_path)
    chains = []
    for chain in state.chains:
        target = base.with_name(f"{base.stem}.{chain.label}.network.json")
        described = network_of_devnet(chain, settlement_key=settlement_key)
        partial = target.with_name(target.name + ".tmp")
        partial.write_bytes(described.to_json() + b"\n")
        partial.replace(target)
        chains.append(msgspec.structs.replace(chain, network_file=str(target)))
    return msgspec.structs.replace(state, chains=tuple(chains))


def resolve_key_reference(reference: str, *, what: str = "settlement_key") -> str:
    """The private key a description's reference names: `env:NAME` or `devnet:N`."""
    kind, _, name = reference.partition(":")
    if kind == "env":
        key = os.environ.get(name, "")
        if not key:
            raise ChainConfigError(f"{what} {reference}: ${name} is not set", code="settlement_key_missing")
        return key
    if kind == "devnet" and name.isdigit():
        return anvil_accounts(int(name) + 1)[int(name)].private_key
    raise ChainConfigError(f"{what} {reference!r} is not env:NAME or devnet:N", code="settlement_key_invalid")


def load_network(path: str | Path) -> Network:
    """A network description from a JSON or TOML file, or from a devnet state file (`agentpay devnet up`)."""
    where = Path(path)
    try:
        text = where.read_text()
    except OSError as exc:
        raise ChainConfigError(
            f"cannot read {path}: {exc.strerror}", code="network_file_unreadable"
        ) from None
    if where.suffix == ".toml":
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidNetwork(f"invalid network description {path}: {exc}") from None
    else:
        try:
            data = msgspec.json.decode(text)
        except msgspec.DecodeError as exc:
            raise InvalidNetwork(f"invalid network description {path}: {exc}") from None
    if isinstance(data, dict) and "contracts" in data and "accounts" in data:
        return network_of_devnet(DevnetState.from_json(text))
    if not isinstance(data, dict):
        raise InvalidNetwork(f"invalid network description {path}: not an object")
    return Network.from_mapping(data)


class Chain:
    """A network, a node client (`rpc`) and the relayer that pays settlement gas (`relayer_key`).

    `network` is a `Network` or the path of a description file (JSON, TOML or a devnet state). `rpc_url`
    overrides the description's node for verification, `settle_rpc_url` for sending (both default to it).
    `accounts` are a devnet's funded accounts (`from_devnet` fills them in), for examples and tests.
    Without `relayer_key`, the description's `settlement_key` reference (if any) names the relayer.
    """

    def __init__(
        self,
        network: Network | str | Path,
        *,
        relayer_key: str | None = None,
        rpc_url: str | None = None,
        settle_rpc_url: str | None = None,
        accounts: Sequence[DevnetAccount] = (),
    ) -> None:
        if isinstance(network, str) and network.startswith(("http://", "https://", "ws://", "wss://")):
            raise ChainConfigError(
                f"{network} is a node, not a network description: use `await Chain.connect(url, token=...)`"
                " to read the facts from the node, or pass a description file"
            )
        described = network if isinstance(network, Network) else load_network(network)
        url = rpc_url or described.rpc_url
        if not url:
            raise ChainConfigError(f"no RPC URL for {described.network}: pass rpc_url=")
        self.network = msgspec.structs.replace(described, rpc_url=url)
        if relayer_key is None and described.settlement_key:  # the description names its settlement key
            relayer_key = resolve_key_reference(described.settlement_key)
        self.accounts = tuple(accounts)
        self.rpc = Rpc(url)
        self.settle_rpc = self.rpc if settle_rpc_url in (None, url) else Rpc(settle_rpc_url or "")
        self._relayer = (
            None
            if relayer_key is None
            else TxSender(self.settle_rpc, relayer_key, chain_id=self.network.chain_id)
        )
        self._exact: ExactEvm | None = None
        self._verifier: EscrowVerifier | None = None

    @classmethod
    def from_devnet(
        cls,
        state: DevnetState | str | Path = ".agentpay/devnet.json",
        *,
        relayer: int | str | None = 3,
        chain: int | str | None = None,
        **kw: Any,
    ) -> Chain:
        """The devnet `state` describes; `relayer` is a devnet account index, or a private key. `chain`
        picks one chain of a multichain devnet (chain id, CAIP-2 id or label like `"base"`; default: the
        first)."""
        devnet = state if isinstance(state, DevnetState) else DevnetState.load(state)
        if isinstance(relayer, int) and not 0 <= relayer < len(devnet.accounts):
            raise ChainConfigError(f"the devnet has no account {relayer}")
        key = devnet.accounts[relayer].private_key if isinstance(relayer, int) else relayer
        network = network_of_devnet(devnet, chain=chain)
        return cls(network, relayer_key=key, accounts=devnet.accounts, **kw)

    @classmethod
    async def connect(
        cls,
        rpc_url: str,
        *,
        token: str,
        escrow: str = "",
        account_factory: str = "",
        entrypoint: str = "",
        relayer_key: str | None = None,
        **kw: Any,
    ) -> Chain:
        """A chain described by asking its node: the chain id, and the token's EIP-712 name, version and
        decimals (from `name()`, `version()`, `decimals()`); the addresses are the caller's."""
        rpc = Rpc(rpc_url)
        try:
            chain_id = int(await rpc.request("eth_chainId", []), 16)
            erc20 = Erc20(rpc, token)
            facts = [
                erc20.abi.decode(fn, await rpc.call(token, erc20.abi.encode(fn)))[0]
                for fn in ("name", "version", "decimals")
            ]
        except (EscrowError, ValueError, DecodingError) as exc:  # no node, or no such token there
            raise ChainConfigError(f"cannot describe {rpc_url} from the node: {exc}") from None
        finally:
            await rpc.aclose()
        network = Network(
            network=f"eip155:{chain_id}",
            chain_id=chain_id,
            rpc_url=rpc_url,
            token=token,
            token_name=str(facts[0]),
            token_version=str(facts[1]),
            token_decimals=int(facts[2]),
            escrow=escrow,
            account_factory=account_factory,
            entrypoint=entrypoint,
        )
        return cls(network, relayer_key=relayer_key, **kw)

    # -- parts -------------------------------------------------------------------------------------------

    @property
    def relayer(self) -> TxSender:
        """The settlement sender; a chain built without `relayer_key` can verify but not settle."""
        if self._relayer is None:
            raise ChainConfigError(f"no relayer key for {self.network.network}: pass relayer_key=")
        return self._relayer

    @property
    def has_relayer(self) -> bool:
        return self._relayer is not None

    @property
    def token(self) -> Erc20:
        return Erc20(self.rpc, self.network.token)

    @property
    def escrow(self) -> AgentEscrow:
        if not self.network.escrow:
            raise ChainConfigError(f"{self.network.network} has no escrow in its description")
        return AgentEscrow(self.rpc, self.network.escrow)

    def exact(self) -> ExactEvm:
        """EIP-3009 verification and settlement (one per chain: its nonce bookkeeping is shared)."""
        if self._exact is None:
            self._exact = ExactEvm(self.rpc, self.relayer)
        return self._exact

    def escrow_verifier(self, *, poll_interval: float = 1.0) -> EscrowVerifier:
        """Escrow payment verification with a grant cache that follows the escrow's events."""
        if self._verifier is None:
            escrow = self.escrow
            cache = GrantCache(escrow, poll_interval=poll_interval)
            self._verifier = EscrowVerifier(escrow, chain_id=self.network.chain_id, cache=cache)
        return self._verifier

    def exact_settler(self, store: ExactQueue, **options: Any) -> ExactSettler:
        """The batching settler of deferred `exact` payments queued in `store`."""
        return ExactSettler(store, self.exact(), **options)

    def escrow_settler(self, store: EscrowQueue, **options: Any) -> EscrowSettler:
        """The batching settler of `escrow` payments queued in `store`."""
        return EscrowSettler(store, self.relayer, **options)

    # -- the owner's side --------------------------------------------------------------------------------

    async def open_session(
        self,
        owner: Signer,
        *,
        max_per_call: Amount,
        budget: Amount,
        deposit: Amount = 0,
        valid_for: int = 3600,
        payees: Sequence[str] = (),
        fallback_key: str = "",
    ) -> SessionWalletFile:
        """A fresh session key for an orchestrator, granted by `owner` and paid from `owner`'s deposit.

        The owner signs the grant (and, when `deposit` > 0, an EIP-3009 deposit of its tokens into the
        escrow) as it would offline; the relayer sends both. Returns the wallet file for the orchestrator
        (`.dump(path)`, then `SessionKeyWallet.load(path)`).
        """
        network, escrow = self.network, self.escrow
        key = secrets.token_bytes(32)
        session = LocalSigner(key)
        now = await self.rpc.block_timestamp()
        if network.atomic(deposit):
            signed_deposit = sign_deposit_authorization(
                owner,
                network.token_domain,
                escrow=escrow.address,
                amount=network.atomic(deposit),
                valid_before=int(time.time()) + valid_for,
            )
            await relay_deposit(escrow, self.relayer, signed_deposit)
        signed = sign_grant_offline(
            owner,
            chain_id=network.chain_id,
            escrow=escrow.address,
            signer=session.address,
            token=network.token,
            max_per_call=network.atomic(max_per_call),
            budget=network.atomic(budget),
            valid_after=now - 60,
            valid_until=now + valid_for,
            payees=list(payees),
        )
        await relay_grant(escrow, self.relayer, signed)
        grant: GrantMessage = signed.grant
        return SessionWalletFile(
            network=network, session_key="0x" + key.hex(), grant=grant, fallback_key=fallback_key
        )

    # -- lifetime ----------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self.settle_rpc is not self.rpc:
            await self.settle_rpc.aclose()
        await self.rpc.aclose()

    async def __aenter__(self) -> Chain:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
