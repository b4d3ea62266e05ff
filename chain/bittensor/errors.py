"""The SDK's failures in our terms: one `chain.errors` class and one line naming the cause.

The SDK reports a refused write two ways. Before signing, an intent's preflight raises
`bittensor.ChainError` (``SetWeights`` checks registration and the weights rate limit)
or `bittensor.BittensorError` (weights that cannot be normalised). After submission,
``execute`` returns an `ExtrinsicResult` whose ``error`` is a `bittensor.ChainError`
carrying the chain's exact error ``name`` (``NeuronNoValidatorPermit``, resolved from
the module error or the pool's ``Custom error: N`` by ``bittensor/result.py`` and
``bittensor/error_map.py``) and a semantic ``code`` (`bittensor.ErrorCode`).

We map by exact name first (`BY_NAME`), then by our own class of the same name (the
local ledger borrows subtensor's names: ``CommitRevealEnabled``, ...), then by code
(`BY_CODE`); what matches nothing stays a plain `ChainError` with the chain's own words.
Reads that hit pruned state become `PastStateUnavailable`; a lost connection becomes
`ChainUnreachable`.
"""

from __future__ import annotations

from typing import Any

from bittensor import (
    BittensorError,
    ErrorCode,
    ExtrinsicResult,
    PolicyError,
    RpcConnectionError,
)
from bittensor import ChainError as SdkChainError

from chain import errors
from chain.errors import (
    AlreadyRegistered,
    ChainError,
    ChainUnreachable,
    CommitmentTooLong,
    InsufficientFunds,
    InvalidCall,
    InvalidWeights,
    NotRegistered,
    NoValidatorPermit,
    PastStateUnavailable,
    RateLimited,
)
from chain.types import Receipt

# Subtensor's error names (bittensor/_generated/errors.py, error_map.py) -> ours.
BY_NAME: dict[str, type[ChainError]] = {
    "HotKeyNotRegisteredInSubNet": NotRegistered,
    "HotKeyNotRegisteredInNetwork": NotRegistered,
    "HotKeyAccountNotExists": NotRegistered,
    "AccountNotAllowedCommit": NotRegistered,
    "NeuronNoValidatorPermit": NoValidatorPermit,
    "NotEnoughStakeToSetWeights": NoValidatorPermit,
    "SettingWeightsTooFast": RateLimited,
    "CommittingWeightsTooFast": RateLimited,
    "RateLimitExceeded": RateLimited,
    "SpaceLimitExceeded": RateLimited,
    "WeightVecNotEqualSize": InvalidWeights,
    "WeightVecLengthIsLow": InvalidWeights,
    "DuplicateUids": InvalidWeights,
    "UidVecContainInvalidOne": InvalidWeights,
    "UidsLengthExceedUidsInSubNet": InvalidWeights,
    "MaxWeightExceeded": InvalidWeights,
    "IncorrectWeightVersionKey": InvalidWeights,
    "CommitPayloadTooLarge": InvalidWeights,
    "TooManyFieldsInCommitmentInfo": CommitmentTooLong,
    "HotKeyAlreadyRegisteredInSubNet": AlreadyRegistered,
}

BY_CODE: dict[ErrorCode, type[ChainError]] = {
    ErrorCode.NOT_REGISTERED: NotRegistered,
    ErrorCode.RATE_LIMITED: RateLimited,
    ErrorCode.INSUFFICIENT_BALANCE: InsufficientFunds,
    ErrorCode.INVALID_ARGUMENT: InvalidCall,
}

_STATE_DISCARDED = ("state discarded", "state already discarded", "archive node")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def error_class(name: str | None, code: ErrorCode | None) -> type[ChainError]:
    """Our class for a chain error `name` / SDK `code`; `ChainError` when none fits."""
    if name:
        if name in BY_NAME:
            return BY_NAME[name]
        own = getattr(errors, name, None)
        if isinstance(own, type) and issubclass(own, ChainError):
            return own
    if code is not None and code in BY_CODE:
        return BY_CODE[code]
    return ChainError


