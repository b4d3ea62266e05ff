"""A miner's state as it travels between peers: θ and the outer momentum of one window.

    metadata, tensors = pack_state(model.state_dict(), momentum, window=8)
    weights, momentum = unpack_state(metadata, tensors, expected=model.state_dict(), window=8)

A miner in step with its averaging groups offers this state to late joiners (hivemind's
state download, see `averaging.participant`); a joiner that takes it starts the window
with exactly the model and outer momentum everyone else has, so the next averaged outer
step leaves all of them identical again. The sender is untrusted: `unpack_state` checks
the format, the window, every name, shape and dtype, that every value is finite, and
that the weights hash to the fingerprint the sender announced; a mismatch raises
`PeerStateError` naming it, and the joiner falls back to the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from common.errors import TensormineError
from train.model import model_fingerprint

FORMAT = "tensormine-state/1"
_KEYS = {"format", "window", "momentum", "fingerprint"}


class PeerStateError(TensormineError, ValueError):
    """A peer's state is malformed or not the one asked for."""


def pack_state(
    weights: Mapping[str, torch.Tensor], momentum: Mapping[str, torch.Tensor], *, window: int
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """(metadata, tensors): weights in sorted name order, then momentum in sorted order.
    The tensors are CPU copies, so later training does not change what peers download."""
    names = sorted(weights)
    held = sorted(momentum)
    cpu = {n: weights[n].detach().to("cpu").clone() for n in names}
    metadata: dict[str, Any] = {
        "format": FORMAT,
        "window": int(window),
        "momentum": held,
        "fingerprint": model_fingerprint(cpu),
    }
    tensors = [cpu[n] for n in names]
    tensors += [momentum[n].detach().to("cpu", torch.float32).clone() for n in held]
    return metadata, tensors


def unpack_state(
    metadata: Mapping[str, Any],
    tensors: list[torch.Tensor],
    *,
    expected: Mapping[str, torch.Tensor],
    window: int,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, momentum) from a peer, checked against `expected` (name -> a tensor of the
    right shape and dtype, e.g. our own state dict); `PeerStateError` otherwise."""
    if set(metadata) != _KEYS or metadata.get("format") != FORMAT:
        raise PeerStateError(f"not a {FORMAT} state: keys {sorted(metadata)}")
    got_window = metadata["window"]
    if not isinstance(got_window, int) or got_window != window:
        raise PeerStateError(f"state is for window {got_window!r}, wanted {window}")
    held = metadata["momentum"]
    names = sorted(expected)
    if (
        not isinstance(held, list)
        or not all(isinstance(n, str) for n in held)
        or held != sorted(set(held))
        or not set(held) <= set(names)
    ):
        raise PeerStateError("momentum names are not a sorted subset of the model's")
    if len(tensors) != len(names) + len(held):
        raise PeerStateError(f"{len(tensors)} tensors, expected {len(names) + len(held)}")
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in zip(names, tensors[: len(names)], strict=True):
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape) or tensor.dtype != want.dtype:
            raise PeerStateError(
                f"{name}: {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {tuple(want.shape)} {want.dtype}"
            )
        weights[name] = tensor
    momentum: dict[str, torch.Tensor] = {}
    for name, tensor in zip(held, tensors[len(names) :], strict=True):
        if tuple(tensor.shape) != tuple(expected[name].shape) or tensor.dtype != torch.float32:
            raise PeerStateError(f"momentum {name}: {tuple(tensor.shape)} {tensor.dtype}")
        momentum[name] = tensor
    for name, tensor in [*weights.items(), *momentum.items()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise PeerStateError(f"{name} has non-finite values")
    if model_fingerprint(weights) != metadata["fingerprint"]:
        raise PeerStateError("weights do not match the announced fingerprint")
    return weights, momentum
