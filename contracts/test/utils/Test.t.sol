// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {Test} from "./Test.sol";

/// @dev Checks the helpers of our forge-std stand-in that tests rely on.
contract TestBaseTest is Test {
    function testFuzz_bound_staysInRange(uint256 x, uint256 min, uint256 max) public pure {
        vm.assume(min <= max);
        uint256 y = bound(x, min, max);
        assertGe(y, min);
        assertLe(y, max);
        if (x >= min && x <= max) assertEq(y, x, "in-range values pass through");
    }

    function test_bound_fullRange() public pure {
        assertEq(bound(type(uint256).max, 0, type(uint256).max), type(uint256).max);
        assertEq(bound(7, 3, 3), 3);
    }

    function test_makeAddrAndKey_isDeterministic() public {
        (address a, uint256 key) = makeAddrAndKey("alice");
        assertEq(key, uint256(keccak256("alice")));
        assertEq(a, vm.addr(key));
        assertEq(makeAddr("alice"), a);
    }

    function test_signPacked_recovers() public {
        (address a, uint256 key) = makeAddrAndKey("signer");
        bytes32 digest = keccak256("message");
        bytes memory sig = signPacked(key, digest);
        assertEq(sig.length, 65);
        (bytes32 r, bytes32 s) = abi.decode(sig, (bytes32, bytes32));
        assertEq(ecrecover(digest, uint8(sig[64]), r, s), a);
    }
}