def describe_sdk_error(error: SdkChainError, action: str) -> str:
    """``"<action> refused: <Name>: <what the chain says>"`` on one line."""
    name = f"{error.name}: " if error.name else ""
    return one_line(f"{action} refused: {name}{error.message}")


def is_state_discarded(error: BaseException) -> bool:
    text = str(error).lower()
    return any(needle in text for needle in _STATE_DISCARDED)


def translate(error: BaseException, action: str, *, where: str) -> ChainError:
    """Our error for an exception the SDK raised while doing `action` on `where`
    (a chain's description). Past-state failures name ``chain.archive_network``."""
    if isinstance(error, ChainError):
        return error
    if isinstance(error, RpcConnectionError):
        return ChainUnreachable(
            one_line(
                f"{where}: lost the connection while {action} ({error}); check that the "
                "node is up or set chain.network to another endpoint"
            )
        )
    if isinstance(error, SdkChainError) and is_state_discarded(error):
        return PastStateUnavailable(
            one_line(
                f"{where} no longer holds the state for {action} (a pruning node); set "
                "chain.archive_network to an archive endpoint (e.g. archive or "
                "wss://archive.chain.opentensor.ai:443)"
            )
        )
    if isinstance(error, SdkChainError):
        cls = error_class(error.name, error.code)
        return cls(describe_sdk_error(error, action))
    if isinstance(error, PolicyError):
        return InvalidCall(one_line(f"{action} refused by the SDK's policy: {error}"))
    if isinstance(error, BittensorError):
        return InvalidCall(one_line(f"{action} refused by the SDK: {error}"))
    if isinstance(error, TimeoutError):
        return errors.NotIncluded(one_line(f"{where}: timed out while {action}"))
    return ChainError(one_line(f"{where}: {action} failed: {type(error).__name__}: {error}"))


def translate_weights(error: BaseException, *, where: str) -> ChainError:
    """`translate` for ``SetWeights``: what the SDK refuses while conforming the weights
    (negative, NaN, all zero, fewer than the subnet's ``min_allowed_weights``) is
    `InvalidWeights`; registration and rate-limit preflights keep their classes."""
    if isinstance(error, SdkChainError):
        if error.name is None and error.code is ErrorCode.INVALID_ARGUMENT:
            return InvalidWeights(describe_sdk_error(error, "set_weights"))
    elif isinstance(error, BittensorError) and not isinstance(
        error, (RpcConnectionError, PolicyError)
    ):
        return InvalidWeights(one_line(f"set_weights refused by the SDK: {error}"))
    return translate(error, "set_weights", where=where)


def result_block(result: ExtrinsicResult) -> int | None:
    """The including block of a result (its extrinsic id is ``"<block>-<index>"``)."""
    extrinsic_id = result.extrinsic_id or ""
    head, _, _ = extrinsic_id.partition("-")
    return int(head) if head.isdigit() else None


def receipt_of(result: ExtrinsicResult, action: str, *, head: int, waited: bool = True) -> Receipt:
    """Our `Receipt` for an SDK result. Subtensor names an included extrinsic by its
    position ``"<block>-<index>"`` (what explorers show; the result carries no hash);
    a MEV-shielded one by the hash of its inner extrinsic. A result that never reached a
    block (a pool rejection) gets block `head` and no id; one accepted into the pool
    without waiting (`waited` False) is "pending" in block -1."""
    data: dict[str, Any] = dict(result.data or {})
    inner = data.get("inner_extrinsic_hash")
    ident = str(inner).removeprefix("0x") if inner else (result.extrinsic_id or "")
    block = result_block(result)
    if result.success and not waited and block is None:
        return Receipt(ident, -1, "pending", None, None)
    if result.success:
        return Receipt(ident, head if block is None else block, "ok", None, None)
    error = result.error
    if error is None:
        error = SdkChainError(result.message or "the extrinsic failed without a reason")
    cls = error_class(error.name, error.code)
    return Receipt(
        ident,
        head if block is None else block,
        "failed",
        cls.__name__,
        describe_sdk_error(error, action),
    )
