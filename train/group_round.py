"""A miner's part in a window's averaging: what it publishes, when its groups meet, θ_{w+1}.

    payload = contribution_payload(seat, shard, names, delta, cfg, residual)  # seat None: no groups
    future = start_round(seat, ledger, cfg, window, shard, payload.parts, body, ...)
    outcomes = future.result()                                         # shard -> result
    synced = in_step(outcomes, {shard, *active}, hotkey)
    outer_steps(model, shards, momentum, outcomes, shard=shard, sent=payload.sent,
                start=theta_w_on_shard, outer=cfg.outer)

With averaging on, the contribution *is* the wire's parts (`averaging.parts`): what a
miner sends into its shard's group is what it commits to, publishes and is paid for.
Without averaging it is the Δ compressed by `compression` (with top-k error feedback),
and `sent` is what validators will decode.

The groups meet at the deadline (`train.windows.meeting_block`), when commitments have
closed: every miner computes the same time from the ledger, so all declare the same
expiry and agree on a leader, and matchmaking runs in the background while the miner
reveals. A group that has not formed by the window's end will not: the round gives up
then, so that a failed round never makes the miner late for the next window.

After the round, the outer step (Nesterov SGD, DiLoCo, arXiv:2311.08105) is applied to
every shard's average, giving θ_{w+1}, identical on every miner in step. A group that
fails leaves the miner with its own Δ on its shard (and θ_w on the shards it missed),
out of step until it loads a peer's state or the store's checkpoint at the next window.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from averaging.compression import decode, encode
from averaging.config import OuterConfig
from averaging.outer import outer_step
from averaging.participant import Participant
from averaging.parts import payload_params, payload_tensors
from averaging.round import AverageResult, AveragingFailed, PreparedParts
from chain.interface import Chain
from tensormine.config import RunConfig
from train.shards import apply_to_shard, shard_state
from train.windows import block_time, meeting_block, start_block

Outcomes = dict[int, AverageResult | AveragingFailed]


@dataclass(frozen=True)
class Payload:
    """A contribution's tensors and compression params as published, its size in bytes,
    the Δ its readers decode (`sent`), and the prepared parts when it goes to a group."""

    tensors: dict[str, torch.Tensor]
    params: dict[str, Any]
    nbytes: int
    sent: dict[str, torch.Tensor]
    parts: PreparedParts | None
    residual: dict[str, torch.Tensor] | None  # new top-k error feedback, without groups


def contribution_payload(
    seat: Participant | None,
    shard: int,
    names: list[str],
    delta: Mapping[str, torch.Tensor],
    cfg: RunConfig,
    residual: Mapping[str, torch.Tensor] | None,
) -> Payload:
    """Δ on `shard` (its tensors `names`) as it is published: the seat's wire parts, else
    the run's compression of it with the error feedback `residual` owed from earlier
    windows."""
    if seat is not None:
        parts = seat.prepare(shard, delta)
        params = payload_params(
            parts.blobs, names, cfg.averaging.wire, cfg.averaging.wire_part_size_bytes
        )
        nbytes = sum(len(b) for b in parts.blobs)
        tensors = payload_tensors(parts.blobs)
        return Payload(tensors, params, nbytes, parts.values, parts, None)
    encoded = encode(delta, cfg.compression, residual)
    shapes = {n: tuple(delta[n].shape) for n in names}
    sent = decode(encoded.tensors, encoded.params, shapes)  # what validators will see
    return Payload(
        dict(encoded.tensors), dict(encoded.params), encoded.nbytes, sent, None, encoded.residual
    )


def start_round(
    seat: Participant,
    ledger: Chain,
    cfg: RunConfig,
    window: int,
    shard: int,
    parts: PreparedParts,
    body: dict[str, Any],
    *,
    commitments: Callable[[], Mapping[str, str] | None],
    receive: Collection[int],
    base: str,
) -> concurrent.futures.Future[Outcomes]:
    """Send `parts` (committed as manifest `body`) into the group of `shard` and receive
    the averages of the shards in `receive`, in the background: matchmaking starts now and
    the groups meet at the window's meeting block."""
    start_at, timeout = round_times(ledger, cfg, window)
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="averaging")
    future = pool.submit(
        seat.average_window,
        window,
        {},
        prepared={shard: (parts, body)},
        commitments=commitments,
        start_at=start_at,
        timeout=timeout,
        receive=receive,
        base=base,
        # Every peer weighs the members as the last epoch before the window began left
        # them, however the reads fall around an epoch near the deadline.
        weights_block=start_block(window, cfg.window),
    )
    pool.shutdown(wait=False)
    return future


