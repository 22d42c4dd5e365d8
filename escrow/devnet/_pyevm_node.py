"""A small JSON-RPC-over-HTTP node on py-evm (through eth-tester), for machines without anvil.

    python -m escrow.devnet._pyevm_node --port 8545 [--accounts 10] [--chain-id 31337]

It speaks the subset of the Ethereum JSON-RPC API that web3.py and raw clients use against a devnet, with
the same conventions as anvil (hex quantities, camelCase keys, code 3 plus revert data on reverts), so the
rest of agentpay only ever sees an `rpc_url`. Transactions are mined one per block as they arrive.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from eth.exceptions import Revert
from eth.vm.spoof import SpoofTransaction
from eth_account.hdaccount import key_from_seed, seed_from_mnemonic
from eth_keys.datatypes import PrivateKey
from eth_tester import EthereumTester, PyEVMBackend
from eth_tester.exceptions import TransactionNotFound
from eth_utils.address import to_canonical_address

from ._devnet import CREATE2_DEPLOYER
from ._node import ANVIL_MNEMONIC

__all__ = ["main"]

# The deterministic-deployment proxy (Arachnid's), which anvil and most chains carry; py-evm starts empty, so
# it is put in the genesis state and CREATE2 deployments land where they do on anvil.
CREATE2_DEPLOYER_CODE = bytes.fromhex(
    "7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffe03601600081602082378035828234f58015156039578182fd5b8082525050506014600cf3"
)
_PRIORITY_FEE = 10**9


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(part.title() for part in rest)


_RENAMES = {"coinbase": "miner", "data": "input"}


def _out(value: Any, key: str = "") -> Any:
    """eth-tester's Python values -> JSON-RPC wire values (hex quantities, camelCase keys)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"0x{value:0512x}" if key == "logs_bloom" else hex(value)
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, list | tuple):
        return [_out(item) for item in value]
    if isinstance(value, dict):
        return {_camel(k): _out(v, k) for k, v in value.items()}
    raise TypeError(f"cannot encode {type(value).__name__}")


def _tx_out(tx: dict[str, Any]) -> Any:
    return {_RENAMES.get(k, _camel(k)): _out(v, k) for k, v in tx.items()}


def _log_out(log: dict[str, Any]) -> Any:
    return {**_out({k: v for k, v in log.items() if k != "type"}), "removed": False}


def _receipt_out(receipt: dict[str, Any]) -> Any:
    # eth-tester fills `state_root` with a placeholder; post-Byzantium receipts carry `status` instead.
    body = {k: v for k, v in receipt.items() if k not in ("logs", "state_root")}
    return {**_out(body), "logs": [_log_out(log) for log in receipt["logs"]]}


def _block_out(block: dict[str, Any]) -> Any:
    body = {k: v for k, v in block.items() if k != "transactions"}
    txs = [tx if isinstance(tx, str) else _tx_out(tx) for tx in block["transactions"]]
    return {**{_RENAMES.get(k, _camel(k)): _out(v, k) for k, v in body.items()}, "transactions": txs}


def _block_id(value: Any) -> int | str:
    if value is None:
        return "latest"
    if isinstance(value, str) and value in ("latest", "pending", "safe", "finalized", "earliest"):
        return value
    if isinstance(value, str) and re.fullmatch(r"0x[0-9a-fA-F]+", value):
        return int(value, 16)
    if isinstance(value, dict) and "blockNumber" in value:
        return _block_id(value["blockNumber"])
    raise RpcError(-32602, f"invalid block id {value!r}")


def _qty(value: Any) -> int:
    return int(value, 16) if isinstance(value, str) else int(value)


_TX_KEYS = {
    "gasPrice": "gas_price",
    "maxFeePerGas": "max_fee_per_gas",
    "maxPriorityFeePerGas": "max_priority_fee_per_gas",
    "accessList": "access_list",
    "chainId": "chain_id",
    "input": "data",
}
_TX_QTY = {"gas", "gas_price", "max_fee_per_gas", "max_priority_fee_per_gas", "value", "nonce", "chain_id"}


