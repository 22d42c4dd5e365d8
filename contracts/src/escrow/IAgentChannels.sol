// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

/**
 * @dev Types, events and errors of {AgentChannels}: unidirectional payment channels with the core ABI of the MPP
 * `evm`/`session` method (`draft-evm-session-00`). Vouchers are EIP-712
 * `Voucher(bytes32 channelId,uint128 cumulativeAmount)` under the domain `"EVM Payment Channel"`, version `"1"`.
 */
interface IAgentChannels {
    /// @dev A channel's state, as `draft-evm-session-00` lists it (the splits are read with {getSplits}).
    struct Channel {
        address payer;
        uint64 closeRequestedAt; // 0: no close requested
        bool finalized; // sticky: a channel id is never reused
        address payee;
        address token;
        address authorizedSigner; // 0: the payer signs vouchers
        uint128 deposit;
        uint128 settled;
    }

    /// @dev One settlement split: `bps` basis points of every settled delta go to `recipient`.
    struct Split {
        address recipient;
        uint16 bps;
    }

    /**
     * @dev A relayed open (the draft's "Relayed / Gasless Operations profile"): `from` signed an EIP-3009
     * `ReceiveWithAuthorization` of `deposit` to this contract, with `nonce` =
     * `keccak256(abi.encode(from, payee, token, salt, authorizedSigner))`. One struct rather than the draft's flat
     * parameter list, which does not compile without `via_ir`; the fields and their meaning are the draft's.
     */
    struct OpenAuthorization {
        address payee;
        address token;
        uint128 deposit;
        bytes32 salt;
        address authorizedSigner;
        address from;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }

    /**
     * @dev A relayed top-up: the channel's payer `from` signed an EIP-3009 `ReceiveWithAuthorization` of
     * `additionalDeposit` to this contract, with `nonce` = `keccak256(abi.encode(channelId, additionalDeposit, from,
     * topUpSalt))`.
     */
    struct TopUpAuthorization {
        bytes32 channelId;
        uint128 additionalDeposit;
        address from;
        bytes32 topUpSalt;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }

    // ------------------------------------------------------------------ events

    /// @dev `payer` opened `channelId` to `payee` with `deposit` of `token`; vouchers are signed by `authorizedSigner`.
    event ChannelOpened(
        bytes32 indexed channelId,
        address indexed payer,
        address indexed payee,
        address token,
        address authorizedSigner,
        uint128 deposit,
        bytes32 salt
    );

    /// @dev The payer added `amount`; the channel's deposit is now `deposit`.
    event ChannelToppedUp(bytes32 indexed channelId, uint128 amount, uint128 deposit);

    /// @dev The payee settled up to `cumulativeAmount`, receiving `delta` (split recipients included).
    event ChannelSettled(bytes32 indexed channelId, uint128 cumulativeAmount, uint128 delta);

    /// @dev The payer asked to close; it can withdraw the unsettled deposit from `readyAt`.
    event ChannelCloseRequested(bytes32 indexed channelId, uint256 readyAt);

    /// @dev A top-up cancelled the pending close request.
    event ChannelCloseCancelled(bytes32 indexed channelId);

    /// @dev The channel is finalized; `refund` went back to the payer.
    event ChannelClosed(bytes32 indexed channelId, uint128 settled, uint128 refund);

    /**
     * @dev The transfer of `amount` of `token` to `recipient` (a split recipient, or the payer's refund) failed, e.g.
     * because the token blocklists it; the amount is owed to `recipient`, who pulls it with {withdrawOwed}.
     */
    event PayoutDeferred(bytes32 indexed channelId, address indexed recipient, address indexed token, uint256 amount);

    /// @dev `recipient` pulled `amount` of `token` it was owed, to `to`.
    event OwedWithdrawn(address indexed recipient, address indexed token, address to, uint256 amount);

    // ------------------------------------------------------------------ errors

    /// @dev A channel with this id already exists (or existed: ids are never reused).
    error ChannelAlreadyExists(bytes32 channelId);

    /// @dev No channel has this id.
    error ChannelNotFound(bytes32 channelId);

    /// @dev The channel is closed.
    error ChannelFinalized(bytes32 channelId);

    /// @dev `caller` is not the party allowed to do this (the payee for settle/close, the payer otherwise).
    error ChannelUnauthorized(bytes32 channelId, address caller);

    /// @dev Open needs a payee and a token.
    error ChannelInvalidParty(address payee, address token);

    /// @dev The splits are malformed: lengths differ, a zero recipient or bps, or a sum of
    /// 10,000 bps or more (the payee must keep a remainder).
    error ChannelInvalidSplits();

    /// @dev The voucher does not move past what was already settled.
    error ChannelAmountNotIncreasing(uint128 cumulativeAmount, uint128 settled);

    /// @dev The voucher asks for more than the channel holds.
    error ChannelAmountExceedsDeposit(uint128 cumulativeAmount, uint128 deposit);

    /// @dev The voucher signature is not the channel's authorized signer's (or the payer's when none is set).
    error ChannelInvalidSignature(bytes32 channelId);

    /// @dev `count` splits were given; a channel takes at most `max`, since every settlement pays each of them.
    error ChannelTooManySplits(uint256 count, uint256 max);

    /// @dev `recipient` is owed nothing in `token`.
    error ChannelNothingOwed(address recipient, address token);

    /// @dev Owed funds cannot be sent to `to` (the channels contract itself).
    error ChannelInvalidRecipient(address to);

    /// @dev {withdraw} needs a {requestClose} first.
    error ChannelCloseNotRequested(bytes32 channelId);

