"""Trajectories: segment bounds, state digests, and a segment rerun from its recorded
start reproducing the miner's own loop bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from tests.train.test_inner import tiny
from train.config import TrainConfig
from train.inner import inner_loop
from train.trajectory import (
    TrajectoryKeeper,
    digest_of_state,
    moment_names,
    segment_bounds,
    tensors_digest,
)
from validation.proof_of_work import choose_segments, compare_update


def test_segment_bounds() -> None:
    assert segment_bounds(20, 4) == [0, 5, 10, 15, 20]
    assert segment_bounds(8, 3) == [0, 3, 5, 8]
    assert segment_bounds(3, 3) == [0, 1, 2, 3]
    for steps, segments in ((3, 4), (0, 1), (5, 0)):
        with pytest.raises(ValueError):
            segment_bounds(steps, segments)
    assert TrainConfig(inner_steps=2, pow_segments=4).trajectory_segments == 2


def test_a_digest_sees_every_bit_and_every_name() -> None:
    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}
    base = tensors_digest(t, ["a", "b"])
    flipped = t["a"].clone()
    flipped.view(torch.int32)[1, 2] ^= 1  # the lowest mantissa bit of one value
    assert tensors_digest({**t, "a": flipped}, ["a", "b"]) != base
    assert tensors_digest({**t, "a": t["a"].reshape(3, 2)}, ["a", "b"]) != base
    assert tensors_digest(t, ["b", "a"]) != base
    assert tensors_digest({"a": t["a"].clone(), "b": t["b"].clone()}, ["a", "b"]) == base


def test_a_segment_rerun_from_its_kept_start_is_the_loop_bit_for_bit(tmp_path: Path) -> None:
    cfg = TrainConfig(inner_steps=6, batch_size=2, warmup_steps=2, lr=3e-3, pow_segments=3)
    pages = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(1))
    bounds = segment_bounds(cfg.inner_steps, cfg.trajectory_segments)
    shard = [n for n, _ in tiny().named_parameters() if n.startswith("model.layers.1.")]
    acc = Accelerator(cpu=True)

    model = tiny()
    for n, p in model.named_parameters():
        p.requires_grad_(n in shard)
    keeper = TrajectoryKeeper(tmp_path / "states")
    inner_loop(
        acc, model, shard, pages, cfg, boundaries=bounds[1:],
        on_boundary=keeper.recorder(3, 0, bounds),
    )  # fmt: skip
    digests = keeper.digests(3, bounds)
    assert keeper.meta(3) == (0, bounds)
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step, digest in zip(bounds[1:], digests, strict=True):
        state = keeper.load(3, step)
        assert state is not None
        assert digest_of_state(step, state, state, shard) == digest
        assert set(state) == set(shard) | set(moment_names(shard))
    assert all(torch.equal(keeper.load(3, 6)[n], final[n]) for n in shard)  # type: ignore[index]

    # Steps [2, 4) from the kept state at 2 (parameters and AdamW moments) end exactly at
    # the kept state at 4: what a validator recomputes is what the miner ran.
    start, end = keeper.load(3, 2), keeper.load(3, 4)
    assert start is not None and end is not None
    again = tiny()
    with torch.no_grad():
        for n, p in again.named_parameters():
            p.requires_grad_(n in shard)
            if n in shard:
                p.copy_(start[n])
    moments = {k: v for k, v in start.items() if "::" in k}
    inner_loop(acc, again, shard, pages, cfg, start_step=2, stop_step=4, moments=moments)
    got = dict(again.named_parameters())
    assert all(torch.equal(got[n].detach(), end[n]) for n in shard)
    with pytest.raises(ValueError, match="moments"):
        inner_loop(acc, again, shard, pages, cfg, start_step=2, stop_step=4)
    with pytest.raises(ValueError, match="within"):
        inner_loop(acc, again, shard, pages, cfg, start_step=4, stop_step=7, moments=moments)

    keeper.prune(4)
    assert keeper.windows() == [] and keeper.load(3, 2) is None


def test_compare_update_closed_forms() -> None:
    start = {"w": torch.zeros(4)}
    u = torch.tensor([1.0, -2.0, 0.5, 0.0])
    assert compare_update(start, {"w": u}, {"w": u}) == (0.0, 1.0)
    rel, cos = compare_update(start, {"w": 2 * u}, {"w": u})  # a doubled update
    assert rel == pytest.approx(1.0) and cos == pytest.approx(1.0)
    rel, cos = compare_update(start, {"w": -u}, {"w": u})
    assert rel == pytest.approx(2.0) and cos == pytest.approx(-1.0)
    v = torch.tensor([2.0, 1.0, 0.0, 3.0])  # orthogonal to u
    rel, cos = compare_update(start, {"w": v}, {"w": u})
    assert cos == pytest.approx(0.0, abs=1e-12)
    assert rel == pytest.approx(float((v - u).norm() / u.norm()))


def test_each_segment_is_checked_with_probability_checks_over_segments() -> None:
    n, trials = 4, 4000
    for checks in (0.5, 1.0, 1.5, 4.0):
        counts = [0] * n
        drawn = 0
        for i in range(trials):
            got = choose_segments(i.to_bytes(4, "big"), n, checks)
            assert list(got) == sorted(set(got)) and all(0 <= s < n for s in got)
            drawn += len(got)
            for s in got:
                counts[s] += 1
        assert drawn / trials == pytest.approx(checks, abs=0.05)
        for c in counts:
            assert c / trials == pytest.approx(checks / n, abs=0.035)
    assert choose_segments(b"x", n, 0.0) == ()
    assert choose_segments(b"x", n, 9.0) == (0, 1, 2, 3)
