"""`train.overlap`: the eager start in closed form, and a round's result across a restart."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest
import torch

from averaging.config import OuterConfig
from averaging.round import AverageResult, AveragingFailed
from tensormine.config import load_config
from train.overlap import (
    Landed,
    LandedError,
    PendingRound,
    Rounds,
    eager_start,
    load_landed,
    save_landed,
    start_for,
)

SHAPES = {"a": (3, 4), "b": (5,), "c": (2, 2)}
PLAIN = OuterConfig(lr=1.0, momentum=0.0, nesterov=False)
NESTEROV = OuterConfig(lr=0.7, momentum=0.9, nesterov=True)


def tensors(seed: int, names: tuple[str, ...] = ("a", "b", "c")) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(SHAPES[n], generator=g) for n in names}


def result(values: dict[str, torch.Tensor], members: list[str]) -> AverageResult:
    """A group's result in which every member started from the same θ_w."""
    return AverageResult(
        tensors=values, members=members, dropped=[], aux=[], bytes_sent=10,
        bytes_received=20, seconds=0.5, attempts=1, bases=dict.fromkeys(members, "θw"),
    )  # fmt: skip


def test_eager_start_steps_our_own_delta_in_closed_form() -> None:
    theta, q = tensors(0), tensors(1, ("a", "b"))
    # Plain outer step (SparseLoCo's): s = θ − q on q's tensors, nothing else.
    start = eager_start(theta, q, {}, PLAIN)
    assert set(start) == {"a", "b"}
    for n in ("a", "b"):
        torch.testing.assert_close(start[n], theta[n] - q[n], rtol=0, atol=0)
    # Nesterov with a momentum b: v = μb + q, s = θ − lr·(q + μv); b itself is untouched.
    b = {"a": torch.full(SHAPES["a"], 0.5)}
    before = b["a"].clone()
    start = eager_start(theta, q, b, NESTEROV)
    v = 0.9 * b["a"] + q["a"]
    torch.testing.assert_close(start["a"], theta["a"] - 0.7 * (q["a"] + 0.9 * v))
    torch.testing.assert_close(start["b"], theta["b"] - 0.7 * (q["b"] + 0.9 * q["b"]))
    assert torch.equal(b["a"], before)


def test_start_for_moves_only_the_earlier_shard() -> None:
    theta, q = tensors(0), tensors(2, ("c",))
    assert start_for(theta, None, {}, PLAIN) is theta
    assert start_for(theta, {}, {}, PLAIN) is theta
    moved = start_for(theta, q, {}, PLAIN)
    assert moved["a"] is theta["a"] and moved["b"] is theta["b"]
    torch.testing.assert_close(moved["c"], theta["c"] - q["c"], rtol=0, atol=0)


def test_a_landed_round_survives_the_disk_bit_for_bit(tmp_path: Path) -> None:
    landed = Landed(
        window=6, shard=1, shards=frozenset({0, 1}),
        averages={0: tensors(3, ("a", "b")), 1: tensors(4, ("c",))},
        in_step=True, sent=tensors(5, ("c",)),
    )  # fmt: skip
    save_landed(tmp_path, landed)
    got = load_landed(tmp_path, 6, SHAPES)
    assert got is not None
    assert (got.window, got.shard, got.shards, got.in_step) == (6, 1, frozenset({0, 1}), True)
    assert sorted(got.averages) == [0, 1]
    for s, avg in landed.averages.items():
        for n, t in avg.items():
            assert torch.equal(got.averages[s][n], t)
    assert torch.equal(got.sent["c"], landed.sent["c"])
    assert load_landed(tmp_path, 7, SHAPES) is None  # another window's round: none kept
    # A newer round replaces the file of the older one.
    save_landed(tmp_path, Landed(7, 0, frozenset({0}), {}, False, {}))
    assert load_landed(tmp_path, 6, SHAPES) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["landed-7.safetensors"]


