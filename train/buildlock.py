"""One builder at a time for a cached artifact that several processes need at once.

    with build_lock(folder):
        if not (folder / "meta.json").is_file():
            build_into(folder)

The miners and validators of a local subnet start together and all need the same page
cache and tokenizer; without a lock each builds them (10 s of CPU apiece on the demo's
corpus, all on the same two cores) and all but one throw the result away. The lock is an
`flock` on a sibling file: the kernel drops it when its holder dies, so a crashed builder
never blocks the others, and the artifact itself is still written atomically (temporary
folder, then rename), so a reader without the lock never sees half of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock named after `target` (its parent folder is created)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            started = time.monotonic()
            logger.info("waiting for another process to build %s", target.name)
            fcntl.flock(fd, fcntl.LOCK_EX)
            logger.info("%s: waited %.1f s", target.name, time.monotonic() - started)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
