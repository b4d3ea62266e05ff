"""The local-folder backend: the embedded default, shared by processes on one machine.

    backend = LocalBackend(Path("runs/local/store"))

Layout under the root::

    store.json                                   marks the folder as a tensormine store
    checkpoints/window-<w>/...                   one immutable HF model folder per window
    refs/latest                                  "window-<w>", the highest window published
    contributions/window-<w>/shard-<s>/<hotkey>.json
    contributions/window-<w>/shard-<s>/<hotkey>-<sha256[:16]>.safetensors
    proofs/window-<w>/...                        files put with `put_files` (see layout)

Every write is atomic, so readers in other processes never see half of anything: a
checkpoint is built in a staging folder under ``.staging/``, fsync'ed, and
renamed into place in one step (a second publish of the same window fails on the
rename); files go through temp file + fsync + rename; ``refs/latest`` only moves forward,
under an exclusive lock so two publishers cannot move it backwards. A contribution's
tensor file lands before its manifest, and listing shows only manifests, so a listed
contribution is always complete. `put_files` writes its files one by one in the order
given, each atomically, so a reader that finds the last one finds them all.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from store import layout
from store.backend import Backend, CheckpointRef, ContributionRef, exchange_files
from store.checkpoint import PROVENANCE_FILE
from store.errors import NotFound, Rejected, StoreConflict, StoreError
from store.fsio import Progress, copy_atomic, fsync_dir, fsync_tree, write_atomic

logger = logging.getLogger(__name__)

MARKER = "store.json"
MARKER_BODY = {"format": "tensormine-store/1"}


def is_local_store(path: Path) -> bool:
    return (path / MARKER).is_file()


def _is_marker_temp(path: Path) -> bool:
    """A marker being written atomically by another process (see `fsio.temp_name`)."""
    return path.name.startswith(".tmp-") and path.name.endswith(f"-{MARKER}")


class LocalBackend(Backend):
    """A store in a folder. `create=False` refuses a folder that is not a store yet."""

    def __init__(self, root: Path, *, create: bool = True) -> None:
        self.root = root
        if is_local_store(root):
            return
        if not create:
            raise NotFound(f"{root} is not a tensormine store (no {MARKER})")
        # Another process may be creating this store right now: its marker's temp file is
        # not foreign content, and the marker may appear while we look.
        foreign = [p for p in root.iterdir() if not _is_marker_temp(p)] if root.exists() else []
        if foreign and not is_local_store(root):
            raise StoreError(f"{root} exists, is not empty and is not a tensormine store")
        root.mkdir(parents=True, exist_ok=True)
        write_atomic(root / MARKER, (json.dumps(MARKER_BODY) + "\n").encode())

    @property
    def location(self) -> str:
        return str(self.root)

    @property
    def contributions_location(self) -> str:
        return str(self.root.resolve())

    def at(self, location: str) -> LocalBackend:
        return LocalBackend(Path(location), create=False)

    # ---- helpers ------------------------------------------------------------------
    @property
    def _checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def _staging(self) -> Path:
        return self.root / ".staging"

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with (self.root / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _inside(self, path: Path) -> Path:
        """`path` if it resolves inside the root (no symlink leads out), else Rejected."""
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root.resolve()):
            raise Rejected("path_escape", f"{path} resolves outside the store at {self.root}")
        return resolved

    def _ref(self, revision: str) -> CheckpointRef:
        window = layout.parse_window_revision(revision)
        folder = self._checkpoints / revision
        prov = folder / PROVENANCE_FILE
        if window is None or not prov.is_file():
            raise NotFound(f"no checkpoint {revision!r} in {self.root}")
        commit = hashlib.sha256(prov.read_bytes()).hexdigest()
        return CheckpointRef(window=window, revision=revision, commit=commit, source=self.location)

    # ---- checkpoints --------------------------------------------------------------
    def list_checkpoints(self) -> list[CheckpointRef]:
        if not self._checkpoints.is_dir():
            return []
        windows = sorted(
            w
            for p in self._checkpoints.iterdir()
            if (w := layout.parse_window_revision(p.name)) is not None
        )
        return [self._ref(layout.window_revision(w)) for w in windows]

    def resolve_checkpoint(self, revision: str) -> CheckpointRef:
        if revision == layout.LATEST:
            latest = self.root / "refs" / layout.LATEST
            if not latest.is_file():
                raise NotFound(f"no checkpoint published yet in {self.root}")
            return self._ref(latest.read_text(encoding="utf-8").strip())
        if layout.parse_window_revision(revision) is not None:
            return self._ref(revision)
        # A commit id (or a unique prefix of one, at least 7 hex digits), as on the Hub.
        if len(revision) >= 7 and all(c in "0123456789abcdef" for c in revision):
            hits = [r for r in self.list_checkpoints() if r.commit.startswith(revision)]
            if len(hits) == 1:
                return hits[0]
        raise NotFound(f"no checkpoint revision {revision!r} in {self.root}")

    def read_checkpoint_file(self, ref: CheckpointRef, name: str, max_bytes: int) -> bytes:
        path = self._inside(self._checkpoints / ref.revision / layout.safe_relpath(name))
        if not path.is_file():
            raise Rejected("not_found", f"{ref.revision}/{name} is missing")
        if path.stat().st_size > max_bytes:
            raise Rejected("too_large", f"{ref.revision}/{name} is over {max_bytes} bytes")
        return path.read_bytes()

    def fetch_checkpoint_files(
        self, ref: CheckpointRef, names: list[str], dest: Path, progress: Progress | None
    ) -> None:
        folder = self._checkpoints / ref.revision
        for name in names:
            rel = layout.safe_relpath(name)
            src = self._inside(folder / rel)
            if not src.is_file():
                raise Rejected("not_found", f"{ref.revision}/{name} is missing")
            copy_atomic(src, dest / rel, progress)

    @contextmanager
    def staging_dir(self) -> Iterator[Path]:
        self._staging.mkdir(exist_ok=True)
        path = self._staging / uuid.uuid4().hex[:12]
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def commit_checkpoint(self, folder: Path, window: int) -> CheckpointRef:
        revision = layout.window_revision(window)
        target = self._checkpoints / revision
        if folder.parent != self._staging:
            # Built elsewhere (another filesystem, maybe): copy into our own staging first
            # so that the final step is still one rename.
            with self.staging_dir() as staging:
                shutil.copytree(folder, staging, dirs_exist_ok=True)
                return self.commit_checkpoint(staging, window)
        self._checkpoints.mkdir(exist_ok=True)
        fsync_tree(folder)
        try:
            folder.rename(target)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise StoreConflict(
                    f"window {window} is already published in {self.root}"
                ) from None
            raise
        fsync_dir(self._checkpoints)
        with self._lock():
            latest = self.root / "refs" / layout.LATEST
            current = (
                layout.parse_window_revision(latest.read_text(encoding="utf-8").strip())
                if latest.is_file()
                else None
            )
            if current is None or window > current:
                write_atomic(latest, f"{revision}\n".encode())
        logger.info("published checkpoint %s in %s", revision, self.root)
        return self._ref(revision)

    # ---- contributions ------------------------------------------------------------
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
        folder = self.root / layout.contribution_dir(window, shard)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / layout.safe_relpath(file_name)
        with tensor_file.open("rb") as fh:
            os.fsync(fh.fileno())
        try:
            tensor_file.replace(target)
            fsync_dir(folder)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            copy_atomic(tensor_file, target)
        manifest_name = layout.contribution_manifest_name(hotkey)
        write_atomic(folder / manifest_name, manifest)
        # Older tensor files of this hotkey are no longer named by any manifest.
        for old in folder.glob(f"{hotkey}-*.safetensors"):
            if old.name != file_name:
                old.unlink(missing_ok=True)
        return self._contribution_ref(window, shard, hotkey)

    def _contribution_ref(self, window: int, shard: int, hotkey: str) -> ContributionRef:
        rel = (
            f"{layout.contribution_dir(window, shard)}/{layout.contribution_manifest_name(hotkey)}"
        )
        stat = (self.root / rel).stat()
        return ContributionRef(
            window=window,
            shard=shard,
            hotkey=hotkey,
            source=self.contributions_location,
            manifest_path=rel,
            received_at=dt.datetime.fromtimestamp(stat.st_mtime_ns / 1e9, tz=dt.UTC),
            revision="",
        )

    def list_contributions(self, window: int | None, shard: int | None) -> list[ContributionRef]:
        base = self.root / layout.CONTRIBUTIONS
        if not base.is_dir():
            return []
        refs = []
        for path in base.glob("window-*/shard-*/*.json"):
            parsed = layout.parse_contribution_path(path.relative_to(self.root).as_posix())
            if parsed is None:
                continue
            w, s, hotkey = parsed
            if (window is None or w == window) and (shard is None or s == shard):
                try:
                    refs.append(self._contribution_ref(w, s, hotkey))
                except FileNotFoundError:
                    continue  # removed while we listed
        return sorted(refs, key=lambda r: (r.window, r.shard, r.hotkey))

    def read_manifest(self, ref: ContributionRef, max_bytes: int) -> bytes:
        path = self._inside(self.root / layout.safe_relpath(ref.manifest_path))
        try:
            size = path.stat().st_size
            if size > max_bytes:
                raise Rejected("too_large", f"manifest is {size} bytes, limit {max_bytes}")
            return path.read_bytes()
        except FileNotFoundError:
            raise Rejected("not_found", f"{ref.manifest_path} is missing") from None

    def contribution_file(self, ref: ContributionRef, file_name: str, max_bytes: int) -> Path:
        folder = (self.root / ref.manifest_path).parent
        path = self._inside(folder / layout.safe_relpath(file_name))
        if not path.is_file():
            raise Rejected("not_found", f"{ref.manifest_path} names {file_name}, which is missing")
        size = path.stat().st_size
        if size > max_bytes:
            raise Rejected("too_large", f"{file_name}: {size} bytes, limit {max_bytes}")
        return path

    # ---- small files exchanged between participants (proofs) -------------------------
    def put_files(self, folder: str, files: Mapping[str, bytes | Path], *, message: str) -> None:
        checked = exchange_files(folder, files)
        # Resolved before anything is created, so that a symlinked folder cannot lead out.
        target = self._inside(self.root / layout.safe_relpath(folder))
        try:
            target.mkdir(parents=True, exist_ok=True)
            # A new folder survives a crash only once the folder holding it is fsync'ed.
            for parent in target.relative_to(self.root.resolve()).parents:
                fsync_dir(self.root / parent)
            for rel, content in checked:
                path = target / rel.rsplit("/", 1)[1]
                if isinstance(content, Path):
                    copy_atomic(content, path)
                else:
                    write_atomic(path, content)
        except OSError as exc:
            raise StoreError(f"cannot put files in {folder} of {self.root}: {exc}") from exc
        logger.info("put %d files in %s/%s (%s)", len(checked), self.root, folder, message)

    def fetch_file(self, path: str, max_bytes: int) -> Path | None:
        target = self._inside(self.root / layout.safe_relpath(path))
        try:
            if not target.is_file():
                return None
            size = target.stat().st_size
        except FileNotFoundError:
            return None  # removed while we looked
        if size > max_bytes:
            raise Rejected("too_large", f"{path}: {size} bytes, limit {max_bytes}")
        return target
