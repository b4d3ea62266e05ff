"""The signed JSON manifest that travels with every contribution's tensor file.

    manifest = build_manifest(
        keypair, uid=3, window=12, shard=0, file_name="...safetensors", size=..., sha256=...,
        compression=Compression(scheme="topk", params={"k": 0.01}), tensors={...},
    )
    body = manifest_bytes(manifest)                     # what goes into the store
    manifest = parse_manifest(body)                     # raises Rejected("bad_manifest")
    check_signature(manifest, expected_hotkey)          # raises Rejected("bad_signature")

The signature is the hotkey's (Ed25519, or sr25519 for a Bittensor wallet: both pass
`chain.keys.verify`) over the canonical JSON of every other field
(`chain.keys.signing_bytes`), so the hotkey vouches for the window, the shard, its UID,
the compression, the tensor list and the sha256 of the exact bytes. The manifest names
its tensor file by a plain file name in the same folder: no separators, no ``..``, so a
manifest can never point outside the store.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chain.interface import SigningKey
from chain.keys import is_address, signing_bytes, verify
from store.errors import Rejected, first_problem
from store.safetensors_check import DTYPE_SIZES, TensorSpec

FORMAT: Literal["tensormine-contribution/1"] = "tensormine-contribution/1"
# A tensor file name: what `layout.contribution_file_name` produces, and nothing that
# could leave the folder (no '/', no '\\', no leading dot, so no '..').
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}\.safetensors$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Compression(_Frozen):
    """How the pseudo-gradient was compressed; the store records it, the validator reads it."""

    scheme: str = Field(default="none", min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)


class TensorEntry(_Frozen):
    dtype: str
    shape: tuple[int, ...]

    def spec(self) -> TensorSpec:
        return TensorSpec(self.dtype, self.shape)


class Trajectory(_Frozen):
    """The inner trajectory a contribution commits to (`train.trajectory`): the segment
    `bounds` [0, …, H] and the sha256 of the shard's state at every bound after 0, the
    last being θ_H (the Δ is θ_w − θ_H). Validators spot-check segments of it
    (`validation.proof_of_work`)."""

    bounds: tuple[int, ...] = Field(min_length=2, max_length=4097)
    states: tuple[str, ...] = Field(min_length=1, max_length=4096)


class ContributionManifest(_Frozen):
    """Everything a validator needs to know about one contribution before it loads it."""

    format: Literal["tensormine-contribution/1"] = FORMAT
    hotkey: str
    uid: int = Field(ge=0)
    window: int = Field(ge=0)
    shard: int = Field(ge=0)
    file: str = Field(description="tensor file name, in the manifest's folder")
    size: int = Field(ge=0)
    sha256: str
    compression: Compression
    tensors: dict[str, TensorEntry]
    created_at: str = Field(description="the miner's clock, informational only")
    trajectory: Trajectory | None = None
    signature: str = Field(default="", description="hex signature by the hotkey, empty if unsigned")

    def unsigned_body(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.model_dump_json())
        body.pop("signature")
        if body.get("trajectory") is None:
            body.pop("trajectory", None)  # manifests without one sign as they always did
        return body

    def tensor_specs(self) -> dict[str, TensorSpec]:
        return {name: entry.spec() for name, entry in self.tensors.items()}


def build_manifest(
    keypair: SigningKey,
    *,
    uid: int,
    window: int,
    shard: int,
    file_name: str,
    size: int,
    sha256: str,
    compression: Compression,
    tensors: dict[str, TensorSpec],
    created_at: dt.datetime | None = None,
    trajectory: Trajectory | None = None,
) -> ContributionManifest:
    """A manifest for the given file, signed by `keypair`."""
    when = created_at or dt.datetime.now(dt.UTC)
    unsigned = ContributionManifest(
        hotkey=keypair.address,
        uid=uid,
        window=window,
        shard=shard,
        file=file_name,
        size=size,
        sha256=sha256,
        compression=compression,
        tensors={n: TensorEntry(dtype=s.dtype, shape=s.shape) for n, s in tensors.items()},
        created_at=when.isoformat(),
        trajectory=trajectory,
    )
    _check_fields(unsigned)
    signature = keypair.sign(signing_bytes(unsigned.unsigned_body())).hex()
    return unsigned.model_copy(update={"signature": signature})


def commitment_body(manifest: ContributionManifest) -> dict[str, Any]:
    """What a miner commits to: every field of the manifest but the signature and
    `created_at` (the miner's clock, informational): the hotkey, UID, window, shard,
    compression (with the digest of every wire part), tensor list and the payload's
    sha256. It travels in the averaging groups' matchmaking, where reducers check it
    against the ledger (`averaging.gather`)."""
    body = manifest.unsigned_body()
    body.pop("created_at")
    return body


def commitment_digest(manifest: ContributionManifest) -> str:
    """The sha256 a miner commits to the ledger before the deadline, revealing the manifest
    (and its tensor file, whose sha256 the manifest holds) only after it: of the canonical
    JSON of `commitment_body`. A revealed manifest whose digest differs from the
    commitment is not the contribution that was committed."""
    return hashlib.sha256(signing_bytes(commitment_body(manifest))).hexdigest()


def manifest_bytes(manifest: ContributionManifest) -> bytes:
    """The manifest as stored: indented JSON, newline-terminated."""
    return (manifest.model_dump_json(indent=2) + "\n").encode()


def _check_fields(manifest: ContributionManifest) -> None:
    name = manifest.file
    if "/" in name or "\\" in name or name.startswith(".") or "\x00" in name:
        raise Rejected("path_escape", f"manifest names file {name!r}, not a plain file name")
    if not name.endswith(".safetensors"):
        raise Rejected("not_safetensors", f"manifest names {name!r}; only .safetensors is accepted")
    if not FILE_NAME.match(name):
        raise Rejected("bad_manifest", f"manifest names file {name!r} with odd characters")
    if not _SHA256.match(manifest.sha256):
        raise Rejected("bad_manifest", "sha256 must be 64 lowercase hex digits")
    if not is_address(manifest.hotkey):
        raise Rejected("bad_manifest", f"hotkey {manifest.hotkey!r} is not an SS58 address")
    for name, entry in manifest.tensors.items():
        if entry.dtype not in DTYPE_SIZES or any(d < 0 for d in entry.shape):
            raise Rejected("bad_manifest", f"tensor {name!r}: bad dtype or shape")
    trajectory = manifest.trajectory
    if trajectory is not None:
        b = trajectory.bounds
        if b[0] != 0 or any(x >= y for x, y in itertools.pairwise(b)):
            raise Rejected("bad_manifest", f"trajectory bounds {list(b)[:8]} do not rise from 0")
        if len(trajectory.states) != len(b) - 1:
            raise Rejected("bad_manifest", "trajectory needs one state digest per bound after 0")
        if not all(_SHA256.match(d) for d in trajectory.states):
            raise Rejected("bad_manifest", "trajectory state digests must be 64 lowercase hex")


def parse_manifest(body: bytes) -> ContributionManifest:
    """Parse and sanity-check stored manifest bytes; the signature is checked separately."""
    try:
        manifest = ContributionManifest.model_validate_json(body)
    except ValidationError as exc:
        raise Rejected("bad_manifest", first_problem(exc, "manifest")) from None
    _check_fields(manifest)
    return manifest


def check_signature(manifest: ContributionManifest, expected_hotkey: str | None = None) -> None:
    """Raise `Rejected` unless the manifest is signed by its own hotkey (and that is expected)."""
    if expected_hotkey is not None and manifest.hotkey != expected_hotkey:
        raise Rejected(
            "wrong_hotkey", f"manifest is by {manifest.hotkey}, expected {expected_hotkey}"
        )
    if not manifest.signature:
        raise Rejected("bad_signature", "manifest is not signed")
    try:
        signature = bytes.fromhex(manifest.signature)
    except ValueError:
        raise Rejected("bad_signature", "signature is not hex") from None
    if not verify(manifest.hotkey, signing_bytes(manifest.unsigned_body()), signature):
        raise Rejected("bad_signature", f"signature does not verify for {manifest.hotkey}")
