"""Typed configuration of the validator (the `validation:` section of a run config).

    validation:
      heldout_pages: 32        # |E|: held-out pages drawn with the validator's secret
      own_data_pairs: 8        # (assigned page, unassigned neighbour) pairs per contribution
      copy_threshold: 0.8      # residual cosine above which a later Δ is a copy
      ema_alpha: 0.3           # weight of the newest window in the score moving average
      weights_every: 1         # set weights on the ledger every this many windows

Every number here decides who gets paid, so each is a field (written into every
checkpoint's provenance with the rest of the run config), never a constant in the code.
Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tensormine.schema import StrictModel


class ValidationConfig(StrictModel):
    """How a validator measures, judges and pays contributions."""

    heldout_pages: int = Field(
        default=32, ge=1, description="|E|: held-out pages per window, drawn with the secret"
    )
    own_data_pairs: int = Field(
        default=8,
        ge=0,
        description="pairs (assigned page, unassigned neighbour) for the own-data check; 0 = off",
    )
    own_data_lr_fraction: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="own-data pages come from inner steps whose lr is at least this × the peak",
    )
    own_data_min_margin: float = Field(
        default=0.0, description="mean paired improvement gap the own-data check requires (>)"
    )
    own_data_min_t: float = Field(
        default=2.0, ge=0.0, description="least t-statistic of the paired gap (noise guard)"
    )
    copy_threshold: float = Field(
        default=0.8,
        gt=0.0,
        lt=1.0,
        description="residual cosine (shared direction removed) above which a later Δ is a copy",
    )
    ema_alpha: float = Field(
        default=0.3, gt=0.0, le=1.0, description="weight of the newest score in the moving average"
    )
    weights_every: int = Field(default=1, ge=1, description="windows between set_weights calls")
    eval_batch: int = Field(default=8, ge=1, description="pages per forward pass")
    publish_checkpoint: bool = Field(
        default=True, description="publish the canonical θ_{w+1} to the store every window"
    )
    secret_file: Path | None = Field(
        default=None,
        description="file with the sampling secret (hex); default: derived from the hotkey seed",
    )
    group_tolerance: float = Field(
        default=0.05, gt=0.0, description="relative error above which a group average mismatches"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="where forward passes run; auto = cuda when available"
    )
