"""Checkpoints of the global model: a plain Hugging Face model folder plus its provenance.

    prov = Provenance(run_id="demo", window=12, parent_revision="window-11", ledger_block=4321,
                      contributors=[Contributor(uid=3, hotkey="5F...", score=0.8, weight=0.6)],
                      metrics={"loss": 3.21}, run_config=cfg.to_json_dict())
    prov = write_checkpoint_folder(model, tokenizer, folder, prov, max_shard_size="2GB")
    prov = verify_checkpoint_folder(folder, max_file_bytes=..., max_header_bytes=...)
    AutoModelForCausalLM.from_pretrained(folder)     # no tensormine code needed

The folder is what `save_pretrained` writes (``config.json``, ``model.safetensors`` or
shards with their index, ``generation_config.json``, tokenizer files) plus a ``README.md``
model card and ``tensormine.json``: the provenance (run, window, parent revision, ledger
block, the contributors with their scores and weights in the aggregate, metrics such as
the loss, the resolved run config) and the sha256 and size of every other file. A folder
is only accepted when every listed file matches, every weights file passes the
safetensors header check, and nothing unlisted (a pickle, say) sits beside them.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from store.config import parse_size
from store.errors import Rejected, first_problem
from store.fsio import sha256_file, write_atomic
from store.layout import safe_relpath
from store.safetensors_check import PICKLE_SUFFIXES, check_safetensors

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "tensormine.json"
# The outer optimizer's momentum that produced θ_{w+1}: part of the global state (θ_{w+2}
# depends on it), so a miner or validator that adopts this checkpoint continues exactly.
OUTER_STATE_FILE = "outer_state.safetensors"
PROVENANCE_MAX_BYTES = 64 * 2**20
FORMAT: Literal["tensormine-checkpoint/1"] = "tensormine-checkpoint/1"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Contributor(_Frozen):
    """One miner's part in the aggregate that produced this checkpoint."""

    uid: int = Field(ge=0)
    hotkey: str
    score: float
    weight: float = Field(description="its weight in the aggregate")
    shard: int | None = Field(default=None, ge=0, description="the shard its Δ went into")


