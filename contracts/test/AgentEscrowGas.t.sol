// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {EscrowTestBase} from "./escrow/EscrowTestBase.sol";
import {IAgentEscrow} from "../src/escrow/IAgentEscrow.sol";
import {PackedBatch} from "./escrow/PackedBatch.sol";

/**
 * @dev Gas of {AgentEscrow-settle} and {AgentEscrow-settlePacked} per payment, warm setup: grants live, deposits funded, each signer's nonce word
 * already non-zero and the payee already holding the token (what a steady-state settler sees).
 *
 * Run `forge test --match-path test/AgentEscrowGas.t.sol --isolate -vv`. With `--isolate` each call is its own
 * transaction, so `exec` (the gasleft delta around the settle call) IS the receipt's gasUsed: 21,000 intrinsic and
 * calldata included. Without `--isolate`, `exec` is execution only and `tx` estimates the receipt as
 * 21,000 + calldata (4/16 gas per zero/non-zero byte) + exec - 2,500 (the address warm-up a transaction's `to`
 * gets for free); that estimate lands within ~1% of the isolated figure.
 *
 * Setup happens in `setUp` (a separate transaction), so every slot the measured call touches starts cold.
 */
abstract contract EscrowGasBase is EscrowTestBase {
    event log_named_uint(string key, uint256 val);

    uint256 internal constant MAX_N = 128;

    /// @dev Measures the batch sent as {AgentEscrow-settle} and, from the same state, as {AgentEscrow-settlePacked}.
    function _measure(string memory label, IAgentEscrow.Payment[] memory ps, bytes[] memory sigs) internal {
        uint256 snap = vm.snapshotState();
        _measureCall(label, abi.encodeCall(IAgentEscrow.settle, (ps, sigs)), ps);
        vm.revertToState(snap);
        _measureCall(
            string.concat(label, " packed"), abi.encodeCall(IAgentEscrow.settlePacked, (PackedBatch.pack(ps, sigs))), ps
        );
    }

    function _measureCall(string memory label, bytes memory data, IAgentEscrow.Payment[] memory ps) internal {
        uint256 n = ps.length;
        uint256 calldataGas;
        for (uint256 i; i < data.length; ++i) calldataGas += data[i] == 0 ? 4 : 16;

        uint256 before = gasleft();
        (bool ok,) = address(escrow).call(data);
        uint256 exec = before - gasleft();
        assertTrue(ok, "settle reverted");
        assertEq(usdc.balanceOf(payee), 1 + _sum(ps), "not all settled");

        uint256 txGas = 21_000 + calldataGas + exec - 2_500;
        emit log_named_uint(string.concat(label, " exec per payment"), exec / n);
        emit log_named_uint(string.concat(label, " tx per payment"), txGas / n);
        emit log_named_uint(string.concat(label, " tx total"), txGas);
        emit log_named_uint(string.concat(label, " calldata bytes per payment"), data.length / n);
    }

    function _sum(IAgentEscrow.Payment[] memory ps) internal pure returns (uint256 total) {
        for (uint256 i; i < ps.length; ++i) total += ps[i].amount;
    }
}

/// @dev One orchestrator (payer + session key) paying one sub-agent many times: the common batch.
contract AgentEscrowGasSameGrant is EscrowGasBase {
    function setUp() public override {
        super.setUp();
        vm.prank(payer);
        escrow.grant(sessionKey, _params(1e6, type(uint128).max), new address[](0));
        usdc.mint(payee, 1); // the payee already holds the token
        IAgentEscrow.Payment memory p = _payment(payer, payee2, 1, 0, 1); // nonce 0: the nonce word is now non-zero
        escrow.settle(_one(p), _one(_sign(sessionKeyPk, p)));
    }

    function _batch(uint256 n) internal view returns (IAgentEscrow.Payment[] memory ps, bytes[] memory sigs) {
        ps = new IAgentEscrow.Payment[](n);
        sigs = new bytes[](n);
        for (uint256 i; i < n; ++i) {
            ps[i] = _payment(1000 + i, i + 1);
            sigs[i] = _sign(sessionKeyPk, ps[i]);
        }
    }

    function test_gas_sameGrant_1() public {
        (IAgentEscrow.Payment[] memory ps, bytes[] memory sigs) = _batch(1);
        _measure("same grant n=1", ps, sigs);
    }

    function test_gas_sameGrant_8() public {
        (IAgentEscrow.Payment[] memory ps, bytes[] memory sigs) = _batch(8);
        _measure("same grant n=8", ps, sigs);
    }

    function test_gas_sameGrant_32() public {
        (IAgentEscrow.Payment[] memory ps, bytes[] memory sigs) = _batch(32);
        _measure("same grant n=32", ps, sigs);
    }

    function test_gas_sameGrant_128() public {
        (IAgentEscrow.Payment[] memory ps, bytes[] memory sigs) = _batch(128);
        _measure("same grant n=128", ps, sigs);
    }
}

/// @dev Many orchestrators (distinct payers, each with its own session key) paying one sub-agent: every payment
/// touches its own cold grant, deposit and nonce slots. This is the expensive shape.
contract AgentEscrowGasDistinctPayers is EscrowGasBase {
    address[] internal payers;
    uint256[] internal keys;

    function setUp() public override {
        super.setUp();
        usdc.mint(payee, 1);
        for (uint256 i; i < MAX_N; ++i) {
            address who = address(uint160(0x1000 + i));
            uint256 key = uint256(keccak256(abi.encode("key", i)));
            address signer = vm.addr(key);
            _fund(who, 10e6);
            vm.prank(who);
            escrow.grant(signer, _params(1e6, 10e6), new address[](0));
            payers.push(who);
            keys.push(key);
        }
        // Warm each signer's nonce word (nonce 0), paid to a throwaway payee so the measured payee stays at 1.
        IAgentEscrow.Payment[] memory ps = new IAgentEscrow.Payment[](MAX_N);
        bytes[] memory sigs = new bytes[](MAX_N);
        for (uint256 i; i < MAX_N; ++i) {
            ps[i] = _payment(payers[i], payee2, 1, 0, 1);
            sigs[i] = _sign(keys[i], ps[i]);
        }
        escrow.settle(ps, sigs);
    }

    function _batch(uint256 n) internal view returns (IAgentEscrow.Payment[] memory ps, bytes[] memory sigs) {
        ps = new IAgentEscrow.Payment[](n);
        sigs = new bytes[](n);
        for (uint256 i; i < n; ++i) {
            ps[i] = _payment(payers[i], payee, 1000 + i, 1, 1);
            sigs[i] = _sign(keys[i], ps[i]);
        }
    }

    function test_gas_distinctPayers_1() public {
        (IAgentEscrow.Payment[] memory ps, bytes[] memory sigs) = _batch(1);
        _measure("distinct payers n=1", ps, sigs);
    }

    function test_gas_distinctPayers_8() public {
        (IAgentEscrow.Payment[] memory ps, bytes[] memory sigs) = _batch(8);
        _measure("distinct payers n=8", ps, sigs);
    }

    function test_gas_distinctPayers_32() public {
        (IAgentEscrow.Payment[] memory ps, bytes[] memory sigs) = _batch(32);
        _measure("distinct payers n=32", ps, sigs);
    }

    function test_gas_distinctPayers_128() public {
        (IAgentEscrow.Payment[] memory ps, bytes[] memory sigs) = _batch(128);
        _measure("distinct payers n=128", ps, sigs);
    }
}
