// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/**
 * @dev The subset of Foundry cheatcodes our tests use. forge-std is not installable offline (npm only has a
 * stale unofficial copy), so this is our own declaration. Signatures must match forge's exactly: forge
 * dispatches on the selector, so a wrong parameter type silently becomes a call to an unknown cheatcode.
 *
 * Add a cheatcode here only when a test needs it; the full list is in the Foundry book ("Cheatcodes reference").
 */
interface Vm {
    /// @dev One log captured between {recordLogs} and {getRecordedLogs}.
    struct Log {
        bytes32[] topics;
        bytes data;
        address emitter;
    }

    // --- environment ---
    function warp(uint256 newTimestamp) external;
    function roll(uint256 newHeight) external;
    function chainId(uint256 newChainId) external;
    function deal(address account, uint256 newBalance) external;
    function etch(address target, bytes calldata newRuntimeBytecode) external;
    function store(address target, bytes32 slot, bytes32 value) external;
    function load(address target, bytes32 slot) external view returns (bytes32 data);
    function snapshotState() external returns (uint256 snapshotId);
    function revertToState(uint256 snapshotId) external returns (bool success);

    // --- callers ---
    function prank(address msgSender) external;
    function prank(address msgSender, address txOrigin) external;
    function startPrank(address msgSender) external;
    function startPrank(address msgSender, address txOrigin) external;
    function stopPrank() external;

    // --- keys and signatures ---
    function addr(uint256 privateKey) external pure returns (address keyAddr);
    function sign(uint256 privateKey, bytes32 digest) external pure returns (uint8 v, bytes32 r, bytes32 s);
    function signCompact(uint256 privateKey, bytes32 digest) external pure returns (bytes32 r, bytes32 vs);
    function label(address account, string calldata newLabel) external;

    // --- expectations ---
    /// @dev Expects the next call to revert with any data.
    function expectRevert() external;
    /// @dev Expects the next call to revert with exactly `revertData` (e.g. `abi.encodeWithSelector(Err.selector, a)`).
    function expectRevert(bytes calldata revertData) external;
    /// @dev Expects the next call to revert with exactly the 4-byte `revertData` (an error without arguments).
    function expectRevert(bytes4 revertData) external;
    /// @dev Expects the next call to revert with data that starts with `revertData` (an error, any arguments).
    function expectPartialRevert(bytes4 revertData) external;
    function expectEmit() external;
    function expectEmit(address emitter) external;
    function expectEmit(bool checkTopic1, bool checkTopic2, bool checkTopic3, bool checkData) external;
    function expectEmit(bool checkTopic1, bool checkTopic2, bool checkTopic3, bool checkData, address emitter) external;
    function expectEmitAnonymous(
        bool checkTopic0,
        bool checkTopic1,
        bool checkTopic2,
        bool checkTopic3,
        bool checkData,
        address emitter
    ) external;
    function expectCall(address callee, bytes calldata data) external;
    function recordLogs() external;
    function getRecordedLogs() external returns (Log[] memory logs);

    // --- fuzzing ---
    /// @dev Discards the current fuzz input when `condition` is false (does not count as a failure).
    function assume(bool condition) external pure;

    // --- environment variables ---
    function envOr(string calldata name, uint256 defaultValue) external view returns (uint256 value);
    function envOr(string calldata name, bool defaultValue) external view returns (bool value);
    function envOr(string calldata name, address defaultValue) external view returns (address value);

    // --- formatting ---
    function toString(uint256 value) external pure returns (string memory stringifiedValue);
    function toString(address value) external pure returns (string memory stringifiedValue);
    function toString(bytes32 value) external pure returns (string memory stringifiedValue);

    // --- assertions: forge formats both sides in the failure message ("assertion failed: 1 != 2") ---
    function assertEq(uint256 left, uint256 right, string calldata err) external pure;
    function assertEq(int256 left, int256 right, string calldata err) external pure;
    function assertEq(address left, address right, string calldata err) external pure;
    function assertEq(bytes32 left, bytes32 right, string calldata err) external pure;
    function assertEq(bool left, bool right, string calldata err) external pure;
    function assertEq(bytes calldata left, bytes calldata right, string calldata err) external pure;
    function assertEq(string calldata left, string calldata right, string calldata err) external pure;
    function assertNotEq(uint256 left, uint256 right, string calldata err) external pure;
    function assertNotEq(address left, address right, string calldata err) external pure;
    function assertNotEq(bytes32 left, bytes32 right, string calldata err) external pure;
    function assertTrue(bool condition, string calldata err) external pure;
    function assertFalse(bool condition, string calldata err) external pure;
    function assertGt(uint256 left, uint256 right, string calldata err) external pure;
    function assertGe(uint256 left, uint256 right, string calldata err) external pure;
    function assertLt(uint256 left, uint256 right, string calldata err) external pure;
    function assertLe(uint256 left, uint256 right, string calldata err) external pure;
}

