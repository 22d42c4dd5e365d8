"""Devnet chains that look like real networks, and the `--chains` spec that names them.

A look-alike chain runs under the real network's chain id and carries the test token at that network's
canonical USDC address, under USDC's EIP-712 domain there. Clients that know only real networks' USDC (the
x402 SDKs' default assets, mppx's EVM charge) then pay the devnet unchanged. Facts checked against the x402
SDK's default assets per network (`x402.mechanisms.evm.default_assets`).

The token is moved, not rebuilt: TestUSDC is deployed as usual, its runtime code is set at the canonical
address (`anvil_setCode`) and its storage (only the ERC-20 name and symbol before any mint) copied there.
OpenZeppelin's EIP712 rebuilds its domain separator whenever `address(this)` differs from the deploying
address, so `verifyingContract` and `chainId` come out right by themselves. Where a network's token is
named differently (Base Sepolia's is `"USDC"`), the name's immutables (its hash and short string) and the
ERC-20 name slot are rewritten word for word. The result is checked against `eip712Domain()` and
`DOMAIN_SEPARATOR()` before the devnet is handed out, so a TestUSDC whose layout changes fails loudly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from ._node import CHAIN_ID, DevnetError

__all__ = ["MAX_CHAINS", "REAL_NETWORKS", "ChainSpec", "RealNetwork", "parse_chains"]

MAX_CHAINS = 8  # each chain is one node process; more than this on a laptop is a mistake, not a plan


class RealNetwork(NamedTuple):
    """A real network a devnet chain can look like: its chain id and its USDC (address, EIP-712 domain)."""

    name: str
    chain_id: int
    usdc: ChecksumAddress
    usdc_name: str  # the EIP-712 domain name, which is also the token's ERC-20 name()
    usdc_version: str


REAL_NETWORKS: dict[str, RealNetwork] = {
    n.name: n
    for n in (
        RealNetwork(
            "base", 8453, to_checksum_address("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"), "USD Coin", "2"
        ),
        RealNetwork(
            "base-sepolia",
            84532,
            to_checksum_address("0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
            "USDC",
            "2",
        ),
        RealNetwork(
            "arbitrum",
            42161,
            to_checksum_address("0xaf88d065e77c8cC2239327C5EDb3A432268e5831"),
            "USD Coin",
            "2",
        ),
        RealNetwork(
            "arbitrum-sepolia",
            421614,
            to_checksum_address("0x75faf114eafb1BDbe2F0316DF893fd58CE46AA4d"),
            "USD Coin",
            "2",
        ),
    )
}
_ALIASES = {"arbitrum-one": "arbitrum", "base-mainnet": "base"}


class ChainSpec(NamedTuple):
    """One chain to start: its chain id, and the real network it looks like (None: a plain devnet chain)."""

    chain_id: int
    like: RealNetwork | None = None

    @property
    def label(self) -> str:
        """How files and messages name the chain: the network's name, else its chain id."""
        return self.like.name if self.like is not None else str(self.chain_id)


def real_network(name: str) -> RealNetwork:
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    key = _ALIASES.get(key, key)
    if key not in REAL_NETWORKS:
        known = ", ".join(REAL_NETWORKS)
        raise DevnetError(f"unknown network {name!r} (known: {known}, or a chain id)", code="devnet_chains")
    return REAL_NETWORKS[key]


def chain_spec(item: str | int) -> ChainSpec:
    """`"base"` (a real network's look-alike) or a chain id (`8453`, `"8453"` or `"eip155:8453"`: a plain
    devnet chain under that id)."""
    text = item if isinstance(item, int) else item.strip().removeprefix("eip155:")
    if isinstance(text, int) or text.isdigit():
        chain_id = int(text)
        if not 0 < chain_id < 2**53:  # JSON numbers, and what wallets accept
            raise DevnetError(f"chain id {chain_id} is out of range", code="devnet_chains")
        return ChainSpec(chain_id)
    like = real_network(text)
    return ChainSpec(like.chain_id, like)


def parse_chains(spec: int | str | Sequence[str | int]) -> tuple[ChainSpec, ...]:
    """The chains `spec` names: a count (`2`, `"2"`: chain ids 31337, 31338, ...), or a comma-separated
    list or sequence of network names and chain ids (`"base,arbitrum"`, `"8453,10"`, `["base", 31337]`).
    A lone number is a count: name a single chain id as `"eip155:8453"`."""
    if isinstance(spec, str):
        text = spec.strip()
        if text.isdigit():
            spec = int(text)
        else:
            spec = [part for part in text.split(",") if part.strip()]
    if isinstance(spec, int):
        if not 0 < spec <= MAX_CHAINS:
            hint = f" (to name chain id {spec}, write eip155:{spec})" if spec > MAX_CHAINS else ""
            raise DevnetError(
                f"a devnet runs 1 to {MAX_CHAINS} chains, not {spec}{hint}", code="devnet_chains"
            )
        return tuple(ChainSpec(CHAIN_ID + i) for i in range(spec))
    chains = tuple(chain_spec(item) for item in spec)
    if not 0 < len(chains) <= MAX_CHAINS:
        raise DevnetError(f"a devnet runs 1 to {MAX_CHAINS} chains, not {len(chains)}", code="devnet_chains")
    seen: set[int] = set()
    for chain in chains:
        if chain.chain_id in seen:
            raise DevnetError(f"chain id {chain.chain_id} is named twice", code="devnet_chains")
        seen.add(chain.chain_id)
    return chains


