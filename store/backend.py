"""What a storage backend does: move files in and out. Formats and checks live above it.

A backend knows where bytes live (a local folder, a Hub repo) and nothing about what they
mean; `store.api.Store` builds checkpoints and contributions on top and is the only thing
the rest of the code talks to. Both backends share the names in `store.layout`.

`CheckpointRef` and `ContributionRef` are the handles a backend gives out: small frozen
records that say which window, which revision or commit, where, and (for contributions)
when the store received it.

Besides checkpoints and contributions, a backend exchanges plain small files in its
contributions location (`put_files` / `fetch_file`, e.g. the ``proofs/`` of
`store.layout`); `exchange_files` checks what a caller asks to write, for both backends.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from store import layout
from store.errors import NotFound, Rejected
from store.fsio import Progress

# Top-level folders of a local store that belong to the store itself, never to `put_files`.
RESERVED_FOLDERS = frozenset({"checkpoints", "refs"})


def exchange_files(
    folder: str, files: Mapping[str, bytes | Path]
) -> list[tuple[str, bytes | Path]]:
    """(path relative to the contributions location, content) for each of `files` under
    `folder`, in the mapping's order, after checking every name and source file, so that a
    bad one stops the write before anything is written.

    Raises `Rejected("path_escape")` for a folder or name that is not plain (see
    `layout.safe_relpath`; names take no ``/``) or a folder under ``checkpoints/`` or
    ``refs/``; `NotFound` for a source path that is not a file; ValueError for no files.
    """
    base = layout.safe_relpath(folder)
    if base.split("/", 1)[0] in RESERVED_FOLDERS:
        raise Rejected("path_escape", f"folder {folder!r} belongs to the store itself")
    if not files:
        raise ValueError(f"no files to put in {folder!r}")
    out: list[tuple[str, bytes | Path]] = []
    for name, content in files.items():
        if isinstance(content, Path) and not content.is_file():
            raise NotFound(f"{content} (to be stored as {base}/{name}) is not a file")
        out.append((f"{base}/{layout.safe_name(name)}", content))
    return out


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

    # ---- small files exchanged between participants (proofs) -----------------------
    @abstractmethod
    def put_files(self, folder: str, files: Mapping[str, bytes | Path], *, message: str) -> None:
        """Store each of `files` (plain name -> bytes, or a local file to copy or upload) in
        `folder` of this backend's contributions location, replacing files of the same
        names.

        Files are written in the mapping's order, so a caller puts last the file that
        readers look for, and a reader that finds it finds the rest too (on the Hub they
        all land in one commit on ``main``, with `message` as its message). Names and
        sources are checked first (`exchange_files`): nothing is written when one is bad.
        """

    @abstractmethod
    def fetch_file(self, path: str, max_bytes: int) -> Path | None:
        """A local path to read `path` (relative to the contributions location) from, or
        None when there is no such file. `Rejected("too_large")` when it is over
        `max_bytes`, before anything is read or downloaded; `Rejected("path_escape")` for
        a path that is not plain. The returned file must not be written to.
        """
