"""A peer's state is taken only if it is exactly the model it claims to be."""

from __future__ import annotations

import pytest
import torch

from train.model import model_fingerprint
from train.peer_state import PeerStateError, pack_state, unpack_state


def model_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=gen),
        "b.bias": torch.randn(5, generator=gen),
        "c.weight": torch.randn(2, 2, generator=gen).to(torch.bfloat16),
    }


def test_round_trip_is_exact_and_detached() -> None:
    weights = model_state()
    momentum = {"b.bias": torch.ones(5), "a.weight": torch.full((4, 3), 0.5)}
    meta, tensors = pack_state(weights, momentum, window=7)
    assert meta["momentum"] == ["a.weight", "b.bias"]
    assert meta["fingerprint"] == model_fingerprint(weights)
    weights["a.weight"].add_(1.0)  # training goes on after the snapshot
    got_w, got_m = unpack_state(meta, tensors, expected=model_state(), window=7)
    assert model_fingerprint(got_w) == model_fingerprint(model_state())
    assert got_w["c.weight"].dtype == torch.bfloat16
    assert torch.equal(got_m["b.bias"], torch.ones(5)) and set(got_m) == set(momentum)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda m, t: m.update(window=8), "window 8"),
        (lambda m, t: m.update(extra=1), "keys"),
        (lambda m, t: m.update(momentum=["b.bias", "a.weight"]), "sorted subset"),
        (lambda m, t: m.update(momentum=["zzz"]), "sorted subset"),
        (lambda m, t: t.pop(), "tensors, expected"),
        (lambda m, t: t.__setitem__(0, torch.zeros(3, 4)), "expected"),
        (lambda m, t: t.__setitem__(0, t[0].double()), "expected"),
        (lambda m, t: t[0].__setitem__((0, 0), float("nan")), "non-finite"),
        (lambda m, t: t[-1].__setitem__(0, float("inf")), "non-finite"),
        (lambda m, t: t[1].__setitem__(0, 123.0), "fingerprint"),
    ],
)
def test_tampered_states_are_refused(tamper: object, message: str) -> None:
    meta, tensors = pack_state(model_state(), {"b.bias": torch.ones(5)}, window=3)
    tamper(meta, tensors)  # type: ignore[operator]
    with pytest.raises(PeerStateError, match=message):
        unpack_state(meta, tensors, expected=model_state(), window=3)
