"""Signers: anything that can sign a 32-byte digest as a 65-byte ``r || s || v`` (v = 27/28)."""

from __future__ import annotations

import importlib
from typing import Any, Final, Protocol, runtime_checkable

import coincurve

from ._errors import InvalidSignature
from ._keccak import checksum_address
from ._keccak import keccak256 as keccak

__all__ = [
    "SECP256K1_HALF_N",
    "SECP256K1_N",
    "LocalSigner",
    "Signer",
    "recover_hash",
]

SECP256K1_N: Final = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1_HALF_N: Final = SECP256K1_N // 2


@runtime_checkable
class Signer(Protocol):
    """Signs EIP-712 digests. ``address`` is the EIP-55 checksummed address of the key."""

    @property
    def address(self) -> str: ...

    def sign_hash(self, digest: bytes) -> bytes:
        """65-byte ``r || s || v`` with ``v`` in {27, 28} and low ``s``."""
        ...


def _address_of(public_key: coincurve.PublicKey) -> str:
    return checksum_address(keccak(public_key.format(compressed=False)[1:])[-20:])


class LocalSigner:
    """An in-process secp256k1 key (coincurve/libsecp256k1). Signatures are deterministic (RFC 6979) and
    low-s, as Ethereum requires."""

    __slots__ = ("_address", "_key")

    def __init__(self, private_key: bytes | str) -> None:
        if isinstance(private_key, str):
            text = private_key[2:] if private_key[:2] in ("0x", "0X") else private_key
            try:
                private_key = bytes.fromhex(text)
            except ValueError:
                raise ValueError("private key must be 32 bytes of hex") from None
        if len(private_key) != 32:
            raise ValueError("private key must be 32 bytes")
        self._key = coincurve.PrivateKey(private_key)
        self._address = _address_of(self._key.public_key)

    @classmethod
    def random(cls) -> LocalSigner:
        return cls(coincurve.PrivateKey().secret)

    @property
    def address(self) -> str:
        return self._address

    def sign_hash(self, digest: bytes) -> bytes:
        if len(digest) != 32:
            raise ValueError("digest must be 32 bytes")
        sig = self._key.sign_recoverable(digest, hasher=None)
        return sig[:64] + bytes((sig[64] + 27,))

    def __repr__(self) -> str:  # never show the key
        return f"LocalSigner({self._address})"


def recover_hash(digest: bytes, signature: bytes) -> str:
    """The checksummed address that signed ``digest``; :class:`InvalidSignature` for a malformed,
    high-s, or unrecoverable signature (v must be 27 or 28, as the EIP-3009 token's ``ecrecover`` needs)."""
    return checksum_address(recover_hash_raw(digest, signature))


def recover_hash_raw(digest: bytes, signature: bytes) -> bytes:
    """As :func:`recover_hash`, the 20 address bytes (no EIP-55 checksum: for hot-path comparisons)."""
    if len(digest) != 32:
        raise InvalidSignature("digest must be 32 bytes")
    if len(signature) != 65:
        raise InvalidSignature(f"signature must be 65 bytes, got {len(signature)}")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    v = signature[64]
    if v not in (27, 28):
        raise InvalidSignature(f"signature v must be 27 or 28, got {v}")
    if not (0 < r < SECP256K1_N):
        raise InvalidSignature("signature r out of range")
    if not (0 < s <= SECP256K1_HALF_N):
        raise InvalidSignature("signature s out of range (high-s signatures are malleable and refused)")
    return keccak(_recover_public_key(digest, signature[:64], v - 27))[-20:]


def _recover_with_coincurve(digest: bytes, rs: bytes, recid: int) -> bytes:
    """The 64-byte uncompressed public key (x || y) that signed `digest`, through coincurve's API."""
    try:
        public_key = coincurve.PublicKey.from_signature_and_message(rs + bytes((recid,)), digest, hasher=None)
    except Exception:  # libsecp256k1 reports failures as ValueError/Exception
        raise InvalidSignature("signature does not recover to a public key") from None
    return bytes(public_key.format(compressed=False)[1:])


try:  # the same libsecp256k1 calls without coincurve's object layers: a fifth of a recovery's time
    _binding: Any = importlib.import_module("coincurve._libsecp256k1")  # the cffi module: no stubs
    _ffi, _lib = _binding.ffi, _binding.lib
    _CTX = importlib.import_module("coincurve.context").GLOBAL_CONTEXT.ctx
    _UNCOMPRESSED = _lib.SECP256K1_EC_UNCOMPRESSED

    def _recover_public_key(digest: bytes, rs: bytes, recid: int) -> bytes:
        sig = _ffi.new("secp256k1_ecdsa_recoverable_signature *")
        key = _ffi.new("secp256k1_pubkey *")
        if not (
            _lib.secp256k1_ecdsa_recoverable_signature_parse_compact(_CTX, sig, rs, recid)
            and _lib.secp256k1_ecdsa_recover(_CTX, key, sig, digest)
        ):
            raise InvalidSignature("signature does not recover to a public key")
        out = _ffi.new("unsigned char[65]")
        size = _ffi.new("size_t *", 65)
        _lib.secp256k1_ec_pubkey_serialize(_CTX, out, size, key, _UNCOMPRESSED)
        return bytes(_ffi.buffer(out, 65))[1:]

except (ImportError, AttributeError):  # another coincurve layout: its public API, a little slower
    _recover_public_key = _recover_with_coincurve
