"""The outer step (DiLoCo, arXiv 2311.08105) against closed forms and torch.optim.SGD."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from averaging.config import OuterConfig
from averaging.outer import (
    OuterStateError,
    load_outer_state,
    mean_delta,
    outer_step,
    save_outer_state,
)

CFG = OuterConfig(lr=0.7, momentum=0.9, nesterov=True)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_two_steps_by_hand() -> None:
    lr, mu = CFG.lr, CFG.momentum
    theta = {"w": torch.tensor([1.0, -2.0])}
    d1, d2 = torch.tensor([0.5, 0.25]), torch.tensor([-1.0, 2.0])
    theta1, b1 = outer_step(theta, {"w": d1}, {}, CFG)
    # b1 = Δ1; θ1 = θ − lr·(Δ1 + μ·Δ1)
    assert torch.allclose(b1["w"], d1)
    assert torch.allclose(theta1["w"], theta["w"] - lr * (1 + mu) * d1)
    theta2, b2 = outer_step(theta1, {"w": d2}, b1, CFG)
    b2_hand = mu * d1 + d2
    assert torch.allclose(b2["w"], b2_hand)
    assert torch.allclose(theta2["w"], theta1["w"] - lr * (d2 + mu * b2_hand))


def test_plain_momentum_uses_the_buffer() -> None:
    cfg = OuterConfig(lr=0.5, momentum=0.9, nesterov=False)
    theta = {"w": torch.zeros(3)}
    d = torch.ones(3)
    theta1, b1 = outer_step(theta, {"w": d}, {}, cfg)
    theta2, _ = outer_step(theta1, {"w": d}, b1, cfg)
    assert torch.allclose(theta1["w"], -0.5 * d)
    assert torch.allclose(theta2["w"], -0.5 * d - 0.5 * (0.9 + 1) * d)


@pytest.mark.parametrize("nesterov", [True, False])
def test_equals_torch_sgd_over_five_steps(nesterov: bool) -> None:
    cfg = OuterConfig(lr=0.7, momentum=0.9, nesterov=nesterov)
    shapes = {"a": (4, 5), "b": (7,)}
    start = {n: rand(*s, seed=i) for i, (n, s) in enumerate(shapes.items())}
    ref = {n: torch.nn.Parameter(t.clone()) for n, t in start.items()}
    sgd = torch.optim.SGD(
        list(ref.values()), lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, dampening=0
    )
    theta = dict(start)
    momentum: dict[str, torch.Tensor] = {}
    for step in range(5):
        delta = {n: rand(*s, seed=100 * step + i) for i, (n, s) in enumerate(shapes.items())}
        for n, p in ref.items():
            p.grad = delta[n].clone()
        sgd.step()
        theta, momentum = outer_step(theta, delta, momentum, cfg)
        for n, p in ref.items():
            torch.testing.assert_close(theta[n], p.detach(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(
                momentum[n], sgd.state[p]["momentum_buffer"], rtol=1e-6, atol=1e-7
            )


def test_peers_with_weights_rank_plus_one() -> None:
    g = rand(3, 3, seed=0)
    theta_w = {"w": rand(3, 3, seed=1)}
    peers = [{"w": theta_w["w"] - (rank + 1) * g} for rank in range(4)]
    deltas = [{"w": theta_w["w"] - p["w"]} for p in peers]  # Δ_i = θ_w − θ_i = (i+1)·g
    delta = mean_delta(deltas)
    torch.testing.assert_close(delta["w"], 2.5 * g)
    new, momentum = outer_step(theta_w, delta, {}, CFG)
    torch.testing.assert_close(new["w"], theta_w["w"] - CFG.lr * (1 + CFG.momentum) * 2.5 * g)
    torch.testing.assert_close(momentum["w"], 2.5 * g)


def test_inputs_are_not_mutated_and_dtypes_kept() -> None:
    theta = {"w": rand(8, seed=0).to(torch.bfloat16), "v": rand(2, seed=1)}
    delta = {"w": rand(8, seed=2), "v": rand(2, seed=3)}
    momentum = {"v": rand(2, seed=4)}
    copies = [{n: t.clone() for n, t in d.items()} for d in (theta, delta, momentum)]
    new, buf = outer_step(theta, delta, momentum, CFG)
    for original, copy in zip((theta, delta, momentum), copies, strict=True):
        for n in original:
            assert torch.equal(original[n], copy[n])
    assert new["w"].dtype == torch.bfloat16 and new["v"].dtype == torch.float32
    assert buf["w"].dtype == torch.float32 and set(buf) == {"w", "v"}
    torch.testing.assert_close(buf["v"], CFG.momentum * momentum["v"] + delta["v"])


def test_mismatched_names_and_shapes_are_rejected() -> None:
    theta = {"w": torch.zeros(2)}
    with pytest.raises(OuterStateError, match="names differ"):
        outer_step(theta, {"x": torch.zeros(2)}, {}, CFG)
    with pytest.raises(OuterStateError, match="not parameters"):
        outer_step(theta, {"w": torch.zeros(2)}, {"x": torch.zeros(2)}, CFG)
    with pytest.raises(OuterStateError, match="shape"):
        outer_step(theta, {"w": torch.zeros(3)}, {}, CFG)
    with pytest.raises(OuterStateError, match="shape"):
        outer_step(theta, {"w": torch.zeros(2)}, {"w": torch.zeros(1)}, CFG)
    with pytest.raises(ValueError, match="other names"):
        mean_delta([{"w": torch.zeros(2)}, {"x": torch.zeros(2)}])


def test_state_round_trip_and_subset(tmp_path: Path) -> None:
    path = tmp_path / "outer.safetensors"
    momentum = {"a": rand(3, 2, seed=0), "b": rand(4, seed=1)}
    save_outer_state(path, momentum)
    shapes = {"a": (3, 2), "b": (4,), "c": (9,)}  # c: a shard this miner never trained
    loaded = load_outer_state(path, shapes)
    assert set(loaded) == {"a", "b"}
    for n, t in momentum.items():
        assert torch.equal(loaded[n], t)
    save_outer_state(path, {})
    assert load_outer_state(path, shapes) == {}
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("fault", ["unknown", "shape", "dtype", "nan", "pickle", "missing"])
def test_bad_state_files_are_rejected(tmp_path: Path, fault: str) -> None:
    path = tmp_path / "outer.safetensors"
    shapes = {"a": (3,)}
    if fault == "unknown":
        save_outer_state(path, {"z": torch.zeros(3)})
    elif fault == "shape":
        save_outer_state(path, {"a": torch.zeros(4)})
    elif fault == "dtype":
        save_file({"a": torch.zeros(3, dtype=torch.float16)}, str(path))
    elif fault == "nan":
        save_outer_state(path, {"a": torch.tensor([0.0, float("nan"), 1.0])})
    elif fault == "pickle":
        torch.save({"a": torch.zeros(3)}, path)
    if fault == "missing":
        with pytest.raises(FileNotFoundError):
            load_outer_state(path, shapes)
        return
    with pytest.raises(OuterStateError):
        load_outer_state(path, shapes)
