"""The SDK's errors, as the SDK itself builds them from chain failures (module errors,
pool rejections, preflight refusals, pruned state), mapped to `chain.errors` classes."""

from __future__ import annotations

import pytest
from bittensor import BittensorError, ErrorCode, ExtrinsicResult
from bittensor import ChainError as SdkChainError
from bittensor._transport.errors import StateDiscardedError
from bittensor.result import (
    RpcConnectionError,
    chain_error_from_dispatch,
    chain_error_from_substrate_request,
)

from chain import errors
from chain.bittensor.errors import error_class, receipt_of, translate, translate_weights
from tests.chain.substrate import pool_rejection

WHERE = "subtensor test netuid 1"


def module_error(pallet: int, index: int) -> SdkChainError:
    """What the SDK makes of a failed extrinsic's ``DispatchError::Module``."""
    return chain_error_from_dispatch({"Module": {"index": pallet, "error": f"0x{index:02x}000000"}})


@pytest.mark.parametrize(
    ("pallet", "index", "name", "ours"),
    [
        (7, 15, "NeuronNoValidatorPermit", errors.NoValidatorPermit),
        (7, 21, "HotKeyAlreadyRegisteredInSubNet", errors.AlreadyRegistered),
        (7, 29, "SettingWeightsTooFast", errors.RateLimited),
        (5, 2, "InsufficientBalance", errors.InsufficientFunds),
        (18, 0, "TooManyFieldsInCommitmentInfo", errors.CommitmentTooLong),
        (18, 2, "SpaceLimitExceeded", errors.RateLimited),
    ],
)
def test_failed_extrinsics_name_our_class(
    pallet: int, index: int, name: str, ours: type[errors.ChainError]
) -> None:
    error = module_error(pallet, index)
    assert error.name == name
    result = ExtrinsicResult(False, error.message, "0xabc", "12-0003", error=error)
    receipt = receipt_of(result, "set_weights", head=99)
    assert (receipt.hash, receipt.block, receipt.status) == ("12-0003", 12, "failed")
    assert receipt.error_type == ours.__name__
    assert receipt.error is not None and name in receipt.error and "\n" not in receipt.error
    with pytest.raises(ours, match=name):
        receipt.raise_for_status()


@pytest.mark.parametrize(
    ("name", "ours"),
    [
        ("HotKeyNotRegisteredInSubNet", errors.NotRegistered),
        ("AccountNotAllowedCommit", errors.NotRegistered),
        ("UidVecContainInvalidOne", errors.InvalidWeights),
        ("NotEnoughStakeToSetWeights", errors.NoValidatorPermit),
        ("NotEnoughBalanceToStake", errors.InsufficientFunds),
        ("CommitRevealEnabled", getattr(errors, "CommitRevealEnabled", errors.ChainError)),
        ("SubNetRegistrationDisabled", errors.ChainError),
    ],
)
def test_names_map_to_our_classes(name: str, ours: type[errors.ChainError]) -> None:
    assert error_class(name, SdkChainError("x", name).code) is ours


def test_pool_rejections_map_by_their_custom_code() -> None:
    error = pool_rejection("Custom error: 6")
    assert error.name == "RateLimitExceeded"
    receipt = receipt_of(ExtrinsicResult(False, error.message, error=error), "commit", head=7)
    assert (receipt.block, receipt.error_type) == (7, "RateLimited")


def test_preflight_refusals_keep_their_code() -> None:
    refused = SdkChainError(
        "Hotkey 5F… is not registered on netuid 1.", code=ErrorCode.NOT_REGISTERED
    )
    assert isinstance(translate(refused, "set_weights", where=WHERE), errors.NotRegistered)
    limited = SdkChainError("last set 3 blocks ago", code=ErrorCode.RATE_LIMITED)
    assert isinstance(translate_weights(limited, where=WHERE), errors.RateLimited)
    too_few = SdkChainError("requires at least 4 weights", code=ErrorCode.INVALID_ARGUMENT)
    assert isinstance(translate_weights(too_few, where=WHERE), errors.InvalidWeights)
    bad = BittensorError("Weights must be finite and non-negative.")
    assert isinstance(translate_weights(bad, where=WHERE), errors.InvalidWeights)
    assert type(translate(bad, "transfer", where=WHERE)) is errors.InvalidCall


def test_pruned_state_and_lost_connections() -> None:
    discarded = chain_error_from_substrate_request(StateDiscardedError("0x12"))
    past = translate(discarded, "reading the metagraph at block 3", where=WHERE)
    assert isinstance(past, errors.PastStateUnavailable)
    assert "chain.archive_network" in str(past) and "\n" not in str(past)
    lost = translate(RpcConnectionError("socket closed"), "reading", where=WHERE)
    assert isinstance(lost, errors.ChainUnreachable) and WHERE in str(lost)
    assert isinstance(translate(TimeoutError(), "waiting", where=WHERE), errors.NotIncluded)


def test_unknown_chain_errors_keep_the_chain_words() -> None:
    error = SdkChainError("Something new\nthat spans lines", "BrandNewError")
    mapped = translate(error, "commit", where=WHERE)
    assert type(mapped) is errors.ChainError
    assert str(mapped) == "commit refused: BrandNewError: Something new that spans lines"
