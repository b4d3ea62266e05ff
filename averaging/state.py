"""The envelope of a state download, for late joiners.

`ShardAverager.share_state(priority, provider)` offers the provider's state through
hivemind's state download; `load_state_from_peers` asks only peers in the directory,
newest declared state first, and reads at most `max_bytes` from each
(`averaging.averager.LedgerAverager`). The sender's metadata travels wrapped with the
number of tensors that follow, so that the receiver can tell a complete state from a
stream that ended early (hivemind issue #504: a download sometimes stops after a tensor
without an error; the second try gets everything).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from hivemind.averaging.partition import AllreduceException

STATE_METADATA = "metadata"
STATE_COUNT = "tensors"
STATE_TRIES = 2  # per peer, when its stream was cut short


class StateTruncated(Exception):
    """A state stream ended before every tensor its metadata announced had arrived."""


def wrap_state(metadata: Any, tensors: Sequence[torch.Tensor]) -> dict[str, Any]:
    """What travels as hivemind's state metadata: the sender's own, and the tensor count."""
    return {STATE_METADATA: metadata, STATE_COUNT: len(tensors)}


def unwrap_state(envelope: Any, tensors: list[torch.Tensor]) -> tuple[Any, list[torch.Tensor]]:
    """The sender's metadata, once the number of tensors received matches its count.

    Raises `StateTruncated` for fewer tensors than announced (the stream was cut short:
    worth asking again) and `AllreduceException` for anything else malformed.
    """
    if not isinstance(envelope, dict) or set(envelope) != {STATE_METADATA, STATE_COUNT}:
        raise AllreduceException("state metadata is not a {metadata, tensors} object")
    count = envelope[STATE_COUNT]
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise AllreduceException(f"state announces {count!r} tensors")
    if len(tensors) < count:
        raise StateTruncated(f"{len(tensors)} of {count} tensors arrived")
    if len(tensors) > count:
        raise AllreduceException(f"{len(tensors)} tensors arrived, {count} announced")
    return envelope[STATE_METADATA], tensors
