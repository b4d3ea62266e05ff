"""One epoch on the ledger: read the metagraph, run Yuma, pay out, store the results.

This is the I/O around the pure pieces: `chain.consensus.yuma_epoch` does the math and
`chain.distribution.split_emission` the integer payouts. What the ledger must do before
calling Yuma, as subtensor does around its epoch:
- weights of validator i on UID j are dropped when i last set weights at or
  before j's registration (they were meant for the UID's previous holder), and bonds on
  a UID registered within the last tempo are dropped;
- stake below the validator minimum does not vote;
- a UID is inactive when it has not set weights for `activity_cutoff` blocks;
- validator permits are the top-K by stake (with the minimum stake).
Emission to miners and validators is added to their stake, as on the chain; the owner's
cut goes to the owner's free balance. Yuma's outputs are stored as u16 like subtensor's,
and the metagraph the epoch leaves is kept per epoch (`Ledger.epoch_neurons`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from chain.config import ChainConfig
from chain.consensus import EpochResult, bonds_from_u16, bonds_to_u16, yuma_epoch
from chain.distribution import U16_MAX, Payout, split_emission
from chain.storage import record_epoch

if TYPE_CHECKING:
    from chain.runtime import Runtime

logger = logging.getLogger(__name__)


def _dense(rows: list[tuple[int, str]], n: int) -> NDArray[np.float64]:
    out = np.zeros((n, n), dtype=np.float64)
    for i, data in rows:
        if i >= n:
            continue
        for j, value in json.loads(data):
            if 0 <= j < n:
                out[i, j] = value
    return out


def _to_u16(values: NDArray[np.float64]) -> list[int]:
    return [int(v) for v in np.floor(np.clip(values, 0.0, 1.0) * U16_MAX)]


@dataclass(frozen=True)
class EpochInputs:
    """What Yuma sees of the ledger at one block, already masked as subtensor masks it."""

    hotkeys: list[str]
    weights: NDArray[np.float64]
    stake: NDArray[np.float64]
    bonds: NDArray[np.float64]
    active: NDArray[np.bool_]
    permits: NDArray[np.bool_]
    owner_uid: int | None  # the owner's self-weight counts, as on the chain


def load_inputs(rt: Runtime, block: int) -> EpochInputs:
    """Read the metagraph, weights and bonds and apply subtensor's masks."""
    cfg = rt.config
    conn = rt.conn
    neurons = conn.execute(
        "SELECT uid, hotkey, registered_block, last_update FROM neurons ORDER BY uid"
    ).fetchall()
    n = len(neurons)
    registered = np.array([int(r[2]) for r in neurons], dtype=np.int64)
    last_update = np.array([int(r[3]) for r in neurons], dtype=np.int64)
    # Weights set at or before the target's registration were meant for its previous holder.
    outdated = last_update[:, None] <= registered[None, :]
    weights = _dense(conn.execute("SELECT uid, data FROM weights").fetchall(), n)
    weights[outdated] = 0.0
    bonds_q = _dense(conn.execute("SELECT uid, data FROM bonds").fetchall(), n)
    bonds = bonds_from_u16(bonds_q.astype(np.uint16), cfg.yuma3)
    # Bonds on a UID registered within the last tempo were earned by its previous holder.
    bonds[:, block - cfg.tempo <= registered] = 0.0
    stake = np.array(rt.stakes_by_uid(), dtype=np.float64)
    # Stake under the validator threshold carries no vote in consensus.
    stake[stake < cfg.validator_min_stake_rao] = 0.0
    return EpochInputs(
        hotkeys=[str(r[1]) for r in neurons],
        weights=weights,
        stake=stake,
        bonds=bonds,
        active=last_update + cfg.activity_cutoff >= block,
        permits=np.array(rt.permits(), dtype=bool),
        owner_uid=rt.uid_of(rt.owner),
    )


def run_yuma(inputs: EpochInputs, cfg: ChainConfig) -> EpochResult:
    """Yuma consensus over `inputs` with the ledger's parameters."""
    return yuma_epoch(
        inputs.weights,
        inputs.stake,
        inputs.bonds,
        kappa=cfg.kappa,
        bond_alpha=cfg.bond_alpha,
        bonds_penalty=cfg.bonds_penalty,
        yuma3=cfg.yuma3,
        liquid_alpha=cfg.liquid_alpha,
        active=inputs.active,
        validator_permit=inputs.permits,
        owner_uid=inputs.owner_uid,
    )


def payout_for(pending: int, inputs: EpochInputs, result: EpochResult, cfg: ChainConfig) -> Payout:
    """The integer split of `pending` rao for this epoch's outcome."""
    return split_emission(
        pending,
        result.incentive.tolist(),
        result.dividends.tolist(),
        np.where(inputs.active, inputs.stake, 0.0).tolist(),
        inputs.stake.tolist(),
        cfg.owner_cut_u16,
    )


def run_epoch(rt: Runtime, block: int) -> None:
    """Run Yuma over the current metagraph and distribute the pending emission."""
    cfg = rt.config
    conn = rt.conn
    inputs = load_inputs(rt, block)
    n = len(inputs.hotkeys)
    hotkeys = inputs.hotkeys
    permits = inputs.permits
    result = run_yuma(inputs, cfg)
    _, pending = rt.issuance()
    payout = payout_for(pending, inputs, result, cfg)
    columns = {
        "rank": _to_u16(result.rank),
        "trust": _to_u16(result.trust),
        "consensus": _to_u16(result.consensus),
        "incentive": _to_u16(result.incentive),
        "dividends": _to_u16(result.dividends),
        "validator_trust": _to_u16(result.validator_trust),
    }
    per_uid = payout.per_uid
    conn.executemany(
        "UPDATE neurons SET rank = ?, trust = ?, consensus = ?, incentive = ?, dividends = ?, "
        "validator_trust = ?, emission = ?, validator_permit = ? WHERE uid = ?",
        [
            (
                *(columns[c][uid] for c in columns),
                per_uid[uid],
                int(permits[uid]),
                uid,
            )
            for uid in range(n)
        ],
    )
    for uid, amount in enumerate(per_uid):
        if amount:
            rt._adjust(hotkeys[uid], stake=amount)
    if payout.owner:
        rt._adjust(rt.owner, balance=payout.owner)
    conn.execute("UPDATE state SET pending_emission = ?", (payout.carried,))

    stored = bonds_to_u16(result.bonds, cfg.yuma3)
    stored[~permits] = 0  # a UID without a permit holds no bonds
    conn.execute("DELETE FROM bonds")
    conn.executemany(
        "INSERT INTO bonds (uid, data) VALUES (?, ?)",
        [
            (i, json.dumps([[int(j), int(stored[i, j])] for j in np.flatnonzero(stored[i])]))
            for i in range(n)
            if stored[i].any()
        ],
    )
    record_epoch(conn, block)  # after the payout: stakes as this epoch leaves them
    logger.debug(
        "epoch at block %d: %d UIDs, paid %d rao (owner %d), carried %d",
        block,
        n,
        sum(per_uid) + payout.owner,
        payout.owner,
        payout.carried,
    )
