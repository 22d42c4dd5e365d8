// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {IEntryPoint} from "@openzeppelin/contracts/interfaces/IERC4337.sol";
import {Clones} from "@openzeppelin/contracts/proxy/Clones.sol";

import {AgentAccount} from "./AgentAccount.sol";

/**
 * @title AgentAccountFactory
 * @dev Deploys {AgentAccount}s as ERC-1167 clones at CREATE2 addresses that depend on the owner and a salt, so an
 * account's address is known before it exists (counterfactual) and funds can be sent to it first.
 *
 * The EntryPoint v0.7 deploys an account on its first UserOperation through `initCode =
 * abi.encodePacked(factory, abi.encodeCall(AgentAccountFactory.createAccount, (owner, salt)))`, which its
 * `SenderCreator` calls. {createAccount} returns the existing address when the account is already deployed, so it is
 * also safe to call directly. The factory keeps no storage (ERC-7562: an unstaked factory may be used).
 *
 * The owner is part of the CREATE2 salt: nobody can deploy a clone at someone else's address with another owner.
 */
contract AgentAccountFactory {
    /// @notice The implementation every account delegates to.
    AgentAccount public immutable accountImplementation;

    /// @dev `account` was deployed for `owner` with `salt`.
    event AgentAccountCreated(address indexed account, address indexed owner, uint256 salt);

    /// @dev Deploys the account implementation for `entryPoint_` (an EntryPoint v0.7, normally the canonical one).
    constructor(IEntryPoint entryPoint_) {
        accountImplementation = new AgentAccount(entryPoint_);
    }

    /**
     * @notice Deploys the account of `owner` for `salt` (if it does not exist yet) and returns its address.
     * @dev Emits {AgentAccountCreated} when it deploys.
     */
    function createAccount(address owner, uint256 salt) external returns (address account) {
        bytes32 cloneSalt = _cloneSalt(owner, salt);
        account = Clones.predictDeterministicAddress(address(accountImplementation), cloneSalt);
        if (account.code.length == 0) {
            Clones.cloneDeterministic(address(accountImplementation), cloneSalt);
            AgentAccount(payable(account)).initialize(owner);
            emit AgentAccountCreated(account, owner, salt);
        }
    }

    /// @notice The address of the account of `owner` for `salt`, deployed or not.
    function getAddress(address owner, uint256 salt) external view returns (address) {
        return Clones.predictDeterministicAddress(address(accountImplementation), _cloneSalt(owner, salt));
    }

    function _cloneSalt(address owner, uint256 salt) private pure returns (bytes32) {
        return keccak256(abi.encode(owner, salt));
    }
}
