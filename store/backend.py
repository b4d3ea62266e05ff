"""What a storage backend does: move files in and out. Formats and checks live above it.

A backend knows where bytes live (a local folder, a Hub repo) and nothing about what they
mean; `store.api.Store` builds checkpoints and contributions on top and is the only thing
the rest of the code talks to. Both backends share the names in `store.layout`.

`CheckpointRef` and `ContributionRef` are the handles a backend gives out: small frozen
records that say which window, which revision or commit, where, and (for contributions)
when the store received it.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from store.fsio import Progress


@dataclass(frozen=True)
class CheckpointRef:
    """One published checkpoint of the global model."""

    window: int
    revision: str  # "window-<w>": a Hub tag, a local folder name
    commit: str  # Hub commit sha; local: sha256 of its tensormine.json
    source: str  # the store it lives in (local root or Hub repo id)


@dataclass(frozen=True)
class ContributionRef:
    """One miner's contribution for (window, shard), as listed; not yet verified."""

    window: int
    shard: int
    hotkey: str  # from the path; the manifest must name the same hotkey
    source: str  # the store it lives in (local root or Hub repo id)
    manifest_path: str  # "contributions/window-<w>/shard-<s>/<hotkey>.json"
    received_at: dt.datetime  # local: the manifest's mtime; Hub: the date of its last commit
    revision: str  # Hub: the commit listed; local: ""


class Backend(ABC):
    """Storage for one location. Methods raise `store.errors` exceptions only."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Printable address of this store (a path or a Hub repo id)."""

    @property
    @abstractmethod
    def contributions_location(self) -> str:
        """Where this store keeps contributions, as `at` accepts it (a miner commits this
        string to the chain so that validators find its contributions)."""

    @abstractmethod
    def at(self, location: str) -> Backend:
        """A backend of the same kind and settings for another location (a miner's store)."""

    # ---- checkpoints --------------------------------------------------------------
    @abstractmethod
    def list_checkpoints(self) -> list[CheckpointRef]:
        """Every published window, oldest first."""

    @abstractmethod
    def resolve_checkpoint(self, revision: str) -> CheckpointRef:
        """``latest``, ``window-<w>`` or a commit id -> its ref; `NotFound` if absent."""

    @abstractmethod
    def read_checkpoint_file(self, ref: CheckpointRef, name: str, max_bytes: int) -> bytes:
        """A small file of a checkpoint (its ``tensormine.json``), at most `max_bytes`."""

    @abstractmethod
    def fetch_checkpoint_files(
        self, ref: CheckpointRef, names: list[str], dest: Path, progress: Progress | None
    ) -> None:
        """Copy or download the named files of a checkpoint into `dest` (same relative paths)."""

    @abstractmethod
    def staging_dir(self) -> AbstractContextManager[Path]:
        """An empty folder to build a checkpoint in; removed on exit unless committed."""

    @abstractmethod
    def commit_checkpoint(self, folder: Path, window: int) -> CheckpointRef:
        """Publish a complete checkpoint folder as the revision of `window`.

        Raises `StoreConflict` if the window was already published.
        """

    # ---- contributions ------------------------------------------------------------
    @abstractmethod
    def put_contribution(
        self,
        *,
        window: int,
        shard: int,
        hotkey: str,
        tensor_file: Path,
        file_name: str,
        manifest: bytes,
    ) -> ContributionRef:
        """Store a tensor file (moved or uploaded) and its manifest, manifest last."""

    @abstractmethod
    def list_contributions(self, window: int | None, shard: int | None) -> list[ContributionRef]:
        """Contributions with a manifest, filtered by window and shard when given."""

    @abstractmethod
    def read_manifest(self, ref: ContributionRef, max_bytes: int) -> bytes: ...

    @abstractmethod
    def contribution_file(self, ref: ContributionRef, file_name: str, max_bytes: int) -> Path:
        """A local path to read the named tensor file from; `Rejected("too_large")` before
        fetching anything over `max_bytes`."""
