"""Commit, then reveal: how a miner hands its Δ of window w to the subnet.

    prepared = store.prepare_contribution(payload, keypair=kp, uid=uid, window=w, shard=s,
                                          compression=compression)
    block = commit_contribution(ledger, kp, w, prepared.digest, timeout=30)  # ChainError
    if block < deadline(w, cfg.window):
        wait_for_block(ledger, deadline(w, cfg.window))
        store.reveal_contribution(prepared)

Before window w's deadline a miner puts the sha256 of its signed manifest
(`store.manifest.commitment_digest`) on the ledger with the `commit_contribution`
extrinsic; the block that includes it is the commitment's time, a clock no miner can set
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
from pathlib import Path

from chain.keys import Keypair
from chain.ledger import Ledger

logger = logging.getLogger(__name__)

COMMIT_CALL = "commit_contribution"


def commit_contribution(
    ledger: Ledger, keypair: Keypair, window: int, digest: str, *, timeout: float
) -> int:
    """Commit `digest` for `window` under `keypair`'s hotkey and wait until a block
    includes it; returns that block. A refusal (not registered, a second commitment for
    the window, a malformed digest) raises the ledger's `ChainError`, naming the cause;
    no block within `timeout` seconds raises `chain.errors.NotIncluded`."""
    receipt = ledger.wait(
        ledger.submit_call(keypair, COMMIT_CALL, {"round": window, "digest": digest}),
        timeout=timeout,
    )
    receipt.raise_for_status()
    logger.info("window %d: committed %s… in block %d", window, digest[:16], receipt.block)
    return receipt.block


def committed_digests(
    ledger_path: Path, window: int, deadline_block: int
) -> Callable[[], Mapping[str, str] | None]:
    """For a bound averaging round (`averaging.participant`): a function that returns
    hotkey -> the manifest digest committed for `window` in a block before the deadline,
    once the ledger has made the deadline block (None before: more could still come).
    It opens its own connection, so another thread may call it."""

    def read() -> Mapping[str, str] | None:
        with Ledger(ledger_path) as ledger:
            if ledger.block_number() < deadline_block:
                return None
            return {
                hotkey: c.digest
                for hotkey, c in ledger.contribution_commitments(window).items()
                if c.block < deadline_block
            }

    return read
