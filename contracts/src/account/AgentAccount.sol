// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {IERC1271} from "@openzeppelin/contracts/interfaces/IERC1271.sol";
import {IEntryPoint, PackedUserOperation} from "@openzeppelin/contracts/interfaces/IERC4337.sol";
import {Account} from "@openzeppelin/contracts/account/Account.sol";
import {ERC7821} from "@openzeppelin/contracts/account/extensions/draft-ERC7821.sol";
import {Initializable} from "@openzeppelin/contracts/proxy/utils/Initializable.sol";
import {ERC721Holder} from "@openzeppelin/contracts/token/ERC721/utils/ERC721Holder.sol";
import {ERC1155Holder} from "@openzeppelin/contracts/token/ERC1155/utils/ERC1155Holder.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";
import {ERC7739} from "@openzeppelin/contracts/utils/cryptography/signers/draft-ERC7739.sol";
import {SignerECDSA} from "@openzeppelin/contracts/utils/cryptography/signers/SignerECDSA.sol";

import {AccountSessionKeys} from "./AccountSessionKeys.sol";
import {MultichainApproval} from "../multichain/MultichainApproval.sol";

/**
 * @title AgentAccount
 * @dev The ERC-4337 (EntryPoint v0.7) smart account of an agent: one offline owner key and any number of scoped
 * session keys.
 *
 * Composed from OpenZeppelin's account pieces:
 *
 * - {Account}: `validateUserOp` for an EntryPoint v0.7 fixed at construction (the canonical one is
 *   `0x0000000071727De22E5E9d8BAf0edAc6f37da032`), prefund payment, 2D nonces ({Account-getNonce}: each 192-bit key
 *   is an independent nonce lane);
 * - {SignerECDSA}: the owner; a UserOperation with a plain 65-byte signature is the owner's;
 * - {ERC7821}: `execute(mode, executionData)` batch execution (mode `0x01000000000000000000...`), callable by the
 *   EntryPoint and the account itself;
 * - {ERC7739}: ERC-1271 `isValidSignature` for the owner, with the hash nested in this account's EIP-712 domain so
 *   one owner signature cannot be replayed on another of its accounts; session keys never sign for ERC-1271; plus
 *   one more form, the owner's multichain approval of a root (see {isValidSignature});
 * - {ERC721Holder} / {ERC1155Holder}: the account can receive NFTs;
 * - {AccountSessionKeys}: session keys, policies, and owner approvals signed offline.
 *
 * Owner and session keys sign the v0.7 `userOpHash` with the EIP-191 prefix
 * (`"\x19Ethereum Signed Message:\n32" ++ userOpHash`, i.e. `personal_sign`), like the reference `SimpleAccount`.
 *
 * Deployed as ERC-1167 clones by {AgentAccountFactory}; the implementation itself cannot be initialized.
 */
contract AgentAccount is
    Account,
    EIP712,
    ERC7739,
    SignerECDSA,
    ERC7821,
    AccountSessionKeys,
    ERC721Holder,
    ERC1155Holder,
    Initializable
{
    IEntryPoint private immutable _entryPoint;

    /// @dev The account was initialized with `owner`.
    event AgentAccountInitialized(address indexed owner);

    /// @dev `owner` cannot own an account (the zero address).
    error AgentAccountInvalidOwner(address owner);

    /**
     * @dev Deploys the implementation that clones delegate to; `entryPoint_` must be an EntryPoint v0.7 (validation
     * data layout and non-EIP-712 `userOpHash` are v0.7's). Clones share it: it lives in the code, not in storage.
     *
     * @custom:oz-upgrades-unsafe-allow constructor
     */
    constructor(IEntryPoint entryPoint_) EIP712("AgentAccount", "1") SignerECDSA(address(0)) {
        _entryPoint = entryPoint_;
        _disableInitializers();
    }

    /**
     * @notice Sets the owner of a freshly cloned account. Callable once.
     * @dev Emits {AgentAccountInitialized}.
     */
    function initialize(address owner) external initializer {
        if (owner == address(0)) revert AgentAccountInvalidOwner(owner);
        _setSigner(owner);
        emit AgentAccountInitialized(owner);
    }

    /**
     * @notice ERC-1271. Valid signatures are the owner's ERC-7739 nested ones ({ERC7739-isValidSignature}) and one
     * more form, the owner's AgentPay multichain approval: `signature = root ++ ownerSignature` (32 + 65 bytes) is
     * valid for `hash` only when `hash` is `MultichainApproval.digest(root)` (the chainless EIP-712 digest of
     * `MultichainApproval(bytes32 root)`, see {MultichainApproval}) and the owner signed that digest. This is what
     * lets an escrow's `grantWithProof` / `revokeWithProof` accept this account as the payer from the owner's ONE
     * signature over many chains.
     * @dev Sound because the account recomputes the digest from the root it is given: the only hashes this form
     * validates are AgentPay multichain digests of roots the owner signed. Another protocol's hash (Permit2, an
     * EIP-3009 or EIP-2612 token, any EIP-712 domain with a chainId or a contract, any personal message) would have
     * to equal such a digest, a keccak256 collision. An owner of several accounts makes the root valid on each of
     * them (the domain names no account), so every leaf a contract checks this way must bind the account: the
     * escrow's `Grant` and `Revoke` name the payer, and every leaf names its chain id and contract.
     */
    function isValidSignature(bytes32 hash, bytes calldata signature) public view virtual override returns (bytes4) {
        if (
            signature.length == 97 && hash == MultichainApproval.digest(bytes32(signature[:32]))
                && _rawSignatureValidation(hash, signature[32:])
        ) return IERC1271.isValidSignature.selector;
        return super.isValidSignature(hash, signature);
    }

    /// @inheritdoc Account
    function entryPoint() public view virtual override returns (IEntryPoint) {
        return _entryPoint;
    }

    /// @dev The v0.7 `userOpHash` is not EIP-712: keys sign it as an EIP-191 personal message.
    function _signableUserOpHash(
        PackedUserOperation calldata,
        /* userOp */
        bytes32 userOpHash
    )
        internal
        view
        virtual
        override
        returns (bytes32)
    {
        return MessageHashUtils.toEthSignedMessageHash(userOpHash);
    }

    /// @dev The EntryPoint (a validated UserOperation) and the account itself may execute.
    function _erc7821AuthorizedExecutor(address caller, bytes32 mode, bytes calldata executionData)
        internal
        view
        virtual
        override
        returns (bool)
    {
        return caller == address(entryPoint()) || super._erc7821AuthorizedExecutor(caller, mode, executionData);
    }

    /// @dev The owner may also manage session keys directly from its own address.
    function _checkSessionKeyAdmin() internal view virtual override {
        if (msg.sender != signer()) super._checkSessionKeyAdmin();
    }

    /// @inheritdoc AccountSessionKeys
    function _validateUserOp(PackedUserOperation calldata userOp, bytes32 userOpHash, bytes calldata signature)
        internal
        virtual
        override(Account, AccountSessionKeys)
        returns (uint256)
    {
        return super._validateUserOp(userOp, userOpHash, signature);
    }
}
