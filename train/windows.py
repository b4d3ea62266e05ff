"""Windows on the ledger: which window a block is in, and when its contributions are due.

Window w spans blocks [w·B, (w+1)·B) with B = `window.blocks`. A miner commits to its
contribution for window w on the ledger (a hash) in a block before the deadline
(w+1)·B − `publish_margin`, and reveals it in the store from the deadline on, before
`reveal_deadline` (`reveal_blocks` later), when validators list what was revealed. So no
miner can read another's Δ of the window before its own commitment is final.

    window_of(block, cfg)     start_block(w, cfg)     deadline(w, cfg)
    meeting_block(w, cfg)     reveal_deadline(w, cfg)
    block_time(chain, deadline(w, cfg), anchor=start_block(w, cfg))    # unix time
"""

from __future__ import annotations

import logging
import time

from chain.interface import Chain
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


def joinable_window(block: int, cfg: WindowConfig) -> int:
    """The window a miner that is ready at `block` trains next: the current one while at
    most half of it has passed (time to train and publish before the deadline), else the
    next one."""
    window = window_of(block, cfg)
    passed = block - start_block(window, cfg)
    return window if passed * 2 <= cfg.blocks else window + 1


def reveal_deadline(window: int, cfg: WindowConfig) -> int:
    """The block at which validators list the revealed contributions of `window`."""
    return deadline(window, cfg) + cfg.reveal_blocks


def block_time(chain: Chain, block: int, *, anchor: int) -> float:
    """When `block` is due (unix time): the `anchor` block's timestamp plus one block time
    per block after it. Processes that use the same (produced) anchor get the same answer
    whatever the head is when they ask, so they can agree on a moment to meet."""
    header = chain.block(anchor)
    if header is None:
        head = chain.block_number()
        raise ValueError(f"anchor block {anchor} is not produced yet (head {head})")
    return header.timestamp + (block - anchor) * chain.block_time_s


def wait_for_block(chain: Chain, block: int, *, timeout: float | None = None) -> int:
    """Poll until the chain's head reaches `block`; returns the head.

    Raises `TimeoutError` naming the chain when no block arrives for `timeout` seconds
    (default: 20 block times), which on the local ledger usually means no
    `tensormine chain run` is running.
    """
    block_time = chain.block_time_s
    limit = timeout if timeout is not None else max(10.0, 20 * block_time)
    last_head, last_change = chain.block_number(), time.monotonic()
    while True:
        head = chain.block_number()
        if head >= block:
            return head
        if head != last_head:
            last_head, last_change = head, time.monotonic()
        elif time.monotonic() - last_change > limit:
            raise TimeoutError(
                f"{chain.describe} made no block for {limit:.0f}s (head {head}); "
                "is it producing blocks (`tensormine chain run` for a local ledger)?"
            )
        time.sleep(min(0.5, block_time / 4))
