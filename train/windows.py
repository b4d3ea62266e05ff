"""Windows on the ledger: which window a block is in, and when its contributions are due.

Window w spans blocks [w·B, (w+1)·B) with B = `window.blocks`. A miner commits to its
contribution for window w on the ledger (a hash) in a block before the deadline
(w+1)·B − `publish_margin`, and reveals it in the store from the deadline on, before
`reveal_deadline` (`reveal_blocks` later), when validators list what was revealed. So no
miner can read another's Δ of the window before its own commitment is final.

    window_of(block, cfg)     start_block(w, cfg)     deadline(w, cfg)
    meeting_block(w, cfg)     reveal_deadline(w, cfg)
    block_time(ledger, deadline(w, cfg), anchor=start_block(w, cfg))   # unix time
"""

from __future__ import annotations

import logging
import time

from chain.ledger import Ledger
from train.config import WindowConfig

logger = logging.getLogger(__name__)


def window_of(block: int, cfg: WindowConfig) -> int:
    return block // cfg.blocks


def start_block(window: int, cfg: WindowConfig) -> int:
    return window * cfg.blocks


def deadline(window: int, cfg: WindowConfig) -> int:
    """The first block at which a contribution for `window` is late."""
    return (window + 1) * cfg.blocks - cfg.publish_margin


def meeting_block(window: int, cfg: WindowConfig) -> int:
    """When the averaging groups of `window` meet: at the deadline block, when no
    commitment for the window can be made any more (matchmaking starts before it, and
    miners reveal while it runs)."""
    return deadline(window, cfg)


def reveal_deadline(window: int, cfg: WindowConfig) -> int:
    """The block at which validators list the revealed contributions of `window`."""
    return deadline(window, cfg) + cfg.reveal_blocks


def block_time(ledger: Ledger, block: int, *, anchor: int) -> float:
    """When `block` is due (unix time): the `anchor` block's timestamp plus one block time
    per block after it. Processes that use the same (produced) anchor get the same answer
    whatever the head is when they ask, so they can agree on a moment to meet."""
    header = ledger.block(anchor)
    if header is None:
        head = ledger.block_number()
        raise ValueError(f"anchor block {anchor} is not produced yet (head {head})")
    return header.timestamp + (block - anchor) * ledger.config.block_time_s


def wait_for_block(ledger: Ledger, block: int, *, timeout: float | None = None) -> int:
    """Poll until the ledger's head reaches `block`; returns the head.

    Raises `TimeoutError` naming the ledger when no block arrives for `timeout` seconds
    (default: 20 block times), which usually means no `tensormine chain run` is running.
    """
    block_time = ledger.config.block_time_s
    limit = timeout if timeout is not None else max(10.0, 20 * block_time)
    last_head, last_change = ledger.block_number(), time.monotonic()
    while True:
        head = ledger.block_number()
        if head >= block:
            return head
        if head != last_head:
            last_head, last_change = head, time.monotonic()
        elif time.monotonic() - last_change > limit:
            raise TimeoutError(
                f"the ledger {ledger.path} made no block for {limit:.0f}s (head {head}); "
                "is `tensormine chain run` producing blocks?"
            )
        time.sleep(min(0.5, block_time / 4))
