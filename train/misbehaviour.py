"""What an adversarial miner publishes and sends instead of its own Δ (demos and tests).

    delta = misbehave("copier", delta, store=store, ledger=ledger, cfg=cfg, uid=uid,
                      hotkey=kp.address, window=w, shard=s)
    parts = poisoned(parts)                 # a poisoner's parts for its group

`train.miner --behaviour B` runs one of `train.adversary.BEHAVIOURS`; the validators must
give each nothing. `train.adversary` says what each publishes as pure functions and
`train.cheats` does the I/O; this module picks the moment: a copier or mixer reads the
others' Δ before the deadline (when nothing of the window is revealed yet, so it finds
nothing), a backdater after the reveal deadline (and commits late); a poisoner commits to
its honest Δ and sends −10× it into its group's all-reduce.
"""

from __future__ import annotations

import logging

import torch

from averaging.round import PreparedParts
from chain.interface import Chain
from store.api import Store
from tensormine.config import RunConfig
from train.adversary import make_adversarial_delta, mean_of
from train.cheats import peek_contributions
from train.windows import deadline, reveal_deadline

logger = logging.getLogger(__name__)


def misbehave(
    behaviour: str,
    delta: dict[str, torch.Tensor],
    *,
    store: Store,
    ledger: Chain,
    cfg: RunConfig,
    uid: int,
    hotkey: str,
    window: int,
    shard: int,
) -> dict[str, torch.Tensor]:
    """The Δ a miner of `behaviour` publishes instead of its own `delta` (see
    `train.adversary`); its noise is seeded by UID and window."""
    rng = torch.Generator().manual_seed(uid * 1_000_003 + window)
    other = None
    if behaviour in ("copier", "mixer", "backdater"):
        # A copier or mixer must commit before the deadline, when nothing of this
        # window is revealed; a backdater reads after it and commits late.
        due = deadline(window, cfg.window)
        until = reveal_deadline(window, cfg.window) if behaviour == "backdater" else (
            due - max(2, cfg.window.publish_margin)
        )  # fmt: skip
        others = peek_contributions(
            store, ledger, window, shard, delta, hotkey,
            until=until, poll_s=ledger.block_time_s,
        )  # fmt: skip
        if others:
            other = mean_of(others) if behaviour == "mixer" else others[0]
            logger.info("window %d: read %d Δ of others to %s", window, len(others), behaviour)
        elif behaviour == "mixer":
            logger.info("window %d: nothing of others readable to mix in", window)
        else:
            logger.warning("window %d: nothing to copy; publishing noise instead", window)
            return make_adversarial_delta("noise", delta, None, rng)
    return make_adversarial_delta(behaviour, delta, other, rng)


def poisoned(parts: PreparedParts) -> PreparedParts:
    """A poisoner's parts: its commitment (the blobs) stands; what it sends does not."""
    return PreparedParts(parts.blobs, parts.values, {n: -10 * t for n, t in parts.raw.items()})
