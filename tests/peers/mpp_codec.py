"""Peer: pympp's own codec functions on given inputs, no network (runs under .venv-peers).

Reads one JSON object on stdin and prints pympp's answers as the last stdout line:

    {"challenge_hash": [[id, realm], ...],      -> {"challenge_hash": ["0x..", ...]}
     "parse_challenge": ["Payment id=..", ...],  -> {"parse_challenge": [{id, realm, method, intent,
                                                      request (decoded), expires, opaque, ...} | {"error"}]}
     "parse_receipt": ["<b64url>", ...],         -> {"parse_receipt": [{status, method, reference, ...}]}
     "verify_challenge": {"secret": s, "realm": r, "headers": ["Payment id=..", ...]}
                                                 -> {"verify_challenge": [true | false, ...]}
     "create_challenge": [{secret_key, realm, method, intent, request, expires?, digest?, meta?,
                           header?}, ...]        -> {"create_challenge": ["Payment id=..", ...]}

``verify_challenge`` recomputes each challenge id with pympp's HMAC (``Challenge.verify``): true
means the issuer binds the same fields the same way pympp and mppx do. ``challenge_hash`` is
``mpp.methods.evm._eip3009.challenge_hash``, the EIP-3009 nonce pympp 0.16 signs into native
``evm/charge`` credentials.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from _peer import emit
from mpp import Challenge, Receipt
from mpp.methods.evm._eip3009 import challenge_hash


def parse_challenge(header: str) -> dict[str, Any]:
    try:
        challenge = Challenge.from_www_authenticate(header)
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}
    return {
        "id": challenge.id,
        "realm": challenge.realm,
        "method": challenge.method,
        "intent": challenge.intent,
        "request": challenge.request,
        "expires": challenge.expires,
        "digest": challenge.digest,
        "opaque": challenge.opaque,
        "description": challenge.description,
    }


def parse_receipt(value: str) -> dict[str, Any]:
    try:
        receipt = Receipt.from_payment_receipt(value)
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}
    return {
        "status": receipt.status,
        "method": receipt.method,
        "reference": receipt.reference,
        "timestamp": str(receipt.timestamp),
    }


def main() -> None:
    query = json.loads(sys.stdin.read() or "{}")
    out: dict[str, Any] = {}
    if "challenge_hash" in query:
        out["challenge_hash"] = [challenge_hash(cid, realm) for cid, realm in query["challenge_hash"]]
    if "parse_challenge" in query:
        out["parse_challenge"] = [parse_challenge(h) for h in query["parse_challenge"]]
    if "parse_receipt" in query:
        out["parse_receipt"] = [parse_receipt(r) for r in query["parse_receipt"]]
    if "verify_challenge" in query:
        spec = query["verify_challenge"]
        out["verify_challenge"] = [
            Challenge.from_www_authenticate(h).verify(spec["secret"], spec["realm"]) for h in spec["headers"]
        ]
    if "create_challenge" in query:
        out["create_challenge"] = [
            Challenge.create(**spec).to_www_authenticate(spec["realm"]) for spec in query["create_challenge"]
        ]
    emit(out)


if __name__ == "__main__":
    main()
