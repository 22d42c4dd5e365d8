"""The devnet: a local chain with EntryPoint v0.7, TestUSDC and funded accounts, described by `DevnetState`.

    with Devnet() as net:            # anvil if installed, else the py-evm node
        print(net.rpc_url, net.contracts["usdc"], net.accounts[1].address)

Contracts come from `DEPLOYMENTS`, a table read top to bottom: each row deploys an artifact (if it exists)
with constructor arguments computed from the rows above it. Transactions are signed locally and sent back
to back (automine mines each on arrival); receipts are polled every 5 ms: web3's 0.1 s default would dominate.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, NamedTuple

import httpx
import msgspec
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_account.hdaccount import key_from_seed, seed_from_mnemonic
from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from ..chain._artifacts import Artifact, artifact_exists, load_artifact
from ._bundler import BundlerProcess, start_alto
from ._networks import ChainSpec, chain_spec, place_token
from ._node import ANVIL_MNEMONIC, CHAIN_ID, DevnetError, NodeProcess, resolve_backend, start_node

__all__ = [
    "CREATE2_DEPLOYER",
    "DEPLOYMENTS",
    "ENTRYPOINT_ADDRESS",
    "Deployment",
    "Devnet",
    "DevnetAccount",
    "DevnetChain",
    "DevnetState",
]

CREATE2_DEPLOYER = to_checksum_address("0x4e59b44847b379578588920ca78fbf26c0b4956c")
ENTRYPOINT_ADDRESS = to_checksum_address("0x0000000071727De22E5E9d8BAf0edAc6f37da032")
ENTRYPOINT_SALT = "0x90d8084deab30c2a37c45e8d47f49f2f7965183cb6990a98943ef94940681de3"
PERMIT2_ADDRESS = to_checksum_address("0x000000000022D473030F116dDEE9F6B43aC78BA3")
UPTO_PROXY_ADDRESS = to_checksum_address("0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002")
_POLL = 0.005
_TIP = 10**9


class Deployment(NamedTuple):
    """One row of the deployment table. `args` maps the addresses deployed so far (plus `deployer`) to the
    constructor arguments. With `salt`, the contract goes through the CREATE2 deployer and must land at
    `address`; with `place_at`, its runtime code is set at that address (`anvil_setCode`: contracts clients
    expect at a canonical address whose real deployment we cannot replay, skipped on nodes without it);
    otherwise the deployer account creates it. A `required` row fails the devnet if its artifact
    is missing; the others are skipped until their contract is built."""

    key: str
    artifact: str
    args: Callable[[Mapping[str, str]], tuple[Any, ...]] = lambda env: ()
    salt: str | None = None
    address: str | None = None
    required: bool = False
    place_at: str | None = None  # runtime code put at this address with `anvil_setCode` (no constructor)


DEPLOYMENTS: tuple[Deployment, ...] = (
    Deployment("entrypoint", "EntryPoint", salt=ENTRYPOINT_SALT, address=ENTRYPOINT_ADDRESS, required=True),
    Deployment("usdc", "TestUSDC", required=True),
    Deployment("escrow", "AgentEscrow", lambda env: (15 * 60,)),  # withdrawal delay: the documented minimum
    Deployment("account_factory", "AgentAccountFactory", lambda env: (env["entrypoint"],)),
    # Sponsor key and owner: the deployer (accounts[0]); `deploy` funds its EntryPoint deposit.
    Deployment(
        "paymaster", "AgentPaymaster", lambda env: (env["entrypoint"], env["deployer"], env["deployer"])
    ),
    # x402 `upto`: clients hard-code both addresses (spender = the proxy, which calls Permit2 by address).
    Deployment("permit2", "Permit2", place_at=PERMIT2_ADDRESS),
    Deployment("upto_proxy", "X402UptoPermit2Proxy", place_at=UPTO_PROXY_ADDRESS),
    Deployment(
        "channels", "AgentChannels"
    ),  # MPP sessions (draft-evm-session-00); last: addresses above stay
)
#: The devnet paymaster's EntryPoint deposit, in wei: what it can sponsor before anyone tops it up.
PAYMASTER_DEPOSIT = 1_000 * 10**18


class DevnetAccount(msgspec.Struct, frozen=True):
    address: ChecksumAddress
    private_key: str


class DevnetChain(msgspec.Struct, frozen=True, kw_only=True):
    """One chain of a devnet. `label` names it in files and messages: the real network it looks like
    (`base`), else its chain id. `network_file` is its network description, once `agentpay devnet up` has
    written it (`escrow.load_network` reads it)."""

    label: str
    rpc_url: str
    chain_id: int
    network: str  # CAIP-2
    contracts: dict[str, ChecksumAddress]
    usdc_name: str
    usdc_version: str
    usdc_decimals: int
    pid: int
    network_file: str | None = None


class DevnetState(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a client needs to use a running devnet; JSON on disk (`agentpay devnet up` writes it).

    The top-level chain fields describe the first chain; `chains` lists every chain, the first included.
    A state file written before devnets had several chains has no `chains`: it loads as one chain.
    """

    backend: Literal["anvil", "py-evm"]
    rpc_url: str
    chain_id: int
    network: str  # CAIP-2, as x402 and MPP name it
    contracts: dict[str, ChecksumAddress]
    accounts: tuple[DevnetAccount, ...]
    usdc_name: str  # the token's EIP-712 domain, read from eip712Domain()
    usdc_version: str
    usdc_decimals: int
    pid: int  # the node process (anvil or the py-evm node)
    bundler_url: str | None = None  # the Alto bundler (`agentpay devnet up --bundler`), ERC-7769 JSON-RPC
    bundler_pid: int | None = None
    supervisor_pid: int | None = None  # the detached supervisor that owns the node (`agentpay devnet up`)
    log_file: str | None = None
    chains: tuple[DevnetChain, ...] = ()

    def __post_init__(self) -> None:
        if not self.chains:  # a single-chain state (or an old file): the top-level chain is the only one
            msgspec.structs.force_setattr(self, "chains", (self._top_chain(),))

    def _top_chain(self) -> DevnetChain:
        return DevnetChain(
            label=str(self.chain_id),
            rpc_url=self.rpc_url,
            chain_id=self.chain_id,
            network=self.network,
            contracts=self.contracts,
            usdc_name=self.usdc_name,
            usdc_version=self.usdc_version,
            usdc_decimals=self.usdc_decimals,
            pid=self.pid,
        )

    def chain(self, which: int | str) -> DevnetChain:
        """A chain by chain id (`8453`), CAIP-2 id (`"eip155:8453"`) or label (`"base"`)."""
        for chain in self.chains:
            if which in (chain.chain_id, chain.network, chain.label):
                return chain
        raise DevnetError(
            f"the devnet has no chain {which!r} (it has {', '.join(c.label for c in self.chains)})",
            code="devnet_no_such_chain",
        )

    @property
    def deployer(self) -> DevnetAccount:
        return self.accounts[0]

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=2)

    @classmethod
    def from_json(cls, data: bytes | str) -> DevnetState:
        try:
            return msgspec.json.decode(data, type=cls)
        except msgspec.DecodeError as exc:
            raise DevnetError(f"invalid devnet state: {exc}", code="devnet_state_invalid") from None

    def dump(self, path: str | Path) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".tmp")
        partial.write_bytes(self.to_json() + b"\n")
        partial.replace(target)  # readers never see half a file

    @classmethod
    def load(cls, path: str | Path) -> DevnetState:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise DevnetError(f"no devnet state at {path}", code="devnet_state_missing") from None
        except OSError as exc:
            raise DevnetError(f"cannot read {path}: {exc.strerror}", code="devnet_state_unreadable") from None
        try:
            return cls.from_json(data)
        except DevnetError as exc:
            raise DevnetError(f"{path}: {exc}", code=exc.code) from None


