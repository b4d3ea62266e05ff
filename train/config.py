"""Typed configuration of the model, the data, the inner loop, windows and W&B.

The `model:` section is the whole architecture, so a preset is just a YAML file
(`configs/tiny.yaml`, `configs/small.yaml`, `configs/1b.yaml`). Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from common.schema import StrictModel


class ModelConfig(StrictModel):
    """A causal LM built from this config (no weight download): a Llama, or with
    ``arch: mixtral`` a Mixtral mixture of experts whose experts can be shards
    (`train.moe`; `intermediate_size` is then each expert's)."""

    arch: Literal["llama", "mixtral"] = "llama"
    vocab_size: int = Field(default=4096, ge=259, le=262144)
    hidden_size: int = Field(default=256, ge=8)
    intermediate_size: int = Field(default=688, ge=8)
    num_layers: int = Field(default=4, ge=1)
    num_heads: int = Field(default=4, ge=1)
    num_kv_heads: int = Field(default=4, ge=1)
    max_seq_len: int = Field(default=256, ge=8)
    rope_theta: float = Field(default=10000.0, gt=0)
    init_std: float = Field(default=0.02, gt=0)
    shards: int = Field(
        default=1,
        ge=1,
        description="S: shards of whole layers (mixtral: the shared parameters, then S − 1 "
        "equal groups of experts); 1 = data parallel",
    )
    num_experts: int = Field(default=8, ge=2, le=256, description="mixtral: experts per layer")
    experts_per_token: int = Field(default=2, ge=1, description="mixtral: top-k routing")
    router_aux_loss_coef: float = Field(
        default=0.01, ge=0, description="mixtral: weight of the load-balancing loss in training"
    )

    @property
    def expert_shards(self) -> bool:
        """Whether the shards are a shared shard (0) plus groups of experts (1 … S − 1)."""
        return self.arch == "mixtral" and self.shards > 1

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}"
            )
        if self.arch == "mixtral":
            if self.experts_per_token > self.num_experts:
                raise ValueError(
                    f"experts_per_token {self.experts_per_token} > num_experts {self.num_experts}"
                )
            if self.shards > 1 and self.num_experts % (self.shards - 1):
                raise ValueError(
                    f"shards {self.shards}: the shared shard plus {self.shards - 1} expert "
                    f"groups, which must divide num_experts {self.num_experts}"
                )
            return self
        if self.shards > self.num_layers + 2:
            raise ValueError(
                f"shards {self.shards} > {self.num_layers + 2} units "
                f"(embeddings, {self.num_layers} layers, head)"
            )
        return self


class DataConfig(StrictModel):
    """Where documents come from and how they become pages."""

    source: Literal["stdlib", "files", "hub"] = "stdlib"
    files: list[str] = Field(
        default_factory=list, description="globs of .txt/.json/.jsonl/.parquet"
    )
    dataset: str | None = Field(default=None, description="Hub dataset id when source = hub")
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    max_documents: int | None = Field(default=None, ge=1)
    max_pages: int | None = Field(default=None, ge=1, description="cap on pages (streaming)")
    tokenizer: str | None = Field(default=None, description="Hub tokenizer name; None = train BPE")
    seq_len: int = Field(default=128, ge=8, description="tokens per page")
    heldout_fraction: float = Field(default=0.05, gt=0.0, lt=0.5)
    cache_dir: Path | None = Field(default=None, description="default: <run.dir>/data")
    topic_field: str | None = Field(
        default=None,
        description="column naming each document's topic (files/hub), the key of the "
        "expert-affinity partition; stdlib: the top-level package; None: each document its own",
    )
    expert_affinity: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="share of an expert-group miner's pages drawn from its group's partition "
        "of the corpus (by topic; model.arch mixtral, model.shards >= 2); 0 = off",
    )

    @model_validator(mode="after")
    def _source(self) -> DataConfig:
        if self.source == "files" and not self.files:
            raise ValueError("source = files needs data.files (glob patterns)")
        if self.source == "hub" and not self.dataset:
            raise ValueError("source = hub needs data.dataset (a Hub dataset id)")
        return self


class TrainConfig(StrictModel):
    """The inner loop (DiLoCo, arXiv 2311.08105): H AdamW steps per window."""

    inner_steps: int = Field(default=20, ge=1, description="H")
    batch_size: int = Field(default=8, ge=1, description="pages per optimizer step, all processes")
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_steps: int = Field(default=5, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    eval_pages: int = Field(
        default=16, ge=1, description="held-out pages the miner reports its loss on each window"
    )
    pow_segments: int = Field(
        default=10,
        ge=0,
        description="segments of the inner trajectory a miner commits to (the digest of its "
        "shard state at each bound) for validators' proof-of-work spot checks (at most H); "
        "0 = none",
    )
    pow_keep_windows: int = Field(
        default=2,
        ge=1,
        description="windows whose trajectory states a miner keeps on disk to answer challenges",
    )

    @property
    def trajectory_segments(self) -> int:
        """Segments a trajectory is cut into: `pow_segments`, at most one per step."""
        return min(self.pow_segments, self.inner_steps)

    @property
    def pages_per_window(self) -> int:
        return self.inner_steps * self.batch_size


class WindowConfig(StrictModel):
    """Time on the ledger: window w spans blocks [w·blocks, (w+1)·blocks)."""

    blocks: int = Field(default=30, ge=2, description="ledger blocks per window")
    publish_margin: int = Field(
        default=2, ge=0, description="blocks before the window ends by which contributions are due"
    )
    reveal_blocks: int = Field(
        default=2,
        ge=1,
        description="blocks after the deadline within which a miner reveals the contribution "
        "it committed to; validators list contributions once that block exists",
    )
    canonical_wait: float = Field(
        default=0.5,
        ge=0.0,
        le=0.9,
        description="fraction of a window an out-of-step miner waits for the canonical θ_w",
    )

    @model_validator(mode="after")
    def _margin(self) -> WindowConfig:
        if self.publish_margin >= self.blocks:
            raise ValueError("publish_margin must be smaller than blocks")
        return self
