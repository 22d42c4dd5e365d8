"""The README cannot drift from the code: its Python blocks run on a devnet, its TOML block is a valid network
description, and neither they nor `examples/` import a private module.

The blocks run as a user runs them, in order, from a fresh working directory holding the devnet state at
`.agentpay/devnet.json` (what `agentpay devnet up` writes), with the default durable store. The one
liberty taken: the sub-agent block's `app` is served on a free port rather than 8402 (the orchestrator
block's URL is pointed at it), since other processes may hold 8402.
"""

from __future__ import annotations

import ast
import asyncio
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from escrow import DevnetState, Erc20, Rpc, TxSender
from gateway import PaymentMiddleware
from tests.conftest import unavailable
from x402 import PERMIT2_ADDRESS, LocalSigner, Network, SettleResponse
from x402.client import PaymentAuth, SpendPolicy, receipt_of
from x402.client_upto import UptoWallet

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_PRIVATE_MODULE = re.compile(r"^(x402|escrow|gateway)(\.\w+)*\._")  # `escrow._x`, `escrow.chain._x`, ...
_OURS = re.compile(r"^(x402|escrow|gateway)(\.\w+)*$")
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(language: str, text: str | None = None) -> list[str]:
    return [body for lang, body in _BLOCK.findall(text or README.read_text()) if lang == language]


def private_imports(source: str) -> list[str]:
    """Every import of a private module: `x402._x`, `escrow._x`, `gateway._x`, or `_x` from those."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _PRIVATE_MODULE.match(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _PRIVATE_MODULE.match(node.module):
                found.append(node.module)
            elif _OURS.match(node.module):
                found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


# -- no private names ----------------------------------------------------------------------------------


def test_the_private_import_check_catches_every_form() -> None:
    source = (
        "import escrow.chain._rpc\nfrom gateway._recovery import Recovery\nfrom x402 import _escrow\n"
        "from x402._escrow import GrantMessage\nimport gateway\nfrom escrow import Chain\n"
        "from . import _helper\n"
    )
    assert private_imports(source) == [
        "escrow.chain._rpc",
        "gateway._recovery",
        "x402._escrow",
        "x402._escrow",
    ]


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_examples_import_public_names_only(path: Path) -> None:
    assert private_imports(path.read_text()) == [], f"{path.name} imports private modules"


def test_readme_blocks_import_public_names_only() -> None:
    python = blocks("python")
    assert len(python) >= 3  # a sub-agent, an owner opening a session, an orchestrator
    for block in python:
        assert private_imports(block) == [], block


def test_example_sizes_stay_small() -> None:
    """The README's sub-agent is at most 15 lines of code, its orchestrator at most 10, imports included."""

    def code(block: str) -> list[str]:
        return [line for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]

    sub_agent, _, orchestrator = blocks("python")[:3]
    assert len(code(sub_agent)) <= 15, sub_agent
    assert len(code(orchestrator)) <= 10, orchestrator


def test_readme_network_description_is_valid() -> None:
    (toml,) = blocks("toml")
    network = Network.from_toml(toml)
    assert network.network == f"eip155:{network.chain_id}"
    assert network.token_domain.verifying_contract == network.token
    assert not network.has_escrow


# -- the blocks run ------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # a thread cannot take signals
        pass


