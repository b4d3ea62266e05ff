"""Open the configured chain: `open_chain(cfg.chain, identity)` -> a `Chain`.

`chain.backend: local` opens the SQLite ledger at `chain.db`; `bittensor` connects to
`chain.network` through the SDK (imported only then, so the local path never loads it).
"""

from __future__ import annotations

import threading
from pathlib import Path

from chain.config import ChainConfig
from chain.interface import Chain, Identity


def open_chain(
    config: ChainConfig, identity: Identity | None = None, *, state_dir: Path | None = None
) -> Chain:
    """A handle on the configured chain, bound to `identity` for writes (or read-only).
    `state_dir`: the program's own folder, where a local ledger's validator keeps the
    secrets of weights it committed and has not revealed yet (so a restart reveals them;
    on Bittensor the chain reveals timelocked commits itself)."""
    if config.backend == "local":
        from chain.local import LocalChain

        reveals = None if state_dir is None else state_dir / "reveals"
        return LocalChain.open(config.db, identity, reveals_dir=reveals)
    from chain.bittensor import BittensorChain

    return BittensorChain.connect(config, identity)


class ChainSource:
    """A handle on the chain for whichever thread asks: `get()` gives each thread its own
    (`Chain.reopen`), since a handle belongs to the thread that opened it (the local
    ledger's SQLite connection, the SDK client's event loop) and averaging runs in
    background threads while the miner trains; its own, too, so it outlives the handle
    it was made from. A path opens the local ledger there."""

    def __init__(self, chain: Chain | Path | str) -> None:
        self._base: Chain | None = chain if isinstance(chain, Chain) else None
        self._path = None if isinstance(chain, Chain) else Path(chain)
        self._local = threading.local()

    def get(self) -> Chain:
        chain: Chain | None = getattr(self._local, "chain", None)
        if chain is None:
            if self._base is not None:
                chain = self._base.reopen()
            else:
                from chain.local import LocalChain

                assert self._path is not None
                chain = LocalChain.open(self._path)
            self._local.chain = chain
        return chain
