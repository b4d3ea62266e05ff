"""Typed configuration of the DHT and of the per-shard all-reduce (the `averaging:` section).

    cfg = AveragingConfig(wire="fp16", robust=RobustConfig(kind="trimmed_mean", trim=0.25))

Defaults suit one machine on loopback. For a run across hosts set `dht.host` to the
interface to listen on and `dht.announce_maddrs` to the addresses others can reach
(e.g. ``/ip4/203.0.113.7/tcp/31337``); peers still find each other through the ledger.
Timeouts bound every wait: `ShardAverager.average` returns or raises within
``timeout + allreduce_timeout_s`` seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from averaging.config import SparseLoCoConfig, TopKConfig, lift_legacy_topk
from common.schema import StrictModel

if TYPE_CHECKING:  # the codec imports torch; configs must load without it
    from averaging.sparseloco import SparseSpec


class DHTConfig(StrictModel):
    """Where this participant's hivemind DHT listens and how it finds the others."""

    host: str = Field(default="127.0.0.1", description="interface to listen on (IPv4 or IPv6)")
    port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port")
    announce_maddrs: list[str] = Field(
        default_factory=list, description="public multiaddrs to announce (real runs behind NAT)"
    )
    initial_peers: list[str] = Field(
        default_factory=list, description="bootstrap multiaddrs, tried together with the ledger's"
    )
    peers_from_ledger: bool = Field(
        default=True, description="bootstrap from the multiaddrs other hotkeys committed"
    )
    max_ledger_peers: int = Field(default=16, ge=1, le=256)
    bootstrap_attempts: int = Field(default=2, ge=1, le=10)
    identity_path: Path | None = Field(
        default=None,
        description="libp2p private key (Ed25519, created 0600); None: a new peer id per start",
    )
    check_identity_free: bool = Field(
        default=False,
        description=(
            "refuse to start if another live peer uses the identity; hivemind's check dials "
            "the identity through the bootstrap peers and can hang for minutes after a crash, "
            "and reads RSA identities only (Ed25519 ones, the default now, skip it)"
        ),
    )
    identity_ttl_s: float = Field(
        default=3600.0, gt=0, le=7 * 86400, description="lifetime of the signed peer-id record"
    )
    startup_timeout_s: float = Field(
        default=60.0, gt=0, description="a DHT node not ready by then is restarted (or given up)"
    )


class RobustConfig(StrictModel):
    """How each reducer combines the contributions to its part (BTARD, arXiv 2106.11257)."""

    kind: Literal["mean", "trimmed_mean", "centered_clip"] = "mean"
    trim: float = Field(
        default=0.25, ge=0.0, lt=0.5, description="weight fraction cut from each tail"
    )
    clip_tau: float = Field(default=1.0, gt=0, description="clipping radius τ")
    clip_relative: bool = Field(
        default=True,
        description="τ is a multiple of the median distance to the starting center (scale-free)",
    )
    clip_iterations: int = Field(default=5, ge=1, le=100)


class AveragingConfig(StrictModel):
    """The all-reduce of one shard's pseudo-gradients Δ among that shard's miners."""

    enabled: bool = Field(
        default=True,
        description="average Δ with the shard's group over hivemind; off: each miner alone",
    )
    dht: DHTConfig = Field(default_factory=DHTConfig)
    wire: Literal["none", "fp16", "int8", "topk", "sparseloco"] = Field(
        default="fp16",
        description=(
            "codec on the wire; the dense ones and topk are all-reduced in hivemind's "
            "butterfly, sparseloco messages are all-gathered (`averaging.allgather`)"
        ),
    )
    topk: TopKConfig = Field(
        default_factory=TopKConfig, description="top-k of the wire (wire = topk)"
    )
    sparseloco: SparseLoCoConfig = Field(
        default_factory=SparseLoCoConfig, description="the SparseLoCo wire (wire = sparseloco)"
    )
    overlap: Literal["off", "delayed", "eager"] = Field(
        default="off",
        description=(
            "hide the round behind compute: the round of window w runs while w+1 trains and "
            "θ_{w+1} = outer(θ_w, average of w − 1) (delayed); eager: each miner also starts "
            "window w from outer(θ_w, its own committed Δ of w − 1) (`train.overlap`); "
            "no effect with averaging off"
        ),
    )
    robust: RobustConfig = Field(default_factory=RobustConfig)
    weights: Literal["uniform", "stake", "incentive", "trust"] = Field(
        default="trust",
        description=(
            "ledger field that weighs each member in the average: trust is the share of a "
            "miner's weight that survives consensus clipping, i.e. how far validators agree"
        ),
    )
    weight_floor: float = Field(
        default=1e-3,
        gt=0,
        description=(
            "least weight of a registered member (new ones have 0 trust; on a fresh subnet "
            "every member has the floor, so the average is uniform)"
        ),
    )
    min_group_size: int = Field(default=2, ge=1)
    target_group_size: int | None = Field(
        default=None, ge=2, description="start as soon as this many joined; None: wait it out"
    )
    min_matchmaking_time_s: float = Field(default=5.0, gt=0)
    request_timeout_s: float = Field(default=2.0, gt=0)
    sender_timeout_s: float = Field(
        default=10.0, gt=0, description="a sender silent this long is dropped"
    )
    allreduce_timeout_s: float = Field(default=60.0, gt=0)
    part_size_bytes: int = Field(
        default=1 << 17,
        ge=1 << 10,
        le=1 << 24,
        description="parts of the vector on the wire; small enough that every member reduces some",
    )
    topk_part_size_bytes: int = Field(
        default=1 << 20,
        ge=1 << 10,
        le=1 << 26,
        description=(
            "part_size_bytes for wire = topk, counted as if dense: a part of 1 MiB is 262,144 "
            "values, ~16 KB on the wire at 2 % density (hivemind cannot size sparse parts)"
        ),
    )
    state_timeout_s: float = Field(
        default=30.0, gt=0, description="how long a late joiner tries to download peers' state"
    )
    strict: bool = Field(
        default=True,
        description="accept a round only if every part was reduced over the same contributors",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        return lift_legacy_topk(data)

    @field_validator("overlap", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare `off` as false (`overlap: off`, `--set averaging.overlap=off`)."""
        return "off" if value is False else value

    @property
    def sparse_spec(self) -> SparseSpec | None:
        """The SparseLoCo message spec when the wire is sparseloco, else None."""
        if self.wire != "sparseloco":
            return None
        from averaging.sparseloco import SparseSpec  # here: it imports torch, configs do not

        cfg = self.sparseloco
        return SparseSpec(chunk=cfg.chunk, k=cfg.k, positions=cfg.positions)

    @property
    def overlap_mode(self) -> str:
        """`overlap` as it acts: "off" whenever averaging is (no group, no round to hide)."""
        return self.overlap if self.enabled else "off"

    @property
    def wire_part_size_bytes(self) -> int:
        """The part size hivemind cuts the vector by, for this wire codec."""
        return self.topk_part_size_bytes if self.wire == "topk" else self.part_size_bytes

    @model_validator(mode="after")
    def _timeouts_fit(self) -> AveragingConfig:
        if self.request_timeout_s >= self.min_matchmaking_time_s:
            raise ValueError("request_timeout_s must be shorter than min_matchmaking_time_s")
        if 2 * self.sender_timeout_s > self.allreduce_timeout_s:
            raise ValueError("allreduce_timeout_s must be at least 2 × sender_timeout_s")
        return self