def matchmaking_lead(ledger: Chain, cfg: RunConfig) -> int:
    """Blocks before the meeting block at which a peer must start matchmaking."""
    return math.ceil((cfg.averaging.min_matchmaking_time_s + 1) / ledger.block_time_s)


def round_times(ledger: Chain, cfg: RunConfig, window: int) -> tuple[float, float]:
    """(when the groups of `window` meet, how long a peer gives their round from now).

    Without overlap a round ends with its window, so that a failed round never makes a
    miner late for the next one. With `averaging.overlap` it runs while the next window
    trains, until a lead before the next window's groups start matchmaking: the same
    peers' next round never meets this one's stragglers."""
    first = start_block(window, cfg.window)
    start_at = block_time(ledger, meeting_block(window, cfg.window), anchor=first)
    if cfg.averaging.overlap_mode == "off":
        end = start_block(window + 1, cfg.window)
    else:
        end = meeting_block(window + 1, cfg.window) - 2 * matchmaking_lead(ledger, cfg)
    until = block_time(ledger, end, anchor=first)
    return start_at, max(until - time.time(), cfg.averaging.min_matchmaking_time_s + 0.5)


def in_step(outcomes: Outcomes, shards: Collection[int], hotkey: str) -> bool:
    """Whether every group of `shards` averaged and `hotkey` ended the round on the model
    most of its peers started from (θ_{w+1} is then the groups')."""
    return all(isinstance(outcomes.get(s), AverageResult) for s in shards) and (
        Participant.in_step(outcomes, hotkey)
    )


def outer_steps(
    model: torch.nn.Module,
    shards: list[list[str]],
    momentum: dict[str, torch.Tensor],
    outcomes: Outcomes,
    *,
    shard: int,
    sent: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    outer: OuterConfig,
) -> None:
    """θ_{w+1} in `model` (and the outer `momentum`, updated in place): the outer step on
    every shard's group average; on our own `shard` without one, on our Δ alone (`sent`)
    from `start` (θ_w on it); other shards without an average stay θ_w."""
    averages: dict[int, Mapping[str, torch.Tensor]] = {
        s: o.tensors for s, o in outcomes.items() if isinstance(o, AverageResult)
    }
    averages.setdefault(shard, sent)
    step_averages(model, shards, momentum, averages, outer, starts={shard: start})


def step_averages(
    model: torch.nn.Module,
    shards: list[list[str]],
    momentum: dict[str, torch.Tensor],
    averages: Mapping[int, Mapping[str, torch.Tensor]],
    outer: OuterConfig,
    *,
    starts: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
) -> None:
    """The outer step on every shard of `averages` (shard -> average), from `starts`' θ of
    that shard when given, else the model's; shards without an average stay as they are."""
    for s, average in sorted(averages.items()):
        if s < len(shards):
            names = shards[s]
            theta = (starts or {}).get(s)
            step_shard(model, names, momentum, theta or shard_state(model, names), average, outer)


def step_shard(
    model: torch.nn.Module,
    names: list[str],
    momentum: dict[str, torch.Tensor],
    theta: Mapping[str, torch.Tensor],
    average: Mapping[str, torch.Tensor],
    outer: OuterConfig,
) -> None:
    """The outer step from `theta` (on the shard's tensors `names`) with `average`, into
    `model` and `momentum` (in place)."""
    buffers = {n: momentum[n] for n in names if n in momentum}
    new_params, new_momentum = outer_step(theta, average, buffers, outer)
    momentum.update(new_momentum)
    apply_to_shard(model, names, new_params)
