"""Scheme-specific payloads (the second, typed decoding step) and network names.

``PaymentPayload.payload`` is an untyped JSON object until the scheme is known. Each scheme registers its
payload Struct once::

    register_scheme_payload("escrow", EscrowPayload)            # any network
    register_scheme_payload("exact", ExactEvmPayload, "eip155")  # only on EVM networks

and :func:`decode_scheme_payload` turns the raw object into that type (or raises
:class:`~x402.MalformedPayment` / :class:`~x402.UnsupportedScheme`).
"""

from __future__ import annotations

from typing import Any, Final, TypeVar

import msgspec

from ._errors import MalformedPayment, Reason, UnsupportedScheme
from ._types import ExactEvmPayload

__all__ = [
    "V1_NETWORKS",
    "caip2_namespace",
    "convert_payload",
    "decode_exact_payload",
    "decode_scheme_payload",
    "encode_scheme_payload",
    "evm_chain_id",
    "evm_network",
    "register_scheme_payload",
    "registered_schemes",
]

T = TypeVar("T")

#: x402 v1 network names -> EIP-155 chain id (the EVM ones the reference SDK knows, plus local devnets).
V1_NETWORKS: Final[dict[str, int]] = {
    "ethereum": 1,
    "sepolia": 11155111,
    "base": 8453,
    "base-sepolia": 84532,
    "avalanche": 43114,
    "avalanche-fuji": 43113,
    "polygon": 137,
    "polygon-amoy": 80002,
    "arbitrum": 42161,
    "arbitrum-sepolia": 421614,
    "optimism": 10,
    "optimism-sepolia": 11155420,
    "sei": 1329,
    "sei-testnet": 1328,
    "iotex": 4689,
    "celo": 42220,
    "localhost": 31337,
    "anvil": 31337,
}

_payload_types: dict[tuple[str, str | None], type[Any]] = {}


def caip2_namespace(network: str) -> str | None:
    """``"eip155"`` for ``"eip155:8453"``; ``"eip155"`` for a known v1 EVM name; else the prefix or None."""
    if ":" in network:
        return network.split(":", 1)[0]
    return "eip155" if network in V1_NETWORKS else None


def evm_chain_id(network: str) -> int:
    """The EIP-155 chain id of a CAIP-2 ``eip155:<id>`` or a v1 network name.

    Raises :class:`UnsupportedScheme` (code ``invalid_network``) for anything else.
    """
    if network.startswith("eip155:"):
        ref = network[7:]
        if ref.isdigit() and len(ref) <= 20 and ref.isascii():
            return int(ref)
    elif network in V1_NETWORKS:
        return V1_NETWORKS[network]
    raise UnsupportedScheme(f"not an EVM network: {network[:80]!r}", code=Reason.INVALID_NETWORK)


def evm_network(chain_id: int) -> str:
    """CAIP-2 name of an EVM chain."""
    return f"eip155:{chain_id}"


def register_scheme_payload(scheme: str, payload_type: type[Any], namespace: str | None = None) -> None:
    """Register the payload Struct of ``scheme`` (optionally only for one CAIP-2 namespace)."""
    _payload_types[(scheme, namespace)] = payload_type


def registered_schemes() -> list[tuple[str, str | None]]:
    return sorted(_payload_types, key=lambda k: (k[0], k[1] or ""))


def _payload_type(scheme: str, network: str | None) -> type[Any]:
    namespace = caip2_namespace(network) if network is not None else None
    tp = _payload_types.get((scheme, namespace)) or _payload_types.get((scheme, None))
    if tp is None:
        raise UnsupportedScheme(f"no payload type for scheme {scheme[:64]!r} on {str(network)[:64]!r}")
    return tp


def decode_scheme_payload(scheme: str, payload: Any, network: str | None = None) -> Any:
    """Decode the raw ``payload`` object of ``scheme`` into its registered type."""
    tp = _payload_type(scheme, network)
    return convert_payload(payload, tp)


def convert_payload(payload: Any, tp: type[T]) -> T:
    """``msgspec.convert`` with the package's error type."""
    try:
        return msgspec.convert(payload, tp)
    except msgspec.ValidationError as exc:
        raise MalformedPayment(f"payload: {exc}") from None
    except (TypeError, ValueError, RecursionError) as exc:  # pragma: no cover - defensive
        raise MalformedPayment(f"payload: {exc}") from None


def decode_exact_payload(payload: Any) -> ExactEvmPayload:
    """The ``exact`` / EVM (EIP-3009) payload: ``{"signature", "authorization": {...}}``."""
    return convert_payload(payload, ExactEvmPayload)


def encode_scheme_payload(payload: msgspec.Struct) -> dict[str, Any]:
    """The JSON object to put in ``PaymentPayload.payload``."""
    out: dict[str, Any] = msgspec.to_builtins(payload)
    return out


register_scheme_payload("exact", ExactEvmPayload, "eip155")
