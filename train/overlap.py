"""Overlap (`averaging.overlap`): the round of window w runs while window w+1 trains.

Without overlap a miner waits at the end of every window for its groups' average A_w and
takes θ_{w+1} = outer(θ_w, A_w) before it can train again. With overlap the rule is

    θ_{w+1} = outer(θ_w, A_{w−1})            (θ_1 = θ_0: A_0 lands at the end of window 1)

so the round of window w has all of window w+1's compute to finish in, and θ_{w+1} is
still one public function of what was committed (the checkpoint validators publish for
w+1 is built from window w − 1's contributions). Each Δ lands one window late, on a model
that already moved by the previous average: measured on the tiny preset this costs ~8 %
of held-out loss after 30 windows (`benchmarks/bench_sparseloco.py`, "-overlap").

``eager`` removes most of that cost (arXiv 2502.12996's idea, made public): miner i trains
window w not from θ_w but from

    s_{i,w} = outer(θ_w, q_{i,w−1})          (with a copy of the outer momentum)

where q_{i,w−1} is the Δ it committed for window w − 1 as its readers decode it — its own
best guess of the average still in flight — and its Δ is measured from there,
Δ_{i,w} = s_{i,w} − θ_i. The start is a function of the published θ_w and i's revealed
contribution, so validators recompute it to check the trajectory (`start_for`); the
published model is θ_w all the same.

    pending = PendingRound(window, shard, shards, sent, future)       # at the deadline
    pending.watch(folder, hotkey)                  # lands on disk when the round ends
    landed = pending.land(hotkey, timeout)         # at the end of the next window
    landed = load_landed(folder, window, shapes)   # a restarted miner
    start = eager_start(theta_w, landed.sent, momentum, outer)
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from averaging.config import OuterConfig
from averaging.outer import outer_step
from averaging.round import AverageResult
from common.errors import TensormineError
from train.group_round import Outcomes, in_step

logger = logging.getLogger(__name__)

LANDED = "landed-{window}.safetensors"


@dataclass(frozen=True)
class Landed:
    """What window `window`'s round left a miner: the averages of the shards it received
    (shard -> tensors; a failed group is absent), whether it is in step with them (every
    shard of `shards` averaged, and it started from the model most of its peers did),
    and the Δ it sent itself as readers decode it (`sent`, on shard `shard`)."""

    window: int
    shard: int
    shards: frozenset[int]
    averages: dict[int, dict[str, torch.Tensor]]
    in_step: bool
    sent: dict[str, torch.Tensor]
    outcomes: Outcomes | None = None  # the round's own results, in the process that ran it


@dataclass
class PendingRound:
    """A round started at window `window`'s deadline and not yet waited for."""

    window: int
    shard: int
    shards: frozenset[int]
    sent: dict[str, torch.Tensor]
    future: concurrent.futures.Future[Outcomes] | None

    def _landed(self, outcomes: Outcomes, hotkey: str) -> Landed:
        averages = {s: dict(o.tensors) for s, o in outcomes.items() if isinstance(o, AverageResult)}
        synced = bool(outcomes) and in_step(outcomes, self.shards, hotkey)
        return Landed(
            self.window, self.shard, self.shards, averages, synced, self.sent, dict(outcomes)
        )

    def land(self, hotkey: str, timeout: float) -> Landed:
        """Wait (at most `timeout` s: the round has its own, shorter one) for the round."""
        outcomes: Outcomes = {}
        if self.future is not None:
            try:
                outcomes = self.future.result(timeout=timeout)
            except concurrent.futures.TimeoutError:
                logger.warning("window %d: the round did not end in %.0fs", self.window, timeout)
        return self._landed(outcomes, hotkey)

    def watch(self, folder: Path, hotkey: str) -> None:
        """Write the round's result under `folder` as soon as it ends (and our own Δ now),
        so that a miner killed before it waits for the round still has it."""
        save_landed(folder, self._landed({}, hotkey))
        if self.future is None:
            return

        def done(future: concurrent.futures.Future[Outcomes]) -> None:
            if future.cancelled() or future.exception() is not None:
                return
            try:
                save_landed(folder, self._landed(future.result(), hotkey))
            except OSError as exc:  # the round itself is fine; only a restart would miss it
                logger.warning("window %d: cannot keep the round's result: %s", self.window, exc)

        self.future.add_done_callback(done)


