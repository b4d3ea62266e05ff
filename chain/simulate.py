"""`tensormine chain simulate`: fast-forward a ledger's emission and epochs with fixed weights.

    tensormine chain simulate --blocks 11000000          # past the first halving
    tensormine chain simulate --to-cap                  # the whole schedule, ~330 M blocks

The projection starts from a ledger's current state (metagraph, weights, stake, bonds,
issuance), holds weights and stake fixed (validators keep their weights fresh), and never
writes to the ledger. On a commit-reveal ledger the weights are those revealed so far
(pending commits are only hashes), as if each validator kept revealing the same ones.
Emission is tallied per UID as it would be paid.

Why it is fast: between two epochs nothing but minting happens, so each stretch is one
multiplication (split at an era boundary when one falls inside it). Epochs run Yuma for
real, bonds quantized to u16 between epochs exactly as the ledger stores them, until the
stored bonds repeat. From then on every epoch has the same outcome, and a run of K epochs
inside one era is paid in one step: the K epochs' mint is split by the fixed shares
and floored once, so the tallies can differ from block-by-block rounding by under one rao
per UID per epoch, while the totals still add up to the issuance exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np

from chain.config import ChainConfig
from chain.consensus import EpochResult, bonds_from_u16, bonds_to_u16
from chain.emission import block_emission, blocks_to_reach, next_emission_change
from chain.epoch import EpochInputs, load_inputs, payout_for, run_yuma
from chain.interface import blocks_until_epoch
from chain.ledger import Ledger
from chain.runtime import Runtime

logger = logging.getLogger(__name__)

MAX_EXPLICIT_EPOCHS = 5000


@dataclass(frozen=True)
class Halving:
    block: int
    issuance: int
    emission_per_block: int


@dataclass
class Projection:
    start_block: int
    start_issuance: int
    block: int
    issuance: int
    pending: int
    hotkeys: list[str]
    earned: list[int]
    owner_earned: int = 0
    epochs: int = 0
    explicit_epochs: int = 0
    halvings: list[Halving] = field(default_factory=list)
    last_result: EpochResult | None = None

    @property
    def paid(self) -> int:
        return sum(self.earned) + self.owner_earned


def snapshot(ledger: Ledger) -> tuple[EpochInputs, int, int, int]:
    """(epoch inputs with every UID active, block, total issuance, pending) of a ledger."""
    ledger.conn.execute("BEGIN")
    try:
        rt = Runtime(ledger.conn, ledger.config, ledger.owner, ledger.genesis_hash)
        block = rt.block()
        issuance, pending = rt.issuance()
        inputs = load_inputs(rt, block)
    finally:
        ledger.conn.execute("COMMIT")
    return replace(inputs, active=np.ones_like(inputs.active)), block, issuance, pending


def project(ledger: Ledger, blocks: int) -> Projection:
    """Run `blocks` blocks ahead of `ledger` in memory (see the module docstring)."""
    if blocks < 0:
        raise ValueError("blocks must be >= 0")
    cfg = ledger.config
    inputs, block, issuance, pending = snapshot(ledger)
    proj = Projection(
        block, issuance, block, issuance, pending, inputs.hotkeys, [0] * len(inputs.hotkeys)
    )
    end = block + blocks
    period = cfg.tempo + 1
    stable = False
    bonds_q = bonds_to_u16(inputs.bonds, cfg.yuma3)
    while proj.block < end:
        emission = block_emission(proj.issuance)
        change = next_emission_change(proj.issuance)
        to_change = blocks_to_reach(proj.issuance, change, emission) if change is not None else end
        to_epoch = blocks_until_epoch(proj.block + 1, cfg.netuid, cfg.tempo) + 1
        if stable and proj.last_result is not None and to_epoch == period:
            # Whole epoch periods that stay inside this era and this projection.
            k = min((end - proj.block) // period, (to_change - 1) // period if emission else 0)
            if k >= 2:
                _mint(proj, k * period, emission)
                _pay(proj, inputs, proj.last_result, k, ledger.config)
                continue
        step = min(to_epoch, to_change, end - proj.block)
        _mint(proj, step, emission)
        if step == to_epoch and len(proj.hotkeys) > 0:
            inputs = replace(inputs, bonds=bonds_from_u16(bonds_q, cfg.yuma3))
            result = run_yuma(inputs, cfg)
            proj.explicit_epochs += 1
            new_q = bonds_to_u16(result.bonds, cfg.yuma3)
            stable = (
                bool(np.array_equal(new_q, bonds_q)) or proj.explicit_epochs >= MAX_EXPLICIT_EPOCHS
            )
            bonds_q = new_q
            proj.last_result = result
            _pay(proj, inputs, result, 1, cfg)
    return proj


def _mint(proj: Projection, blocks: int, emission: int) -> None:
    """`blocks` blocks at `emission` rao each (the emission at the current issuance)."""
    proj.block += blocks
    proj.issuance += blocks * emission
    proj.pending += blocks * emission
    after = block_emission(proj.issuance)
    if after != emission:
        proj.halvings.append(Halving(proj.block, proj.issuance, after))
        logger.debug(
            "block %d: issuance %d rao, emission now %d rao/block", proj.block, proj.issuance, after
        )


def _pay(
    proj: Projection, inputs: EpochInputs, result: EpochResult, epochs: int, cfg: ChainConfig
) -> None:
    payout = payout_for(proj.pending, inputs, result, cfg)
    for uid, amount in enumerate(payout.per_uid):
        proj.earned[uid] += amount
    proj.owner_earned += payout.owner
    proj.pending = payout.carried
    proj.epochs += epochs