def anvil_accounts(count: int) -> tuple[DevnetAccount, ...]:
    """The accounts anvil derives from its default mnemonic (m/44'/60'/0'/0/i)."""
    seed = seed_from_mnemonic(ANVIL_MNEMONIC, "")
    keys = (key_from_seed(seed, f"m/44'/60'/0'/0/{i}") for i in range(count))
    return tuple(DevnetAccount(Account.from_key(k).address, "0x" + k.hex()) for k in keys)


class _Chain:
    """Just enough JSON-RPC to deploy: one keep-alive connection, local signing, 5 ms receipt polling."""

    def __init__(self, url: str) -> None:
        self._client = httpx.Client(timeout=60.0)
        self._url, self._ids = url, itertools.count()
        self._nonces: dict[str, int] = {}
        self._max_fee = 0
        self.chain_id = int(self.rpc("eth_chainId"), 16)

    def close(self) -> None:
        self._client.close()

    def rpc(self, method: str, *params: Any) -> Any:
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": list(params)}
        try:
            reply = self._client.post(self._url, json=body).json()
        except (httpx.HTTPError, ValueError) as exc:
            raise DevnetError(f"{method}: {exc!r}", code="devnet_rpc") from None
        if "error" in reply:
            err = reply["error"]
            detail = f"{method}: {err.get('message')} {err.get('data') or ''}".strip()
            raise DevnetError(detail, code="devnet_deploy_failed")
        return reply.get("result")

    def call(self, to: str, data: bytes) -> bytes:
        return bytes.fromhex(self.rpc("eth_call", {"to": to, "data": "0x" + data.hex()}, "latest")[2:])

    def estimate(self, sender: str, to: str | None, data: bytes) -> int:
        tx: dict[str, str] = {"from": sender, "data": "0x" + data.hex()}
        if to is not None:
            tx["to"] = to
        return int(self.rpc("eth_estimateGas", tx), 16)

    def send(self, account: DevnetAccount, to: str | None, data: bytes, gas: int, value: int = 0) -> str:
        if not self._max_fee:
            base = int(self.rpc("eth_getBlockByNumber", "latest", False)["baseFeePerGas"], 16)
            self._max_fee = 2 * base + _TIP  # base fees only fall on a devnet of nearly empty blocks
        if account.address not in self._nonces:
            self._nonces[account.address] = int(
                self.rpc("eth_getTransactionCount", account.address, "pending"), 16
            )
        tx = {
            "chainId": self.chain_id,
            "nonce": self._nonces[account.address],
            "gas": gas,
            "maxFeePerGas": self._max_fee,
            "maxPriorityFeePerGas": _TIP,
            "data": data,
            "value": value,
            **({"to": to_checksum_address(to)} if to is not None else {}),
        }
        signed = Account.sign_transaction(tx, account.private_key)
        tx_hash: str = self.rpc("eth_sendRawTransaction", "0x" + signed.raw_transaction.hex())
        self._nonces[account.address] += 1
        return tx_hash

    def wait(self, tx_hash: str, what: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (receipt := self.rpc("eth_getTransactionReceipt", tx_hash)) is None:
            if time.monotonic() > deadline:
                raise DevnetError(f"{what} {tx_hash} got no receipt", code="devnet_deploy_failed")
            time.sleep(_POLL)
        if int(receipt["status"], 16) != 1:
            raise DevnetError(f"{what} {tx_hash} reverted", code="devnet_deploy_failed")
        return dict(receipt)


def _abi_type(entry: Mapping[str, Any]) -> str:
    kind: str = entry["type"]
    if kind.startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in entry["components"]) + ")" + kind[5:]
    return kind


