"""Commit, then reveal: how a miner hands its Δ of window w to the subnet.

    prepared = store.prepare_contribution(payload, keypair=kp, uid=uid, window=w, shard=s,
                                          compression=compression)
    block = commit_contribution(chain, w, prepared.digest, timeout=30)  # ChainError
    if block < deadline(w, cfg.window):
        wait_for_block(chain, deadline(w, cfg.window))
        store.reveal_contribution(prepared)

Before window w's deadline a miner puts the sha256 of its signed manifest
(`store.manifest.commitment_digest`) on the chain (`Chain.commit_contribution`: its own
extrinsic on the local ledger, a key of the hotkey's commitment on Bittensor); the block
that includes it is the commitment's time, a clock no miner can set
(a file's modification time is not). From the deadline on it reveals the manifest and the
tensor file in its store. Nothing of anyone's Δ is readable while commitments are still
open, so nobody can copy or mix in another miner's work of the same window; a reveal that
does not hash to the commitment, a commitment in or after the deadline block, a second
commitment for the window (the ledger refuses it) or no reveal by `reveal_deadline` earn
nothing and stay out of θ_{w+1} (`validation.admission`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from chain.errors import ChainError
from chain.interface import Chain

logger = logging.getLogger(__name__)


def commit_contribution(chain: Chain, window: int, digest: str, *, timeout: float) -> int:
    """Commit `digest` for `window` under the chain handle's hotkey and wait until a block
    includes it; returns that block. A refusal (not registered, a second commitment for
    the window, a malformed digest) raises the chain's `ChainError`, naming the cause;
    no block within `timeout` seconds raises `chain.errors.NotIncluded`."""
    receipt = chain.commit_contribution(window, digest, timeout=timeout)
    receipt.raise_for_status()
    logger.info("window %d: committed %s… in block %d", window, digest[:16], receipt.block)
    return receipt.block


def commit_before_deadline(
    chain: Chain, window: int, digest: str, deadline_block: int, *, anyway: bool = False
) -> int | None:
    """Commit `digest` for `window` if the chain can still take it before
    `deadline_block`; returns the block that took it (at or past the deadline: late), or
    None when it was too late to try or the chain refused it (logged; no reveal follows
    either way). `anyway` commits past the deadline too (a backdater's cheat, for the
    tests that show it earns nothing)."""
    head = chain.block_number()
    if head >= deadline_block and not anyway:
        return None
    blocks = max(1, deadline_block - head) + 2
    try:
        return commit_contribution(
            chain, window, digest, timeout=blocks * chain.block_time_s + 10.0
        )
    except ChainError as exc:
        logger.warning("window %d: the ledger refused our commitment: %s", window, exc)
        return None


def committed_digests(
    chain: Chain, window: int, deadline_block: int
) -> Callable[[], Mapping[str, str] | None]:
    """For a bound averaging round (`averaging.participant`): a function that returns
    hotkey -> the manifest digest committed for `window` in a block before the deadline,
    once the chain has made the deadline block (None before: more could still come).
    It opens its own handle (`Chain.reopen`), so another thread may call it."""

    def read() -> Mapping[str, str] | None:
        with chain.reopen() as own:
            if own.block_number() < deadline_block:
                return None
            return {
                hotkey: c.digest
                for hotkey, c in own.contribution_commitments(window, block=deadline_block).items()
                if c.block < deadline_block
            }

    return read
