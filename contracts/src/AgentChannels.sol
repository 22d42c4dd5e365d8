// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {IAgentChannels} from "./escrow/IAgentChannels.sol";
import {IERC3009Receive} from "./escrow/IERC3009Receive.sol";

/**
 * @title AgentChannels
 * @dev Unidirectional payment channels for metered streams, with the core ABI of the MPP `evm`/`session` method
 * (`draft-evm-session-00`): {open}, {settle}, {topUp}, {close}, {requestClose}, {withdraw}.
 *
 * A payer locks a deposit for one payee. Its `authorizedSigner` (a session key, or the payer itself) signs
 * *cumulative* EIP-712 vouchers off-chain, one per call or per chunk of a stream. The payee settles the latest
 * voucher whenever it likes, so one on-chain settlement covers every payment since the last. Unlike the shared
 * deposit of {AgentEscrow}, the deposit is reserved for this payee: nobody else can spend it, and the payer can
 * only take back the unsettled part after {requestClose} and {CLOSE_GRACE_PERIOD}, during which the payee still
 * settles. The session key can sign vouchers and nothing else; it is bounded by the deposit.
 *
 * Voucher signatures: 65-byte low-s ECDSA from the authorized signer (or ERC-1271 when that signer is a contract),
 * through OpenZeppelin's {SignatureChecker}.
 *
 * Relayed profile: {openWithAuthorization} / {topUpWithAuthorization} pull the deposit with the payer's EIP-3009
 * `receiveWithAuthorization` (the draft's nonce derivation, `NonceMismatch` on a mismatch); their parameters are
 * grouped in one struct each (the draft's flat lists need `via_ir`, which the rest of the build does not use).
 *
 * Storage: four slots per channel (amounts are kept as `uint96` next to addresses; the ABI keeps the draft's
 * `uint128`, and a deposit above 2^96 - 1 base units reverts), so a settlement reads four slots and writes one.
 *
 * Payouts: the payee's share is transferred to it (a payee the token refuses can only block itself). Split shares
 * and the payer's refund go to parties the payee does not choose, so a transfer the token refuses (a blocklisted
 * recipient) never reverts a settlement or a close: the amount is owed to its recipient, who pulls it later with
 * {withdrawOwed}, as {AgentEscrow} does with failed payouts.
 *
 * WARNING: Fee-on-transfer and rebasing tokens are not supported.
 */
