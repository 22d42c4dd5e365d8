"""`AgentAccountFactory`: the CREATE2 factory of `AgentAccount`s (counterfactual addresses, initCode)."""

from __future__ import annotations

from eth_utils.address import to_checksum_address

from ..chain._abi import ContractAbi
from ..chain._artifacts import load_artifact
from ..chain._rpc import Rpc

__all__ = ["AgentAccountFactory", "clone_code"]


def _factory_abi() -> ContractAbi:
    return ContractAbi(load_artifact("AgentAccountFactory").abi)


def clone_code(implementation: str) -> str:
    """Runtime code of an ERC-1167 minimal proxy to `implementation` (what the factory deploys)."""
    return "0x363d3d373d3d3d363d73" + implementation[2:].lower() + "5af43d82803e903d91602b57fd5bf3"


class AgentAccountFactory:
    """The `AgentAccountFactory` contract: CREATE2 addresses per (owner, salt)."""

    def __init__(self, rpc: Rpc, address: str) -> None:
        self.rpc, self.address, self._abi = rpc, to_checksum_address(address), _factory_abi()

    async def get_address(self, owner: str, salt: int = 0) -> str:
        data = self._abi.encode("getAddress", to_checksum_address(owner), salt)
        (address,) = self._abi.decode("getAddress", await self.rpc.call(self.address, data))
        return to_checksum_address(address)

    def init_code(self, owner: str, salt: int = 0) -> bytes:
        """`factory ++ createAccount(owner, salt)`: the initCode of the account's first operation."""
        return bytes.fromhex(self.address[2:]) + self._abi.encode(
            "createAccount", to_checksum_address(owner), salt
        )

    async def implementation(self) -> str:
        data = self._abi.encode("accountImplementation")
        (address,) = self._abi.decode("accountImplementation", await self.rpc.call(self.address, data))
        return to_checksum_address(address)
