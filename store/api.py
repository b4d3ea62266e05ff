"""The one interface the rest of the code uses: `Store`, from `open_store` or `open_source`.

    store = open_store(cfg.store)                       # local folder or Hub, per config

    # the validator publishes the canonical checkpoint of window w+1 ...
    ref = store.publish_checkpoint(model, tokenizer, Provenance(run_id=..., window=w + 1, ...))
    # ... and miners fetch it (or `latest`)
    pulled = store.pull_checkpoint(Path("work/theta"), window=w + 1)

    # a miner prepares its pseudo-gradient for (window, shard), commits prepared.digest
    # to the ledger before the deadline, and reveals it after
    prepared = store.prepare_contribution(delta, keypair=kp, uid=7, window=w, shard=s,
                                          compression=Compression(scheme="none"))
    store.reveal_contribution(prepared)

    # the validator lists and verifies every contribution of the window
    for ref in store.list_contributions(w, shard=s, sources=committed_locations):
        try:
            got = store.load_contribution(ref, hotkey=hotkey_of[uid], uid=uid, window=w,
                                          shard=s, expected=shard_specs)
        except Rejected as exc:
            record(uid, exc.reason)

Which backend sits underneath (`store.local.LocalBackend`, `store.hub.HubBackend`) is
decided by the config alone; both have the same layout (`store.layout`) and every check
(signatures, hashes, sizes, the safetensors header, expected names/shapes/dtypes) runs
here, the same for both.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from chain.interface import SigningKey
from store import layout
from store.backend import Backend, CheckpointRef, ContributionRef
from store.checkpoint import (
    PROVENANCE_FILE,
    PROVENANCE_MAX_BYTES,
    Provenance,
    parse_provenance,
    verify_checkpoint_folder,
    write_checkpoint_folder,
)
from store.config import REPO_ID, StoreConfig
from store.errors import NotFound, Reason, Rejected, StoreConflict, StoreError
from store.fsio import fsync_dir, write_atomic
from store.local import LocalBackend
from store.manifest import (
    Compression,
    ContributionManifest,
    Trajectory,
    build_manifest,
    check_signature,
    commitment_digest,
    manifest_bytes,
    parse_manifest,
)
from store.safetensors_check import TensorSpec, check_safetensors_bytes, load_safetensors_bytes

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MANIFEST_MAX_BYTES = 8 * 2**20


@dataclass(frozen=True)
class PulledCheckpoint:
    """A checkpoint copied or downloaded into `path` and verified file by file."""

    ref: CheckpointRef
    provenance: Provenance
    path: Path


@dataclass(frozen=True)
class PreparedContribution:
    """A signed contribution not yet in the store: its manifest and tensor file bytes."""

    manifest: ContributionManifest
    data: bytes

    @property
    def digest(self) -> str:
        """What the miner commits to the ledger (`store.manifest.commitment_digest`)."""
        return commitment_digest(self.manifest)


@dataclass(frozen=True)
class VerifiedContribution:
    """A contribution that passed every check; `tensors` are on the CPU."""

    ref: ContributionRef
    manifest: ContributionManifest
    tensors: dict[str, torch.Tensor]

    @property
    def received_at(self) -> dt.datetime:
        return self.ref.received_at


class Store:
    """Checkpoints and contributions over one backend; see the module docstring."""

    def __init__(self, backend: Backend, cfg: StoreConfig) -> None:
        self.backend = backend
        self.cfg = cfg

    @property
    def location(self) -> str:
        return self.backend.location

    @property
    def contributions_location(self) -> str:
        """The string a miner commits to the chain so validators find its contributions."""
        return self.backend.contributions_location

    # ---- checkpoints -------------------------------------------------------------------
    def list_checkpoints(self) -> list[CheckpointRef]:
        return self.backend.list_checkpoints()

    def resolve(self, *, window: int | None = None, revision: str | None = None) -> CheckpointRef:
        """The checkpoint of `window`, or at `revision` (``latest``, ``window-<w>``, a
        commit id; on the Hub also a branch), or the latest one when both are None."""
        if window is not None and revision is not None:
            raise ValueError("give window or revision, not both")
        if window is not None:
            return self.backend.resolve_checkpoint(layout.window_revision(window))
        return self.backend.resolve_checkpoint(revision or layout.LATEST)

    def latest(self) -> CheckpointRef | None:
        try:
            return self.resolve()
        except NotFound:
            return None

    def read_provenance(self, ref: CheckpointRef) -> Provenance:
        body = self.backend.read_checkpoint_file(ref, PROVENANCE_FILE, PROVENANCE_MAX_BYTES)
        prov = parse_provenance(body)
        if prov.window != ref.window:
            raise Rejected("wrong_window", f"{ref.revision} holds window {prov.window}")
        return prov

    def publish_checkpoint(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None,
        provenance: Provenance,
        outer_state: Mapping[str, torch.Tensor] | None = None,
    ) -> CheckpointRef:
        """Write `model` (+ `tokenizer`, + the outer momentum) as the revision of
        `provenance.window`.

        Windows are published in increasing order; `StoreConflict` otherwise. When
        `provenance.parent_revision` is None it is set to the latest revision, if any.
        """
        latest = self._check_next_window(provenance.window)
        if provenance.parent_revision is None and latest is not None:
            provenance = provenance.model_copy(update={"parent_revision": latest.revision})
        with self.backend.staging_dir() as folder:
            write_checkpoint_folder(
                model, tokenizer, folder, provenance, max_shard_size=self.cfg.max_shard_size,
                outer_state=outer_state,
            )  # fmt: skip
            return self.backend.commit_checkpoint(folder, provenance.window)

    def publish_folder(self, folder: Path) -> CheckpointRef:
        """Publish a checkpoint folder written by `write_checkpoint_folder` (verified first)."""
        prov = verify_checkpoint_folder(
            folder,
            max_file_bytes=self.cfg.max_checkpoint_file_bytes,
            max_header_bytes=self.cfg.max_header_bytes,
        )
        self._check_next_window(prov.window)
        with self.backend.staging_dir() as staging:
            for name in [*prov.files, PROVENANCE_FILE]:
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / name, staging / name)
            return self.backend.commit_checkpoint(staging, prov.window)

    def _check_next_window(self, window: int) -> CheckpointRef | None:
        latest = self.latest()
        if latest is not None and window <= latest.window:
            raise StoreConflict(
                f"window {window} is not after the latest published window {latest.window} "
                f"in {self.location}"
            )
        return latest

    def pull_checkpoint(
        self,
        dest: Path,
        *,
        window: int | None = None,
        revision: str | None = None,
        progress: bool | None = None,
    ) -> PulledCheckpoint:
        """Copy or download a checkpoint into `dest` (absent or empty) and verify it.

        The provenance is read and its file list checked before any weights are fetched;
        files land in a hidden sibling folder that becomes `dest` only once every sha256
        matched. `progress` None shows a bar (on a terminal) for pulls of at least
        `store.progress_min_bytes`.
        """
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise StoreError(f"{dest} exists and is not an empty folder")
        ref = self.resolve(window=window, revision=revision)
        body = self.backend.read_checkpoint_file(ref, PROVENANCE_FILE, PROVENANCE_MAX_BYTES)
        prov = parse_provenance(body)
        if prov.window != ref.window:
            raise Rejected("wrong_window", f"{ref.revision} holds window {prov.window}")
        for name, digest in prov.files.items():
            if digest.size > self.cfg.max_checkpoint_file_bytes:
                raise Rejected("too_large", f"{name}: {digest.size} bytes, over the limit")
        total = prov.total_bytes
        # tqdm: disable=None shows the bar only on a terminal.
        disable: bool | None = not progress if progress is not None else None
        if progress is None and total < self.cfg.progress_min_bytes:
            disable = True
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=f"pull {ref.revision}", disable=disable
            ) as bar:
                self.backend.fetch_checkpoint_files(ref, sorted(prov.files), tmp, bar)
            write_atomic(tmp / PROVENANCE_FILE, body)
            with tqdm(
                total=total, unit="B", unit_scale=True, desc="verify sha256", disable=disable
            ) as bar:
                verify_checkpoint_folder(
                    tmp,
                    max_file_bytes=self.cfg.max_checkpoint_file_bytes,
                    max_header_bytes=self.cfg.max_header_bytes,
                    progress=bar,
                )
            if dest.exists():
                dest.rmdir()
            tmp.rename(dest)
            fsync_dir(dest.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("pulled %s@%s into %s", ref.source, ref.revision, dest)
        return PulledCheckpoint(ref=ref, provenance=prov, path=dest)

    # ---- contributions -----------------------------------------------------------------
    def prepare_contribution(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        keypair: SigningKey,
        uid: int,
        window: int,
        shard: int,
        compression: Compression | None = None,
        trajectory: Trajectory | None = None,
    ) -> PreparedContribution:
        """Serialize `tensors` and sign their manifest, without storing anything yet.

        The miner commits `commitment_digest(prepared.manifest)` to the ledger before the
        deadline and reveals (`reveal_contribution`) after it, so that nobody can read its
        Δ while they could still copy it."""
        from safetensors.torch import save

        if not tensors:
            raise ValueError("a contribution needs at least one tensor")
        cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        specs = {name: TensorSpec.of(t) for name, t in cpu.items()}
        data = save(cpu)
        if len(data) > self.cfg.max_contribution_bytes:
            raise Rejected(
                "too_large",
                f"{len(data)} bytes, store.max_contribution_bytes is "
                f"{self.cfg.max_contribution_bytes}",
            )
        sha256 = hashlib.sha256(data).hexdigest()
        manifest = build_manifest(
            keypair,
            uid=uid,
            window=window,
            shard=shard,
            file_name=layout.contribution_file_name(keypair.address, sha256),
            size=len(data),
            sha256=sha256,
            compression=compression or Compression(),
            tensors=specs,
            trajectory=trajectory,
        )
        return PreparedContribution(manifest=manifest, data=data)

    def reveal_contribution(self, prepared: PreparedContribution) -> ContributionRef:
        """Write a prepared contribution (its tensor file, then its manifest) to the store."""
        manifest = prepared.manifest
        with self.backend.staging_dir() as staging:
            path = staging / "contribution.safetensors"
            path.write_bytes(prepared.data)
            ref = self.backend.put_contribution(
                window=manifest.window,
                shard=manifest.shard,
                hotkey=manifest.hotkey,
                tensor_file=path,
                file_name=manifest.file,
                manifest=manifest_bytes(manifest),
            )
        logger.info("published contribution %s (%d bytes)", ref.manifest_path, manifest.size)
        return ref

    def publish_contribution(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        keypair: SigningKey,
        uid: int,
        window: int,
        shard: int,
        compression: Compression | None = None,
    ) -> ContributionRef:
        """Prepare and reveal at once: a contribution with no commitment to precede it
        (validators refuse those; for tools and tests of the store itself)."""
        prepared = self.prepare_contribution(
            tensors, keypair=keypair, uid=uid, window=window, shard=shard, compression=compression
        )
        return self.reveal_contribution(prepared)

    def list_contributions(
        self,
        window: int | None = None,
        shard: int | None = None,
        *,
        sources: list[str] | None = None,
    ) -> list[ContributionRef]:
        """Contributions in this store, or in each of `sources` (locations that miners
        committed: Hub repo ids or local store folders). A source that does not exist
        contributes nothing."""
        refs: list[ContributionRef] = []
        for source in sources if sources is not None else [None]:
            try:
                backend = self.backend if source is None else self.backend.at(source)
                refs.extend(backend.list_contributions(window, shard))
            except NotFound as exc:
                logger.info("no contributions at %s: %s", source or self.location, exc)
        return refs

    def read_manifest(self, ref: ContributionRef) -> ContributionManifest:
        """The parsed manifest, NOT verified (for listings); use `load_contribution`."""
        return parse_manifest(self._backend_of(ref).read_manifest(ref, MANIFEST_MAX_BYTES))

    def _backend_of(self, ref: ContributionRef) -> Backend:
        if ref.source == self.backend.contributions_location:
            return self.backend
        return self.backend.at(ref.source)

    def load_contribution(
        self,
        ref: ContributionRef,
        *,
        hotkey: str,
        uid: int,
        window: int,
        shard: int,
        expected: Mapping[str, TensorSpec] | None = None,
        require_finite: bool = True,
    ) -> VerifiedContribution:
        """Verify a contribution completely, then load it; `Rejected(reason)` otherwise.

        Checked in order, cheapest first and nothing downloaded before the manifest
        passed: manifest parse and paths, signature by `hotkey`, UID/window/shard (the
        manifest's and the path's), size limit, sha256 and size of the bytes, the
        safetensors header, header == manifest tensor list, == `expected` (names,
        dtypes, shapes), and finally every float value finite.
        """
        backend = self._backend_of(ref)
        manifest = parse_manifest(backend.read_manifest(ref, MANIFEST_MAX_BYTES))
        if manifest.hotkey != ref.hotkey:
            raise Rejected(
                "wrong_hotkey", f"manifest at {ref.manifest_path} is by {manifest.hotkey}"
            )
        check_signature(manifest, hotkey)
        if manifest.uid != uid:
            raise Rejected("wrong_uid", f"manifest is for UID {manifest.uid}, expected {uid}")
        for what, claimed, listed, wanted in (
            ("window", manifest.window, ref.window, window),
            ("shard", manifest.shard, ref.shard, shard),
        ):
            if claimed != wanted or listed != wanted:
                reason: Reason = "wrong_window" if what == "window" else "wrong_shard"
                raise Rejected(
                    reason,
                    f"manifest says {what} {claimed}, stored under {listed}, expected {wanted}",
                )
        limit = self.cfg.max_contribution_bytes
        if manifest.size > limit:
            raise Rejected("too_large", f"manifest declares {manifest.size} bytes, limit {limit}")
        path = backend.contribution_file(ref, manifest.file, limit)
        # One read: every check below and the load see the same bytes, even if a newer
        # contribution replaces (and removes) the file meanwhile. The size is capped above.
        try:
            with path.open("rb") as fh:
                data = fh.read(limit + 1)
        except FileNotFoundError:
            raise Rejected("not_found", f"{manifest.file} disappeared before it was read") from None
        return self._load_verified(ref, manifest, data, expected, require_finite)

    def _load_verified(
        self,
        ref: ContributionRef,
        manifest: ContributionManifest,
        data: bytes,
        expected: Mapping[str, TensorSpec] | None,
        require_finite: bool,
    ) -> VerifiedContribution:
        limit = self.cfg.max_contribution_bytes
        if len(data) != manifest.size:
            raise Rejected(
                "size_mismatch",
                f"{manifest.file}: {len(data)} bytes, manifest says {manifest.size}",
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != manifest.sha256:
            raise Rejected(
                "sha256_mismatch",
                f"{manifest.file}: sha256 {digest[:16]}… expected {manifest.sha256[:16]}…",
            )
        header = check_safetensors_bytes(
            data, name=manifest.file, max_header_bytes=self.cfg.max_header_bytes,
            max_file_bytes=limit,
        )  # fmt: skip
        if header.tensors != manifest.tensor_specs():
            raise Rejected(
                "manifest_mismatch", "the file's tensors differ from the manifest's list"
            )
        if expected is not None:
            _match_expected(header.tensors, expected)
        tensors = load_safetensors_bytes(
            data, name=manifest.file, max_header_bytes=self.cfg.max_header_bytes,
            max_file_bytes=limit,
        )  # fmt: skip
        if require_finite:
            for name, tensor in tensors.items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise Rejected("not_finite", f"tensor {name!r} holds NaN or infinity")
        return VerifiedContribution(ref=ref, manifest=manifest, tensors=tensors)

    # ---- small files exchanged between participants (proofs) ---------------------------
    def put_files(self, folder: str, files: Mapping[str, bytes | Path], *, message: str) -> None:
        """Write `files` (name -> bytes or a local file) into `folder` of this store's
        contributions location, in the mapping's order: put last the file that readers
        look for. See `Backend.put_files`; the paths come from `store.layout`, e.g.

            store.put_files(layout.answer_dir(w, validator, miner),
                            {"tensors.safetensors": path, "answer.json": body},
                            message=f"proof answer window {w}")
        """
        self.backend.put_files(folder, files, message=message)

    def fetch_file(self, location: str, path: str, max_bytes: int) -> Path | None:
        """A local path to read `path` from in the contributions location `location`
        (another participant's, as it committed it to the chain, or our own), or None when
        that file or location does not exist. `Rejected("too_large")` before fetching a
        file over `max_bytes`. The file may be shared (the store's own file or a download
        cache): read it, never write to it.
        """
        try:
            own = location == self.contributions_location
            backend = self.backend if own else self.backend.at(location)
        except NotFound as exc:
            logger.info("no files at %s: %s", location, exc)
            return None
        return backend.fetch_file(path, max_bytes)


def _match_expected(got: Mapping[str, TensorSpec], expected: Mapping[str, TensorSpec]) -> None:
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise Rejected("name_mismatch", f"missing {missing[:3]}, unexpected {extra[:3]}")
    for name, want in expected.items():
        have = got[name]
        if have.dtype != want.dtype:
            raise Rejected("dtype_mismatch", f"{name}: {have.dtype}, expected {want.dtype}")
        if have.shape != want.shape:
            raise Rejected(
                "shape_mismatch", f"{name}: {list(have.shape)}, expected {list(want.shape)}"
            )


def expected_specs(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """Name -> `TensorSpec` of tensors (e.g. a model shard's parameters), for `expected`."""
    return {name: TensorSpec.of(t) for name, t in tensors.items()}


def open_store(cfg: StoreConfig, *, create: bool = True) -> Store:
    """The store the config describes: a local folder (`cfg.root`) or the Hub."""
    if cfg.backend == "hub":
        from store.hub import HubBackend

        return Store(HubBackend(cfg), cfg)
    return Store(LocalBackend(cfg.root, create=create), cfg)


def open_source(source: str, cfg: StoreConfig | None = None) -> Store:
    """A store named on the command line: an existing local store folder, else a Hub repo.

    ``hf://org/name`` (or ``hf://datasets/org/name``) always means the Hub; a path that
    exists is a local store; otherwise ``org/name`` is taken as a Hub repo id.
    """
    cfg = cfg or StoreConfig()
    path = Path(source).expanduser()
    if not source.startswith("hf://") and path.exists():
        return Store(LocalBackend(path, create=False), cfg)
    from store.hub import HubBackend, parse_hub_location

    bare = source.removeprefix("hf://")
    if not (REPO_ID.match(bare) or bare.startswith(("datasets/", "models/"))):
        raise NotFound(f"{source!r}: no such local store, and not a Hub repo id like org/name")
    repo_id, repo_type = parse_hub_location(source)
    backend = HubBackend(
        cfg, checkpoint_repo=repo_id, contributions_repo=repo_id, contributions_repo_type=repo_type
    )
    return Store(backend, cfg)