contract AgentChannels is IAgentChannels, EIP712, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 cumulativeAmount)");

    /// @notice Time the payee keeps to settle after the payer's {requestClose} (the draft's reference value).
    uint256 public constant CLOSE_GRACE_PERIOD = 15 minutes;

    /// @notice At most this many splits per channel: every settlement pays each of them.
    uint256 public constant MAX_SPLITS = 8;

    /// @dev {IAgentChannels-Channel}, packed into four slots.
    struct ChannelData {
        address payer; // slot 0
        uint64 closeRequestedAt;
        bool finalized;
        uint8 splitCount; // saves settlements of split-less channels a cold read of the split array
        address payee; // slot 1
        uint96 settled;
        address token; // slot 2
        uint96 deposit;
        address authorizedSigner; // slot 3
    }

    mapping(bytes32 channelId => ChannelData) private _channels;
    mapping(bytes32 channelId => Split[]) private _splits;
    mapping(address recipient => mapping(address token => uint256)) private _owed;

    constructor() EIP712("EVM Payment Channel", "1") {}

    // ------------------------------------------------------------------ draft-evm-session-00 core

    /// @inheritdoc IAgentChannels
    function open(
        address payee,
        address token,
        uint128 deposit,
        bytes32 salt,
        address authorizedSigner,
        address[] calldata splitRecipients,
        uint16[] calldata splitBps
    ) external nonReentrant returns (bytes32 channelId) {
        require(payee != address(0) && token != address(0), ChannelInvalidParty(payee, token));
        channelId = _channelId(msg.sender, payee, token, salt, authorizedSigner);
        ChannelData storage c = _channels[channelId];
        require(c.payer == address(0), ChannelAlreadyExists(channelId));

        c.payer = msg.sender;
        c.splitCount = _setSplits(channelId, splitRecipients, splitBps);
        c.payee = payee;
        c.token = token;
        c.deposit = SafeCast.toUint96(deposit);
        c.authorizedSigner = authorizedSigner;
        emit ChannelOpened(channelId, msg.sender, payee, token, authorizedSigner, deposit, salt);

        IERC20(token).safeTransferFrom(msg.sender, address(this), deposit);
    }

    /// @inheritdoc IAgentChannels
    function openWithAuthorization(OpenAuthorization calldata auth, bytes calldata signature)
        external
        nonReentrant
        returns (bytes32 channelId)
    {
        address payee = auth.payee;
        address token = auth.token;
        require(payee != address(0) && token != address(0), ChannelInvalidParty(payee, token));
        require(auth.deposit != 0, ChannelZeroDeposit());
        address from = auth.from;
        bytes32 expected = keccak256(abi.encode(from, payee, token, auth.salt, auth.authorizedSigner));
        require(auth.nonce == expected, ChannelNonceMismatch(expected, auth.nonce));
        channelId = _channelId(from, payee, token, auth.salt, auth.authorizedSigner);
        ChannelData storage c = _channels[channelId];
        require(c.payer == address(0), ChannelAlreadyExists(channelId));

        c.payer = from;
        c.payee = payee;
        c.token = token;
        c.deposit = SafeCast.toUint96(auth.deposit);
        c.authorizedSigner = auth.authorizedSigner;
        emit ChannelOpened(channelId, from, payee, token, auth.authorizedSigner, auth.deposit, auth.salt);

        // `receive` (not `transfer`) WithAuthorization: the token checks that we are both recipient and caller, so the
        // authorization cannot be front-run into a plain transfer that opens no channel.
        IERC3009Receive(token).receiveWithAuthorization(
            from, address(this), auth.deposit, auth.validAfter, auth.validBefore, auth.nonce, signature
        );
    }

    /// @inheritdoc IAgentChannels
    function topUpWithAuthorization(TopUpAuthorization calldata auth, bytes calldata signature) external nonReentrant {
        bytes32 channelId = auth.channelId;
        ChannelData storage c = _live(channelId);
        require(auth.from == c.payer, ChannelUnauthorized(channelId, auth.from));
        require(auth.additionalDeposit != 0, ChannelZeroDeposit());
        bytes32 expected = keccak256(abi.encode(channelId, auth.additionalDeposit, auth.from, auth.topUpSalt));
        require(auth.nonce == expected, ChannelNonceMismatch(expected, auth.nonce));
        _addDeposit(channelId, c, auth.additionalDeposit);

        IERC3009Receive(c.token).receiveWithAuthorization(
            auth.from, address(this), auth.additionalDeposit, auth.validAfter, auth.validBefore, auth.nonce, signature
        );
    }

    /// @inheritdoc IAgentChannels
    function settle(bytes32 channelId, uint128 cumulativeAmount, bytes calldata signature) external nonReentrant {
        ChannelData storage c = _live(channelId);
        require(msg.sender == c.payee, ChannelUnauthorized(channelId, msg.sender));
        _settle(channelId, c, cumulativeAmount, signature);
    }

    /// @inheritdoc IAgentChannels
    function topUp(bytes32 channelId, uint128 additionalDeposit) external nonReentrant {
        ChannelData storage c = _live(channelId);
        require(msg.sender == c.payer, ChannelUnauthorized(channelId, msg.sender));
        _addDeposit(channelId, c, additionalDeposit);

        IERC20(c.token).safeTransferFrom(msg.sender, address(this), additionalDeposit);
    }

    /// @inheritdoc IAgentChannels
    function close(bytes32 channelId, uint128 cumulativeAmount, bytes calldata signature) external nonReentrant {
        ChannelData storage c = _live(channelId);
        require(msg.sender == c.payee, ChannelUnauthorized(channelId, msg.sender));
        if (cumulativeAmount > c.settled) _settle(channelId, c, cumulativeAmount, signature);
        _finalize(channelId, c);
    }

    /// @inheritdoc IAgentChannels
    function requestClose(bytes32 channelId) external {
        ChannelData storage c = _live(channelId);
        require(msg.sender == c.payer, ChannelUnauthorized(channelId, msg.sender));
        // Asking again must not push the payee's deadline around.
        require(c.closeRequestedAt == 0, ChannelCloseAlreadyRequested(channelId));
        c.closeRequestedAt = uint64(block.timestamp);
        emit ChannelCloseRequested(channelId, block.timestamp + CLOSE_GRACE_PERIOD);
    }

    /// @inheritdoc IAgentChannels
    function withdraw(bytes32 channelId) external nonReentrant {
        ChannelData storage c = _live(channelId);
        require(msg.sender == c.payer, ChannelUnauthorized(channelId, msg.sender));
        uint256 requestedAt = c.closeRequestedAt;
        require(requestedAt != 0, ChannelCloseNotRequested(channelId));
        uint256 readyAt = requestedAt + CLOSE_GRACE_PERIOD;
        require(block.timestamp >= readyAt, ChannelCloseNotReady(channelId, readyAt));
        _finalize(channelId, c);
    }

    /// @inheritdoc IAgentChannels
    function withdrawOwed(address token, address to) external nonReentrant returns (uint256 amount) {
        // Sending to this contract would strand the tokens outside every channel's books.
        require(to != address(this), ChannelInvalidRecipient(to));
        amount = _owed[msg.sender][token];
        require(amount != 0, ChannelNothingOwed(msg.sender, token));
        delete _owed[msg.sender][token];
        emit OwedWithdrawn(msg.sender, token, to, amount);

        IERC20(token).safeTransfer(to, amount);
    }

    // ------------------------------------------------------------------ views

    /// @inheritdoc IAgentChannels
    function owedTo(address recipient, address token) external view returns (uint256) {
        return _owed[recipient][token];
    }

    /// @inheritdoc IAgentChannels
    function computeChannelId(address payer, address payee, address token, bytes32 salt, address authorizedSigner)
        external
        view
        returns (bytes32)
    {
        return _channelId(payer, payee, token, salt, authorizedSigner);
    }

    /// @inheritdoc IAgentChannels
    function getChannel(bytes32 channelId) external view returns (Channel memory) {
        ChannelData memory c = _channels[channelId];
        return Channel({
            payer: c.payer,
            closeRequestedAt: c.closeRequestedAt,
            finalized: c.finalized,
            payee: c.payee,
            token: c.token,
            authorizedSigner: c.authorizedSigner,
            deposit: c.deposit,
            settled: c.settled
        });
    }

    /// @inheritdoc IAgentChannels
    function getSplits(bytes32 channelId) external view returns (Split[] memory) {
        return _splits[channelId];
    }

    /// @inheritdoc IAgentChannels
    function hashVoucher(bytes32 channelId, uint128 cumulativeAmount) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, cumulativeAmount)));
    }

    // ------------------------------------------------------------------ internals

    function _channelId(address payer, address payee, address token, bytes32 salt, address authorizedSigner)
        private
        view
        returns (bytes32)
    {
        return keccak256(abi.encode(payer, payee, token, salt, authorizedSigner, address(this), block.chainid));
    }

    function _addDeposit(bytes32 channelId, ChannelData storage c, uint128 additionalDeposit) private {
        uint128 deposit = c.deposit + additionalDeposit;
        c.deposit = SafeCast.toUint96(deposit);
        emit ChannelToppedUp(channelId, additionalDeposit, deposit);
        if (c.closeRequestedAt != 0) {
            // Topping up says "keep going": the pending close would otherwise cut the payee's new funds short.
            c.closeRequestedAt = 0;
            emit ChannelCloseCancelled(channelId);
        }
    }

    function _live(bytes32 channelId) private view returns (ChannelData storage c) {
        c = _channels[channelId];
        require(c.payer != address(0), ChannelNotFound(channelId));
        require(!c.finalized, ChannelFinalized(channelId));
    }

    function _setSplits(bytes32 channelId, address[] calldata recipients, uint16[] calldata bps)
        private
        returns (uint8 count)
    {
        uint256 n = recipients.length;
        require(n <= MAX_SPLITS, ChannelTooManySplits(n, MAX_SPLITS));
        require(n == bps.length, ChannelInvalidSplits());
        uint256 total;
        for (uint256 i; i < n; ++i) {
            require(recipients[i] != address(0) && bps[i] != 0, ChannelInvalidSplits());
            total += bps[i];
            _splits[channelId].push(Split(recipients[i], bps[i]));
        }
        require(total < 10_000, ChannelInvalidSplits());
        return uint8(n); // n <= MAX_SPLITS
    }

    function _settle(bytes32 channelId, ChannelData storage c, uint128 cumulativeAmount, bytes calldata signature)
        private
    {
        uint128 settled = c.settled;
        require(cumulativeAmount > settled, ChannelAmountNotIncreasing(cumulativeAmount, settled));
        uint128 deposit = c.deposit;
        require(cumulativeAmount <= deposit, ChannelAmountExceedsDeposit(cumulativeAmount, deposit));
        address signer = c.authorizedSigner;
        if (signer == address(0)) signer = c.payer;
        require(
            SignatureChecker.isValidSignatureNowCalldata(signer, hashVoucher(channelId, cumulativeAmount), signature),
            ChannelInvalidSignature(channelId)
        );

        uint128 delta = cumulativeAmount - settled;
        c.settled = uint96(cumulativeAmount); // <= deposit, which fits 96 bits
        emit ChannelSettled(channelId, cumulativeAmount, delta);

        IERC20 token = IERC20(c.token);
        uint256 rest = delta;
        uint256 splitCount = c.splitCount;
        for (uint256 i; i < splitCount; ++i) {
            Split memory split = _splits[channelId][i];
            uint256 share = uint256(delta) * split.bps / 10_000;
            rest -= share;
            if (share != 0) _payOrOwe(channelId, token, split.recipient, share);
        }
        token.safeTransfer(c.payee, rest);
    }

    /// @dev Transfers `amount` to `recipient`; if the token refuses (e.g. a blocklisted recipient), it is owed instead.
    function _payOrOwe(bytes32 channelId, IERC20 token, address recipient, uint256 amount) private {
        if (!token.trySafeTransfer(recipient, amount)) {
            _owed[recipient][address(token)] += amount;
            emit PayoutDeferred(channelId, recipient, address(token), amount);
        }
    }

    function _finalize(bytes32 channelId, ChannelData storage c) private {
        uint128 settled = c.settled;
        uint128 refund = c.deposit - settled;
        // The record stays (finalized is sticky), so the id can never be opened again and old vouchers stay dead.
        c.finalized = true;
        c.closeRequestedAt = 0;
        emit ChannelClosed(channelId, settled, refund);

        // A payer the token refuses must not keep the payee from closing: its refund is owed instead.
        if (refund != 0) _payOrOwe(channelId, IERC20(c.token), c.payer, refund);
    }
}
