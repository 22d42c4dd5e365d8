// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Test} from "../utils/Test.sol";
import {AgentChannels} from "../../src/AgentChannels.sol";
import {IAgentChannels} from "../../src/escrow/IAgentChannels.sol";
import {TestUSDC} from "../../src/TestUSDC.sol";

/// @dev Signing helpers for the channel suites: vouchers and EIP-3009 `ReceiveWithAuthorization`s, type strings spelled
/// out here so that a typo in the contract fails the tests.
abstract contract ChannelsSigning is Test {
    bytes32 internal constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 cumulativeAmount)");
    bytes32 internal constant RECEIVE_TYPEHASH = keccak256(
        "ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );

    function _voucherSig(AgentChannels channels, uint256 key, bytes32 id, uint128 cumulative)
        internal
        view
        returns (bytes memory)
    {
        bytes32 domainSeparator = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("EVM Payment Channel"),
                keccak256("1"),
                block.chainid,
                address(channels)
            )
        );
        bytes32 structHash = keccak256(abi.encode(VOUCHER_TYPEHASH, id, cumulative));
        return signPacked(key, keccak256(abi.encodePacked("\x19\x01", domainSeparator, structHash)));
    }

    function _receiveSig(
        TestUSDC usdc,
        uint256 key,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce
    ) internal view returns (bytes memory) {
        address from = vm.addr(key);
        bytes32 structHash = keccak256(abi.encode(RECEIVE_TYPEHASH, from, to, value, validAfter, validBefore, nonce));
        return signPacked(key, keccak256(abi.encodePacked("\x19\x01", usdc.DOMAIN_SEPARATOR(), structHash)));
    }

    function _openAuth(address from, address payee, address token, uint128 deposit, bytes32 salt, address signer)
        internal
        view
        returns (IAgentChannels.OpenAuthorization memory auth)
    {
        auth = IAgentChannels.OpenAuthorization({
            payee: payee,
            token: token,
            deposit: deposit,
            salt: salt,
            authorizedSigner: signer,
            from: from,
            validAfter: 0,
            validBefore: block.timestamp + 1 hours,
            nonce: keccak256(abi.encode(from, payee, token, salt, signer))
        });
    }

    function _topUpAuth(bytes32 id, uint128 amount, address from, bytes32 topUpSalt)
        internal
        view
        returns (IAgentChannels.TopUpAuthorization memory auth)
    {
        auth = IAgentChannels.TopUpAuthorization({
            channelId: id,
            additionalDeposit: amount,
            from: from,
            topUpSalt: topUpSalt,
            validAfter: 0,
            validBefore: block.timestamp + 1 hours,
            nonce: keccak256(abi.encode(id, amount, from, topUpSalt))
        });
    }
}
