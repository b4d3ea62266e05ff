"""A loopback HTTP server that speaks enough of the Hugging Face Hub's protocol for tests.

    hub = FakeHub(tmp_path / "blobs").start()      # http://127.0.0.1:<port>
    HfApi(endpoint=hub.url).create_repo("org/model")
    ...
    hub.fail("POST", r"/commit/", status=503, times=2)   # the next 2 commits get a 503
    hub.stop()

It is a test fixture, not a product feature: one process, state in memory, file bodies on
disk by sha256. It answers what the real `huggingface_hub` client sends for the calls the
store makes, with the Hub's status codes and headers:

- ``POST /api/repos/create`` (409 with ``url`` when the repo exists; a new repo gets an
  initial commit holding ``.gitattributes``, as on the Hub);
- ``GET /api/{models,datasets}/{id}[/revision/{rev}]`` (repo info with ``sha``);
- ``POST .../preupload/{rev}`` (``regular`` upload mode, or ``lfs`` for files of at least
  `lfs_threshold` bytes), ``POST .../commit/{rev}`` (NDJSON header / file / lfsFile /
  deletedFile / deletedFolder lines, ``parentCommit`` honoured with a 412);
- ``HEAD|GET /[datasets/]{id}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``
  (``X-Linked-Etag``/``X-Linked-Size`` for LFS files), byte ranges, and ``X-Error-Code``
  RepoNotFound / RevisionNotFound / EntryNotFound;
- ``GET /api/agent-harnesses`` (a registry the client fetches for its user agent);
- ``GET .../refs``, ``.../commits/{rev}``, ``.../tree/{rev}[/{path}]`` (``recursive`` and
  ``expand`` with each file's last commit), ``POST .../branch/{name}`` and
  ``.../tag/{rev}``, ``POST /api/validate-yaml``;
- the LFS batch API and a streaming PUT target for ``lfs`` uploads (chunked bodies too).

Every request is logged in `requests` (method, path, Authorization header); requests to
routes it does not know land in `unhandled` and get a plain 404, so a test can assert
that the client used nothing else. `fail()` injects errors (429 with ``Retry-After``,
5xx) into the next matching requests.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

CHUNK = 1 << 20
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_date(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Blob:
    sha256: str
    size: int
    git_oid: str  # git blob id for regular files; for LFS files the sha256, as the Hub does
    lfs: bool


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    date: dt.datetime
    title: str
    message: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    status: int
    times: int
    retry_after: int | None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class FakeHub:
    """The server's state and its thread; see the module docstring."""

    def __init__(
        self,
        blob_dir: Path,
        *,
        lfs_threshold: int | None = None,
        now: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.blob_dir = blob_dir
        blob_dir.mkdir(parents=True, exist_ok=True)
        self.lfs_threshold = lfs_threshold
        self.now = now or (lambda: dt.datetime.now(dt.UTC))
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.faults: list[Fault] = []
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "start() the server first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ---- test controls ---------------------------------------------------------------
    def fail(
        self,
        method: str,
        pattern: str,
        *,
        status: int,
        times: int = 1,
        retry_after: int | None = None,
    ) -> None:
        """Answer the next `times` requests matching (method, path regex) with `status`."""
        with self.lock:
            self.faults.append(Fault(method, re.compile(pattern), status, times, retry_after))

    def count(self, method: str, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for m, p, _ in self.requests if m == method and rx.search(p))

    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def tamper(self, repo_id: str, path: str, data: bytes, repo_type: str = "model") -> None:
        """Replace a file's bytes in every commit, as a compromised mirror would (tests only)."""
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            blob = self._store_bytes(data, lfs=False)
            for oid, commit in list(repo.commits.items()):
                if path in commit.files:
                    files = {**commit.files, path: blob}
                    repo.commits[oid] = Commit(
                        oid, commit.parent, commit.date, commit.title, commit.message, files
                    )

    # ---- storage helpers -------------------------------------------------------------
    def _store_bytes(self, data: bytes, *, lfs: bool) -> Blob:
        sha = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha)
        if not path.exists():
            tmp = path.with_suffix(f".tmp{uuid.uuid4().hex}")
            tmp.write_bytes(data)
            tmp.replace(path)
        return Blob(sha, len(data), sha if lfs else git_blob_oid(data), lfs)

    def _new_commit(
        self, repo: Repo, parent: str | None, files: dict[str, Blob], title: str, message: str
    ) -> Commit:
        when = self.now()
        seed = json.dumps(
            [parent, sorted((p, b.sha256) for p, b in files.items()), when.isoformat(), title]
        ).encode()
        oid = hashlib.sha1(seed + uuid.uuid4().bytes).hexdigest()
        commit = Commit(oid, parent, when, title, message, dict(files))
        repo.commits[oid] = commit
        return commit

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        oid = repo.branches.get(revision) or repo.tags.get(revision)
        if oid is None and revision in repo.commits:
            oid = revision
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    def _last_commit(self, repo: Repo, head: Commit, path: str) -> Commit:
        """The newest commit at or before `head` that changed `path`."""
        blob = head.files.get(path)
        current = head
        while current.parent is not None:
            parent = repo.commits[current.parent]
            if parent.files.get(path) != blob:
                break
            current = parent
        return current

    def _prefix(self, repo_type: str) -> str:
        return "datasets/" if repo_type == "dataset" else ""


