"""The packed batch of `AgentEscrow.settlePacked`: `settle`'s payments in about a third of the call data.

Calldata costs 16 gas per non-zero byte and 4 per zero byte, and the ABI form of a payment is 13 words or
more: 12 zero bytes of padding per address, 20-odd per small uint, two words of offset and length per
signature. The packed form names each address once per batch and each field in the width the contract reads:

    batch = u16 count ++ u8 n ++ n x address (20 bytes)
            ++ count x (u8 payer ++ u8 payee ++ u8 token ++ u96 amount ++ u256 nonce
                        ++ u32 deadline ++ u32 epoch ++ u16 signatureLength ++ signature)

all big-endian, where an entry's amount, nonce, deadline and epoch are each XORed with the entry before's
(the first with zero): sequential nonces under one price and deadline send mostly zero bytes. A batch with a
value that does not fit (an amount of 2**96 or more, a deadline past 2106, more than 255 addresses or 65,535
payments) has no packed form: `pack_batch` returns None and the caller sends the ABI `settle` instead. The
payment's EIP-712 digest covers the full-width values, which the contract rebuilds exactly, so the signatures
are those of `settle`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from eth_utils.address import to_checksum_address

from x402._escrow import EscrowPayload, EscrowPayment

__all__ = ["ENTRY_SIZE", "pack_batch", "unpack_batch"]

ENTRY_SIZE: Final = 57  # an entry's fixed bytes, before its signature
_MAX_AMOUNT: Final = 2**96
_MAX_DEADLINE: Final = 2**32
_MAX_ADDRESSES: Final = 255
_MAX_COUNT: Final = 2**16


def pack_batch(payloads: Sequence[EscrowPayload]) -> bytes | None:
    """The packed batch of `payloads` in order, or None when one of its values does not fit the packing."""
    if len(payloads) >= _MAX_COUNT:
        return None
    table: dict[bytes, int] = {}
    entries = bytearray()

    def index(address: str) -> int:
        raw = bytes.fromhex(address[2:])
        return table.setdefault(raw, len(table))

    previous = (0, 0, 0, 0)  # amount, nonce, deadline, epoch of the entry before
    for payload in payloads:
        p = payload.payment
        amount, deadline = int(p.amount), int(p.deadline)
        signature = bytes.fromhex(payload.signature[2:])
        if amount >= _MAX_AMOUNT or deadline >= _MAX_DEADLINE or len(signature) >= 2**16:
            return None
        indexes = (index(p.payer), index(p.payee), index(p.token))
        if len(table) > _MAX_ADDRESSES:
            return None
        entries += bytes(indexes)
        values = (amount, int(p.nonce), deadline, int(p.epoch))
        if values[1] >= 2**256 or not 0 <= values[3] < 2**32:  # not a valid Payment: let `settle` refuse it
            return None
        xored = [v ^ w for v, w in zip(values, previous, strict=True)]
        previous = values
        entries += xored[0].to_bytes(12, "big") + xored[1].to_bytes(32, "big")
        entries += xored[2].to_bytes(4, "big") + xored[3].to_bytes(4, "big")
        entries += len(signature).to_bytes(2, "big") + signature
    return len(payloads).to_bytes(2, "big") + bytes((len(table),)) + b"".join(table) + bytes(entries)


def unpack_batch(batch: bytes) -> list[EscrowPayload]:
    """The payments of a packed batch, decoded as the contract does; ValueError where it would revert."""
    if len(batch) < 3:
        raise ValueError("a packed batch starts with 3 header bytes")
    count, n = int.from_bytes(batch[:2], "big"), batch[2]
    at = 3 + 20 * n
    if at > len(batch):
        raise ValueError("the address table runs past the batch")
    table = [to_checksum_address(batch[3 + 20 * i : 23 + 20 * i]) for i in range(n)]
    out = []
    amount = nonce = deadline = epoch = 0
    for _ in range(count):
        if at + ENTRY_SIZE > len(batch):
            raise ValueError(f"entry at byte {at} is cut short")
        e = batch[at : at + ENTRY_SIZE]
        length = int.from_bytes(e[55:57], "big")
        end = at + ENTRY_SIZE + length
        if end > len(batch):
            raise ValueError(f"signature at byte {at + ENTRY_SIZE} is cut short")
        if max(e[0], e[1], e[2]) >= n:
            raise ValueError(f"entry at byte {at} names an address outside the table")
        amount ^= int.from_bytes(e[3:15], "big")
        nonce ^= int.from_bytes(e[15:47], "big")
        deadline ^= int.from_bytes(e[47:51], "big")
        epoch ^= int.from_bytes(e[51:55], "big")
        payment = EscrowPayment(
            payer=table[e[0]],
            payee=table[e[1]],
            token=table[e[2]],
            amount=str(amount),
            nonce=str(nonce),
            deadline=str(deadline),
            epoch=epoch,
        )
        out.append(EscrowPayload(signature="0x" + batch[at + ENTRY_SIZE : end].hex(), payment=payment))
        at = end
    if at != len(batch):
        raise ValueError(f"{len(batch) - at} bytes after the last entry")
    return out
