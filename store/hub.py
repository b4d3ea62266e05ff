"""The Hugging Face Hub backend: what real subnets use, through `huggingface_hub` only.

    backend = HubBackend(cfg)          # cfg.hub.checkpoint_repo / contributions_repo

Checkpoints live in one model repo: each window is one commit on ``main`` (so ``main`` is
the latest model) tagged ``window-<w>``; ``latest`` is the highest tag. So
``AutoModelForCausalLM.from_pretrained(repo, revision="window-12")`` loads window 12.
Contributions live in the miner's own repo (a dataset repo by default) under
``contributions/window-<w>/shard-<s>/``; the validator lists them with one recursive tree
call whose ``expand`` data gives the date of the commit that last touched each manifest,
which is when the Hub received the contribution. Files put with `put_files` (proofs) go
to the same repo, all in one commit on ``main``; `fetch_file` reads the head of ``main``.

The token comes from ``HF_TOKEN`` (or the saved login), the address from
``store.hub.endpoint``, else ``HF_ENDPOINT``, else huggingface.co; both are read when the
backend is made, not when `huggingface_hub` is imported. Every call is retried a bounded
number of times with exponential backoff on 429, 5xx and network errors (honouring
``Retry-After``); other failures become `NotFound` / `RemoteError` / `StoreConflict` at
once. Uploads pass file paths to the client and downloads go to disk in chunks, so a
large file is never held in memory by this module.
"""

from __future__ import annotations

import datetime as dt
import importlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from store import layout
from store.backend import Backend, CheckpointRef, ContributionRef, exchange_files
from store.checkpoint import PROVENANCE_FILE, PROVENANCE_MAX_BYTES, Provenance, parse_provenance
from store.config import REPO_ID, StoreConfig
from store.errors import NotFound, Rejected, RemoteError, StoreConflict, StoreError
from store.fsio import Progress

logger = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_ENDPOINT = "https://huggingface.co"
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Files every Hub repo may carry that are no part of a checkpoint.
HUB_HOUSEKEEPING = frozenset({".gitattributes"})


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP library's network-error classes (httpx2, httpx or requests, by version)."""
    found: list[type[Exception]] = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError")):
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        found.append(cls)
    return tuple(found)


def parse_hub_location(location: str) -> tuple[str, str]:
    """``org/name`` / ``models/org/name`` / ``datasets/org/name`` (``hf://`` optional)
    -> (repo_id, repo_type)."""
    text = location.removeprefix("hf://")
    repo_type = "model"
    for prefix, kind in (("datasets/", "dataset"), ("models/", "model")):
        if text.startswith(prefix):
            text, repo_type = text[len(prefix) :], kind
    if not REPO_ID.match(text):
        raise NotFound(f"{location!r} is not a Hub repo id like my-org/my-model")
    return text, repo_type


def hub_location(repo_id: str, repo_type: str) -> str:
    return f"datasets/{repo_id}" if repo_type == "dataset" else repo_id


def _forwarding_tqdm(progress: Progress | None) -> type[tqdm]:  # type: ignore[type-arg]
    """A silent tqdm class for `hf_hub_download` that adds its bytes to our own bar."""

    class _Forward(tqdm):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if progress is not None and n:
                progress.update(n)
            return super().update(n)

    return _Forward


