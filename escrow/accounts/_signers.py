"""Who signs a user operation and under which nonce.

    op = PackedUserOperation(sender=account, nonce=lane.nonce, call_data=encode_execute(calls), ...)
    op = op.signed(SessionKey(key_signer, interval=3600), chain_id=chain_id, timestamp=now)

`OwnerKey` and `SessionKey` are the account's two kinds of signer; `NonceLanes` hands out ERC-4337 2D nonce
keys so concurrent operations of one account never collide.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address

from x402 import Signer

from ..chain._rpc import Rpc
from ._userop import _GET_NONCE, ENTRYPOINT_V07, personal_digest

__all__ = [
    "Lane",
    "NonceLanes",
    "OwnerKey",
    "SessionKey",
]

# ---------------------------------------------------------------------------------------------- signers


class OwnerKey:
    """The account owner: a plain 65-byte ECDSA signature of the EIP-191 digest of the hash."""

    __slots__ = ("signer",)

    def __init__(self, signer: Signer) -> None:
        self.signer = signer

    @property
    def address(self) -> str:
        return self.signer.address

    def sign_user_op(self, user_op_hash: bytes, *, timestamp: int) -> bytes:
        return self.signer.sign_hash(personal_digest(user_op_hash))

    def __repr__(self) -> str:
        return f"OwnerKey({self.address})"


class SessionKey:
    """A session key: `key (20) ++ window (6) ++ ECDSA signature (65)`.

    `interval` is the key's rate-limit interval (0 when it has none); the window claimed is the one holding
    `timestamp`, which should be the chain's current time. An operation that lands in another window than the
    one it claims is rejected by the EntryPoint (`AA22`), so near a window's end, allow for block time.
    """

    __slots__ = ("interval", "signer")

    def __init__(self, signer: Signer, *, interval: int = 0) -> None:
        self.signer = signer
        self.interval = interval

    @property
    def address(self) -> str:
        return self.signer.address

    def window(self, timestamp: int) -> int:
        return timestamp // self.interval if self.interval else 0

    def sign_user_op(self, user_op_hash: bytes, *, timestamp: int) -> bytes:
        return (
            bytes.fromhex(self.address[2:])
            + self.window(timestamp).to_bytes(6, "big")
            + self.signer.sign_hash(personal_digest(user_op_hash))
        )

    def __repr__(self) -> str:
        return f"SessionKey({self.address}, interval={self.interval})"


# ---------------------------------------------------------------------------------------------- nonce lanes


class Lane:
    """One 2D nonce lane held by one in-flight operation: `nonce` is the next one to use on it."""

    __slots__ = ("_lanes", "index", "key", "nonce", "state")

    def __init__(self, lanes: NonceLanes, index: int, key: int, nonce: int) -> None:
        self._lanes, self.index, self.key, self.nonce = lanes, index, key, nonce
        self.state = "unknown"  # "used" (nonce consumed), "unused" (not consumed), or "unknown"

    def used(self) -> None:
        """The operation landed (executed or not): its nonce is consumed."""
        self.state = "used"

    def unused(self) -> None:
        """The operation was rejected before it could consume its nonce."""
        self.state = "unused"


class NonceLanes:
    """Allocates ERC-4337 nonce keys ("lanes") so concurrent operations of one account never collide.

    Each in-flight operation holds a lane of its own; the lowest free lane is handed out first, so a steady
    load keeps reusing the same few lanes (the first use of a lane costs about 17k gas more: the EntryPoint's
    sequence slot goes from zero to one). The key of lane `i` is `prefix << 32 | i`: processes that submit for
    the same account must use distinct prefixes. Sequence numbers are read from the EntryPoint on first use
    and then tracked locally; a lane whose fate is unknown (timeout, transport error) is read again next time.
    """

    def __init__(
        self,
        rpc: Rpc,
        sender: str,
        *,
        entry_point: str = ENTRYPOINT_V07,
        prefix: int = 0,
        max_lanes: int = 1024,
    ) -> None:
        if not 0 <= prefix < 2**160:
            raise ValueError("prefix must fit in 160 bits")
        self.rpc, self.sender, self.entry_point = rpc, to_checksum_address(sender), entry_point
        self.prefix, self.max_lanes = prefix, max_lanes
        self._free: list[int] = []
        self._next_index = 0
        self._sequence: dict[int, int] = {}
        self._available = asyncio.Condition()

    def key(self, index: int) -> int:
        return (self.prefix << 32) | index

    async def next_nonce(self, key: int) -> int:
        """`EntryPoint.getNonce(sender, key)`: `key << 64 | sequence`."""
        data = _GET_NONCE + abi_encode(["address", "uint192"], [self.sender, key])
        return int.from_bytes(await self.rpc.call(self.entry_point, data), "big")

    @asynccontextmanager
    async def lane(self) -> AsyncIterator[Lane]:
        """Hold a lane for one operation; mark it `used()` once the operation landed."""
        async with self._available:
            while not self._free and self._next_index >= self.max_lanes:
                await self._available.wait()
            if self._free:
                index = min(self._free)
                self._free.remove(index)
            else:
                index, self._next_index = self._next_index, self._next_index + 1
        key = self.key(index)
        try:
            if index in self._sequence:
                nonce = (key << 64) | self._sequence[index]
            else:
                nonce = await self.next_nonce(key)
        except BaseException:
            await self._release(index)
            raise
        lane = Lane(self, index, key, nonce)
        try:
            yield lane
        finally:
            if lane.state == "used":
                self._sequence[index] = (nonce & (2**64 - 1)) + 1
            elif lane.state == "unused":
                self._sequence[index] = nonce & (2**64 - 1)
            else:
                self._sequence.pop(index, None)
            await self._release(index)

    async def _release(self, index: int) -> None:
        async with self._available:
            self._free.append(index)
            self._available.notify()
