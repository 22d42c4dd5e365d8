// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Test} from "./utils/Test.sol";
import {TestUSDC} from "../src/TestUSDC.sol";
import {ERC1271Wallet} from "../src/mocks/ERC1271Wallet.sol";
import {ERC3009} from "@openzeppelin/contracts/token/ERC20/extensions/draft-ERC3009.sol";
import {IERC3009, IERC3009Cancel} from "@openzeppelin/contracts/interfaces/draft-IERC3009.sol";
import {IERC20Errors} from "@openzeppelin/contracts/interfaces/draft-IERC6093.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";

contract TestUSDCTest is Test {
    // Spelled out here rather than read from the token, so a typo in the contract's typehashes fails the tests.
    bytes32 constant TRANSFER_TYPEHASH = keccak256(
        "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );
    bytes32 constant RECEIVE_TYPEHASH = keccak256(
        "ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );
    bytes32 constant CANCEL_TYPEHASH = keccak256("CancelAuthorization(address authorizer,bytes32 nonce)");
    bytes32 constant PERMIT_TYPEHASH =
        keccak256("Permit(address owner,address spender,uint256 value,uint256 nonce,uint256 deadline)");

    TestUSDC usdc;
    address payer;
    uint256 payerKey;
    address payee;
    address relayer;
    /// @dev Computed here from first principles (and compared with the token's in {test_metadata}); kept in
    /// storage so signing helpers make no external call that a pending `vm.expectRevert` would consume.
    bytes32 domainSeparator;

    struct Auth {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }

    function setUp() public {
        vm.warp(1_700_000_000);
        usdc = new TestUSDC();
        (payer, payerKey) = makeAddrAndKey("payer");
        payee = makeAddr("payee");
        relayer = makeAddr("relayer");
        usdc.mint(payer, 1_000e6);
        domainSeparator = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("USD Coin"),
                keccak256("2"),
                block.chainid,
                address(usdc)
            )
        );
    }

    // ------------------------------------------------------------------ helpers

    function _auth(uint256 value, bytes32 nonce) internal view returns (Auth memory) {
        return Auth(payer, payee, value, 0, block.timestamp + 60, nonce);
    }

    function _digest(bytes32 structHash) internal view returns (bytes32) {
        return keccak256(abi.encodePacked("\x19\x01", domainSeparator, structHash));
    }

    function _authDigest(bytes32 typehash, Auth memory a) internal view returns (bytes32) {
        return _digest(keccak256(abi.encode(typehash, a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce)));
    }

    function _transfer(Auth memory a, uint256 key) internal {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(key, _authDigest(TRANSFER_TYPEHASH, a));
        usdc.transferWithAuthorization(a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce, v, r, s);
    }

    function _transferBytes(Auth memory a, uint256 key) internal {
        bytes memory sig = signPacked(key, _authDigest(TRANSFER_TYPEHASH, a));
        usdc.transferWithAuthorization(a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce, sig);
    }

    // ------------------------------------------------------------------ metadata

    function test_metadata() public view {
        assertEq(usdc.name(), "USD Coin");
        assertEq(usdc.symbol(), "USDC");
        assertEq(uint256(usdc.decimals()), 6);
        assertEq(usdc.version(), "2");
        (, string memory name, string memory version, uint256 chainId, address verifying,,) = usdc.eip712Domain();
        assertEq(name, "USD Coin");
        assertEq(version, "2");
        assertEq(chainId, block.chainid);
        assertEq(verifying, address(usdc));
        assertEq(usdc.DOMAIN_SEPARATOR(), domainSeparator);
    }

    function test_mint_isOpenAndEmitsTransfer() public {
        vm.expectEmit(true, true, false, true, address(usdc));
        emit IERC20.Transfer(address(0), payee, 5e6);
        vm.prank(relayer);
        usdc.mint(payee, 5e6);
        assertEq(usdc.balanceOf(payee), 5e6);
    }

    // ------------------------------------------------------------------ transferWithAuthorization

    function test_transferWithAuthorization_movesFunds() public {
        Auth memory a = _auth(10e6, keccak256("n1"));
        vm.expectEmit(true, true, false, false, address(usdc));
        emit IERC3009.AuthorizationUsed(payer, a.nonce);
        vm.expectEmit(true, true, false, true, address(usdc));
        emit IERC20.Transfer(payer, payee, 10e6);
        vm.prank(relayer);
        _transfer(a, payerKey);
        assertEq(usdc.balanceOf(payer), 990e6);
        assertEq(usdc.balanceOf(payee), 10e6);
        assertTrue(usdc.authorizationState(payer, a.nonce));
    }

    function test_transferWithAuthorization_replayReverts() public {
        Auth memory a = _auth(10e6, keccak256("n1"));
        _transfer(a, payerKey);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, payer, a.nonce));
        _transfer(a, payerKey);
        // The bytes overload shares the nonce space.
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, payer, a.nonce));
        _transferBytes(a, payerKey);
    }

    function test_transferWithAuthorization_expiredReverts() public {
        Auth memory a = _auth(10e6, keccak256("n1"));
        vm.warp(a.validBefore); // validBefore is exclusive
        vm.expectRevert(
            abi.encodeWithSelector(ERC3009.ERC3009InvalidAuthorizationTime.selector, a.validAfter, a.validBefore)
        );
        _transfer(a, payerKey);
    }

    function test_transferWithAuthorization_notYetValidReverts() public {
        Auth memory a = _auth(10e6, keccak256("n1"));
        a.validAfter = block.timestamp; // validAfter is exclusive too
        vm.expectRevert(
            abi.encodeWithSelector(ERC3009.ERC3009InvalidAuthorizationTime.selector, a.validAfter, a.validBefore)
        );
        _transfer(a, payerKey);
        vm.warp(block.timestamp + 1);
        _transfer(a, payerKey);
        assertEq(usdc.balanceOf(payee), 10e6);
    }

    function test_transferWithAuthorization_wrongSignerReverts() public {
        Auth memory a = _auth(10e6, keccak256("n1"));
        (, uint256 otherKey) = makeAddrAndKey("other");
        vm.expectRevert(ERC3009.ERC3009InvalidSignature.selector);
        _transfer(a, otherKey);
        vm.expectRevert(ERC3009.ERC3009InvalidSignature.selector);
        _transferBytes(a, otherKey);
    }

    function test_transferWithAuthorization_tamperedAmountReverts() public {
        Auth memory a = _auth(10e6, keccak256("n1"));
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(payerKey, _authDigest(TRANSFER_TYPEHASH, a));
        vm.expectRevert(ERC3009.ERC3009InvalidSignature.selector);
        usdc.transferWithAuthorization(a.from, a.to, a.value + 1, a.validAfter, a.validBefore, a.nonce, v, r, s);
    }

    function test_transferWithAuthorization_insufficientBalanceReverts() public {
        Auth memory a = _auth(1_001e6, keccak256("n1"));
        vm.expectRevert(abi.encodeWithSelector(IERC20Errors.ERC20InsufficientBalance.selector, payer, 1_000e6, 1_001e6));
        _transfer(a, payerKey);
        assertFalse(usdc.authorizationState(payer, a.nonce), "failed transfer must not burn the nonce");
    }

    function test_transferWithAuthorization_bytesOverload() public {
        Auth memory a = _auth(7e6, keccak256("n2"));
        _transferBytes(a, payerKey);
        assertEq(usdc.balanceOf(payee), 7e6);
    }

    // ------------------------------------------------------------------ receiveWithAuthorization

    function test_receiveWithAuthorization_onlyPayee() public {
        Auth memory a = _auth(3e6, keccak256("r1"));
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(payerKey, _authDigest(RECEIVE_TYPEHASH, a));
        vm.prank(relayer);
        vm.expectRevert(abi.encodeWithSelector(IERC20Errors.ERC20InvalidReceiver.selector, payee));
        usdc.receiveWithAuthorization(a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce, v, r, s);

        vm.prank(payee);
        usdc.receiveWithAuthorization(a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce, v, r, s);
        assertEq(usdc.balanceOf(payee), 3e6);
    }

    function test_receiveWithAuthorization_rejectsTransferSignature() public {
        // The two typehashes differ, so a transfer authorization cannot be submitted as a receive (or back).
        Auth memory a = _auth(3e6, keccak256("r1"));
        bytes memory sig = signPacked(payerKey, _authDigest(TRANSFER_TYPEHASH, a));
        vm.prank(payee);
        vm.expectRevert(ERC3009.ERC3009InvalidSignature.selector);
        usdc.receiveWithAuthorization(a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce, sig);
    }

    // ------------------------------------------------------------------ cancelAuthorization

    function test_cancelAuthorization() public {
        bytes32 nonce = keccak256("c1");
        (uint8 v, bytes32 r, bytes32 s) =
            vm.sign(payerKey, _digest(keccak256(abi.encode(CANCEL_TYPEHASH, payer, nonce))));
        vm.expectEmit(true, true, false, false, address(usdc));
        emit IERC3009Cancel.AuthorizationCanceled(payer, nonce);
        vm.prank(relayer);
        usdc.cancelAuthorization(payer, nonce, v, r, s);
        assertTrue(usdc.authorizationState(payer, nonce));

        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, payer, nonce));
        _transfer(_auth(1e6, nonce), payerKey);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, payer, nonce));
        usdc.cancelAuthorization(payer, nonce, v, r, s);
    }

    function test_cancelAuthorization_wrongSignerReverts() public {
        bytes32 nonce = keccak256("c1");
        (, uint256 otherKey) = makeAddrAndKey("other");
        bytes memory sig = signPacked(otherKey, _digest(keccak256(abi.encode(CANCEL_TYPEHASH, payer, nonce))));
        vm.expectRevert(ERC3009.ERC3009InvalidSignature.selector);
        usdc.cancelAuthorization(payer, nonce, sig);
    }

    // ------------------------------------------------------------------ ERC-1271 payers

    function test_erc1271_transferAndCancel() public {
        ERC1271Wallet wallet = new ERC1271Wallet(payer);
        usdc.mint(address(wallet), 50e6);
        Auth memory a = Auth(address(wallet), payee, 20e6, 0, block.timestamp + 60, keccak256("w1"));
        bytes memory sig = signPacked(payerKey, _authDigest(TRANSFER_TYPEHASH, a));

        usdc.transferWithAuthorization(a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce, sig);
        assertEq(usdc.balanceOf(payee), 20e6);

        // The v, r, s overload also reaches ERC-1271 (x402 facilitators choose it for 65-byte signatures).
        a.nonce = keccak256("w2");
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(payerKey, _authDigest(TRANSFER_TYPEHASH, a));
        usdc.transferWithAuthorization(a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce, v, r, s);
        assertEq(usdc.balanceOf(payee), 40e6);

        bytes32 nonce = keccak256("w3");
        bytes memory cancelSig =
            signPacked(payerKey, _digest(keccak256(abi.encode(CANCEL_TYPEHASH, address(wallet), nonce))));
        usdc.cancelAuthorization(address(wallet), nonce, cancelSig);
        assertTrue(usdc.authorizationState(address(wallet), nonce));
    }

    function test_erc1271_wrongOwnerReverts() public {
        ERC1271Wallet wallet = new ERC1271Wallet(makeAddr("someoneElse"));
        usdc.mint(address(wallet), 50e6);
        Auth memory a = Auth(address(wallet), payee, 20e6, 0, block.timestamp + 60, keccak256("w1"));
        bytes memory sig = signPacked(payerKey, _authDigest(TRANSFER_TYPEHASH, a));
        vm.expectRevert(ERC3009.ERC3009InvalidSignature.selector);
        usdc.transferWithAuthorization(a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce, sig);
    }

    function test_erc1271_receiveWithAuthorization() public {
        ERC1271Wallet wallet = new ERC1271Wallet(payer);
        usdc.mint(address(wallet), 50e6);
        Auth memory a = Auth(address(wallet), payee, 5e6, 0, block.timestamp + 60, keccak256("w1"));
        bytes memory sig = signPacked(payerKey, _authDigest(RECEIVE_TYPEHASH, a));
        vm.prank(payee);
        usdc.receiveWithAuthorization(a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce, sig);
        assertEq(usdc.balanceOf(payee), 5e6);
    }

    function test_erc1271Wallet_executeOnlyOwner() public {
        ERC1271Wallet wallet = new ERC1271Wallet(payer);
        usdc.mint(address(wallet), 50e6);
        bytes memory call = abi.encodeCall(IERC20.transfer, (payee, 1e6));
        vm.prank(relayer);
        vm.expectRevert(abi.encodeWithSelector(ERC1271Wallet.ERC1271WalletUnauthorized.selector, relayer));
        wallet.execute(address(usdc), 0, call);

        vm.expectEmit(true, false, false, true, address(wallet));
        emit ERC1271Wallet.Executed(address(usdc), 0, call);
        vm.prank(payer);
        wallet.execute(address(usdc), 0, call);
        assertEq(usdc.balanceOf(payee), 1e6);
    }

    // ------------------------------------------------------------------ permit

    function _permitDigest(address owner, address spender, uint256 value, uint256 nonce, uint256 deadline)
        internal
        view
        returns (bytes32)
    {
        return _digest(keccak256(abi.encode(PERMIT_TYPEHASH, owner, spender, value, nonce, deadline)));
    }

    function test_permit() public {
        uint256 deadline = block.timestamp + 1 hours;
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(payerKey, _permitDigest(payer, relayer, 100e6, 0, deadline));
        vm.expectEmit(true, true, false, true, address(usdc));
        emit IERC20.Approval(payer, relayer, 100e6);
        usdc.permit(payer, relayer, 100e6, deadline, v, r, s);
        assertEq(usdc.allowance(payer, relayer), 100e6);
        assertEq(usdc.nonces(payer), 1);

        vm.expectRevert(abi.encodeWithSelector(TestUSDC.ERC2612InvalidSignature.selector, payer));
        usdc.permit(payer, relayer, 100e6, deadline, v, r, s); // nonce moved on: replay fails

        vm.prank(relayer);
        assertTrue(usdc.transferFrom(payer, payee, 100e6));
        assertEq(usdc.balanceOf(payee), 100e6);
    }

    function test_permit_expiredReverts() public {
        uint256 deadline = block.timestamp - 1;
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(payerKey, _permitDigest(payer, relayer, 1, 0, deadline));
        vm.expectRevert(abi.encodeWithSelector(TestUSDC.ERC2612ExpiredSignature.selector, deadline));
        usdc.permit(payer, relayer, 1, deadline, v, r, s);
    }

    function test_permit_erc1271Owner() public {
        ERC1271Wallet wallet = new ERC1271Wallet(payer);
        uint256 deadline = block.timestamp + 1 hours;
        bytes memory sig = signPacked(payerKey, _permitDigest(address(wallet), relayer, 9, 0, deadline));
        usdc.permit(address(wallet), relayer, 9, deadline, sig);
        assertEq(usdc.allowance(address(wallet), relayer), 9);
    }

    // ------------------------------------------------------------------ fuzz

    function testFuzz_transferWithAuthorization(uint256 balance, uint256 value, bytes32 nonce, uint256 window) public {
        balance = bound(balance, 0, type(uint128).max);
        value = bound(value, 0, balance);
        window = bound(window, 1, 365 days);
        address from = payer;
        usdc.mint(from, balance);
        uint256 before = usdc.balanceOf(from);

        Auth memory a = Auth(from, payee, value, block.timestamp - 1, block.timestamp + window, nonce);
        assertFalse(usdc.authorizationState(from, nonce));
        _transferBytes(a, payerKey);
        assertEq(usdc.balanceOf(from), before - value);
        assertEq(usdc.balanceOf(payee), value);
        assertTrue(usdc.authorizationState(from, nonce));

        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, from, nonce));
        _transfer(a, payerKey);
    }

    function testFuzz_nonceIndependence(bytes32 n1, bytes32 n2) public {
        vm.assume(n1 != n2);
        _transfer(_auth(1e6, n1), payerKey);
        assertFalse(usdc.authorizationState(payer, n2));
        _transfer(_auth(1e6, n2), payerKey);
        assertEq(usdc.balanceOf(payee), 2e6);
    }

    function testFuzz_timeWindow(uint256 validAfter, uint256 validBefore, uint256 timestamp) public {
        validAfter = bound(validAfter, 0, 2 ** 40);
        validBefore = bound(validBefore, 0, 2 ** 40);
        timestamp = bound(timestamp, 1, 2 ** 40);
        vm.warp(timestamp);
        Auth memory a = Auth(payer, payee, 1, validAfter, validBefore, bytes32(timestamp));
        if (timestamp > validAfter && timestamp < validBefore) {
            _transfer(a, payerKey);
            assertEq(usdc.balanceOf(payee), 1);
        } else {
            vm.expectRevert(
                abi.encodeWithSelector(ERC3009.ERC3009InvalidAuthorizationTime.selector, validAfter, validBefore)
            );
            _transfer(a, payerKey);
        }
    }

    function testFuzz_permit(uint256 value, uint256 deadlineOffset) public {
        deadlineOffset = bound(deadlineOffset, 0, 10 * 365 days);
        uint256 deadline = block.timestamp + deadlineOffset;
        bytes memory sig = signPacked(payerKey, _permitDigest(payer, relayer, value, 0, deadline));
        usdc.permit(payer, relayer, value, deadline, sig);
        assertEq(usdc.allowance(payer, relayer), value);
    }
}

