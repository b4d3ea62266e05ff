"""Commit-reveal of weights on the ledger, as subtensor's salted-hash commit-reveal.

A validator that copies the weights others set earns as much as they do without
evaluating anything. Commit-reveal makes it copy stale weights: weights are first
committed as a hash, the weights themselves appear on the ledger one reveal period later,
by which time the honest validators have committed newer ones.

    commit_weights(commit_hash)              commit_hash = commit_hash(genesis, netuid,
    reveal_weights(uids, weights, salt)          hotkey, uids, weights, salt)

Timing. Reveal windows are the spans between two epochs: window k begins with the
epoch block whose `on_initialize` runs the k-th epoch (Yuma runs before any extrinsic of
that block, so its extrinsics already belong to the new window) and ends with the block
before the next epoch block:

    reveal_window(b) = (b + netuid + 2) // (tempo + 1)

which grows by one exactly at the blocks where `chain.interface.is_epoch_block` is true
(subtensor's `get_epoch_index` is the same count shifted by one block, so that there the
epoch block's own extrinsics belong to the old epoch). A commit included in block c, of
window e = reveal_window(c), may be revealed only by a reveal included in a block of
window e + reveal_period_epochs. Earlier is `RevealTooEarly`; later is
`ExpiredWeightCommit` (during the window right after) and then `NoWeightsCommitFound`:
the epoch block that opens window e + p + 2 deletes the commit. Revealed weights count
from the next epoch, so weights committed in window e are used first by the epoch that
opens window e + p + 1 (without commit-reveal: the one that opens e + 1).

What a commit and a reveal check and do:
- commit: the signer is registered and holds a validator permit, and the weights rate
  limit applies (`weights_rate_limit` blocks since its last commit). One commit per
  signer and window: a second commit in the same window replaces the first, which can
  no longer be revealed, so the weights revealed for a window are the last committed in
  it (subtensor queues up to 10 commits instead; with one reveal per window the last
  one would win there as well).
- reveal: the hash of (ledger, netuid, signer, uids, weights, salt) equals one of the
  signer's pending commits, in its window; then exactly what `set_weights` does without
  commit-reveal (registered, permit, weight vector validity; the weights are stored and
  `last_update` is set), except that `last_update` is the commit's block: the weights
  were chosen then, so a UID registered since does not inherit weights meant for its
  previous holder. The commit is consumed. A reveal is not rate limited.
- With `commit_reveal` on, plain `set_weights` is refused (`CommitRevealEnabled`);
  with it off, commits and reveals are (`CommitRevealDisabled`).

The salt and the weights stay with the validator until the reveal
(`chain.reveals.PendingReveals`); `Chain.set_weights` does both steps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chain.errors import (
    CommitRevealDisabled,
    ExpiredWeightCommit,
    InvalidRevealCommitHashNotMatch,
    NoWeightsCommitFound,
    RevealTooEarly,
)
from chain.extrinsics import WeightCommitArgs, WeightRevealArgs
from chain.keys import signing_bytes

if TYPE_CHECKING:
    import sqlite3

    from chain.config import ChainConfig
    from chain.runtime import Runtime


@dataclass(frozen=True)
class WeightCommit:
    """A pending commit as the ledger stores it: included in `block`, of reveal window
    `epoch`."""

    hotkey: str
    epoch: int
    commit_hash: str
    block: int


def reveal_window(block: int, netuid: int, tempo: int) -> int:
    """The reveal window (epoch index) that `block`'s extrinsics belong to."""
    return (block + netuid + 2) // (tempo + 1)


def window_blocks(window: int, netuid: int, tempo: int) -> tuple[int, int]:
    """(first, last) block of reveal window `window`."""
    first = window * (tempo + 1) - netuid - 2
    return first, first + tempo


def reveal_blocks(commit_block: int, config: ChainConfig) -> tuple[int, int]:
    """(first, last) block in which a commit included in `commit_block` may be revealed."""
    cfg = config
    window = reveal_window(commit_block, cfg.netuid, cfg.tempo) + cfg.reveal_period_epochs
    return window_blocks(window, cfg.netuid, cfg.tempo)