@pytest.fixture
def workdir(devnet: DevnetState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh directory with the devnet's state where `agentpay devnet up` puts it, and no store override."""
    devnet.dump(tmp_path / ".agentpay" / "devnet.json")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AGENTPAY_STORE", raising=False)  # the blocks get the durable default, as users do
    yield tmp_path


def _serve(app: Any) -> tuple[_Server, threading.Thread, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the sub-agent did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


def _balance(devnet: DevnetState, who: str) -> int:
    async def read() -> int:
        rpc = Rpc(devnet.rpc_url)
        try:
            return await Erc20(rpc, devnet.contracts["usdc"]).balance_of(who)
        finally:
            await rpc.aclose()

    return asyncio.run(read())


def test_readme_blocks_run_a_paid_call_on_a_devnet(
    devnet: DevnetState, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sub_agent, owner, orchestrator = blocks("python")[:3]
    payee = devnet.accounts[2].address
    before = _balance(devnet, payee)

    namespace: dict[str, Any] = {"__name__": "readme_subagent"}
    exec(compile(sub_agent, "README.md (sub-agent)", "exec"), namespace)
    app = namespace["app"]
    assert isinstance(app, PaymentMiddleware)
    server, thread, url = _serve(app)
    try:
        exec(compile(owner, "README.md (owner)", "exec"), {"__name__": "readme_owner"})
        assert (workdir / "orchestrator.session.json").stat().st_mode & 0o077 == 0  # it holds a key
        capsys.readouterr()
        pointed = orchestrator.replace("http://127.0.0.1:8402", url)
        assert pointed != orchestrator
        exec(compile(pointed, "README.md (orchestrator)", "exec"), {"__name__": "readme_orchestrator"})
        printed = capsys.readouterr().out
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive(), "the sub-agent did not stop"

    # The orchestrator got the content, with a receipt of an escrow payment settled on chain.
    assert "'message': 'hello, orchestrator'" in printed
    assert "success=True" in printed and "transaction='0x" in printed, printed
    # The sub-agent's payee got exactly the price, and the default durable store was used.
    assert _balance(devnet, payee) - before == 1_000
    assert (workdir / ".agentpay" / "payments.db").exists()


def test_readme_metered_block_charges_what_the_handler_reports(devnet: DevnetState, workdir: Path) -> None:
    """The usage-priced block: a plain EOA pays `upto` for at most $0.01 and is charged 42 tokens."""
    if "permit2" not in devnet.contracts:
        unavailable("this devnet has no Permit2 (py-evm): no upto")
    (metered,) = [block for block in blocks("python") if "metered=True" in block]
    namespace: dict[str, Any] = {"__name__": "readme_metered"}
    exec(compile(metered, "README.md (metered)", "exec"), namespace)
    payee = devnet.accounts[2].address
    payer = LocalSigner.random()

    async def fund() -> None:  # ETH for its one Permit2 approval, and TestUSDC (its mint is open)
        rpc = Rpc(devnet.rpc_url)
        try:
            await rpc.request("anvil_setBalance", [payer.address, hex(10**18)])
            sender = TxSender(rpc, "0x" + payer._key.secret.hex(), chain_id=devnet.chain_id)
            usdc = Erc20(rpc, devnet.contracts["usdc"])
            await sender.transact(usdc.address, usdc.abi.encode("mint", payer.address, 10**6), gas=100_000)
            await sender.transact(
                usdc.address, usdc.approve_calldata(PERMIT2_ADDRESS, 2**256 - 1), gas=100_000
            )
        finally:
            await rpc.aclose()

    asyncio.run(fund())
    before = _balance(devnet, payee), _balance(devnet, payer.address)
    server, thread, url = _serve(namespace["app"])
    try:
        auth = PaymentAuth(UptoWallet(payer), SpendPolicy(max_per_call="$0.01"))
        with httpx.Client(auth=auth, timeout=30) as client:
            response = client.get(f"{url}/generate?tokens=42")
            refused = [client.get(f"{url}/generate", params={"tokens": bad}) for bad in ("x", "²", "9" * 50)]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert response.status_code == 200 and response.json() == {"tokens": 42}
    receipt = receipt_of(response)
    assert isinstance(receipt, SettleResponse) and receipt.amount == "420", receipt
    assert _balance(devnet, payee) - before[0] == 420  # 42 x $0.00001, of the $0.01 signed
    assert before[1] - _balance(devnet, payer.address) == 420
    assert [r.status_code for r in refused] == [400, 400, 400]  # bad input: a 400, and nothing charged
