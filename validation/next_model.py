"""θ_{w+1}: which average each shard's outer step applies, and who is in it.

    updates = shard_averages(shapes, admitted, results, pinned_weights, cfg.averaging,
                             uid_of=uid_by_hotkey)
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
failed) gets what a group of every contribution it admitted would have sent back
(`source == "store"`): the contributions are the parts their miners committed to and
sent, and `averaging.parts.reduce_parts` combines them per part exactly as reducers do,
bit for bit. The miners of that shard were out of step anyway and adopt the published
checkpoint at the next window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from averaging.parts import reduce_parts
from averaging.round import AverageResult, AveragingFailed
from averaging.settings import AveragingConfig
from validation.admission import Admitted


@dataclass(frozen=True)
class ShardAverage:
    shard: int
    source: Literal["group", "store"]
    average: dict[str, torch.Tensor]
    members: list[tuple[int | None, str, float]]  # (UID, hotkey, share of the weight)


def weight_shares(
    hotkeys: Sequence[str], weights: Mapping[str, float], floor: float
) -> list[float]:
    """Each hotkey's share of the pinned ledger weight (`floor` for one the table lacks)."""
    raw = [weights.get(h, floor) for h in hotkeys]
    total = sum(raw)
    return [w / total for w in raw] if total > 0 else [1.0 / len(raw)] * len(raw)


def shard_averages(
    shapes: Mapping[int, Mapping[str, Sequence[int]]],
    admitted: Sequence[Admitted],
    results: Mapping[int, AverageResult | AveragingFailed],
    weights: Mapping[str, float],
    averaging: AveragingConfig,
    *,
    uid_of: Mapping[str, int],
) -> list[ShardAverage]:
    """Per shard, in shard order: the group's average when this validator received it,
    else what a group of every admitted Δ would have sent back (`averaging.parts.
    reduce_parts`: the same parts, pinned ledger `weights` (hotkey -> weight; the floor
    for a hotkey it lacks), robust rule and codec); shards with neither are left out."""
    floor = averaging.weight_floor
    out = []
    for shard in sorted(shapes):
        result = results.get(shard)
        if isinstance(result, AverageResult) and result.members:
            shares = weight_shares(result.members, weights, floor)
            members = [(uid_of.get(h), h, s) for h, s in zip(result.members, shares, strict=True)]
            out.append(ShardAverage(shard, "group", dict(result.tensors), members))
            continue
        rows = sorted((a for a in admitted if a.shard == shard), key=lambda a: a.hotkey)
        if not rows:
            continue
        hotkeys = [a.hotkey for a in rows]
        average = reduce_parts(
            [a.delta for a in rows], [weights.get(h, floor) for h in hotkeys], shapes[shard],
            averaging.wire, averaging.wire_part_size_bytes, averaging.robust,
        )  # fmt: skip
        shares = weight_shares(hotkeys, weights, floor)
        members = [(a.uid, a.hotkey, s) for a, s in zip(rows, shares, strict=True)]
        out.append(ShardAverage(shard, "store", average, members))
    return out