def _type(segment: str | None) -> str:
    return {"models": "model", "datasets": "dataset", None: "model"}.get(segment, "model")


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API = r"^/api/(?P<kind>models|datasets)/" + _REPO
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(r"^/api/agent-harnesses$"), "agent_harnesses"),
    ("GET", re.compile(_API + r"(?:/revision/(?P<rev>[^/]+))?$"), "repo_info"),
    ("POST", re.compile(_API + r"/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(_API + r"/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(_API + r"/refs$"), "refs"),
    ("GET", re.compile(_API + r"/commits/(?P<rev>[^/]+)$"), "commits"),
    ("GET", re.compile(_API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>[^/]+))?$"), "tree"),
    ("POST", re.compile(_API + r"/branch/(?P<name>[^/]+)$"), "branch"),
    ("POST", re.compile(_API + r"/tag/(?P<rev>[^/]+)$"), "tag"),
    (
        "HEAD",
        re.compile(
            r"^/(?:(?P<kind>datasets)/)?" + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"
        ),
        "resolve",
    ),
    (
        "GET",
        re.compile(
            r"^/(?:(?P<kind>datasets)/)?" + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"
        ),
        "resolve",
    ),
    (
        "POST",
        re.compile(r"^/(?:(?P<kind>datasets)/)?" + _REPO + r"\.git/info/lfs/objects/batch$"),
        "lfs_batch",
    ),
    ("PUT", re.compile(r"^/__lfs/(?P<oid>[0-9a-f]{64})$"), "lfs_put"),
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY each response
    # would wait out the client's delayed ACK (~40 ms).
    disable_nagle_algorithm = True
    fake: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        return

    # ---- plumbing --------------------------------------------------------------------
    def _body_chunks(self) -> Any:
        """Yield the request body in chunks (Content-Length or chunked encoding)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                remaining = size
                while remaining:
                    data = self.rfile.read(min(CHUNK, remaining))
                    remaining -= len(data)
                    yield data
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                data = self.rfile.read(min(CHUNK, remaining))
                if not data:
                    return
                remaining -= len(data)
                yield data

    def _body(self) -> bytes:
        return b"".join(self._body_chunks())

    def _json_body(self) -> Any:
        body = self._body()
        return json.loads(body) if body else {}

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(
            status,
            json.dumps(obj).encode(),
            {"Content-Type": "application/json", **(headers or {})},
        )

    def _dispatch(self) -> None:
        fake = self.fake
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        fake.requests.append((self.command, path, self.headers.get("Authorization")))
        with fake.lock:
            for fault in fake.faults:
                if fault.times > 0 and fault.method == self.command and fault.pattern.search(path):
                    fault.times -= 1
                    self._body()
                    extra = (
                        {"Retry-After": str(fault.retry_after)}
                        if fault.retry_after is not None
                        else {}
                    )
                    self._json(
                        fault.status,
                        {"error": "injected fault"},
                        {"X-Error-Message": "injected fault", **extra},
                    )
                    return
        for method, pattern, name in ROUTES:
            match = pattern.match(path)
            if method == self.command and match:
                try:
                    getattr(self, f"do_{name}")({k: v for k, v in match.groupdict().items()}, query)
                except HubError as err:
                    headers = {"X-Error-Message": err.message, **err.extra}
                    if err.code:
                        headers["X-Error-Code"] = err.code
                    self._json(err.status, {"error": err.message}, headers)
                return
        fake.unhandled.append((self.command, path))
        self._body()
        self._json(404, {"error": f"no route for {self.command} {path}"})

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _dispatch  # noqa: N815

    def _repo_of(self, groups: dict[str, str | None]) -> Repo:
        return self.fake._repo(_type(groups.get("kind")), unquote(str(groups["repo"])))

    # ---- API routes --------------------------------------------------------------------
    def do_create_repo(self, groups: dict[str, str | None], query: dict[str, list[str]]) -> None:
        body = self._json_body()
        repo_type = body.get("type") or "model"
        repo_id = (
            f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        )
        fake = self.fake
        url = f"{fake.url}/{fake._prefix(repo_type)}{repo_id}"
        with fake.lock:
            if (repo_type, repo_id) in fake.repos:
                self._json(409, {"error": "You already created this repo", "url": url})
                return
            repo = Repo(repo_id, repo_type, body.get("visibility") == "private")
            blob = fake._store_bytes(GITATTRIBUTES, lfs=False)
            first = fake._new_commit(repo, None, {".gitattributes": blob}, "initial commit", "")
            repo.branches["main"] = first.oid
            fake.repos[(repo_type, repo_id)] = repo
        self._json(200, {"url": url, "name": repo_id})

    def do_validate_yaml(self, groups: dict[str, str | None], query: dict[str, list[str]]) -> None:
        body = self._json_body()
        content = str(body.get("content", ""))
        if content.startswith("---") and content.count("---") < 2:
            self._json(400, {"errors": [{"message": "unterminated YAML front matter"}]})
            return
        self._json(200, {"errors": [], "warnings": []})

    def do_agent_harnesses(
        self, groups: dict[str, str | None], query: dict[str, list[str]]
    ) -> None:
        # The client fetches this registry once a day to tag its user agent.
        self._json(200, {"standardEnvVars": [], "harnesses": {}})

    def do_repo_info(self, groups: dict[str, str | None], query: dict[str, list[str]]) -> None:
        with self.fake.lock:
            repo = self._repo_of(groups)
            commit = self.fake._resolve(repo, unquote(groups["rev"] or "main"))
        siblings = [
            {"rfilename": p, "size": b.size, "blobId": b.git_oid}
            | ({"lfs": {"size": b.size, "sha256": b.sha256, "pointerSize": 134}} if b.lfs else {})
            for p, b in sorted(commit.files.items())
        ]
        self._json(
            200,
            {
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "private": repo.private,
                "lastModified": hub_date(commit.date),
                "tags": [],
                "siblings": siblings,
            },
        )

    def do_preupload(self, groups: dict[str, str | None], query: dict[str, list[str]]) -> None:
        body = self._json_body()
        fake = self.fake
        with fake.lock:
            repo = self._repo_of(groups)
            commit = fake._resolve(repo, unquote(str(groups["rev"])))
        files = []
        for item in body["files"]:
            lfs = fake.lfs_threshold is not None and item["size"] >= fake.lfs_threshold
            existing = commit.files.get(item["path"])
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": existing.git_oid if existing is not None else None,
                }
            )
        self._json(200, {"files": files, "commitOid": commit.oid})

    def do_commit(self, groups: dict[str, str | None], query: dict[str, list[str]]) -> None:
        fake = self.fake
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        with fake.lock:
            repo = self._repo_of(groups)
            branch = unquote(str(groups["rev"]))
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            header = lines[0]["value"] if lines and lines[0]["key"] == "header" else {}
            parent = header.get("parentCommit")
            if parent is not None and parent != head.oid:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    files[value["path"]] = fake._store_bytes(data, lfs=False)
                elif key == "lfsFile":
                    oid = value["oid"]
                    blob_path = fake.blob_path(oid)
                    if not blob_path.exists():
                        raise HubError(400, f"LFS object {oid} was never uploaded")
                    files[value["path"]] = Blob(oid, blob_path.stat().st_size, oid, True)
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for path in [p for p in files if p.startswith(prefix)]:
                        del files[path]
                else:
                    raise HubError(400, f"unknown commit line {key!r}")
            commit = fake._new_commit(
                repo, head.oid, files, header.get("summary", ""), header.get("description", "")
            )
            repo.branches[branch] = commit.oid
        url = f"{fake.url}/{fake._prefix(repo.repo_type)}{repo.repo_id}/commit/{commit.oid}"
        self._json(
            200,
            {"commitUrl": url, "commitOid": commit.oid, "success": True, "pullRequestUrl": None},
        )

    def do_refs(self, groups: dict[str, str | None], query: dict[str, list[str]]) -> None:
        with self.fake.lock:
            repo = self._repo_of(groups)
            branches = [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c}
                for n, c in sorted(repo.branches.items())
            ]
            tags = [
                {"name": n, "ref": f"refs/tags/{n}", "targetCommit": c}
                for n, c in sorted(repo.tags.items())
            ]
        self._json(200, {"branches": branches, "converts": [], "tags": tags, "pullRequests": []})

    def do_commits(self, groups: dict[str, str | None], query: dict[str, list[str]]) -> None:
        with self.fake.lock:
            repo = self._repo_of(groups)
            commit: Commit | None = self.fake._resolve(repo, unquote(str(groups["rev"])))
            out = []
            while commit is not None:
                out.append(
                    {
                        "id": commit.oid,
                        "authors": [{"user": "tester"}],
                        "date": hub_date(commit.date),
                        "title": commit.title,
                        "message": commit.message,
                    }
                )
                commit = repo.commits[commit.parent] if commit.parent else None
        self._json(200, out)

    def do_tree(self, groups: dict[str, str | None], query: dict[str, list[str]]) -> None:
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        expand = query.get("expand", ["false"])[0].lower() in ("true", "1")
        base = unquote(groups["path"] or "").strip("/")
        fake = self.fake
        with fake.lock:
            repo = self._repo_of(groups)
            head = fake._resolve(repo, unquote(str(groups["rev"])))
            prefix = base + "/" if base else ""
            below = {p: b for p, b in head.files.items() if p.startswith(prefix)}
            if base and not below:
                raise HubError(
                    404, f"{base} does not exist", "EntryNotFound", **{"X-Repo-Commit": head.oid}
                )
            entries: dict[str, dict[str, Any]] = {}
            for path, blob in sorted(below.items()):
                rest = path[len(prefix) :].split("/")
                # Folders on the way down: every level when recursive, else the first one.
                depths = range(1, len(rest)) if recursive else range(1, min(len(rest), 2))
                for depth in depths:
                    folder = prefix + "/".join(rest[:depth])
                    entries.setdefault(
                        folder, {"type": "directory", "oid": "0" * 40, "path": folder}
                    )
                if not recursive and len(rest) > 1:
                    continue
                entry: dict[str, Any] = {
                    "type": "file",
                    "oid": blob.git_oid,
                    "size": blob.size,
                    "path": path,
                }
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": 134}
                if expand:
                    last = fake._last_commit(repo, head, path)
                    entry["lastCommit"] = {
                        "id": last.oid,
                        "title": last.title,
                        "date": hub_date(last.date),
                    }
                entries[path] = entry
        self._json(200, list(entries.values()))

    def do_branch(self, groups: dict[str, str | None], query: dict[str, list[str]]) -> None:
        body = self._json_body()
        name = unquote(str(groups["name"]))
        with self.fake.lock:
            repo = self._repo_of(groups)
            if name in repo.branches:
                raise HubError(409, f"Branch {name} already exists")
            start = self.fake._resolve(repo, body.get("startingPoint") or "main")
            repo.branches[name] = start.oid
        self._json(200, {})

    def do_tag(self, groups: dict[str, str | None], query: dict[str, list[str]]) -> None:
        body = self._json_body()
        with self.fake.lock:
            repo = self._repo_of(groups)
            target = self.fake._resolve(repo, unquote(str(groups["rev"])))
            if body["tag"] in repo.tags:
                raise HubError(409, f"Tag {body['tag']} already exists")
            repo.tags[body["tag"]] = target.oid
        self._json(200, {})

    # ---- files -------------------------------------------------------------------------
    def do_resolve(self, groups: dict[str, str | None], query: dict[str, list[str]]) -> None:
        fake = self.fake
        path = unquote(str(groups["path"]))
        with fake.lock:
            repo = self._repo_of(groups)
            commit = fake._resolve(repo, unquote(str(groups["rev"])))
            blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", **{"X-Repo-Commit": commit.oid})
        etag = f'"{blob.git_oid}"'
        headers = {"X-Repo-Commit": commit.oid, "ETag": etag, "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers |= {"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)}
        start = 0
        match = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
        status = 200
        if match and int(match.group(1)) < blob.size:
            start, status = int(match.group(1)), 206
            headers["Content-Range"] = f"bytes {start}-{blob.size - 1}/{blob.size}"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(blob.size - start))
        self.end_headers()
        if self.command == "HEAD":
            return
        with fake.blob_path(blob.sha256).open("rb") as fh:
            fh.seek(start)
            while chunk := fh.read(CHUNK):
                self.wfile.write(chunk)

    def do_lfs_batch(self, groups: dict[str, str | None], query: dict[str, list[str]]) -> None:
        body = self._json_body()
        with self.fake.lock:
            self._repo_of(groups)
        objects = []
        for obj in body["objects"]:
            item: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self.fake.blob_path(obj["oid"]).exists():
                item["actions"] = {"upload": {"href": f"{self.fake.url}/__lfs/{obj['oid']}"}}
            objects.append(item)
        self._json(
            200,
            {"transfer": "basic", "objects": objects},
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def do_lfs_put(self, groups: dict[str, str | None], query: dict[str, list[str]]) -> None:
        oid = str(groups["oid"])
        target = self.fake.blob_path(oid)
        tmp = target.with_suffix(f".tmp{uuid.uuid4().hex}")
        digest = hashlib.sha256()
        with tmp.open("wb") as fh:
            for chunk in self._body_chunks():
                digest.update(chunk)
                fh.write(chunk)
        if digest.hexdigest() != oid:
            tmp.unlink()
            raise HubError(400, "sha256 of the uploaded body does not match the oid")
        tmp.replace(target)
        self._send(200)
