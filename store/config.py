"""Typed configuration of the checkpoint and contribution store (the `store:` section).

    store:
      backend: local                 # or "hub"
      root: runs/local/store         # the local backend's folder
      max_shard_size: 2GB            # checkpoints are split into safetensors shards above this
      max_contribution_bytes: 1073741824
      hub:
        checkpoint_repo: my-org/tensormine-model
        contributions_repo: my-miner/tensormine-contributions
        contributions_repo_type: dataset

The Hub token is never part of the config: it comes from `HF_TOKEN` (or `hf auth login`).
The Hub address comes from `hub.endpoint`, else `HF_ENDPOINT`, else huggingface.co.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from common.schema import StrictModel

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(value: int | str) -> int:
    """Bytes in ``2GB`` / ``500MiB`` / ``1048576`` (decimal units as `transformers` reads them)."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a size like 2GB, 500MiB or 1048576")
    unit = (match.group(2) or "B").lower()
    return int(float(match.group(1)) * _UNITS[unit])


class HubSection(StrictModel):
    """Where the Hub backend writes, and how hard it tries when the Hub is busy."""

    checkpoint_repo: str | None = Field(
        default=None, description="model repo of the global model, e.g. my-org/tensormine-model"
    )
    contributions_repo: str | None = Field(
        default=None, description="repo that holds this miner's contributions (its own repo)"
    )
    contributions_repo_type: Literal["model", "dataset"] = "dataset"
    private: bool = False
    endpoint: str | None = Field(
        default=None, description="Hub URL; default: $HF_ENDPOINT, else https://huggingface.co"
    )
    max_retries: int = Field(default=5, ge=0, le=20, description="retries on 429/5xx/network")
    backoff_s: float = Field(default=1.0, ge=0.0, le=60.0, description="first retry delay")
    max_backoff_s: float = Field(default=30.0, ge=0.0, le=600.0)

    @field_validator("checkpoint_repo", "contributions_repo")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        if value is not None and not REPO_ID.match(value):
            raise ValueError(f"{value!r} is not a Hub repo id like my-org/my-model")
        return value


class StoreConfig(StrictModel):
    """The store of one process: backend, where it lives, and the limits it enforces."""

    backend: Literal["local", "hub"] = "local"
    root: Path = Field(default=Path("runs/local/store"), description="local backend folder")
    cache_dir: Path | None = Field(
        default=None, description="Hub download cache; default: the Hugging Face cache"
    )
    max_shard_size: int | str = Field(
        default="2GB", description="checkpoint weights are sharded above this size"
    )
    max_contribution_bytes: int = Field(default=2**30, ge=1, description="per tensor file")
    max_checkpoint_file_bytes: int = Field(default=50 * 10**9, ge=1, description="per file")
    max_header_bytes: int = Field(
        default=16 * 2**20, ge=64, le=100_000_000, description="safetensors JSON header limit"
    )
    progress_min_bytes: int = Field(
        default=50 * 2**20, ge=0, description="show a progress bar for pulls at least this big"
    )
    hub: HubSection = HubSection()

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, value: int | str) -> int | str:
        if parse_size(value) < 1:
            raise ValueError("must be at least one byte")
        return value

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)