# -- moving the token to the canonical address ---------------------------------------------------------------

_STORAGE_SLOTS = 16  # TestUSDC's plain (non-mapping) state lives in its first few slots: name, symbol


def _short_string(text: str) -> bytes:
    """OpenZeppelin's ShortString: the bytes left-aligned, the length in the last byte (an immutable)."""
    raw = text.encode()
    if len(raw) > 31:
        raise DevnetError(f"token name {text!r} is longer than 31 bytes", code="devnet_deploy_failed")
    return raw.ljust(31, b"\0") + bytes([len(raw)])


def _storage_string(text: str) -> bytes:
    """A Solidity `string` under 32 bytes in storage: the bytes left-aligned, twice the length last."""
    raw = text.encode()
    return raw.ljust(31, b"\0") + bytes([2 * len(raw)])


def _replace_word(blob: str, old: bytes, new: bytes, what: str) -> str:
    if old == new:
        return blob
    pattern = old.hex()
    if not re.search(pattern, blob):
        raise DevnetError(f"TestUSDC's {what} is not where expected", code="devnet_deploy_failed")
    return blob.replace(pattern, new.hex())


_DOMAIN_TYPEHASH = keccak(
    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)


def place_token(
    rpc: Callable[..., Any],
    call: Callable[[str, bytes], bytes],
    deployed: str,
    like: RealNetwork,
    chain_id: int,
) -> ChecksumAddress:
    """Put the TestUSDC deployed at `deployed` (no balances yet) at `like`'s USDC address with its domain."""
    name, version = _read_domain(call, deployed)[1:3]
    code: str = rpc("eth_getCode", deployed, "latest")[2:]
    code = _replace_word(code, keccak(text=name), keccak(text=like.usdc_name), "EIP-712 name hash")
    code = _replace_word(code, _short_string(name), _short_string(like.usdc_name), "EIP-712 name")
    code = _replace_word(code, keccak(text=version), keccak(text=like.usdc_version), "EIP-712 version hash")
    code = _replace_word(code, _short_string(version), _short_string(like.usdc_version), "EIP-712 version")
    rpc("anvil_setCode", like.usdc, "0x" + code)
    old_name, new_name = _storage_string(name), _storage_string(like.usdc_name)
    renamed = old_name == new_name
    for slot in range(_STORAGE_SLOTS):
        word = bytes.fromhex(rpc("eth_getStorageAt", deployed, hex(slot), "latest")[2:].rjust(64, "0"))
        if word == old_name:
            word, renamed = new_name, True
        if any(word):
            rpc("anvil_setStorageAt", like.usdc, "0x" + slot.to_bytes(32, "big").hex(), "0x" + word.hex())
    if not renamed:
        raise DevnetError("TestUSDC's ERC-20 name is not where expected", code="devnet_deploy_failed")
    _check_domain(call, like, chain_id)
    return like.usdc


def _read_domain(call: Callable[[str, bytes], bytes], token: str) -> tuple[Any, ...]:
    return tuple(
        abi_decode(
            ["bytes1", "string", "string", "uint256", "address", "bytes32", "uint256[]"],
            call(token, keccak(text="eip712Domain()")[:4]),
        )
    )


def _check_domain(call: Callable[[str, bytes], bytes], like: RealNetwork, chain_id: int) -> None:
    """The moved token reports, and signs under, exactly the real USDC's domain on this chain."""
    _, name, version, reported_chain, contract = _read_domain(call, like.usdc)[:5]
    wanted = (like.usdc_name, like.usdc_version, chain_id, like.usdc)
    got = (name, version, reported_chain, to_checksum_address(contract))
    (erc20_name,) = abi_decode(["string"], call(like.usdc, keccak(text="name()")[:4]))
    separator = call(like.usdc, keccak(text="DOMAIN_SEPARATOR()")[:4])
    expected = keccak(
        abi_encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [_DOMAIN_TYPEHASH, keccak(text=name), keccak(text=version), chain_id, like.usdc],
        )
    )
    if got != wanted or erc20_name != like.usdc_name or separator != expected:
        raise DevnetError(
            f"the token placed at {like.usdc} reports domain {got}, name {erc20_name!r}; wanted {wanted}",
            code="devnet_deploy_failed",
        )