class Rounds:
    """A miner's rounds across the window boundary: the one still running (`pending`) and
    the one a restarted miner found on disk (`kept`), under `folder`."""

    def __init__(self, folder: Path, hotkey: str, wait_s: float) -> None:
        self.folder, self.hotkey, self.wait_s = folder, hotkey, wait_s
        self.pending: PendingRound | None = None
        self.kept: Landed | None = None

    def start(self, pending: PendingRound) -> None:
        """`pending` runs on into the next window; its result is kept on disk when it ends."""
        self.pending = pending
        pending.watch(self.folder, self.hotkey)

    def resume(self, window: int, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """A restarted miner whose state is of `window`: take window − 1's round from disk."""
        try:
            self.kept = load_landed(self.folder, window - 1, shapes)
        except LandedError as exc:
            logger.warning("not resuming the round of window %d: %s", window - 1, exc)

    def sent_before(self, window: int) -> dict[str, torch.Tensor]:
        """Our Δ of window − 1 as its readers decode it, when we sent one (a late Δ is
        neither revealed nor sent, so nobody steps it in)."""
        for source in (self.pending, self.kept):
            if source is not None and source.window == window - 1:
                return dict(source.sent)
        return {}

    def finish(self, timeout: float) -> None:
        """Before the miner stops: give its last round `timeout` s to end (its peers may be
        fetching our message) and keep its result on disk for a restart."""
        if self.pending is not None and self.pending.future is not None:
            try:
                self.pending.future.result(timeout=timeout)
            except concurrent.futures.TimeoutError:
                logger.info("window %d: the last round did not end in time", self.pending.window)

    def land(self, window: int, committed: Callable[[], bool]) -> Landed:
        """The round of window − 1, waited for (it had all of this window to end in), or as
        the miner we restarted from kept it; an empty one when we took no part (in step
        only if nobody could have: `committed()` says whether anyone committed to window − 1,
        asked only then)."""
        pending, self.pending = self.pending, None
        if pending is not None and pending.window == window - 1:
            return pending.land(self.hotkey, timeout=self.wait_s)
        if self.kept is not None and self.kept.window == window - 1:
            return self.kept
        return Landed(window - 1, -1, frozenset(), {}, not committed(), {})


def eager_start(
    theta: Mapping[str, torch.Tensor],
    sent: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor],
    outer: OuterConfig,
) -> dict[str, torch.Tensor]:
    """s = outer(θ, q) on the tensors of `sent` (q), with a copy of the outer `momentum`:
    the step the public model would take if the average in flight were our own Δ."""
    names = list(sent)
    buffers = {n: momentum[n] for n in names if n in momentum}
    params, _ = outer_step({n: theta[n] for n in names}, dict(sent), buffers, outer)  # pure
    return params


def start_for(
    theta: Mapping[str, torch.Tensor],
    earlier: Mapping[str, torch.Tensor] | None,
    momentum: Mapping[str, torch.Tensor],
    outer: OuterConfig,
) -> Mapping[str, torch.Tensor]:
    """The whole model a miner's eager window starts from: θ_w, with `earlier` (its
    admitted Δ of the window before, decoded; None: it had none) stepped in."""
    if not earlier:
        return theta
    out = dict(theta)
    moved = eager_start(theta, earlier, momentum, outer)
    for n, t in moved.items():
        out[n] = t.to(theta[n].dtype)
    return out


# ---- on disk -----------------------------------------------------------------------------
def save_landed(folder: Path, landed: Landed) -> Path:
    """`landed` as one safetensors file (tensors ``sent::<name>`` and
    ``avg<shard>::<name>``, the rest as metadata), written atomically."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"sent::{n}": t.detach().cpu().contiguous() for n, t in landed.sent.items()}
    for s, avg in landed.averages.items():
        tensors.update({f"avg{s}::{n}": t.detach().cpu().contiguous() for n, t in avg.items()})
    meta = {
        "window": str(landed.window),
        "shard": str(landed.shard),
        "shards": json.dumps(sorted(landed.shards)),
        "averaged": json.dumps(sorted(landed.averages)),
        "in_step": json.dumps(landed.in_step),
    }
    path = folder / LANDED.format(window=landed.window)
    tmp = path.with_suffix(".partial")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    for old in folder.glob(LANDED.format(window="*")):
        if old != path:
            old.unlink(missing_ok=True)
    return path


class LandedError(TensormineError, ValueError):
    """A kept round result that does not fit the model."""


def load_landed(folder: Path, window: int, shapes: Mapping[str, tuple[int, ...]]) -> Landed | None:
    """The kept result of `window`'s round (None when there is none), every tensor
    checked against the model's `shapes`."""
    from safetensors import safe_open

    path = folder / LANDED.format(window=window)
    if not path.is_file():
        return None
    sent: dict[str, torch.Tensor] = {}
    averages: dict[int, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
            kind, _, name = key.partition("::")
            tensor = fh.get_tensor(key)
            if name not in shapes or tuple(tensor.shape) != tuple(shapes[name]):
                raise LandedError(f"{path}: {key} does not fit the model")
            if kind == "sent":
                sent[name] = tensor
            elif kind.startswith("avg") and kind[3:].isdigit():
                averages.setdefault(int(kind[3:]), {})[name] = tensor
            else:
                raise LandedError(f"{path}: unexpected tensor {key}")
    try:
        landed = Landed(
            window=int(meta["window"]),
            shard=int(meta["shard"]),
            shards=frozenset(int(s) for s in json.loads(meta["shards"])),
            averages=averages,
            in_step=bool(json.loads(meta["in_step"])),
            sent=sent,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise LandedError(f"{path}: bad metadata ({exc})") from None
    if landed.window != window or sorted(averages) != json.loads(meta["averaged"]):
        raise LandedError(f"{path}: not the round of window {window}")
    return landed
