"""The official-SDK half of the throughput benchmark.

``run_official`` runs ``tests/peers/bench_official.py`` in the peer venv (.venv-peers, where the
official ``x402`` 2.25.0 package lives) and returns its measurement: the official Starlette/FastAPI
``PaymentMiddlewareASGI`` served in-process through ``httpx.ASGITransport``, paid by the official
httpx client with ``concurrency`` concurrent tasks, with

* ``settle_mode="stub"``: a facilitator that says verify ok / settle ok without touching a chain
  (``verify=True``: after recovering the EIP-3009 signer, as our benchmark's stub settler does);
* ``settle_mode="chain"``: the official facilitator (``x402Facilitator`` +
  ``FacilitatorWeb3Signer``) broadcasting one ``transferWithAuthorization`` per request on anvil.

By default the official httpx client pays each request (402 -> sign -> paid retry); with
``presigned=True`` the official client signs every payment before the clock starts and the timed
requests carry them up front (the server's cost alone; ``sign_us`` is then the client's time to sign
and encode one payment). ``unpaid=N`` also times N unpaid requests (``unpaid_per_s``).

It also reports the official client's signing time per payment (``sign_ms``) and the eth-keys ECC
backend the peer venv uses (``ecc_backend``): without ``coincurve`` installed there, eth-keys
falls back to pure-Python ECDSA and both figures get several times slower.

    from tests.bench._official import run_official
    run_official(16, 400, "stub")
    run_official(16, 2000, "stub", presigned=True, verify=True, unpaid=2000)
    run_official(16, 200, "chain", devnet=state)    # an escrow.DevnetState (or rpc_url=, asset=, keys)
"""

from __future__ import annotations

from typing import Any

from tests.peers._harness import run_peer

SETTLE_ALIASES = {
    "stub": "stub",
    "none": "stub",
    "chain": "chain",
    "real": "chain",
    "anvil": "chain",
    "before-response": "chain",
}


def run_official(
    concurrency: int = 16,
    n: int = 400,
    settle_mode: str = "stub",
    *,
    devnet: Any = None,
    payer_index: int = 4,
    facilitator_index: int = 5,
    rpc_url: str | None = None,
    chain_id: int = 31337,
    asset: str | None = None,
    pay_to: str | None = None,
    payer_key: str | None = None,
    facilitator_key: str | None = None,
    amount: int = 1000,
    warmup: int = 3,
    sign_rounds: int = 300,
    presigned: bool = False,
    verify: bool = False,
    unpaid: int = 0,
    timeout: float = 600,
) -> dict[str, Any]:
    """Measure the official x402 middleware; returns ``{"req_per_s", "seconds", "sign_ms", ...}``.

    ``settle_mode="chain"`` needs ``rpc_url``, ``asset`` (an EIP-3009 token whose EIP-712 domain is
    readable through ``eip712Domain()``), ``payer_key`` (holding at least ``n + warmup`` times
    ``amount``) and ``facilitator_key`` (gas for one transaction per request). Given a ``devnet``
    (``escrow.DevnetState``: every account holds TestUSDC and ETH), these default to its RPC URL, its
    TestUSDC and the keys of accounts ``payer_index`` and ``facilitator_index``. Use keys no other
    process is sending transactions from while this runs.
    """
    if devnet is not None:
        rpc_url = rpc_url or devnet.rpc_url
        chain_id = devnet.chain_id
        asset = asset or devnet.contracts["usdc"]
        payer_key = payer_key or devnet.accounts[payer_index].private_key
        facilitator_key = facilitator_key or devnet.accounts[facilitator_index].private_key
    mode = SETTLE_ALIASES.get(settle_mode)
    if mode is None:
        raise ValueError(f"settle_mode must be one of {sorted(SETTLE_ALIASES)}, not {settle_mode!r}")
    args = [
        "--settle",
        mode,
        "--n",
        str(n),
        "--concurrency",
        str(concurrency),
        "--warmup",
        str(warmup),
        "--sign-rounds",
        str(sign_rounds),
        "--chain-id",
        str(chain_id),
        "--amount",
        str(amount),
        "--unpaid",
        str(unpaid),
    ]
    if presigned:
        args.append("--presigned")
    if verify:
        args.append("--verify")
    for flag, value in (("--rpc-url", rpc_url), ("--asset", asset), ("--pay-to", pay_to)):
        if value is not None:
            args += [flag, value]
    env = {}
    if payer_key is not None:
        env["PEER_PRIVATE_KEY"] = payer_key
    if facilitator_key is not None:
        env["PEER_FACILITATOR_KEY"] = facilitator_key
    if mode == "chain" and not (rpc_url and asset and payer_key and facilitator_key):
        raise ValueError("settle_mode='chain' needs rpc_url, asset, payer_key and facilitator_key")
    result: dict[str, Any] = run_peer("bench_official.py", *args, env=env, timeout=timeout)
    return result


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run_official(16, int(sys.argv[1]) if len(sys.argv) > 1 else 400, "stub")))
