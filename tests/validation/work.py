"""Miners of the proof-of-work tests: honest ones and the cheats the spot checks must catch.

    delta = train_window(behaviour, ctx, keeper)   # trains, records the trajectory

Each trains the shard in-process the way `train.miner` does (`train.inner.inner_loop`
with a `TrajectoryKeeper` recording the state at every segment bound), except:

- ``honest1t``: honest, on one thread (the validator recomputes on its own count);
- ``scaled2`` / ``scaled4``: trains H/2 steps and publishes its Δ × 2 / × 4; the states it
  commits after H/2 are made up (on the line from its real state at H/2 to θ_w − s·Δ, so
  that its last state is what the published Δ was made from, as a careful cheat's is);
- ``unassigned``: trains the second segment on pages it was not assigned;
- ``fabricator``: trains honestly, then answers with states that are not the committed
  ones (its kept states perturbed after the commitment);
- ``silent``: trains honestly and never answers (the test gives it no responder).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from train.config import TrainConfig
from train.inner import inner_loop
from train.shards import shard_state
from train.trajectory import MOMENT_KINDS, TrajectoryKeeper, moment_name, segment_bounds

POW_BEHAVIOURS = ("honest", "honest1t", "scaled2", "scaled4", "unassigned", "fabricator", "silent")


@dataclass
class Job:
    acc: Accelerator
    model: nn.Module
    names: list[str]
    rows: np.ndarray  # assigned pages, in step order
    other: np.ndarray  # pages it was not assigned, as many
    cfg: TrainConfig
    window: int
    shard: int


def train_window(behaviour: str, job: Job, keeper: TrajectoryKeeper) -> dict[str, torch.Tensor]:
    """Train `job` as `behaviour` does, recording its committed states; returns its Δ."""
    cfg, names = job.cfg, job.names
    bounds = segment_bounds(cfg.inner_steps, cfg.trajectory_segments)
    start = shard_state(job.model, names)
    record = keeper.recorder(job.window, job.shard, bounds)
    rows = job.rows
    if behaviour == "unassigned":
        rows = rows.copy()
        b = cfg.batch_size
        rows[bounds[1] * b : bounds[2] * b] = job.other[bounds[1] * b : bounds[2] * b]
    pages = torch.from_numpy(rows)
    if behaviour.startswith("scaled"):
        return _scaled(job, keeper, bounds, start, pages, float(behaviour[len("scaled") :]))
    threads = torch.get_num_threads()
    if behaviour == "honest1t":
        torch.set_num_threads(1)
    try:
        # `mine` makes one accelerator per window and drops it: no `free_memory` per miner.
        inner_loop(
            job.acc, job.model, names, pages, cfg, boundaries=bounds[1:],
            on_boundary=record, release=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    trained = shard_state(job.model, names)
    if behaviour == "fabricator":
        for step in bounds[1:]:
            path = keeper.path(job.window, step)
            state = load_file(str(path))
            gen = torch.Generator().manual_seed(step)
            save_file(
                {k: v + 1e-4 * torch.randn(v.shape, generator=gen) for k, v in state.items()},
                str(path),
            )
    return {n: start[n] - trained[n] for n in names}


def _scaled(
    job: Job,
    keeper: TrajectoryKeeper,
    bounds: list[int],
    start: dict[str, torch.Tensor],
    pages: torch.Tensor,
    scale: float,
) -> dict[str, torch.Tensor]:
    cfg, names = job.cfg, job.names
    half = cfg.inner_steps // 2
    if half not in bounds:
        raise ValueError(f"H/2 = {half} must be a segment bound of {bounds}")
    kept: dict[str, torch.Tensor] = {}

    def record(step: int, params: object, moments: object) -> None:
        assert isinstance(params, dict) and isinstance(moments, dict)
        keeper.record(job.window, step, params, moments)
        if step == half:
            kept.update({k: v.detach().clone() for k, v in moments.items()})

    keeper.start(job.window, job.shard, bounds)
    inner_loop(
        job.acc, job.model, names, pages, cfg, stop_step=half,
        boundaries=bounds[1:], on_boundary=record, release=False,
    )  # fmt: skip
    mid = shard_state(job.model, names)
    delta = {n: scale * (start[n] - mid[n]) for n in names}
    end = {n: start[n] - delta[n] for n in names}
    for step in (b for b in bounds if b > half):
        f = (step - half) / (cfg.inner_steps - half)
        params = {n: mid[n] + f * (end[n] - mid[n]) for n in names}
        moments = {moment_name(n, k): kept[moment_name(n, k)] for n in names for k in MOMENT_KINDS}
        keeper.record(job.window, step, params, moments)
    with torch.no_grad():
        by_name = dict(job.model.named_parameters())
        for n in names:
            by_name[n].copy_(end[n])
    return delta
