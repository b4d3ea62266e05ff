"""Typed configuration of the local subnet (the `subnet:` section of a run config).

    subnet:
      miners: 4
      validators: 2
      windows: 5
      adversaries: [free-rider]      # the last miners misbehave, the rest are honest
      validator_stake_tao: [1500, 800]

`tensormine subnet up` reads it; its options (`--miners`, `--windows`, ...) are shorthands
for ``--set subnet.<key>=...``. Checks that need other sections (stake against the
ledger's permit threshold, validators against the permit slots) live in `check`, which
runs before anything starts, so a bad mix fails in a second instead of after minutes.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from chain.config import RAO_PER_TAO, ChainConfig
from common.errors import ConfigError
from common.schema import StrictModel
from train import behaviours
from train.behaviours import flag_spelling

# The miner behaviours of `train.behaviours`, spelled as flags; "honest" is every miner
# not listed.
BEHAVIOURS: tuple[str, ...] = tuple(flag_spelling(b) for b in behaviours.BEHAVIOURS)


class SubnetConfig(StrictModel):
    """How many of each participant to start, how long, and with how much stake."""

    miners: int = Field(default=4, ge=1, le=64)
    validators: int = Field(default=2, ge=0, le=64)
    windows: int = Field(
        default=5,
        ge=1,
        description="windows every miner trains in the run (a resumed run trains the rest)",
    )
    processes_per_miner: int = Field(
        default=1, ge=1, le=16, description="accelerate processes (DDP) per miner"
    )
    adversaries: list[str] = Field(
        default_factory=list,
        description="behaviours of the last len(adversaries) miners; the others are honest",
    )
    validator_stake_tao: list[float] = Field(
        default_factory=lambda: [1500.0, 800.0],
        min_length=1,
        description="stake of validator i (the last value repeats for further validators)",
    )
    validator_fund_tao: float = Field(
        default=2000.0, ge=0, description="faucet credit per validator (covers its stake)"
    )
    miner_fund_tao: float = Field(default=0.0, ge=0, description="faucet credit per miner")
    keys_dir: Path | None = Field(default=None, description="default: <run.dir>/keys")
    threads_per_process: int = Field(
        default=1, ge=1, le=256, description="OMP_NUM_THREADS of each child (CPU runs)"
    )
    drain_windows: int = Field(
        default=2,
        ge=0,
        le=100,
        description="windows validators may run past the miners' last one to score it",
    )
    stop_grace_s: float = Field(
        default=5.0, gt=0, le=120, description="SIGINT/SIGTERM to SIGKILL, for every child"
    )
    refresh_s: float = Field(default=1.0, gt=0, le=60, description="live view refresh")
    sample_prompt: str = Field(default="def ", description="prompt for the final text sample")
    sample_tokens: int = Field(default=48, ge=0, le=1024, description="0 skips the sample")

    @field_validator("adversaries", mode="before")
    @classmethod
    def _spelling(cls, value: object) -> object:
        # train.adversary spells them free_rider / wrong_data; accept both.
        if isinstance(value, list):
            spelled = [flag_spelling(v) if isinstance(v, str) else v for v in value]
            unknown = [v for v in spelled if v not in BEHAVIOURS]
            if unknown:
                raise ValueError(f"unknown behaviours {unknown}; one of {', '.join(BEHAVIOURS)}")
            return spelled
        return value

    @model_validator(mode="after")
    def _mix(self) -> SubnetConfig:
        if len(self.adversaries) >= self.miners:
            raise ValueError(
                f"{len(self.adversaries)} adversaries need at least "
                f"{len(self.adversaries) + 1} miners: keep one honest miner"
            )
        if any(s <= 0 for s in self.validator_stake_tao):
            raise ValueError("validator_stake_tao values must be > 0")
        return self

    def stake_rao(self, index: int) -> int:
        """Stake of validator `index` in rao."""
        stakes = self.validator_stake_tao
        return round(stakes[min(index, len(stakes) - 1)] * RAO_PER_TAO)

    def behaviour(self, index: int) -> str:
        """Behaviour of miner `index`: adversaries take the last slots."""
        first_adversary = self.miners - len(self.adversaries)
        return "honest" if index < first_adversary else self.adversaries[index - first_adversary]

    def keys_folder(self, run_dir: Path) -> Path:
        return self.keys_dir or run_dir / "keys"


def check(sub: SubnetConfig, chain: ChainConfig) -> list[str]:
    """Checks across the `subnet` and `chain` sections; raises `ConfigError` for a mix
    that cannot work and returns warnings (one line each) for one that works but may
    surprise."""
    errors: list[str] = []
    warnings: list[str] = []
    if chain.backend != "local":
        # `subnet up` runs a ledger of its own (genesis, faucet, block producer): no real
        # chain offers that. On Bittensor each miner and validator starts by itself.
        raise ConfigError(
            f"subnet up runs a local ledger; chain.backend is {chain.backend!r}. On Bittensor "
            "start each participant with `tensormine miner` / `tensormine validator` "
            "(README: On Bittensor)"
        )
    min_stake = chain.validator_min_stake_rao / RAO_PER_TAO
    if sub.validators > chain.max_validators:
        errors.append(
            f"subnet.validators {sub.validators} > chain.max_validators {chain.max_validators}: "
            "the extra validators would get no permit"
        )
    for i in range(sub.validators):
        stake = sub.stake_rao(i)
        if stake < chain.validator_min_stake_rao:
            errors.append(
                f"validator {i}: stake {stake / RAO_PER_TAO:,.0f} τ is below "
                f"chain.validator_min_stake_rao ({min_stake:,.0f} τ)"
            )
        fund = round(sub.validator_fund_tao * RAO_PER_TAO)
        if fund < stake:
            errors.append(
                f"subnet.validator_fund_tao {sub.validator_fund_tao:,} is below validator {i}'s "
                f"stake {stake / RAO_PER_TAO:,.0f} τ"
            )
    for key, amount in (
        ("validator_fund_tao", sub.validator_fund_tao if sub.validators else 0),
        ("miner_fund_tao", sub.miner_fund_tao),
    ):
        if amount > 0 and chain.faucet_rao == 0:
            errors.append(f"subnet.{key} needs a faucet: set chain.faucet_rao (dev ledgers)")
    if sub.validators == 0 and sub.adversaries:
        warnings.append("adversaries without validators: nobody scores them")
    if chain.max_validators > max(sub.validators, 1):
        # A miner whose emission (staked to it) passes the threshold would take a free
        # permit slot and stop being a miner; top-K slots == validators rules that out.
        warnings.append(
            f"chain.max_validators {chain.max_validators} > subnet.validators "
            f"{sub.validators}: a miner that earns {min_stake:,.0f} τ "
            "gets a validator permit and stops mining (set chain.max_validators to the "
            "number of validators)"
        )
    if errors:
        raise ConfigError("\n".join(errors))
    return warnings