/// @dev Drives TestUSDC with signed authorizations from a few fixed actors, for {TestUSDCInvariantTest}.
contract TestUSDCHandler is Test {
    TestUSDC public immutable usdc;
    bytes32 public immutable domainSeparator;
    address[] public actors;
    uint256[] internal keys;
    bytes32[] public usedNonces; // authorizer-tagged: keccak256(authorizer, nonce)
    mapping(bytes32 tagged => address authorizer) public authorizerOf;
    mapping(bytes32 tagged => bytes32 nonce) public nonceOf;

    bytes32 constant TRANSFER_TYPEHASH = keccak256(
        "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );
    bytes32 constant CANCEL_TYPEHASH = keccak256("CancelAuthorization(address authorizer,bytes32 nonce)");

    constructor(TestUSDC usdc_, bytes32 domainSeparator_) {
        usdc = usdc_;
        domainSeparator = domainSeparator_;
        for (uint256 i = 0; i < 3; i++) {
            (address actor, uint256 key) = makeAddrAndKey(string.concat("actor", vm.toString(i)));
            actors.push(actor);
            keys.push(key);
        }
    }

    function actorCount() external view returns (uint256) {
        return actors.length;
    }

    function usedCount() external view returns (uint256) {
        return usedNonces.length;
    }

    function mint(uint256 actorSeed, uint256 amount) external {
        usdc.mint(actors[actorSeed % actors.length], bound(amount, 0, 1e18));
    }

    function transferWithAuthorization(uint256 fromSeed, uint256 toSeed, uint256 amount, bytes32 nonce) external {
        uint256 i = fromSeed % actors.length;
        address from = actors[i];
        address to = actors[toSeed % actors.length];
        amount = bound(amount, 0, usdc.balanceOf(from));
        if (usdc.authorizationState(from, nonce)) return;
        bytes32 digest = keccak256(
            abi.encodePacked(
                "\x19\x01",
                domainSeparator,
                keccak256(abi.encode(TRANSFER_TYPEHASH, from, to, amount, 0, block.timestamp + 1, nonce))
            )
        );
        usdc.transferWithAuthorization(from, to, amount, 0, block.timestamp + 1, nonce, signPacked(keys[i], digest));
        _recordUsed(from, nonce);
    }

    function cancelAuthorization(uint256 actorSeed, bytes32 nonce) external {
        uint256 i = actorSeed % actors.length;
        address authorizer = actors[i];
        if (usdc.authorizationState(authorizer, nonce)) return;
        bytes32 digest = keccak256(
            abi.encodePacked("\x19\x01", domainSeparator, keccak256(abi.encode(CANCEL_TYPEHASH, authorizer, nonce)))
        );
        usdc.cancelAuthorization(authorizer, nonce, signPacked(keys[i], digest));
        _recordUsed(authorizer, nonce);
    }

    function _recordUsed(address authorizer, bytes32 nonce) private {
        bytes32 tagged = keccak256(abi.encode(authorizer, nonce));
        usedNonces.push(tagged);
        authorizerOf[tagged] = authorizer;
        nonceOf[tagged] = nonce;
    }
}

contract TestUSDCInvariantTest is Test {
    TestUSDC usdc;
    TestUSDCHandler handler;

    function setUp() public {
        vm.warp(1_700_000_000);
        usdc = new TestUSDC();
        handler = new TestUSDCHandler(usdc, usdc.DOMAIN_SEPARATOR());
        targetContract(address(handler));
        bytes4[] memory selectors = new bytes4[](3);
        selectors[0] = TestUSDCHandler.mint.selector;
        selectors[1] = TestUSDCHandler.transferWithAuthorization.selector;
        selectors[2] = TestUSDCHandler.cancelAuthorization.selector;
        targetSelector(FuzzSelector(address(handler), selectors));
    }

    /// @dev Signed transfers only move tokens between actors: their balances always add up to the supply.
    function invariant_balancesSumToSupply() public view {
        uint256 sum;
        for (uint256 i = 0; i < handler.actorCount(); i++) {
            sum += usdc.balanceOf(handler.actors(i));
        }
        assertEq(sum, usdc.totalSupply());
    }

    /// @dev Every nonce that was used or canceled stays used.
    function invariant_usedNoncesStayUsed() public view {
        for (uint256 i = 0; i < handler.usedCount(); i++) {
            bytes32 tagged = handler.usedNonces(i);
            assertTrue(usdc.authorizationState(handler.authorizerOf(tagged), handler.nonceOf(tagged)));
        }
    }
}
