"""Compiled contract artifacts shipped inside the package (`escrow/artifacts/<Name>.json`).

They are committed so that a pip-only install can deploy and call every contract without node or solc.
This module also holds the package's error root, since every chain-side failure starts from an artifact:

    EscrowError                 code: stable, machine-readable
     +-- ArtifactError          an artifact is missing or malformed
     +-- DevnetError            the devnet could not start, deploy, stop, or read its state
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import msgspec

__all__ = ["Artifact", "ArtifactError", "EscrowError", "artifact_exists", "load_artifact"]


class EscrowError(Exception):
    """Root of every error raised by `escrow`. `code` is stable; the message is for people."""

    code: str = "escrow_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ArtifactError(EscrowError):
    code = "artifact_error"


class Artifact(msgspec.Struct, frozen=True, kw_only=True):
    """One contract's ABI and bytecode, in the Hardhat-style shape the build script writes."""

    contract_name: str = msgspec.field(name="contractName")
    source_name: str = msgspec.field(name="sourceName", default="")
    abi: list[dict[str, Any]]
    bytecode: str
    deployed_bytecode: str = msgspec.field(name="deployedBytecode", default="0x")

    @property
    def constructor_inputs(self) -> list[dict[str, Any]]:
        for entry in self.abi:
            if entry.get("type") == "constructor":
                inputs: list[dict[str, Any]] = entry.get("inputs", [])
                return inputs
        return []


_decoder = msgspec.json.Decoder(Artifact)


def _path(name: str) -> resources.abc.Traversable:
    return resources.files("escrow").joinpath("artifacts", f"{name}.json")


def artifact_exists(name: str) -> bool:
    """Whether `escrow/artifacts/<name>.json` is present (contracts still being written have none yet)."""
    return _path(name).is_file()


@functools.cache
def load_artifact(name: str) -> Artifact:
    """Load `escrow/artifacts/<name>.json`, once per process."""
    path = _path(name)
    try:
        raw = path.read_bytes()
    except OSError:
        raise ArtifactError(f"no artifact {name!r} at {path}", code="artifact_missing") from None
    try:
        artifact = _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise ArtifactError(f"artifact {name!r} is malformed: {exc}", code="artifact_malformed") from None
    # Hardhat and our build script both write 0x-prefixed hex; solc's own output is bare.
    return msgspec.structs.replace(
        artifact,
        bytecode=_prefixed(artifact.bytecode),
        deployed_bytecode=_prefixed(artifact.deployed_bytecode),
    )


def _prefixed(code: str) -> str:
    return code if code.startswith("0x") else "0x" + code
