"""`tensormine chain run`: produce blocks on a clock until stopped.

    tensormine chain run --config configs/demo.yaml

One producer per ledger: the loop holds an exclusive `flock` on ``<ledger>.producer.lock``
so a second `chain run` (or `chain advance`) on the same file refuses to start instead of
forking the chain. Blocks come every `block_time_s` seconds of wall time; a producer that
falls behind (a slow epoch) does not burst to catch up, as a real chain does not. SIGINT
and SIGTERM stop it between blocks; SIGKILL at any moment loses nothing committed,
because every block is a single SQLite transaction.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from chain.errors import ChainError
from chain.ledger import BlockHeader, Ledger

logger = logging.getLogger(__name__)


def lock_path(db: Path) -> Path:
    return db.with_name(db.name + ".producer.lock")


@contextlib.contextmanager
def producer_lock(db: Path) -> Iterator[None]:
    """Hold the ledger's producer lock, or raise if another process holds it."""
    path = lock_path(db)
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ChainError(
                f"another process is producing blocks on {db} (lock {path} is held)"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def run_producer(
    ledger: Ledger,
    *,
    block_time_s: float | None = None,
    max_blocks: int | None = None,
    stop: threading.Event | None = None,
    on_block: Callable[[BlockHeader], None] | None = None,
) -> int:
    """Produce blocks until `stop` is set, `max_blocks` are made, or a signal arrives.

    Returns the number of blocks produced. Signal handlers are installed only when
    called from the main thread.
    """
    interval = ledger.config.block_time_s if block_time_s is None else block_time_s
    stop = stop or threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def _handle(signum: int, _frame: FrameType | None) -> None:
            logger.info("signal %d: stopping after the current block", signum)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _handle)
    produced = 0
    try:
        with producer_lock(ledger.path):
            next_at = time.monotonic() + interval
            while not stop.is_set() and (max_blocks is None or produced < max_blocks):
                if stop.wait(max(0.0, next_at - time.monotonic())):
                    break
                started = time.monotonic()
                header = ledger.produce_block()
                produced += 1
                took = time.monotonic() - started
                if took > interval:
                    logger.warning(
                        "block %d took %.2fs, longer than the block time", header.number, took
                    )
                if on_block is not None:
                    on_block(header)
                next_at = max(next_at + interval, time.monotonic())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return produced
