"""θ_{w+1}: which average each shard's outer step applies, and who is in it.

    updates = shard_averages(shards, shapes, admitted, results, weights, robust)
    for u in updates:                      # one per shard that has an average
        theta = outer_step(theta_of(u.shard), u.average, momentum, cfg.outer)
        u.source, u.members                # "group" | "store", [(uid, hotkey, weight)]

There is one model (DESIGN, "The loop"). In window w every miner of a shard sends its
committed Δ into the shard's hivemind group; the group's reducers combine them with the
ledger's weights pinned to the last epoch before w and the robust rule
(`averaging.robust`), and send the same bytes to every member and auxiliary peer. Every
miner in step then takes the outer step on those averages, and so does the validator (an
auxiliary peer of every group): the checkpoint it publishes *is* the miners' θ_{w+1},
fingerprint for fingerprint. Scores do not enter it: they move the ledger's weights
(Yuma), which weigh later windows' averages.

A shard whose group this validator did not receive (no group formed, or its own seat
failed) gets the same reduction of the contributions it admitted, with the same pinned
weights (`source == "store"`); the miners of that shard were out of step anyway and
adopt the published checkpoint at the next window. It differs from a group's average only
by the wire's rounding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from averaging.group import AverageResult, AveragingFailed
from averaging.robust import aggregate
from averaging.settings import RobustConfig
from validation.admission import Admitted
from validation.scoring import flatten

AGGREGATE_CHUNK = 1 << 20  # coordinates per robust-aggregation slice (bounds fp64 memory)


@dataclass(frozen=True)
class ShardAverage:
    shard: int
    source: Literal["group", "store"]
    average: dict[str, torch.Tensor]
    members: list[tuple[int | None, str, float]]  # (UID, hotkey, share of the weight)


def unflatten(shapes: Mapping[str, Sequence[int]], vector: torch.Tensor) -> dict[str, torch.Tensor]:
    """A shard's tensors from one vector in `scoring.flatten`'s (sorted name) order."""
    out, offset = {}, 0
    for name in sorted(shapes):
        numel = int(np.prod(shapes[name]))
        out[name] = vector[offset : offset + numel].view(tuple(shapes[name]))
        offset += numel
    return out


def aggregate_rows(
    stack: torch.Tensor, weights: torch.Tensor, robust: RobustConfig
) -> torch.Tensor:
    """`averaging.robust.aggregate` over whole flattened Δ, in slices of the columns for
    the coordinate-wise rules (CenteredClip's norms need whole rows)."""
    if stack.shape[0] == 1:
        return stack[0]
    if robust.kind == "centered_clip":
        return aggregate(stack, weights, robust)
    parts = [
        aggregate(stack[:, i : i + AGGREGATE_CHUNK], weights, robust)
        for i in range(0, stack.shape[1], AGGREGATE_CHUNK)
    ]
    return torch.cat(parts)


def _shares(hotkeys: Sequence[str], weights: Mapping[str, float], floor: float) -> list[float]:
    raw = [weights.get(h, floor) for h in hotkeys]
    total = sum(raw)
    return [w / total for w in raw] if total > 0 else [1.0 / len(raw)] * len(raw)


def shard_averages(
    shapes: Mapping[int, Mapping[str, Sequence[int]]],
    admitted: Sequence[Admitted],
    results: Mapping[int, AverageResult | AveragingFailed],
    weights: Mapping[str, float],
    robust: RobustConfig,
    *,
    floor: float,
    uid_of: Mapping[str, int],
) -> list[ShardAverage]:
    """Per shard, in shard order: the group's average when this validator received it,
    else the robust reduction of the admitted Δ with the pinned ledger `weights` (hotkey
    -> weight; `floor` for a hotkey it lacks); shards with neither are left out."""
    out = []
    for shard in sorted(shapes):
        result = results.get(shard)
        if isinstance(result, AverageResult) and result.members:
            shares = _shares(result.members, weights, floor)
            members = [(uid_of.get(h), h, s) for h, s in zip(result.members, shares, strict=True)]
            out.append(ShardAverage(shard, "group", dict(result.tensors), members))
            continue
        rows = sorted((a for a in admitted if a.shard == shard), key=lambda a: a.hotkey)
        if not rows:
            continue
        hotkeys = [a.hotkey for a in rows]
        w = torch.tensor([weights.get(h, floor) for h in hotkeys], dtype=torch.float64)
        stack = torch.stack([flatten(a.delta) for a in rows])
        average = unflatten(shapes[shard], aggregate_rows(stack, w, robust))
        shares = _shares(hotkeys, weights, floor)
        members = [(a.uid, a.hotkey, s) for a, s in zip(rows, shares, strict=True)]
        out.append(ShardAverage(shard, "store", average, members))
    return out
