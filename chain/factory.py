"""Open the configured chain: `open_chain(cfg.chain, identity)` -> a `Chain`.

`chain.backend: local` opens the SQLite ledger at `chain.db`; `bittensor` connects to
`chain.network` through the SDK (imported only then, so the local path never loads it).
"""

from __future__ import annotations

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
