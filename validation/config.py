"""Typed configuration of the validator (the `validation:` section of a run config).

    validation:
      heldout_pages: 32        # |E|: held-out pages drawn with the validator's secret
      probe_lr: null           # step along Δ when measuring it; null = outer.lr / contributions
      norm_clip: 1.0           # measure Δ clipped to this × the median norm of its shard's Δs
      heldout_files: []        # private held-out text/JSON/parquet files (E drawn from them)
      own_data_pairs: 8        # (assigned page, unassigned neighbour) pairs per contribution
      own_data_grace_t: 1.5    # an inconclusive t in [this, own_data_min_t) after a pass: credit
      heldout_rival_pages: 8   # generic train pages the held-out-rival check compares E with
      heldout_rival_ratio: 0.3 # gain on E ≥ this × gain on own pages (beyond generic): none
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

from common.schema import StrictModel


class ValidationConfig(StrictModel):
    """How a validator measures, judges and pays contributions."""

    heldout_pages: int = Field(
        default=32, ge=1, description="|E|: held-out pages per window, drawn with the secret"
    )
    heldout_files: list[str] = Field(
        default_factory=list,
        description="private held-out files (globs of .txt/.json/.jsonl/.parquet, text in "
        "data.text_field), made into pages like the run's data; E is drawn from them instead "
        "of the public held-out split",
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
    own_data_grace_t: float = Field(
        default=1.5,
        ge=0.0,
        description="an inconclusive gap (this ≤ t < own_data_min_t, margin above the minimum) "
        "still earns credit when the miner passed its previous checked window; "
        "≥ own_data_min_t turns the grace off",
    )
    heldout_rival_pages: int = Field(
        default=8,
        ge=0,
        description="generic train pages (drawn with the secret, the same for all miners) the "
        "held-out-rival check measures E's gain against; 0 turns the check off",
    )
    heldout_rival_ratio: float = Field(
        default=0.3,
        gt=0.0,
        description="no credit when the gain on the public held-out sample E beyond generic "
        "train pages reaches this × the gain on the miner's own pages beyond them (and its t "
        "reaches own_data_min_t)",
    )
    pow_checks: float = Field(
        default=1.0,
        ge=0.0,
        description="segments of each contribution's committed trajectory the validator "
        "recomputes (proof of work, `validation.proof_of_work`), on average: the whole "
        "part always, one more with the fraction's probability (0.5 = half of the "
        "contributions get one); 0 turns the checks off",
    )
    pow_answer_s: float = Field(
        default=20.0,
        gt=0.0,
        description="seconds after its challenges within which a miner's answer must be in "
        "its store; a missing answer fails the check",
    )
    pow_max_rel_error: float = Field(
        default=0.05,
        gt=0.0,
        description="largest ‖claimed − recomputed update‖ / ‖recomputed update‖ of a segment",
    )
    pow_min_cosine: float = Field(
        default=0.99,
        ge=-1.0,
        le=1.0,
        description="least cosine between a segment's claimed and recomputed updates",
    )
    pow_fail_resets: bool = Field(
        default=True,
        description="a failed proof of work also resets the miner's score moving average to 0",
    )
    probe_lr: float | None = Field(
        default=None,
        gt=0.0,
        description="step along each Δ when measuring it (θ_w − step·Δ); None = outer.lr / the "
        "number of admitted contributions of its shard, its share of the aggregate step",
    )
    norm_clip: float = Field(
        default=1.0,
        ge=0.0,
        description="measure a Δ scaled down to at most this × the median norm of its shard's "
        "admitted Δs (inflating a Δ earns nothing); 0 = off",
    )
    heldout_rival_strikes: int = Field(
        default=2,
        ge=1,
        description="flagged held-out-rival verdicts in a row before a miner loses the "
        "window's credit (1 = at the first)",
    )
    copy_threshold: float = Field(
        default=0.8,
        gt=0.0,
        lt=1.0,
        description="residual cosine (shared direction removed) above which a later Δ is a copy",
    )
    copy_family_gap: float = Field(
        default=0.15,
        gt=0.0,
        lt=1.0,
        description="a row whose removal alone drops a pair's cosine this far below the median "
        "row's is the pair's family (a near-duplicate), left out of the shared direction",
    )
    replay_threshold: float = Field(
        default=0.95,
        gt=0.0,
        le=1.0,
        description="cosine with a Δ admitted in the last window above which a Δ is a replay "
        "of it (commit before reveal rules out copies within a window, not replays)",
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
