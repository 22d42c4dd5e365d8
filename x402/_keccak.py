"""keccak-256 and EIP-55 checksums on the verification hot path.

Every verified payment hashes three to four times (struct hash, digest, the recovered key's address, its
checksum). eth-hash's auto backend prefers pycryptodome, whose ctypes wrapper costs about 6 us per call;
safe-pysha3's C object costs about 1 us. So the fastest implementation installed is picked once here:
safe-pysha3 (``sha3``), else pycryptodome's keccak directly, else eth-hash. All three compute the same
function (the test-suite checks them against eth-hash).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Final

__all__ = ["checksum_address", "keccak256"]


def _pick() -> Callable[[bytes], bytes]:
    try:
        # Imported by name: safe-pysha3 ships no type information.
        keccak_256: Any = importlib.import_module("sha3").keccak_256
    except (ImportError, AttributeError):
        keccak_256 = None
    if keccak_256 is not None:
        return lambda data: bytes(keccak_256(data).digest())
    try:
        from Crypto.Hash import keccak as _pycryptodome
    except ImportError:
        from eth_hash.auto import keccak

        return keccak
    new = _pycryptodome.new
    return lambda data: bytes(new(data=data, digest_bits=256).digest())


keccak256: Final[Callable[[bytes], bytes]] = _pick()

_HEX: Final = b"0123456789abcdef"
# Per hex digit of the address hash: 0x20 (upper-case this position) when the nibble is >= 8.
_HIGH_NIBBLE: Final = bytes.maketrans(_HEX, b"\x00" * 8 + b"\x20" * 8)
# Per hex digit of the address: 0x20 for the letters a-f, which are the only ones that have a case.
_LETTER: Final = bytes.maketrans(_HEX, b"\x00" * 10 + b"\x20" * 6)


def checksum_address(raw: bytes) -> str:
    """The EIP-55 form of a 20-byte address, in C-speed operations instead of a per-character loop: the
    case bits to clear are (hash nibble >= 8) AND (digit is a letter), subtracted from the lower-case text
    in one big-integer operation (no borrow can occur: each byte is 0x00 or 0x20 below a letter)."""
    if len(raw) != 20:
        raise ValueError("an address is 20 bytes")
    lower = raw.hex().encode("ascii")
    digest = keccak256(lower).hex().encode("ascii")[:40]
    high = int.from_bytes(digest.translate(_HIGH_NIBBLE), "big")
    flip = high & int.from_bytes(lower.translate(_LETTER), "big")
    return "0x" + (int.from_bytes(lower, "big") - flip).to_bytes(40, "big").decode("ascii")
