// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

/**
 * @dev How an {ArgRule} compares the 32-byte ABI word it selects with its `values`. Words are compared as
 * `uint256`, which is exact for `uintN`, `address`, `bool` and `bytesN` arguments (the ABI left-pads the first
 * three and right-pads the last; equality is exact for all of them, ordering only makes sense for `uintN`).
 *
 * - `Equal`: `word == values[0]` (exactly one value).
 * - `LessOrEqual`: `word <= values[0]` (exactly one value): this is how a per-call cap is written.
 * - `OneOf`: `word` is one of `values` (at least one value; checked with one storage lookup, whatever the count).
 */
enum ArgCondition {
    Equal,
    LessOrEqual,
    OneOf
}

/**
 * @dev The policy a session-key UserOperation failed, carried by {IAgentAccountSessionKeys-SessionKeyPolicyViolation}.
 * The numeric values are stable (off-chain code maps them to names).
 *
 * - `Key` (0): the key is not installed (never installed, or revoked).
 * - `Call` (1): the UserOperation is not an ERC-7821 batch `execute`, or a call's `(target, selector)` is not
 *   allowed, or a call targets the account itself.
 * - `Value` (2): a call sends more native value than its permission's `valueLimit`.
 * - `Argument` (3): an {ArgRule} does not hold (or its word lies beyond the calldata).
 * - `Timestamp` (4): the rate-limit window claimed by the signature lies wholly outside the key's validity
 *   period. An operation that is merely early or late is not reverted: the validity period is returned in the
 *   validation data and the EntryPoint rejects it with `AA22 expired or not due`.
 * - `RateLimit` (5): the lifetime use count is exhausted, the current window's count is exhausted, or the
 *   claimed window is older than the last one used (or is window 0).
 * - `Gas` (6): the operation's worst-case gas cost would exceed the key's remaining gas budget.
 */
enum SessionPolicyKind {
    Key,
    Call,
    Value,
    Argument,
    Timestamp,
    RateLimit,
    Gas
}

/**
 * @dev A rule on one 32-byte ABI word of a call's arguments: the word starts `offset` bytes after the 4-byte
 * selector (argument `i` of a static signature is at `offset = 32 * i`). A word that does not fit inside the
 * calldata fails the rule.
 */
struct ArgRule {
    ArgCondition condition;
    uint32 offset;
    bytes32[] values;
}

/**
 * @dev One allowed `(target, selector)` pair. `selector == 0x00000000` allows only calls with empty calldata (plain
 * native transfers): calldata of 1 to 3 bytes, or starting with four zero bytes, matches no permission.
 * `valueLimit` caps the native value of each call. Every rule must hold.
 */
struct CallPermission {
    address target;
    bytes4 selector;
    uint128 valueLimit;
    ArgRule[] rules;
}

/**
 * @dev Everything a session key may do; all parts must pass for each UserOperation it signs.
 *
 * - `validAfter` / `validUntil`: the timestamp policy; the UserOperation is valid when
 *   `validAfter <= block.timestamp <= validUntil` (`validUntil == 0`: no expiry). Enforced by the EntryPoint from
 *   the returned validation data, never by reading the clock during validation.
 * - `maxUses`: lifetime number of UserOperations (`0`: unlimited).
 * - `interval` / `maxUsesPerInterval`: at most `maxUsesPerInterval` UserOperations in each fixed window
 *   `[w * interval, (w + 1) * interval - 1]` of Unix time (`interval == 0`: no per-window limit; both set or both
 *   zero). See {AccountSessionKeys} for how this is enforced without reading the clock.
 * - `gasBudget`: wei the key's UserOperations may commit, counted at their worst case
 *   `(preVerificationGas + verificationGasLimit + callGasLimit + paymaster gas limits) * maxFeePerGas`. Required
 *   (`0` is refused at install): a key that bundles its own operations picks their fee rate and collects the fees,
 *   so an unbounded key could drain the account's native balance. `type(uint128).max` is an explicit "no cap".
 * - `permissions`: the call policy; at least one entry, no duplicate `(target, selector)`.
 */
struct SessionPolicy {
    uint48 validAfter;
    uint48 validUntil;
    uint32 maxUses;
    uint48 interval;
    uint32 maxUsesPerInterval;
    uint128 gasBudget;
    CallPermission[] permissions;
}

/**
 * @dev The stored state of a session key (returned by {IAgentAccountSessionKeys-sessionKey}). `id` is `0` when
 * the key is not installed; every install takes a fresh `id`, so nothing from an earlier grant (counters,
 * permissions) survives a revoke and reinstall.
 *
 * `uses` counts only when `maxUses != 0` and `window`/`windowUses` only when `interval != 0`: unlimited policies
 * cost no storage write. `gasSpent` always counts, since every key has a gas budget.
 */
struct SessionKeyState {
    // slot 0
    uint64 id;
    uint48 validAfter;
    uint48 validUntil;
    uint32 maxUses;
    uint32 uses;
    // slot 1
    uint48 interval;
    uint32 maxUsesPerInterval;
    uint48 window;
    uint32 windowUses;
    // slot 2
    uint128 gasBudget;
    uint128 gasSpent;
}

/**
 * @dev A stored {ArgRule} as {IAgentAccountSessionKeys-callPermission} returns it. For `OneOf`, `value` is the
 * number of allowed values (membership is checked with {IAgentAccountSessionKeys-isOneOfValue}).
 */
struct StoredArgRule {
    ArgCondition condition;
    uint32 offset;
    bytes32 value;
}