    /// @dev A close is already pending.
    error ChannelCloseAlreadyRequested(bytes32 channelId);

    /// @dev The grace period runs until `readyAt`.
    error ChannelCloseNotReady(bytes32 channelId, uint256 readyAt);

    /// @dev A relayed open or top-up whose EIP-3009 nonce is not the one derived from its terms.
    error ChannelNonceMismatch(bytes32 expected, bytes32 given);

    /// @dev A zero deposit (or top-up): a channel nobody can be paid from.
    error ChannelZeroDeposit();

    // ------------------------------------------------------------------ draft-evm-session-00 core

    /**
     * @notice Opens a channel from `auth.from` (the payer) without a transaction from it: the caller relays the
     * payer's EIP-3009 `receiveWithAuthorization` (USDC v2.2 `bytes signature` form) of `auth.deposit` to this
     * contract. The channel is the one {open} from `auth.from` would create, without splits.
     * @dev Emits {ChannelOpened}. Reverts `ChannelNonceMismatch` if `auth.nonce` is not derived from the terms (so a
     * relayer cannot open a channel to another payee or signer with the payer's authorization).
     * @param auth the channel's terms and the EIP-3009 authorization's fields
     * @param signature the payer's signature of the EIP-3009 authorization
     * @return channelId the new channel
     */
    function openWithAuthorization(OpenAuthorization calldata auth, bytes calldata signature)
        external
        returns (bytes32 channelId);

    /**
     * @notice Adds `auth.additionalDeposit` to a live channel from its payer, relayed: the caller submits the payer's
     * EIP-3009 `receiveWithAuthorization` to this contract. Cancels a pending close, as {topUp} does.
     * @dev Emits {ChannelToppedUp}. Reverts `ChannelUnauthorized` if `auth.from` is not the channel's payer and
     * `ChannelNonceMismatch` if `auth.nonce` is not derived from the terms.
     * @param auth the top-up's terms and the EIP-3009 authorization's fields
     * @param signature the payer's signature of the EIP-3009 authorization
     */
    function topUpWithAuthorization(TopUpAuthorization calldata auth, bytes calldata signature) external;

    /**
     * @notice Opens a channel from the caller (the payer) to `payee`, pulling `deposit` of `token` (approve first).
     * `authorizedSigner` (zero: the payer) signs vouchers, e.g. a session key. Splits are fixed for the channel's life.
     * @dev Emits {ChannelOpened}. Reverts if the channel id was ever used, or if the deposit exceeds 2^96 - 1.
     */
    function open(
        address payee,
        address token,
        uint128 deposit,
        bytes32 salt,
        address authorizedSigner,
        address[] calldata splitRecipients,
        uint16[] calldata splitBps
    ) external returns (bytes32 channelId);

    /**
     * @notice Payee only: claims up to the voucher's `cumulativeAmount` without closing; pays the delta (minus splits).
     * Allowed while a close is pending. A split whose transfer fails (e.g. a recipient the token blocklists) does
     * not block the payee: its share is owed to the recipient instead ({withdrawOwed}).
     * @dev Emits {ChannelSettled}, and {PayoutDeferred} per failed split transfer.
     */
    function settle(bytes32 channelId, uint128 cumulativeAmount, bytes calldata signature) external;

    /**
     * @notice Payer only: adds `additionalDeposit` (approve first); cancels a pending close.
     * @dev Emits {ChannelToppedUp}, and {ChannelCloseCancelled} if a close was pending.
     */
    function topUp(bytes32 channelId, uint128 additionalDeposit) external;

    /**
     * @notice Payee only: settles the final voucher (if it moves past what was settled) and refunds the rest to the
     * payer. A `cumulativeAmount` not above the settled amount needs no signature: the payee only gives up. A failed
     * split or refund transfer is owed to its recipient instead of blocking the close.
     * @dev Emits {ChannelSettled} (if anything was due), {ChannelClosed}, and {PayoutDeferred} per failed transfer.
     */
    function close(bytes32 channelId, uint128 cumulativeAmount, bytes calldata signature) external;

    /**
     * @notice Payer only: starts the {CLOSE_GRACE_PERIOD}, during which the payee can still settle.
     * @dev Emits {ChannelCloseRequested}.
     */
    function requestClose(bytes32 channelId) external;

    /**
     * @notice Payer only: after the grace period, takes back everything not settled and finalizes the channel.
     * @dev Emits {ChannelClosed}.
     */
    function withdraw(bytes32 channelId) external;

    /**
     * @notice Sends the caller (a split recipient or payer whose transfer failed) what it is owed in `token`, to
     * `to` (e.g. an address the token does not block).
     * @dev Emits {OwedWithdrawn}.
     */
    function withdrawOwed(address token, address to) external returns (uint256 amount);

    // ------------------------------------------------------------------ views

    /// @notice What `recipient` is owed in `token` after failed split or refund transfers.
    function owedTo(address recipient, address token) external view returns (uint256);

    /// @notice The channel id `open` derives: `keccak256(abi.encode(payer, payee, token, salt, authorizedSigner,
    /// address(this), block.chainid))`.
    function computeChannelId(address payer, address payee, address token, bytes32 salt, address authorizedSigner)
        external
        view
        returns (bytes32);

    /// @notice The channel's state (all zero if it does not exist).
    function getChannel(bytes32 channelId) external view returns (Channel memory);

    /// @notice The channel's settlement splits.
    function getSplits(bytes32 channelId) external view returns (Split[] memory);

    /// @notice The EIP-712 digest the authorized signer signs for a voucher.
    function hashVoucher(bytes32 channelId, uint128 cumulativeAmount) external view returns (bytes32);
}