def _initcode(artifact: Artifact, args: Sequence[Any], name: str) -> bytes:
    inputs = artifact.constructor_inputs
    if len(inputs) != len(args):
        wanted = ", ".join(f"{_abi_type(i)} {i.get('name', '')}".strip() for i in inputs)
        raise DevnetError(
            f"{name}'s constructor takes ({wanted}) but DEPLOYMENTS passes {len(args)} argument(s): "
            "update its row in escrow/devnet/_devnet.py",
            code="devnet_deploy_args",
        )
    return bytes.fromhex(artifact.bytecode[2:]) + abi_encode([_abi_type(i) for i in inputs], list(args))


def _create2_address(salt: bytes, initcode: bytes) -> ChecksumAddress:
    digest = keccak(b"\xff" + bytes.fromhex(CREATE2_DEPLOYER[2:]) + salt + keccak(initcode))
    return to_checksum_address(digest[12:])


def _deploy_row(
    chain: _Chain, deployer: DevnetAccount, row: Deployment, env: Mapping[str, str]
) -> ChecksumAddress:
    if row.place_at is not None:
        code = load_artifact(row.artifact).deployed_bytecode
        chain.rpc("anvil_setCode", row.place_at, code)
        return to_checksum_address(row.place_at)
    initcode = _initcode(load_artifact(row.artifact), row.args(env), row.artifact)
    if row.salt is None:
        gas = chain.estimate(deployer.address, None, initcode)
        receipt = chain.wait(chain.send(deployer, None, initcode, gas + gas // 5), "transaction")
        return to_checksum_address(receipt["contractAddress"])
    salt = bytes.fromhex(row.salt[2:])
    address = _create2_address(salt, initcode)
    if row.address is not None and address != to_checksum_address(row.address):
        raise DevnetError(
            f"it would land at {address}, not {row.address}: the artifact is not the canonical build",
            code="devnet_deploy_failed",
        )
    if chain.rpc("eth_getCode", CREATE2_DEPLOYER, "latest") in ("0x", None):
        raise DevnetError(
            f"the chain has no CREATE2 deployer at {CREATE2_DEPLOYER}", code="devnet_deploy_failed"
        )
    if chain.rpc("eth_getCode", address, "latest") == "0x":
        gas = chain.estimate(deployer.address, CREATE2_DEPLOYER, salt + initcode)
        chain.wait(chain.send(deployer, CREATE2_DEPLOYER, salt + initcode, gas + gas // 5), "transaction")
    return address


def _selector(signature: str) -> bytes:
    return keccak(text=signature)[:4]


def deploy(
    chain: _Chain, accounts: Sequence[DevnetAccount], usdc_each: int, spec: ChainSpec | None = None
) -> tuple[dict[str, ChecksumAddress], str, str, int]:
    """Run `DEPLOYMENTS`, mint `usdc_each` whole USDC to every account, read the token's EIP-712 domain.
    When `spec` looks like a real network, the token moves to that network's USDC address first."""
    deployer = accounts[0]
    contracts: dict[str, ChecksumAddress] = {}
    for row in DEPLOYMENTS:
        if not artifact_exists(row.artifact):
            if row.required:
                raise DevnetError(f"artifact {row.artifact} is missing", code="devnet_deploy_failed")
            continue
        try:
            address = _deploy_row(chain, deployer, row, {**contracts, "deployer": deployer.address})
        except DevnetError as exc:
            if row.place_at is not None and not row.required:
                continue  # a node without `anvil_setCode` (py-evm): no `upto` on it
            raise DevnetError(f"deploying {row.artifact}: {exc}", code=exc.code) from None
        if chain.rpc("eth_getCode", address, "latest") == "0x":
            raise DevnetError(
                f"no code at {address} after deploying {row.artifact}", code="devnet_deploy_failed"
            )
        contracts[row.key] = address
    if "paymaster" in contracts:
        fund = _selector("addDeposit()")
        gas = chain.estimate(deployer.address, contracts["paymaster"], fund) * 2
        tx_hash = chain.send(deployer, contracts["paymaster"], fund, gas, PAYMASTER_DEPOSIT)
        chain.wait(tx_hash, "paymaster deposit")
    if spec is not None and spec.like is not None:
        contracts["usdc"] = place_token(chain.rpc, chain.call, contracts["usdc"], spec.like, chain.chain_id)
    usdc = contracts["usdc"]
    decimals = abi_decode(["uint8"], chain.call(usdc, _selector("decimals()")))[0]
    mints = [
        _selector("mint(address,uint256)")
        + abi_encode(["address", "uint256"], [a.address, usdc_each * 10**decimals])
        for a in accounts
    ]
    # Every mint costs the same (fresh balance), so one estimate serves all; send them all, then wait.
    gas = chain.estimate(deployer.address, usdc, mints[0]) * 5 // 4
    for tx_hash in [chain.send(deployer, usdc, data, gas) for data in mints]:
        chain.wait(tx_hash, "minting TestUSDC: transaction")
    domain = abi_decode(
        ["bytes1", "string", "string", "uint256", "address", "bytes32", "uint256[]"],
        chain.call(usdc, _selector("eip712Domain()")),
    )
    return contracts, domain[1], domain[2], decimals


class Devnet:
    """Start a node, deploy, and describe it; `stop()` (or leaving the `with` block) ends the node.

    `chain` picks the chain: a chain id (`Devnet(chain=8453)`, a plain devnet under that id) or a real
    network's name (`Devnet(chain="base")`: Base's chain id, and the token at Base's USDC address with its
    EIP-712 domain). Default: chain id 31337. `chain_id=N` is `chain=N`. `Devnets` runs several.
    """

    def __init__(
        self,
        *,
        chain: int | str | ChainSpec | None = None,
        chain_id: int | None = None,
        backend: str | None = None,
        port: int | None = None,
        accounts: int = 10,
        usdc_each: int = 1_000_000,
        log: IO[bytes] | None = None,
        bundler: bool = False,
    ) -> None:
        if accounts < 1:
            raise DevnetError("a devnet needs at least one account (the deployer)", code="devnet_accounts")
        self._backend, self._port, self._log = backend, port, log
        self._count, self._usdc_each = accounts, usdc_each
        self._want_bundler = bundler
        if chain is not None and chain_id is not None:
            raise DevnetError("pass chain= or chain_id=, not both", code="devnet_chains")
        chosen = chain_id if chain is None else chain
        self._spec = (
            ChainSpec(CHAIN_ID)
            if chosen is None
            else chosen
            if isinstance(chosen, ChainSpec)
            else chain_spec(chosen)
        )
        self._bundler: BundlerProcess | None = None
        self._node: NodeProcess | None = None
        self._state: DevnetState | None = None

    @property
    def state(self) -> DevnetState:
        if self._state is None:
            raise DevnetError("the devnet is not running", code="devnet_not_running")
        return self._state

    @property
    def node(self) -> NodeProcess | None:
        return self._node

    def start(self) -> DevnetState:
        if self._state is not None:
            return self._state
        backend, anvil = resolve_backend(self._backend)
        if self._want_bundler and backend != "anvil":
            raise DevnetError("the bundler needs the anvil backend", code="devnet_bundler_backend")
        accounts = anvil_accounts(self._count)
        if self._spec.like is not None and backend != "anvil":
            raise DevnetError(
                f"a devnet that looks like {self._spec.like.name} needs the anvil backend (anvil_setCode)",
                code="devnet_chains_backend",
            )
        spec = self._spec
        self._node = node = start_node(
            backend, anvil, port=self._port, accounts=self._count, log=self._log, chain_id=spec.chain_id
        )
        try:
            chain = _Chain(node.rpc_url)
            try:
                contracts, name, version, decimals = deploy(chain, accounts, self._usdc_each, spec)
                if self._want_bundler:
                    self._bundler = self._start_bundler(chain, node.rpc_url)
            finally:
                chain.close()
        except BaseException:
            self.stop()
            raise
        self._state = DevnetState(
            backend=backend,
            rpc_url=node.rpc_url,
            chain_id=chain.chain_id,
            network=f"eip155:{chain.chain_id}",
            contracts=contracts,
            accounts=accounts,
            usdc_name=name,
            usdc_version=version,
            usdc_decimals=decimals,
            pid=node.pid,
            bundler_url=self._bundler.url if self._bundler else None,
            bundler_pid=self._bundler.pid if self._bundler else None,
            chains=(
                DevnetChain(
                    label=spec.label,
                    rpc_url=node.rpc_url,
                    chain_id=chain.chain_id,
                    network=f"eip155:{chain.chain_id}",
                    contracts=contracts,
                    usdc_name=name,
                    usdc_version=version,
                    usdc_decimals=decimals,
                    pid=node.pid,
                ),
            ),
        )
        return self._state

    def _start_bundler(self, chain: _Chain, rpc_url: str) -> BundlerProcess:
        """Alto, with a fresh executor key funded by `anvil_setBalance` (shared with no other account)."""
        executor = Account.create()
        chain.rpc("anvil_setBalance", executor.address, hex(10_000 * 10**18))
        return start_alto(rpc_url, executor_key="0x" + bytes(executor.key).hex(), log=self._log)

    @property
    def bundler(self) -> BundlerProcess | None:
        return self._bundler

    def stop(self) -> None:
        if self._bundler is not None:
            self._bundler.stop()
        if self._node is not None:
            self._node.stop()
        self._node = self._state = self._bundler = None

    def __enter__(self) -> DevnetState:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