/**
 * @dev Minimal Foundry test base (our stand-in for forge-std's `Test`).
 *
 * - `vm`: the cheatcode handle at the HEVM address.
 * - Assertions (`assertEq` for uint256/int256/address/bytes32/bool/bytes/string, `assertNotEq`, `assertTrue`,
 *   `assertFalse`, `assertGt/Ge/Lt/Le`), each with an optional message. They forward to forge's assertion
 *   cheatcodes, which revert with both values formatted, so a failing test says what differed.
 * - `bound`, `makeAddr`, `makeAddrAndKey` for fuzzing and actors.
 * - Invariant targeting: forge calls the public `targetContracts()`, `targetSelectors()`, `targetSenders()`,
 *   `excludeContracts()`, `excludeSelectors()`, `excludeSenders()`, `targetArtifacts()`, `excludeArtifacts()`,
 *   `targetArtifactSelectors()` and `targetInterfaces()` by selector before an invariant campaign; populate
 *   them in `setUp` with the internal `targetContract(...)`, `targetSelector(...)`, `excludeSender(...)`, etc.
 *   With nothing registered, forge fuzzes every contract deployed in `setUp`.
 */
abstract contract Test {
    /// @dev `address(uint160(uint256(keccak256("hevm cheat code"))))`, where forge intercepts cheatcode calls.
    Vm internal constant vm = Vm(0x7109709ECfa91a80626fF3989D68f67F5b1DD12D);

    /// @dev The selectors of `addr` that an invariant run may call (the ABI forge decodes from `targetSelectors()`).
    struct FuzzSelector {
        address addr;
        bytes4[] selectors;
    }

    /// @dev Selectors of an artifact (e.g. "src/Foo.sol:Foo") to fuzz (decoded from `targetArtifactSelectors()`).
    struct FuzzArtifactSelector {
        string artifact;
        bytes4[] selectors;
    }

    /// @dev Treat `addr` as an instance of `artifacts` (for proxies; decoded from `targetInterfaces()`).
    struct FuzzInterface {
        address addr;
        string[] artifacts;
    }

    /// @dev Marks this as a test contract for tools that look for it (forge-std exposes the same flag).
    bool public constant IS_TEST = true;

    address[] private _targetedContracts;
    address[] private _excludedContracts;
    address[] private _targetedSenders;
    address[] private _excludedSenders;
    string[] private _targetedArtifacts;
    string[] private _excludedArtifacts;
    FuzzSelector[] private _targetedSelectors;
    FuzzSelector[] private _excludedSelectors;
    FuzzArtifactSelector[] private _targetedArtifactSelectors;
    FuzzInterface[] private _targetedInterfaces;

    // ------------------------------------------------------------------ assertions

    function assertTrue(bool condition) internal pure {
        vm.assertTrue(condition, "");
    }

    function assertTrue(bool condition, string memory err) internal pure {
        vm.assertTrue(condition, err);
    }

    function assertFalse(bool condition) internal pure {
        vm.assertFalse(condition, "");
    }

    function assertFalse(bool condition, string memory err) internal pure {
        vm.assertFalse(condition, err);
    }

    function assertEq(uint256 left, uint256 right) internal pure {
        vm.assertEq(left, right, "");
    }

    function assertEq(uint256 left, uint256 right, string memory err) internal pure {
        vm.assertEq(left, right, err);
    }

    function assertEq(int256 left, int256 right) internal pure {
        vm.assertEq(left, right, "");
    }

    function assertEq(int256 left, int256 right, string memory err) internal pure {
        vm.assertEq(left, right, err);
    }

    function assertEq(address left, address right) internal pure {
        vm.assertEq(left, right, "");
    }

    function assertEq(address left, address right, string memory err) internal pure {
        vm.assertEq(left, right, err);
    }

    function assertEq(bytes32 left, bytes32 right) internal pure {
        vm.assertEq(left, right, "");
    }

    function assertEq(bytes32 left, bytes32 right, string memory err) internal pure {
        vm.assertEq(left, right, err);
    }

    function assertEq(bool left, bool right) internal pure {
        vm.assertEq(left, right, "");
    }

    function assertEq(bool left, bool right, string memory err) internal pure {
        vm.assertEq(left, right, err);
    }

    function assertEq(bytes memory left, bytes memory right) internal pure {
        vm.assertEq(left, right, "");
    }

    function assertEq(bytes memory left, bytes memory right, string memory err) internal pure {
        vm.assertEq(left, right, err);
    }

    function assertEq(string memory left, string memory right) internal pure {
        vm.assertEq(left, right, "");
    }

    function assertEq(string memory left, string memory right, string memory err) internal pure {
        vm.assertEq(left, right, err);
    }

    function assertNotEq(uint256 left, uint256 right) internal pure {
        vm.assertNotEq(left, right, "");
    }

    function assertNotEq(uint256 left, uint256 right, string memory err) internal pure {
        vm.assertNotEq(left, right, err);
    }

    function assertNotEq(address left, address right) internal pure {
        vm.assertNotEq(left, right, "");
    }

    function assertNotEq(address left, address right, string memory err) internal pure {
        vm.assertNotEq(left, right, err);
    }

    function assertNotEq(bytes32 left, bytes32 right) internal pure {
        vm.assertNotEq(left, right, "");
    }

    function assertNotEq(bytes32 left, bytes32 right, string memory err) internal pure {
        vm.assertNotEq(left, right, err);
    }

    function assertGt(uint256 left, uint256 right) internal pure {
        vm.assertGt(left, right, "");
    }

    function assertGt(uint256 left, uint256 right, string memory err) internal pure {
        vm.assertGt(left, right, err);
    }

    function assertGe(uint256 left, uint256 right) internal pure {
        vm.assertGe(left, right, "");
    }

    function assertGe(uint256 left, uint256 right, string memory err) internal pure {
        vm.assertGe(left, right, err);
    }

    function assertLt(uint256 left, uint256 right) internal pure {
        vm.assertLt(left, right, "");
    }

    function assertLt(uint256 left, uint256 right, string memory err) internal pure {
        vm.assertLt(left, right, err);
    }

    function assertLe(uint256 left, uint256 right) internal pure {
        vm.assertLe(left, right, "");
    }

    function assertLe(uint256 left, uint256 right, string memory err) internal pure {
        vm.assertLe(left, right, err);
    }

    /// @dev Fails the test unconditionally.
    function fail(string memory err) internal pure {
        vm.assertTrue(false, err);
    }

    // ------------------------------------------------------------------ fuzzing and actors

    /**
     * @dev Maps `x` into `[min, max]`. Values already in range are returned unchanged, so the fuzzer's
     * edge-case dictionary (0, 1, max, values seen in storage) still reaches the test; others wrap around
     * modulo the range size. Prefer this to {Vm-assume} for ranges, which discards runs instead.
     */
    function bound(uint256 x, uint256 min, uint256 max) internal pure returns (uint256) {
        require(min <= max, "Test bound: min > max");
        if (x >= min && x <= max) return x;
        // `max - min + 1` cannot overflow here: the full range [0, 2**256-1] returned above.
        return min + (x % (max - min + 1));
    }

    /// @dev A deterministic labelled address for `name`.
    function makeAddr(string memory name) internal returns (address addr) {
        (addr,) = makeAddrAndKey(name);
    }

    /// @dev A deterministic labelled address for `name` and its private key (`keccak256(name)`).
    function makeAddrAndKey(string memory name) internal returns (address addr, uint256 privateKey) {
        privateKey = uint256(keccak256(abi.encodePacked(name)));
        addr = vm.addr(privateKey);
        vm.label(addr, name);
    }

    /// @dev `vm.sign` packed as the 65-byte `r || s || v` signature that OpenZeppelin's ECDSA expects.
    function signPacked(uint256 privateKey, bytes32 digest) internal pure returns (bytes memory) {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(privateKey, digest);
        return abi.encodePacked(r, s, v);
    }

    // ------------------------------------------------------------------ invariant targeting (read by forge)

    function targetContract(address target) internal {
        _targetedContracts.push(target);
    }

    function excludeContract(address target) internal {
        _excludedContracts.push(target);
    }

    function targetSender(address sender) internal {
        _targetedSenders.push(sender);
    }

    function excludeSender(address sender) internal {
        _excludedSenders.push(sender);
    }

    function targetSelector(FuzzSelector memory selector) internal {
        _targetedSelectors.push(selector);
    }

    function excludeSelector(FuzzSelector memory selector) internal {
        _excludedSelectors.push(selector);
    }

    function targetArtifact(string memory artifact) internal {
        _targetedArtifacts.push(artifact);
    }

    function excludeArtifact(string memory artifact) internal {
        _excludedArtifacts.push(artifact);
    }

    function targetArtifactSelector(FuzzArtifactSelector memory selector) internal {
        _targetedArtifactSelectors.push(selector);
    }

    function targetInterface(FuzzInterface memory target) internal {
        _targetedInterfaces.push(target);
    }

    function targetContracts() public view returns (address[] memory) {
        return _targetedContracts;
    }

    function excludeContracts() public view returns (address[] memory) {
        return _excludedContracts;
    }

    function targetSenders() public view returns (address[] memory) {
        return _targetedSenders;
    }

    function excludeSenders() public view returns (address[] memory) {
        return _excludedSenders;
    }

    function targetSelectors() public view returns (FuzzSelector[] memory) {
        return _targetedSelectors;
    }

    function excludeSelectors() public view returns (FuzzSelector[] memory) {
        return _excludedSelectors;
    }

    function targetArtifacts() public view returns (string[] memory) {
        return _targetedArtifacts;
    }

    function excludeArtifacts() public view returns (string[] memory) {
        return _excludedArtifacts;
    }

    function targetArtifactSelectors() public view returns (FuzzArtifactSelector[] memory) {
        return _targetedArtifactSelectors;
    }

    function targetInterfaces() public view returns (FuzzInterface[] memory) {
        return _targetedInterfaces;
    }
}
