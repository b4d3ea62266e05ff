"""The validator's seat in the groups: joined on time whatever scoring does, and what the
groups say of each miner decides whether it is paid for the window.

`GroupSeats` runs against a real ledger (blocks made by this test) with a seat that only
records when it was asked to join (the hivemind side is tested in `tests/averaging`).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from averaging.round import AverageResult, AveragingFailed
from averaging.weights import LedgerWeights
from tests.validation.conftest import Subnet
from train.windows import meeting_block, reveal_deadline, window_of
from validation.group_audit import (
    NOT_AVERAGED,
    GroupSeatError,
    GroupSeats,
    join_block,
    mark_averaged,
)
from validation.report import MinerRow
from validation.scoring import OWN_FAIL

Factory = Callable[..., Subnet]


class RecordingSeat:
    """Records the window and the head block of every join; answers one shard-0 group."""

    def __init__(self, net: Subnet) -> None:
        self.net = net
        self.joined: list[tuple[int, int]] = []
        self.event = threading.Event()

    def average_window(self, window: int, tensors: object, **_: Any) -> dict[int, AverageResult]:
        with self.net.chain.reopen() as own:
            self.joined.append((window, own.block_number()))
        self.event.set()
        result = AverageResult(
            tensors={"w": torch.zeros(1)}, members=["m"], dropped=[], aux=[],
            bytes_sent=0, bytes_received=0, seconds=0.0, attempts=1,
        )  # fmt: skip
        return {0: result}


def test_the_seat_joins_each_window_on_time_while_scoring_is_busy(
    subnet_factory: Factory,
) -> None:
    net = subnet_factory([])
    cfg, chain = net.cfg, net.chain
    w = window_of(net.ledger.block_number(), cfg.window) + 1
    seat = RecordingSeat(net)
    weights = LedgerWeights(chain, cfg.averaging.weights, cfg.averaging.weight_floor)
    seats = GroupSeats(seat, chain, cfg, weights, first=w)  # type: ignore[arg-type]
    try:
        # Nobody calls `take` while the window runs (the validator is busy scoring w − 1):
        # the seat's own thread joins once the matchmaking lead before the meeting is here.
        start = join_block(chain, cfg, w)
        assert start < meeting_block(w, cfg.window)
        net.to_block(start - 1)
        assert not seat.event.wait(0.5) and seat.joined == []  # not before its time
        net.to_block(start)
        assert seat.event.wait(10)
        assert seat.joined == [(w, start)]
        # The scoring of w − 1 ends long after w's groups met: w's round is still there.
        net.to_block(reveal_deadline(w, cfg.window))
        future = seats.take(w)
        assert isinstance(future, concurrent.futures.Future)
        results, table = future.result(timeout=10)
        assert set(results) == {0} and isinstance(table, dict)
        # A window whose meeting passed before the seat could start has no round.
        net.to_block(reveal_deadline(w + 1, cfg.window))
        assert seats.take(w + 1) is None
        # Window w + 1 was never joined; the thread went on to w + 2, whose matchmaking may
        # already be open at this head (joining it then is right, so it is not asserted).
        joined = [j for j, _ in seat.joined]
        assert joined[0] == w and w + 1 not in joined and set(joined) <= {w, w + 2}
    finally:
        started = time.monotonic()
        seats.close()
        assert time.monotonic() - started < 5  # the thread stops while it waits


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_seat_thread_that_died_is_said_not_hidden(subnet_factory: Factory) -> None:
    """An error the thread does not expect ends it; `take` then raises instead of handing
    back None for every later window (which would leave them all unaudited quietly)."""
    net = subnet_factory([])

    class Broken:  # a ledger whose handle for the thread cannot be opened
        def reopen(self) -> None:
            raise RuntimeError("no handle")

    weights = LedgerWeights(net.chain, net.cfg.averaging.weights, net.cfg.averaging.weight_floor)
    seats = GroupSeats(RecordingSeat(net), Broken(), net.cfg, weights, first=5)  # type: ignore[arg-type]
    with pytest.raises(GroupSeatError, match="ended"):
        seats.take(5, timeout=1)
    seats.close()


def row(name: str, *, status: str = "scored", score: float = 0.5) -> MinerRow:
    return MinerRow(uid=ord(name), hotkey=name, shard=0, status=status, score=score)


def test_only_what_went_into_the_model_is_paid() -> None:
    """In → kept; dropped or absent from a group that formed → 0 without a strike;
    mismatch → 0 and a strike (refused rows too); a shard whose group never reached the
    validator → unknown, kept (the model takes every admitted Δ of it from the store)."""
    avg = {"w": torch.zeros(1)}
    results: dict[int, AverageResult | AveragingFailed] = {
        0: AverageResult(
            tensors=avg, members=["a"], dropped=["b"], aux=[], bytes_sent=0,
            bytes_received=0, seconds=0.0, attempts=1, mismatched={"d": [0, 1, 2, 5]},
        ),
        1: AveragingFailed("no group"),
    }  # fmt: skip
    rows = [row("a"), row("b"), row("c"), row("d"), row("e"), row("f"), row("g", status="refused")]
    # c was admitted on shard 0 but is in no group; e on shard 1, whose group failed here;
    # f contributed nothing to the averaged window.
    shard_of = {"a": 0, "b": 0, "c": 0, "d": 0, "e": 1, "g": 0}
    mark_averaged(rows, results, shard_of)
    got = {r.hotkey: (r.averaged, r.score, r.verdict, r.own_outcome) for r in rows}
    assert got == {
        "a": ("in", 0.5, None, None),
        "b": ("dropped", 0.0, NOT_AVERAGED, None),
        "c": ("absent", 0.0, NOT_AVERAGED, None),
        "d": ("mismatch: parts 0-2, 5", 0.0, "mismatch", OWN_FAIL),
        "e": (None, 0.5, None, None),
        "f": (None, 0.5, None, None),
        "g": ("absent", 0.5, None, None),  # refused already: nothing more to take
    }
