"""`ContractAbi`: an artifact's ABI as selectors, eth_abi types, event topics and errors, computed once.

The chain client's part of every contract binding (escrow, accounts, ERC-20): encode calls, decode results,
reverts and logs (`EscrowEvent`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak

from ._rpc import Log

__all__ = ["ContractAbi", "EscrowEvent", "abi_type"]


def abi_type(entry: Mapping[str, Any]) -> str:
    kind: str = entry["type"]
    if kind.startswith("tuple"):
        inner = ",".join(abi_type(c) for c in entry["components"])
        return f"({inner}){kind[5:]}"
    return kind


class _Function(NamedTuple):
    selector: bytes
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


class _Event(NamedTuple):
    name: str
    names: tuple[str, ...]  # every input, in order
    indexed: tuple[bool, ...]
    types: tuple[str, ...]


class EscrowEvent(NamedTuple):
    """One decoded log: `args` by input name; `tx_hash` and `block` where the log came from."""

    name: str
    args: dict[str, Any]
    tx_hash: str
    block: int
    address: str


class ContractAbi:
    """Selectors, types and event topics of one ABI, computed once."""

    def __init__(self, abi: Sequence[Mapping[str, Any]]) -> None:
        self.functions: dict[str, _Function] = {}
        self.events: dict[bytes, _Event] = {}
        self.topics: dict[str, str] = {}
        self.errors: dict[bytes, tuple[str, tuple[str, ...]]] = {}
        for entry in abi:
            kind = entry.get("type")
            inputs = tuple(abi_type(i) for i in entry.get("inputs", []))
            if kind == "function":
                sig = f"{entry['name']}({','.join(inputs)})"
                outputs = tuple(abi_type(o) for o in entry.get("outputs", []))
                # Overloads keep the first name; callers needing another use the full signature.
                self.functions.setdefault(entry["name"], _Function(keccak(text=sig)[:4], inputs, outputs))
                self.functions[sig] = _Function(keccak(text=sig)[:4], inputs, outputs)
            elif kind == "event":
                topic = keccak(text=f"{entry['name']}({','.join(inputs)})")
                names = tuple(i["name"] for i in entry["inputs"])
                indexed = tuple(bool(i.get("indexed")) for i in entry["inputs"])
                self.events[topic] = _Event(entry["name"], names, indexed, inputs)
                self.topics[entry["name"]] = "0x" + topic.hex()
            elif kind == "error":
                self.errors[keccak(text=f"{entry['name']}({','.join(inputs)})")[:4]] = (entry["name"], inputs)

    def encode(self, name: str, *args: Any) -> bytes:
        fn = self.functions[name]
        return fn.selector + abi_encode(fn.inputs, args)

    def decode(self, name: str, data: bytes) -> tuple[Any, ...]:
        return tuple(abi_decode(self.functions[name].outputs, data))

    def decode_error(self, data: bytes) -> tuple[str, tuple[Any, ...]] | None:
        found = self.errors.get(data[:4])
        if found is None:
            return None
        return found[0], tuple(abi_decode(found[1], data[4:]))

    def decode_log(self, log: Log, *, block: int = 0, tx_hash: str = "") -> EscrowEvent | None:
        if not log.topics:
            return None
        event = self.events.get(bytes.fromhex(log.topics[0][2:]))
        if event is None:
            return None
        plain = [t for t, i in zip(event.types, event.indexed, strict=True) if not i]
        values = iter(abi_decode(plain, bytes.fromhex(log.data[2:])))
        topics = iter(log.topics[1:])
        args: dict[str, Any] = {}
        for name, indexed, tp in zip(event.names, event.indexed, event.types, strict=True):
            if indexed:
                raw = bytes.fromhex(next(topics)[2:])
                args[name] = (
                    abi_decode([tp], raw)[0] if tp in ("address", "uint256", "uint32", "bool") else raw
                )
            else:
                args[name] = next(values)
        return EscrowEvent(event.name, args, tx_hash, block, log.address)