def _tx_in(tx: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tx.items():
        name = _TX_KEYS.get(key, key)
        if name == "access_list":
            value = [{"address": e["address"], "storage_keys": e.get("storageKeys", [])} for e in value]
        out[name] = _qty(value) if name in _TX_QTY else value
    out.pop("type", None)
    return out


class Node:
    """JSON-RPC methods over one eth-tester chain. Not thread-safe: the server serialises calls."""

    def __init__(self, *, accounts: int, balance_eth: int, chain_id: int, mnemonic: str) -> None:
        seed = seed_from_mnemonic(mnemonic, "")
        self.keys = [PrivateKey(key_from_seed(seed, f"m/44'/60'/0'/0/{i}")) for i in range(accounts)]
        state: dict[bytes, dict[str, Any]] = {
            k.public_key.to_canonical_address(): {
                "balance": balance_eth * 10**18,
                "nonce": 0,
                "code": b"",
                "storage": {},
            }
            for k in self.keys
        }
        state[to_canonical_address(CREATE2_DEPLOYER)] = {
            "balance": 0,
            "nonce": 1,
            "code": CREATE2_DEPLOYER_CODE,
            "storage": {},
        }
        backend = PyEVMBackend(genesis_state=state)
        backend.account_keys = tuple(self.keys)  # eth_accounts / eth_sendTransaction: the same keys as anvil
        # eth-tester's chain class hard-codes its chain id; the VM reads it from the chain instance.
        backend.chain.chain_id = chain_id
        self.backend = backend
        self.tester = EthereumTester(backend)
        self.chain_id = chain_id
        self._offset = self._floor = (
            0  # evm_increaseTime: seconds added to the clock, earliest next timestamp
        )
        self._next_timestamp: int | None = None  # set by evm_setNextBlockTimestamp
        self.methods: dict[str, Callable[..., Any]] = {
            name[4:]: getattr(self, name) for name in dir(self) if name.startswith("rpc_")
        }

    def handle(self, method: str, params: list[Any]) -> Any:
        fn = self.methods.get(method)
        if fn is None:
            raise RpcError(-32601, f"method {method!r} is not supported by the py-evm devnet")
        try:
            return fn(*params)
        except RpcError:
            raise
        except TransactionNotFound:
            return None
        except Exception as exc:  # every other failure is the caller's input or a rejected transaction
            raise RpcError(-32000, str(exc) or type(exc).__name__) from None

    # -- chain facts
    def rpc_eth_chainId(self) -> str:
        return hex(self.chain_id)

    def rpc_net_version(self) -> str:
        return str(self.chain_id)

    def rpc_web3_clientVersion(self) -> str:
        return "agentpay-pyevm/1"

    def rpc_eth_syncing(self) -> bool:
        return False

    def rpc_eth_accounts(self) -> list[str]:
        return [k.public_key.to_checksum_address() for k in self.keys]

    def rpc_eth_blockNumber(self) -> str:
        return hex(self._number("latest"))

    def rpc_eth_gasPrice(self) -> str:
        return hex(self.backend.get_base_fee("pending") + _PRIORITY_FEE)

    def rpc_eth_maxPriorityFeePerGas(self) -> str:
        return hex(_PRIORITY_FEE)

    def rpc_eth_feeHistory(self, count: Any, newest: Any, percentiles: list[float] | None = None) -> Any:
        last = self._number(newest)
        first = max(0, last - _qty(count) + 1)
        blocks = [self.tester.get_block_by_number(n) for n in range(first, last + 1)]
        base_fees = [b["base_fee_per_gas"] for b in blocks] + [self.backend.get_base_fee("pending")]
        return {
            "oldestBlock": hex(first),
            "baseFeePerGas": [hex(f) for f in base_fees],
            "gasUsedRatio": [b["gas_used"] / b["gas_limit"] for b in blocks],
            "reward": [[hex(_PRIORITY_FEE)] * len(percentiles or []) for _ in blocks],
        }

    # -- state
    def rpc_eth_getBalance(self, address: str, block: Any = "latest") -> str:
        return hex(self.tester.get_balance(address, _block_id(block)))

    def rpc_eth_getCode(self, address: str, block: Any = "latest") -> str:
        return str(self.tester.get_code(address, _block_id(block)))

    def rpc_eth_getTransactionCount(self, address: str, block: Any = "latest") -> str:
        return hex(self.tester.get_nonce(address, _block_id(block)))

    def rpc_eth_getStorageAt(self, address: str, slot: str, block: Any = "latest") -> str:
        word = self.backend.get_storage(to_canonical_address(address), _qty(slot), _block_id(block))
        return (
            "0x" + (word.to_bytes(32, "big") if isinstance(word, int) else bytes(word).rjust(32, b"\0")).hex()
        )

    # -- execution
    def _spoof(self, tx: dict[str, Any], header: Any) -> SpoofTransaction:
        chain = self.backend.chain
        sender = to_canonical_address(tx.get("from") or "0x" + "00" * 20)
        to = tx.get("to")
        unsigned = chain.create_unsigned_transaction(
            nonce=chain.get_vm(header).state.get_nonce(sender),
            gas_price=0,
            gas=_qty(tx.get("gas", header.gas_limit)),
            to=to_canonical_address(to) if to else b"",
            value=_qty(tx.get("value", 0)),
            data=bytes.fromhex(str(tx.get("data") or tx.get("input") or "0x")[2:]),
        )
        return SpoofTransaction(unsigned, from_=sender)

    def _header(self, block: Any) -> Any:
        return self.backend.chain.get_canonical_block_header_by_number(self._number(block))

    def _reverting(self, run: Callable[[], Any]) -> Any:
        try:
            return run()
        except Revert as exc:
            data = exc.args[0] if exc.args and isinstance(exc.args[0], bytes) else b""
            raise RpcError(3, "execution reverted", "0x" + data.hex()) from None

    def rpc_eth_call(self, tx: dict[str, Any], block: Any = "latest", *_overrides: Any) -> str:
        header = self._header(block)
        chain = self.backend.chain
        out = self._reverting(lambda: chain.get_transaction_result(self._spoof(tx, header), header))
        return "0x" + bytes(out).hex()

    def rpc_eth_estimateGas(self, tx: dict[str, Any], block: Any = "latest") -> str:
        header = self._header(block)
        chain = self.backend.chain
        return hex(self._reverting(lambda: chain.estimate_gas(self._spoof(tx, header), header)))

    def _tick(self) -> None:
        """Date the block about to be mined now, as anvil does. py-evm dates it when the previous block was
        mined, so after an idle minute a payment's `validAfter` could still lie in the chain's future.
        (py-evm needs strictly increasing timestamps, so a burst of blocks runs a few seconds ahead.)"""
        chain = self.backend.chain
        timestamp, self._next_timestamp = self._next_timestamp, None
        if timestamp is None:
            timestamp = max(chain.header.timestamp, int(time.time()) + self._offset, self._floor)
        chain.header = chain.header.copy(timestamp=timestamp)

    def rpc_eth_sendRawTransaction(self, raw: str) -> str:
        self._tick()
        return str(self.tester.send_raw_transaction(raw))

    def rpc_eth_sendTransaction(self, tx: dict[str, Any]) -> str:
        self._tick()
        return str(self.tester.send_transaction(_tx_in(tx)))

    # -- history
    def rpc_eth_getTransactionReceipt(self, tx_hash: str) -> Any:
        return _receipt_out(self.tester.get_transaction_receipt(tx_hash))

    def rpc_eth_getTransactionByHash(self, tx_hash: str) -> Any:
        return _tx_out(self.tester.get_transaction_by_hash(tx_hash))

    def rpc_eth_getBlockByNumber(self, block: Any, full: bool = False) -> Any:
        return _block_out(self.tester.get_block_by_number(_block_id(block), full))

    def rpc_eth_getBlockByHash(self, block_hash: str, full: bool = False) -> Any:
        return _block_out(self.tester.get_block_by_hash(block_hash, full))

    def rpc_eth_getLogs(self, query: dict[str, Any]) -> Any:
        if "blockHash" in query:
            start = end = self.tester.get_block_by_hash(query["blockHash"])["number"]
        else:
            start, end = (self._number(query.get(key, "latest")) for key in ("fromBlock", "toBlock"))
        logs = self.tester.get_logs(
            from_block=start, to_block=end, address=query.get("address"), topics=query.get("topics")
        )
        return [_log_out(log) for log in logs]

    def _number(self, block: Any) -> int:
        number: int = self.tester.get_block_by_number(_block_id(block))["number"]
        return number

    # -- devnet controls (anvil's names)
    def rpc_evm_mine(self, *_args: Any) -> str:
        self._tick()
        self.tester.mine_blocks(1)
        return "0x0"

    def rpc_evm_snapshot(self) -> str:
        return hex(self.tester.take_snapshot())

    def rpc_evm_revert(self, snapshot_id: Any) -> bool:
        self.tester.revert_to_snapshot(_qty(snapshot_id))
        return True

    def rpc_evm_setNextBlockTimestamp(self, timestamp: Any) -> None:
        self._next_timestamp = _qty(timestamp)

    def rpc_evm_increaseTime(self, seconds: Any) -> str:
        self._offset += _qty(seconds)
        # Measured from the chain's clock, which may run ahead of the wall clock (see _tick).
        self._floor = max(self._floor, self.tester.get_block_by_number("latest")["timestamp"] + _qty(seconds))
        return hex(self._offset)


def _serve(node: Node, host: str, port: int) -> ThreadingHTTPServer:
    lock = threading.Lock()

    def answer(request: Any) -> dict[str, Any]:
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            return {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "invalid request"}}
        params = request.get("params") or []
        try:
            with lock:
                return {
                    "jsonrpc": "2.0",
                    "id": request.get("id"),
                    "result": node.handle(request["method"], params),
                }
        except RpcError as exc:
            error: dict[str, Any] = {"code": exc.code, "message": exc.message}
            if exc.data is not None:
                error["data"] = exc.data
            return {"jsonrpc": "2.0", "id": request.get("id"), "error": error}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: web3 and httpx reuse one connection
        disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

        def do_POST(self) -> None:
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                reply: Any = [answer(r) for r in body] if isinstance(body, list) else answer(body)
            except ValueError:
                reply = {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse error"}}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would drown the devnet log

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m escrow.devnet._pyevm_node", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8545)
    parser.add_argument("--accounts", type=int, default=10)
    parser.add_argument("--balance", type=int, default=10_000, help="ETH per account")
    parser.add_argument("--chain-id", type=int, default=31337)
    parser.add_argument("--mnemonic", default=ANVIL_MNEMONIC)
    args = parser.parse_args(argv)
    node = Node(
        accounts=args.accounts, balance_eth=args.balance, chain_id=args.chain_id, mnemonic=args.mnemonic
    )
    try:
        server = _serve(node, args.host, args.port)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    # SIGTERM (how the devnet stops its node) ends serve_forever cleanly instead of killing mid-response.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