class HubBackend(Backend):
    """Checkpoints in `cfg.hub.checkpoint_repo`, contributions in `cfg.hub.contributions_repo`."""

    def __init__(
        self,
        cfg: StoreConfig,
        *,
        checkpoint_repo: str | None = None,
        contributions_repo: str | None = None,
        contributions_repo_type: str | None = None,
    ) -> None:
        from huggingface_hub import HfApi

        self.cfg = cfg
        self.hub = cfg.hub
        self.checkpoint_repo = checkpoint_repo or cfg.hub.checkpoint_repo
        self.contributions_repo = contributions_repo or cfg.hub.contributions_repo
        self.contributions_repo_type = contributions_repo_type or cfg.hub.contributions_repo_type
        if self.checkpoint_repo is None and self.contributions_repo is None:
            raise StoreError(
                "store.backend is hub but neither hub.checkpoint_repo nor "
                "hub.contributions_repo is set"
            )
        self.endpoint = (
            cfg.hub.endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
        ).rstrip("/")
        self.token = os.environ.get("HF_TOKEN") or None
        self.api = HfApi(endpoint=self.endpoint, token=self.token)
        self._transient = _transport_errors()
        self._catch: tuple[type[Exception], ...] = (OSError, *self._transient)

    @property
    def location(self) -> str:
        return self.checkpoint_repo or hub_location(
            str(self.contributions_repo), self.contributions_repo_type
        )

    @property
    def contributions_location(self) -> str:
        return hub_location(self._contrib_repo(), self.contributions_repo_type)

    def at(self, location: str) -> HubBackend:
        repo_id, repo_type = parse_hub_location(location)
        return HubBackend(
            self.cfg,
            checkpoint_repo=repo_id,
            contributions_repo=repo_id,
            contributions_repo_type=repo_type,
        )

    def _ckpt_repo(self) -> str:
        if self.checkpoint_repo is None:
            raise StoreError("store.hub.checkpoint_repo is not set")
        return self.checkpoint_repo

    def _contrib_repo(self) -> str:
        if self.contributions_repo is None:
            raise StoreError("store.hub.contributions_repo is not set")
        return self.contributions_repo

    # ---- retries and error translation -----------------------------------------------
    def _retry_delay(self, exc: BaseException) -> float | None:
        """Seconds the server asked us to wait, 0.0 for "retry on our schedule", None for
        "do not retry". Looks through the exception's causes: `hf_hub_download` wraps a
        failed HEAD in a LocalEntryNotFoundError."""
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        seen: BaseException | None = exc
        while seen is not None:
            if isinstance(seen, OfflineModeIsEnabled):
                return None
            if isinstance(seen, HfHubHTTPError) and seen.response is not None:
                if seen.response.status_code not in RETRY_STATUS:
                    return None
                after = seen.response.headers.get("Retry-After", "")
                return float(after) if after.isdigit() else 0.0
            if self._transient and isinstance(seen, self._transient):
                return 0.0
            seen = seen.__cause__ or seen.__context__
        return None

    def _translate(self, exc: BaseException, what: str) -> StoreError:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        if isinstance(exc, StoreError):
            return exc
        if isinstance(exc, RepositoryNotFoundError):
            return NotFound(f"{what}: repository not found on {self.endpoint}")
        if isinstance(exc, RevisionNotFoundError):
            return NotFound(f"{what}: revision not found")
        if isinstance(exc, EntryNotFoundError):
            return NotFound(f"{what}: file not found")
        if isinstance(exc, OfflineModeIsEnabled):
            return RemoteError(f"{what}: HF_HUB_OFFLINE is set, the Hub cannot be reached")
        if isinstance(exc, HfHubHTTPError) and exc.response is not None:
            status = exc.response.status_code
            if status in (409, 412):
                return StoreConflict(f"{what}: the Hub refused a conflicting write ({status})")
            return RemoteError(f"{what}: HTTP {status} from {self.endpoint}")
        return RemoteError(f"{what}: {type(exc).__name__}: {exc}")

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """`fn()`, retried on 429/5xx/network errors with exponential backoff."""
        delay = self.hub.backoff_s
        attempt = 0
        while True:
            try:
                return fn()
            except self._catch as exc:
                asked = self._retry_delay(exc)
                if asked is None:
                    raise self._translate(exc, what) from exc
                if attempt >= self.hub.max_retries:
                    raise RemoteError(
                        f"{what}: still failing after {attempt + 1} attempts: {exc}"
                    ) from exc
                wait = min(max(asked, delay), self.hub.max_backoff_s)
                attempt += 1
                logger.warning(
                    "%s failed (%s); retry %d/%d in %.2fs",
                    what,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                    attempt,
                    self.hub.max_retries,
                    wait,
                )
                time.sleep(wait)
                delay = min(delay * 2, self.hub.max_backoff_s)

    # ---- small building blocks ---------------------------------------------------------
    def _ensure_repo(self, repo_id: str, repo_type: str) -> None:
        self._call(
            f"create {repo_type} repo {repo_id}",
            lambda: self.api.create_repo(
                repo_id, repo_type=repo_type, private=self.hub.private, exist_ok=True
            ),
        )

    def _head_sha(self, repo_id: str, repo_type: str, revision: str) -> str:
        info = self._call(
            f"{repo_id}@{revision}",
            lambda: self.api.repo_info(repo_id, repo_type=repo_type, revision=revision),
        )
        if not info.sha:
            raise RemoteError(f"{repo_id}@{revision}: the Hub returned no commit id")
        return str(info.sha)

    def _file_size(self, repo_id: str, repo_type: str, revision: str, path: str) -> int | None:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(
            repo_id, path, repo_type=repo_type, revision=revision, endpoint=self.endpoint
        )
        meta = self._call(
            f"{repo_id}@{revision[:12]}/{path}",
            lambda: get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint),
        )
        return meta.size

    def _download(
        self,
        repo_id: str,
        repo_type: str,
        revision: str,
        path: str,
        *,
        local_dir: Path | None = None,
        progress: Progress | None = None,
    ) -> Path:
        from huggingface_hub import hf_hub_download

        cache_dir = str(self.cfg.cache_dir) if self.cfg.cache_dir is not None else None
        result = self._call(
            f"download {repo_id}@{revision[:12]}/{path}",
            lambda: hf_hub_download(
                repo_id,
                path,
                repo_type=repo_type,
                revision=revision,
                cache_dir=None if local_dir is not None else cache_dir,
                local_dir=local_dir,
                token=self.token,
                endpoint=self.endpoint,
                tqdm_class=_forwarding_tqdm(progress),
            ),
        )
        return Path(str(result))

    def _read_small(
        self, repo_id: str, repo_type: str, revision: str, path: str, limit: int
    ) -> bytes:
        size = self._file_size(repo_id, repo_type, revision, path)
        if size is not None and size > limit:
            raise Rejected("too_large", f"{repo_id}/{path}: {size} bytes, limit {limit}")
        body = self._download(repo_id, repo_type, revision, path).read_bytes()
        if len(body) > limit:
            raise Rejected("too_large", f"{repo_id}/{path}: {len(body)} bytes, limit {limit}")
        return body

    def _tree(
        self, repo_id: str, repo_type: str, revision: str, path: str | None, *, expand: bool
    ) -> list[Any]:
        """Files (not folders) under `path`, recursively; [] when `path` does not exist."""
        from huggingface_hub.hf_api import RepoFile

        try:
            entries = self._call(
                f"list {repo_id}@{revision[:12]}/{path or ''}",
                lambda: list(
                    self.api.list_repo_tree(
                        repo_id,
                        path_in_repo=path,
                        recursive=True,
                        expand=expand,
                        revision=revision,
                        repo_type=repo_type,
                    )
                ),
            )
        except NotFound:
            return []
        return [e for e in entries if isinstance(e, RepoFile)]

    # ---- checkpoints -------------------------------------------------------------------
    def _provenance_at(self, commit: str) -> Provenance:
        body = self._read_small(
            self._ckpt_repo(), "model", commit, PROVENANCE_FILE, PROVENANCE_MAX_BYTES
        )
        return parse_provenance(body)

    def list_checkpoints(self) -> list[CheckpointRef]:
        repo = self._ckpt_repo()
        try:
            refs = self._call(f"refs of {repo}", lambda: self.api.list_repo_refs(repo))
        except NotFound:
            return []
        out = []
        for tag in refs.tags:
            window = layout.parse_window_revision(tag.name)
            if window is not None:
                out.append(CheckpointRef(window, tag.name, tag.target_commit, repo))
        return sorted(out, key=lambda r: r.window)

    def resolve_checkpoint(self, revision: str) -> CheckpointRef:
        repo = self._ckpt_repo()
        window = layout.parse_window_revision(revision)
        if window is not None:
            for ref in self.list_checkpoints():
                if ref.window == window:
                    return ref
            raise NotFound(f"{repo} has no checkpoint for window {window} (no tag {revision})")
        if revision == layout.LATEST:
            # The highest tagged window, not `main`: a publish that crashed between its
            # commit and its tag has not published that window yet.
            published = self.list_checkpoints()
            if not published:
                raise NotFound(f"{repo} has no published checkpoint (no window-<w> tag)")
            return published[-1]
        commit = self._head_sha(repo, "model", revision)
        try:
            prov = self._provenance_at(commit)
        except NotFound:
            raise NotFound(
                f"{repo}@{revision} is not a tensormine checkpoint (no {PROVENANCE_FILE})"
            ) from None
        return CheckpointRef(prov.window, layout.window_revision(prov.window), commit, repo)

    def read_checkpoint_file(self, ref: CheckpointRef, name: str, max_bytes: int) -> bytes:
        return self._read_small(
            ref.source, "model", ref.commit, layout.safe_relpath(name), max_bytes
        )

    def fetch_checkpoint_files(
        self, ref: CheckpointRef, names: list[str], dest: Path, progress: Progress | None
    ) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for name in names:
            self._download(
                ref.source,
                "model",
                ref.commit,
                layout.safe_relpath(name),
                local_dir=dest,
                progress=progress,
            )
        # hf_hub_download(local_dir=...) keeps its bookkeeping in dest/.cache/huggingface;
        # a pulled checkpoint is a plain model folder, so drop it.
        shutil.rmtree(dest / ".cache" / "huggingface", ignore_errors=True)
        cache = dest / ".cache"
        if cache.is_dir() and not any(cache.iterdir()):
            cache.rmdir()

    @contextmanager
    def staging_dir(self) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="tensormine-stage-") as tmp:
            yield Path(tmp)

    def commit_checkpoint(self, folder: Path, window: int) -> CheckpointRef:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        repo = self._ckpt_repo()
        tag = layout.window_revision(window)
        ours = parse_provenance((folder / PROVENANCE_FILE).read_bytes())
        self._ensure_repo(repo, "model")
        if any(r.window == window for r in self.list_checkpoints()):
            raise StoreConflict(f"window {window} is already published in {repo} (tag {tag})")
        parent = self._head_sha(repo, "model", "main")
        commit = self._matching_main(repo, parent, ours)
        if commit is None:
            local = sorted(
                p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
            )
            remote = {e.path for e in self._tree(repo, "model", parent, None, expand=False)}
            stale = sorted(remote - set(local) - HUB_HOUSEKEEPING)
            operations: list[Any] = [
                CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel))
                for rel in local
            ]
            operations += [CommitOperationDelete(path_in_repo=rel) for rel in stale]
            try:
                info = self._call(
                    f"commit window {window} to {repo}",
                    lambda: self.api.create_commit(
                        repo,
                        operations,
                        commit_message=f"tensormine: global model after window {window}",
                        revision="main",
                        parent_commit=parent,
                    ),
                )
                commit = str(info.oid)
            except StoreConflict:
                # A retried commit whose first attempt landed conflicts with itself.
                commit = self._matching_main(repo, self._head_sha(repo, "model", "main"), ours)
                if commit is None:
                    raise
        self._tag(repo, tag, commit)
        logger.info("published %s@%s (commit %s)", repo, tag, commit[:12])
        return CheckpointRef(window, tag, commit, repo)

    def _matching_main(self, repo: str, head: str, ours: Provenance) -> str | None:
        """`head` if main already holds exactly this checkpoint (a publish that crashed or
        lost its reply between commit and tag), else None."""
        try:
            theirs = self._provenance_at(head)
        except (NotFound, Rejected):
            return None
        if theirs.window == ours.window and theirs.files == ours.files:
            logger.warning("%s main already holds window %d; tagging it", repo, ours.window)
            return head
        return None

    def _tag(self, repo: str, tag: str, commit: str) -> None:
        try:
            self._call(
                f"tag {repo}@{commit[:12]} as {tag}",
                lambda: self.api.create_tag(repo, tag=tag, revision=commit),
            )
        except StoreConflict:
            existing = {r.revision: r.commit for r in self.list_checkpoints()}
            if existing.get(tag) != commit:
                raise

    # ---- contributions -----------------------------------------------------------------
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
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        repo, kind = self._contrib_repo(), self.contributions_repo_type
        folder = layout.contribution_dir(window, shard)
        self._ensure_repo(repo, kind)
        head = self._head_sha(repo, kind, "main")
        old = [
            e.path
            for e in self._tree(repo, kind, head, folder, expand=False)
            if e.path.rsplit("/", 1)[-1].startswith(f"{hotkey}-")
            and e.path.endswith(".safetensors")
            and e.path != f"{folder}/{file_name}"
        ]
        operations: list[Any] = [
            CommitOperationAdd(
                path_in_repo=f"{folder}/{file_name}", path_or_fileobj=str(tensor_file)
            ),
            CommitOperationAdd(
                path_in_repo=f"{folder}/{layout.contribution_manifest_name(hotkey)}",
                path_or_fileobj=manifest,
            ),
        ]
        operations += [CommitOperationDelete(path_in_repo=p) for p in old]
        info = self._call(
            f"commit contribution {folder}/{hotkey} to {repo}",
            lambda: self.api.create_commit(
                repo,
                operations,
                repo_type=kind,
                commit_message=f"tensormine: contribution window {window} shard {shard}",
                revision="main",
            ),
        )
        for ref in self._list(repo, kind, str(info.oid), window, shard):
            if ref.hotkey == hotkey:
                return ref
        raise RemoteError(f"{repo}: the contribution committed as {info.oid} is not listed")

    def _list(
        self, repo: str, kind: str, commit: str, window: int | None, shard: int | None
    ) -> list[ContributionRef]:
        if window is None:
            path = layout.CONTRIBUTIONS
        elif shard is None:
            path = f"{layout.CONTRIBUTIONS}/window-{window}"
        else:
            path = layout.contribution_dir(window, shard)
        refs = []
        for entry in self._tree(repo, kind, commit, path, expand=True):
            parsed = layout.parse_contribution_path(entry.path)
            if parsed is None:
                continue
            w, s, hotkey = parsed
            if (window is not None and w != window) or (shard is not None and s != shard):
                continue
            if entry.last_commit is None:
                raise RemoteError(f"{repo}: the tree listing has no commit date for {entry.path}")
            received = entry.last_commit.date
            if received.tzinfo is None:
                received = received.replace(tzinfo=dt.UTC)
            refs.append(
                ContributionRef(
                    window=w,
                    shard=s,
                    hotkey=hotkey,
                    source=hub_location(repo, kind),
                    manifest_path=entry.path,
                    received_at=received,
                    revision=commit,
                )
            )
        return sorted(refs, key=lambda r: (r.window, r.shard, r.hotkey))

    def list_contributions(self, window: int | None, shard: int | None) -> list[ContributionRef]:
        repo, kind = self._contrib_repo(), self.contributions_repo_type
        try:
            head = self._head_sha(repo, kind, "main")
        except NotFound:
            return []
        return self._list(repo, kind, head, window, shard)

    def read_manifest(self, ref: ContributionRef, max_bytes: int) -> bytes:
        repo, kind = parse_hub_location(ref.source)
        try:
            return self._read_small(repo, kind, ref.revision, ref.manifest_path, max_bytes)
        except NotFound:
            raise Rejected("not_found", f"{ref.manifest_path} is missing") from None

    def contribution_file(self, ref: ContributionRef, file_name: str, max_bytes: int) -> Path:
        repo, kind = parse_hub_location(ref.source)
        folder = ref.manifest_path.rsplit("/", 1)[0]
        path = f"{folder}/{layout.safe_relpath(file_name)}"
        try:
            size = self._file_size(repo, kind, ref.revision, path)
            if size is not None and size > max_bytes:
                raise Rejected("too_large", f"{file_name}: {size} bytes, limit {max_bytes}")
            return self._download(repo, kind, ref.revision, path)
        except NotFound:
            raise Rejected("not_found", f"{ref.manifest_path} names {file_name}, missing") from None

    # ---- small files exchanged between participants (proofs) ---------------------------
    def put_files(self, folder: str, files: Mapping[str, bytes | Path], *, message: str) -> None:
        from huggingface_hub import CommitOperationAdd

        repo, kind = self._contrib_repo(), self.contributions_repo_type
        operations = [
            CommitOperationAdd(rel, str(body) if isinstance(body, Path) else body)
            for rel, body in exchange_files(folder, files)
        ]
        self._ensure_repo(repo, kind)
        self._call(
            f"commit {folder} to {repo}",
            lambda: self.api.create_commit(
                repo, operations, repo_type=kind, commit_message=message, revision="main"
            ),
        )
        logger.info("put %d files in %s/%s (%s)", len(operations), repo, folder, message)

    def fetch_file(self, path: str, max_bytes: int) -> Path | None:
        repo, kind = self._contrib_repo(), self.contributions_repo_type
        rel = layout.safe_relpath(path)
        try:
            head = self._head_sha(repo, kind, "main")
            size = self._file_size(repo, kind, head, rel)
            if size is not None and size > max_bytes:
                raise Rejected("too_large", f"{repo}/{rel}: {size} bytes, limit {max_bytes}")
            local = self._download(repo, kind, head, rel)
        except NotFound:
            return None
        if local.stat().st_size > max_bytes:  # the Hub did not say its size beforehand
            raise Rejected("too_large", f"{repo}/{rel}: over {max_bytes} bytes")
        return local
