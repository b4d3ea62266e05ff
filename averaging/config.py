"""Typed configuration of the outer step and of pseudo-gradient compression."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tensormine.schema import StrictModel


class OuterConfig(StrictModel):
    """Nesterov SGD on the averaged pseudo-gradient (DiLoCo: lr 0.7, momentum 0.9)."""

    lr: float = Field(default=0.7, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = True


class CompressionConfig(StrictModel):
    """How a pseudo-gradient is encoded for publication (and later on the wire)."""

    scheme: Literal["none", "fp16", "int8", "topk"] = "none"
    int8_block_size: int = Field(default=256, ge=8, le=1 << 20)
    topk_density: float = Field(default=0.02, gt=0, le=1)
    topk_chunk: int = Field(default=4096, ge=64, description="top-k is taken per chunk")
    error_feedback: bool = Field(
        default=True, description="keep what top-k dropped, add it next time"
    )
