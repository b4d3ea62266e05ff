"""Typed configuration of the outer step, of pseudo-gradient compression and of top-k.

`TopKConfig` is the one description of chunked top-k, used by both the published Δ
(`compression.topk`) and the all-reduce wire (`averaging.topk`), so both take the same
bounds; a payload's params are checked against the same ones (`averaging.compression`).
The flat keys of earlier versions (``topk_density``, ``topk_chunk``) are still read.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from common.schema import StrictModel

TOPK_CHUNK_RANGE = (64, 1 << 20)
_LEGACY_TOPK = {"topk_density": "density", "topk_chunk": "chunk"}


class OuterConfig(StrictModel):
    """Nesterov SGD on the averaged pseudo-gradient (DiLoCo: lr 0.7, momentum 0.9)."""

    lr: float = Field(default=0.7, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = True


class TopKConfig(StrictModel):
    """Chunked top-k (SparseLoCo, arXiv 2508.15706): of every `chunk` consecutive values,
    the ⌈density·chunk⌉ largest in magnitude are kept."""

    density: float = Field(default=0.02, gt=0, le=1, description="kept fraction per chunk")
    chunk: int = Field(
        default=4096,
        ge=TOPK_CHUNK_RANGE[0],
        le=TOPK_CHUNK_RANGE[1],
        description="values per chunk; top-k is taken per chunk",
    )


class SparseLoCoConfig(StrictModel):
    """The SparseLoCo wire (`averaging.sparseloco`): `k` of every `chunk` values, 2-bit
    values and packed indices, and the sender's error-feedback buffer decaying by
    `error_decay` (β) each window."""

    chunk: int = Field(default=4096, ge=64, le=1 << 16, description="values per chunk")
    k: int = Field(default=64, ge=1, description="values kept per full chunk")
    error_decay: float = Field(
        default=0.95, ge=0, le=1, description="β in e ← β·e + Δ (1: nothing is forgotten)"
    )
    positions: Literal["packed", "rice"] = Field(
        default="rice",
        description="kept positions as fixed-width indices (the paper's 12 bits) or as "
        "Rice-coded gaps (~7.5 bits, lossless; `averaging.sparseloco`)",
    )

    @model_validator(mode="after")
    def _k_fits(self) -> SparseLoCoConfig:
        if self.k > self.chunk:
            raise ValueError(f"k ({self.k}) cannot exceed chunk ({self.chunk})")
        return self


def lift_legacy_topk(data: Any) -> Any:
    """``{"topk_density": d, "topk_chunk": c}`` -> ``{"topk": {"density": d, "chunk": c}}``."""
    if not isinstance(data, dict) or not set(_LEGACY_TOPK) & set(data):
        return data
    if "topk" in data:
        raise ValueError("give top-k settings either as topk: {density, chunk} or flat, not both")
    out = {k: v for k, v in data.items() if k not in _LEGACY_TOPK}
    out["topk"] = {new: data[old] for old, new in _LEGACY_TOPK.items() if old in data}
    return out


class CompressionConfig(StrictModel):
    """How a pseudo-gradient is encoded for publication."""

    scheme: Literal["none", "fp16", "int8", "topk", "sparseloco"] = "none"
    int8_block_size: int = Field(default=256, ge=8, le=1 << 20)
    topk: TopKConfig = Field(default_factory=TopKConfig)
    sparseloco: SparseLoCoConfig = Field(
        default_factory=lambda: SparseLoCoConfig(positions="packed"),
        description="the SparseLoCo message (scheme = sparseloco; its buffer always feeds back)",
    )
    error_feedback: bool = Field(
        default=True, description="keep what top-k dropped, add it next time"
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        data = lift_legacy_topk(data)
        # A publication's message packs its positions unless told otherwise (the wire's
        # default, Rice, does not fit a manifest; see below).
        if isinstance(data, dict) and isinstance(data.get("sparseloco"), dict):
            data = {**data, "sparseloco": {"positions": "packed", **data["sparseloco"]}}
        return data

    @model_validator(mode="after")
    def _packed_positions(self) -> CompressionConfig:
        # A publication's manifest lists every tensor's exact shape before the file is read
        # (`averaging.compression.expected_specs`); Rice-coded positions vary in length.
        if self.sparseloco.positions != "packed":
            raise ValueError(
                "compression.sparseloco.positions must be packed: a publication's tensors "
                "have fixed sizes (Rice-coded positions are for averaging.sparseloco, the wire)"
            )
        return self
