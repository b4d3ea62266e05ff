"""Typed configuration of the ledger (the `chain:` section of a run config).

Defaults are subtensor's for a subnet, so a config that says nothing behaves like the real
chain; the demo config shortens the block time and the tempo.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tensormine.schema import StrictModel

RAO_PER_TAO = 1_000_000_000


class ChainConfig(StrictModel):
    """Everything the ledger needs to know; written into the database at genesis."""

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

    @property
    def bond_alpha(self) -> float:
        """Weight of the new bonds in the EMA: 1 - BondsMovingAverage / 10^6."""
        return 1.0 - self.bonds_moving_average / 1_000_000