def commit_hash(
    genesis: str,
    netuid: int,
    hotkey: str,
    uids: Sequence[int],
    weights: Sequence[int],
    salt: str,
) -> str:
    """sha256 of the canonical JSON of what a commit binds: this ledger (its genesis hash)
    and subnet, the committing hotkey, the wire weights (u16) and the salt."""
    body = {
        "genesis": genesis,
        "netuid": int(netuid),
        "hotkey": hotkey,
        "uids": [int(u) for u in uids],
        "weights": [int(w) for w in weights],
        "salt": salt,
    }
    return hashlib.sha256(signing_bytes(body)).hexdigest()


def pending_commits(conn: sqlite3.Connection, hotkey: str) -> list[WeightCommit]:
    """`hotkey`'s commits still on the ledger (not revealed, not yet deleted), oldest
    first. Public, as on subtensor: the hashes say nothing about the weights."""
    rows = conn.execute(
        "SELECT hotkey, epoch, commit_hash, block FROM weight_commits WHERE hotkey = ? "
        "ORDER BY epoch",
        (hotkey,),
    ).fetchall()
    return [WeightCommit(str(r[0]), int(r[1]), str(r[2]), int(r[3])) for r in rows]


# ---- state transitions (called by `chain.runtime.Runtime`) ---------------------------
def commit_weights(rt: Runtime, hotkey: str, args: WeightCommitArgs, block: int) -> None:
    cfg = rt.config
    if not cfg.commit_reveal:
        raise CommitRevealDisabled(
            "this ledger does not run commit-reveal (chain.commit_reveal is off): "
            "set weights directly with set_weights"
        )
    uid = rt.weights_setter(hotkey, block, rate_limited=True)
    window = reveal_window(block, cfg.netuid, cfg.tempo)
    rt.conn.execute(
        "INSERT INTO weight_commits (hotkey, epoch, commit_hash, block) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(hotkey, epoch) DO UPDATE SET commit_hash = excluded.commit_hash, "
        "block = excluded.block",
        (hotkey, window, args.commit_hash, block),
    )
    rt.conn.execute("UPDATE neurons SET weights_block = ? WHERE uid = ?", (block, uid))


def reveal_weights(rt: Runtime, hotkey: str, args: WeightRevealArgs, block: int) -> None:
    cfg = rt.config
    if not cfg.commit_reveal:
        raise CommitRevealDisabled(
            "this ledger does not run commit-reveal (chain.commit_reveal is off): "
            "there is nothing to reveal; set weights directly with set_weights"
        )
    digest = commit_hash(rt.genesis, cfg.netuid, hotkey, args.uids, args.weights, args.salt)
    pending = pending_commits(rt.conn, hotkey)
    found = next((c for c in pending if c.commit_hash == digest), None)
    if found is None:
        if not pending:
            raise NoWeightsCommitFound(
                f"{hotkey} has no pending weights commit (never made, replaced by a later "
                f"commit in its window, already revealed, or expired)"
            )
        raise InvalidRevealCommitHashNotMatch(
            f"the revealed weights and salt match none of {hotkey}'s {len(pending)} pending "
            "commits: reveal exactly the uids, u16 weights and salt that were committed"
        )
    first, last = reveal_blocks(found.block, cfg)
    if block < first:
        raise RevealTooEarly(
            f"the commit in block {found.block} may be revealed in blocks {first}..{last}, "
            f"not in block {block}"
        )
    if block > last:
        raise ExpiredWeightCommit(
            f"the commit in block {found.block} had to be revealed in blocks {first}..{last}; "
            f"block {block} is too late and the commit counts for nothing"
        )
    uid = rt.weights_setter(hotkey, block, rate_limited=False)
    rt.store_weights(uid, args.uids, args.weights, last_update=found.block)
    rt.conn.execute(
        "DELETE FROM weight_commits WHERE hotkey = ? AND epoch = ?", (hotkey, found.epoch)
    )


def expire_commits(rt: Runtime, block: int) -> None:
    """At an epoch block: delete the commits whose reveal window ended before the window
    that just closed (those of that window are kept one window longer, so that a late
    reveal is told `ExpiredWeightCommit`)."""
    cfg = rt.config
    window = reveal_window(block, cfg.netuid, cfg.tempo)
    rt.conn.execute(
        "DELETE FROM weight_commits WHERE epoch + ? + 1 < ?",
        (cfg.reveal_period_epochs, window),
    )