class FileDigest(_Frozen):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Provenance(_Frozen):
    """The contents of ``tensormine.json``: where a checkpoint came from, and its files."""

    format: Literal["tensormine-checkpoint/1"] = FORMAT
    run_id: str
    window: int = Field(ge=0)
    parent_revision: str | None = None
    ledger_block: int | None = Field(default=None, ge=0)
    contributors: list[Contributor] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict, description="e.g. {'loss': 3.2}")
    run_config: dict[str, Any] = Field(default_factory=dict)
    fingerprint: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="`train.model.model_fingerprint` of the weights: every miner in step "
        "holds a model with this fingerprint",
    )
    created_at: str = ""
    files: dict[str, FileDigest] = Field(default_factory=dict)

    @field_validator("metrics")
    @classmethod
    def _finite(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [k for k, v in value.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"metrics must be finite: {bad}")
        return value

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


def provenance_bytes(prov: Provenance) -> bytes:
    return (prov.model_dump_json(indent=2) + "\n").encode()


def parse_provenance(body: bytes) -> Provenance:
    """Parse ``tensormine.json``; a bad one raises `Rejected("bad_manifest")`."""
    if len(body) > PROVENANCE_MAX_BYTES:
        raise Rejected("too_large", f"{PROVENANCE_FILE} is {len(body)} bytes")
    try:
        prov = Provenance.model_validate_json(body)
    except ValidationError as exc:
        problem = first_problem(exc, PROVENANCE_FILE)
        raise Rejected("bad_manifest", f"{PROVENANCE_FILE}: {problem}") from None
    check_file_list(prov)
    return prov


def check_file_list(prov: Provenance) -> None:
    """The listed files are safe to fetch: plain relative paths, safetensors weights only."""
    for name in prov.files:
        safe_relpath(name)
        if name == PROVENANCE_FILE:
            raise Rejected("bad_manifest", f"{PROVENANCE_FILE} cannot list itself")
        if Path(name).suffix.lower() in PICKLE_SUFFIXES:
            raise Rejected("not_safetensors", f"checkpoint lists {name}, a pickle format")
    if "config.json" not in prov.files:
        raise Rejected("bad_manifest", "checkpoint has no config.json")
    if not any(name.endswith(".safetensors") for name in prov.files):
        raise Rejected("bad_manifest", "checkpoint has no .safetensors weights")


def model_card(prov: Provenance) -> str:
    """A README.md with Hub metadata and a human summary of the provenance."""
    rows = "\n".join(
        f"| {c.uid} | `{c.hotkey}` | {c.score:.6g} | {c.weight:.6g} |" for c in prov.contributors
    )
    metrics = ", ".join(f"{k} = {v:.6g}" for k, v in sorted(prov.metrics.items())) or "none"
    return (
        "---\nlibrary_name: transformers\ntags:\n- tensormine\n- decentralized-training\n---\n\n"
        f"# {prov.run_id}: global model after window {prov.window}\n\n"
        f"Parent revision: `{prov.parent_revision}`; ledger block: {prov.ledger_block}; "
        f"metrics: {metrics}.\n\n"
        "| UID | hotkey | score | weight |\n| --- | --- | --- | --- |\n"
        f"{rows}\n\nFull provenance and file hashes: `{PROVENANCE_FILE}`.\n"
    )


def write_checkpoint_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    folder: Path,
    provenance: Provenance,
    *,
    max_shard_size: int | str,
    outer_state: Mapping[str, torch.Tensor] | None = None,
) -> Provenance:
    """Save `model` (+ `tokenizer`) as a HF folder with a model card and ``tensormine.json``.

    Weights are safetensors, sharded above `max_shard_size`; `outer_state` (the outer
    optimizer's momentum, fp32) goes to ``outer_state.safetensors`` beside them. Returns
    the provenance as written, with `created_at` and the sha256 and size of every file
    filled in.
    """
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size=parse_size(max_shard_size))
    if outer_state:
        from safetensors.torch import save_file

        tensors = {
            n: t.detach().to("cpu", torch.float32).contiguous() for n, t in outer_state.items()
        }
        save_file(
            tensors, str(folder / OUTER_STATE_FILE), metadata={"format": "tensormine-outer-state/1"}
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    prov = provenance.model_copy(
        update={"created_at": dt.datetime.now(dt.UTC).isoformat(), "files": {}}
    )
    (folder / "README.md").write_text(model_card(prov), encoding="utf-8")
    files: dict[str, FileDigest] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == PROVENANCE_FILE:
            continue
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ValueError(f"save_pretrained wrote {rel}, a pickle; refusing to publish it")
        digest, size = sha256_file(path)
        files[rel] = FileDigest(sha256=digest, size=size)
    prov = prov.model_copy(update={"files": files})
    check_file_list(prov)
    write_atomic(folder / PROVENANCE_FILE, provenance_bytes(prov))
    logger.info("wrote checkpoint of window %d to %s (%d files)", prov.window, folder, len(files))
    return prov


def read_provenance(folder: Path) -> Provenance:
    """The parsed ``tensormine.json`` of a checkpoint folder (files are not re-hashed)."""
    path = folder / PROVENANCE_FILE
    if not path.is_file():
        raise Rejected("not_found", f"{folder} has no {PROVENANCE_FILE}")
    if path.stat().st_size > PROVENANCE_MAX_BYTES:
        raise Rejected("too_large", f"{path} is larger than {PROVENANCE_MAX_BYTES} bytes")
    return parse_provenance(path.read_bytes())


def verify_checkpoint_folder(
    folder: Path, *, max_file_bytes: int, max_header_bytes: int, progress: Any = None
) -> Provenance:
    """Check every file of a checkpoint folder against ``tensormine.json``; raise `Rejected`.

    `progress` is an optional tqdm-like bar advanced by the bytes hashed.
    """
    prov = read_provenance(folder)
    listed = set(prov.files) | {PROVENANCE_FILE}
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") or not path.is_file() or rel in listed:
            continue
        reason: Literal["not_safetensors", "bad_manifest"] = (
            "not_safetensors" if path.suffix.lower() in PICKLE_SUFFIXES else "bad_manifest"
        )
        raise Rejected(reason, f"{rel} is in the folder but not listed in {PROVENANCE_FILE}")
    for name, digest in prov.files.items():
        path = folder / name
        if not path.is_file() or path.is_symlink():
            raise Rejected("not_found", f"{name} is listed in {PROVENANCE_FILE} but missing")
        size = path.stat().st_size
        if size > max_file_bytes:
            raise Rejected("too_large", f"{name}: {size} bytes, limit {max_file_bytes}")
        if size != digest.size:
            raise Rejected("size_mismatch", f"{name}: {size} bytes, provenance says {digest.size}")
        if name.endswith(".safetensors"):
            check_safetensors(
                path, max_header_bytes=max_header_bytes, max_file_bytes=max_file_bytes
            )
        actual, _ = sha256_file(path, progress)
        if actual != digest.sha256:
            raise Rejected(
                "sha256_mismatch", f"{name}: sha256 {actual[:16]}… expected {digest.sha256[:16]}…"
            )
    return prov
