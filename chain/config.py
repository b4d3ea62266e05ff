"""Typed configuration of the chain (the `chain:` section of a run config).

Two backends answer to one `chain.interface.Chain`: `local` (default), the SQLite ledger
of `chain.ledger`, and `bittensor`, subtensor through the official SDK (`network`,
`netuid`, a wallet). The ledger's hyperparameters default to subtensor's for a subnet, so
a config that says nothing behaves like the real chain; the demo config shortens the
block time and the tempo. The connection fields (`CONNECTION_FIELDS`) say how a process
reaches the chain and are not part of a local ledger's genesis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from common.schema import StrictModel

RAO_PER_TAO = 1_000_000_000


class WalletConfig(StrictModel):
    """A Bittensor wallet as `btcli` lays it out: `<path>/<name>/coldkey`,
    `<path>/<name>/coldkeypub.txt`, `<path>/<name>/hotkeys/<hotkey>`."""

    name: str = Field(default="default", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    hotkey: str = Field(default="default", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    path: Path = Field(default=Path("~/.bittensor/wallets"), description="wallets folder")
    password_env: str = Field(
        default="TENSORMINE_COLDKEY_PASSWORD",
        description="environment variable holding the coldkey password (coldkey writes only)",
    )


# How a process reaches the chain: never part of a local ledger's genesis.
CONNECTION_FIELDS = frozenset(
    {"db", "backend", "network", "archive_network", "wallet", "retries", "cache_dir"}
)


class ChainConfig(StrictModel):
    """Which chain and how to reach it; for the local ledger, also its hyperparameters
    (written into the database at genesis)."""

    backend: Literal["local", "bittensor"] = Field(
        default="local", description="local: the SQLite ledger; bittensor: subtensor via the SDK"
    )
    network: str = Field(
        default="test",
        min_length=1,
        description="bittensor backend: finney | test | local | ws://host:port | wss://…",
    )
    archive_network: str | None = Field(
        default=None, description="archive endpoint for past-block reads when the node prunes"
    )
    wallet: WalletConfig = Field(default_factory=WalletConfig)
    retries: int = Field(default=3, ge=0, le=20, description="connection attempts beyond the first")
    cache_dir: Path | None = Field(
        default=None, description="bittensor SDK caches; default <run dir>/bittensor"
    )
    db: Path = Field(default=Path("runs/local/ledger.sqlite"), description="SQLite ledger file")
    netuid: int = Field(default=1, ge=0, le=65535)
    block_time_s: float = Field(default=12.0, gt=0, le=3600)
    tempo: int = Field(default=360, ge=1, le=65535, description="blocks between epochs")
    max_uids: int = Field(default=256, ge=1, le=4096)
    immunity_period: int = Field(default=4096, ge=0)
    max_validators: int = Field(default=64, ge=1, le=4096, description="top-K validator permits")
    validator_min_stake_rao: int = Field(default=1_000 * RAO_PER_TAO, ge=0)
    activity_cutoff: int = Field(default=5000, ge=1, description="blocks without weights")
    weights_rate_limit: int = Field(default=100, ge=0, description="blocks between set_weights")
    kappa: float = Field(default=0.5, ge=0.0, le=1.0)
    bonds_moving_average: int = Field(default=900_000, ge=0, le=1_000_000)
    bonds_penalty: float = Field(default=1.0, ge=0.0, le=1.0)
    yuma3: bool = False
    liquid_alpha: bool = False
    owner_cut_u16: int = Field(default=11796, ge=0, le=65535)
    registration_burn_rao: int = Field(default=0, ge=0)
    faucet_rao: int = Field(
        default=0, ge=0, description="dev chains only: largest faucet mint per call, 0 disables"
    )
    commit_reveal: bool = Field(
        default=True, description="weights are committed as a hash and revealed later"
    )
    reveal_period_epochs: int = Field(
        default=1, ge=1, le=100, description="epochs between a weights commit and its reveal"
    )

    def genesis_dict(self) -> dict[str, object]:
        """The ledger hyperparameters, as a local ledger's genesis records them."""
        return self.model_dump(mode="json", exclude=set(CONNECTION_FIELDS))

    @property
    def bond_alpha(self) -> float:
        """Weight of the new bonds in the EMA: 1 - BondsMovingAverage / 10^6."""
        return 1.0 - self.bonds_moving_average / 1_000_000