def test_a_kept_round_that_does_not_fit_the_model_is_refused(tmp_path: Path) -> None:
    save_landed(tmp_path, Landed(2, 0, frozenset({0}), {0: {"a": torch.zeros(4, 3)}}, True, {}))
    with pytest.raises(LandedError, match="does not fit"):
        load_landed(tmp_path, 2, SHAPES)
    save_landed(tmp_path, Landed(3, 0, frozenset({0}), {0: {"zz": torch.zeros(1)}}, True, {}))
    with pytest.raises(LandedError, match="does not fit"):
        load_landed(tmp_path, 3, SHAPES)


def test_a_pending_round_lands_on_disk_when_it_ends(tmp_path: Path) -> None:
    future: concurrent.futures.Future = concurrent.futures.Future()
    sent = tensors(7, ("a", "b"))
    pending = PendingRound(4, 0, frozenset({0, 1}), sent, future)
    pending.watch(tmp_path, "hk")
    # Before the round ends the file holds our own Δ (the eager start) and no average.
    kept = load_landed(tmp_path, 4, SHAPES)
    assert kept is not None and kept.averages == {} and not kept.in_step
    assert torch.equal(kept.sent["a"], sent["a"])
    avg0, avg1 = tensors(8, ("a", "b")), tensors(9, ("c",))
    future.set_result({0: result(avg0, ["hk", "x"]), 1: result(avg1, ["hk", "y"])})
    kept = load_landed(tmp_path, 4, SHAPES)
    assert kept is not None and kept.in_step and sorted(kept.averages) == [0, 1]
    assert torch.equal(kept.averages[1]["c"], avg1["c"])
    landed = pending.land("hk", timeout=1)
    assert landed.in_step and landed.outcomes is not None and sorted(landed.outcomes) == [0, 1]


def test_a_failed_group_leaves_the_miner_out_of_step(tmp_path: Path) -> None:
    future: concurrent.futures.Future = concurrent.futures.Future()
    pending = PendingRound(4, 0, frozenset({0, 1}), {}, future)
    future.set_result({0: result(tensors(1, ("a", "b")), ["hk"]), 1: AveragingFailed("no group")})
    landed = pending.land("hk", timeout=1)
    assert not landed.in_step and sorted(landed.averages) == [0]


def test_rounds_give_the_previous_window_only(tmp_path: Path) -> None:
    rounds = Rounds(tmp_path, "hk", wait_s=1)
    sent = tensors(1, ("a",))
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result({0: result(tensors(2, ("a", "b")), ["hk"])})
    rounds.start(PendingRound(5, 0, frozenset({0}), sent, future))
    assert rounds.sent_before(7) == {}  # window 5's Δ is no look-ahead for window 7
    assert torch.equal(rounds.sent_before(6)["a"], sent["a"])
    # A miner that skipped a window took no part in its round.
    empty = rounds.land(7, committed=lambda: True)
    assert (empty.window, empty.averages, empty.in_step) == (6, {}, False)
    # Nobody committed to the window before: nobody averaged it, θ_{w+1} = θ_w is in step.
    assert Rounds(tmp_path, "hk", 1).land(1, committed=lambda: False).in_step
    # A restarted miner takes the round the last one kept on disk.
    restarted = Rounds(tmp_path, "hk", wait_s=1)
    restarted.resume(6, SHAPES)
    assert torch.equal(restarted.sent_before(6)["a"], sent["a"])
    landed = restarted.land(6, committed=lambda: True)
    assert landed.in_step and landed.window == 5 and sorted(landed.averages) == [0]


def test_overlap_acts_only_with_averaging() -> None:
    cfg = load_config("configs/tiny.yaml", ["averaging.overlap=delayed"])
    assert cfg.averaging.overlap_mode == "delayed"
    off = load_config("configs/tiny.yaml", ["averaging.overlap=eager", "averaging.enabled=false"])
    assert off.averaging.overlap_mode == "off"
    # YAML's bare `off` is false: it means "off" here, `true` means nothing.
    assert load_config("configs/tiny.yaml", ["averaging.overlap=off"]).averaging.overlap == "off"
    for bad in ("sometimes", "true"):
        with pytest.raises(ValueError, match="overlap"):
            load_config("configs/tiny.yaml", [f"averaging.overlap={bad}"])
