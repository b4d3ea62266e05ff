"""What a caller hands to one round of `averaging.group.ShardAverager.average` and gets
back from it: roles, results and failures, the parts a member committed to, what binds a
bound round, states for late joiners, and where a shard's groups meet.

A round is one (run, shard, window): hivemind prefix ``<run>_shard<s>`` (`group_prefix`),
group bits the window in binary (`window_bits`), so the miners of one shard meet in one
group per window, and the retry of a failed attempt stays under the same key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import torch

from averaging.dht import check_run_name
from common.errors import TensormineError


class Role(StrEnum):
    MEMBER = "member"  # contributes its Δ and receives the average
    AUX = "aux"  # contributes nothing, receives the average


class AveragingFailed(TensormineError, RuntimeError):
    """No average this round (no group, timeout, too many drops); fall back to the canonical
    checkpoint of the store.

    The counters say what the round cost anyway, summed over its attempts (as on
    `AverageResult`); `delivered` is the fraction of this member's Δ (its values) that
    reached a group's average with this member counted as a contributor, although the
    round failed here (0 for aux peers, or when nothing is known)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    attempts: int = 0
    delivered: float = 0.0
    mismatched: dict[str, list[int]] = {}  # noqa: RUF012 - replaced per instance


@dataclass(frozen=True)
class AverageResult:
    tensors: dict[str, torch.Tensor]  # the average, same names, shapes and dtypes as the template
    members: list[str]  # hotkeys whose Δ is in the average
    dropped: list[str]  # hotkeys that were in a group of this round but are not in it
    aux: list[str]  # hotkeys of auxiliary peers of the final group
    bytes_sent: int  # all-reduce payload bytes this peer sent, all attempts
    bytes_received: int
    seconds: float
    attempts: int  # groups this round went through (> 1 after a failed attempt)
    bases: dict[str, str] = field(default_factory=dict)  # hotkey -> announced θ_w fingerprint
    # hotkey -> parts its reducers refused: not the bytes it committed to (bound rounds)
    mismatched: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedParts:
    """A member's Δ of one window as the wire carries it (`ShardAverager.prepare`): the
    serialized parts it commits to and publishes, and the fp32 values they decode to."""

    blobs: list[bytes]
    values: dict[str, torch.Tensor]
    # What the parts were encoded from: the averager encodes these again, to the same
    # bytes (the codecs are deterministic; 8-bit quantization is not idempotent, so
    # re-encoding `values` would not give them).
    raw: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Binding:
    """What binds a bound round: `manifest`, the body of the contribution manifest this
    member committed to (None for an auxiliary peer), and `commitments`, which returns
    hotkey -> committed manifest digest of the window once the ledger is past its deadline
    (None until then; polled while the round runs)."""

    manifest: dict[str, Any] | None
    commitments: Callable[[], Mapping[str, str] | None]


# What a participant shares with late joiners: small JSON-able metadata and tensors, or
# None while it has nothing trustworthy to share. Called in the caller's process.
StateProvider = Callable[[], tuple[dict[str, Any], list[torch.Tensor]] | None]


@dataclass(frozen=True)
class PeerState:
    """A state downloaded from a peer: untrusted until the caller checked it."""

    hotkey: str
    metadata: dict[str, Any]
    tensors: list[torch.Tensor]
    nbytes: int


class Directory(Protocol):
    def peers(self) -> Mapping[str, str]:
        """peer id (base58) -> hotkey of every admitted peer."""
        ...


def group_prefix(run: str, shard: int) -> str:
    if shard < 0:
        raise ValueError("shard must be non-negative")
    return f"{check_run_name(run)}_shard{shard}"


def window_bits(window: int) -> str:
    if window < 0:
        raise ValueError("window must be non-negative")
    return format(window, "b")


@dataclass(frozen=True)
class PeerInfo:
    """An admitted peer as the caller's process hands it to the averager's each round."""

    hotkey: str
    weight: float  # its ledger weight for this round
