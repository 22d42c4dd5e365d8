"""Several local chains with distinct chain ids and the same contracts on each (for the multichain suites and
the multichain gas benchmark). Each chain is its own anvil (`--chain-id N`), deployed with the devnet's
`deploy`; CREATE2 puts every contract at the same address on every chain, as on real networks.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from escrow.devnet._devnet import _Chain, anvil_accounts, deploy
from escrow.devnet._node import (
    ANVIL_MNEMONIC,
    NodeProcess,
    _die_with_parent,
    _free_port,
    _wait_ready,
    find_anvil,
)


@dataclass(frozen=True)
class LocalChain:
    chain_id: int
    rpc_url: str
    contracts: dict[str, str]


@contextmanager
def local_chain(chain_id: int) -> Iterator[LocalChain]:
    anvil = find_anvil()
    if anvil is None:
        import pytest

        pytest.skip("the multichain suites need anvil (distinct chain ids)")
    port = _free_port()
    command = [anvil, "--host", "127.0.0.1", "--port", str(port), "--accounts", "3", "--balance", "10000"]
    command += ["--chain-id", str(chain_id), "--mnemonic", ANVIL_MNEMONIC]
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            preexec_fn=_die_with_parent(),
        )
        node = NodeProcess("anvil", proc, port)
        try:
            _wait_ready(node, errors, timeout=15.0)
            chain = _Chain(node.rpc_url)
            try:
                contracts, _name, _version, _decimals = deploy(chain, anvil_accounts(3), 1_000)
            finally:
                chain.close()
            yield LocalChain(chain_id, node.rpc_url, dict(contracts))
        finally:
            node.stop()


@contextmanager
def local_chains(chain_ids: Sequence[int]) -> Iterator[list[LocalChain]]:
    with ExitStack() as stack:
        yield [stack.enter_context(local_chain(c)) for c in chain_ids]
