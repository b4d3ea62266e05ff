"""A validator's side of commit-reveal on the local ledger: secrets kept until revealed.

    store = PendingReveals.shared(ledger.genesis_hash, key.address, folder=run_dir)
    xt = commit_and_reveal(ledger, key, uids, u16_weights, store)   # what set_weights does
    start_revealer(ledger.path, key, store)      # reveals on time if set_weights is not called

`commit_and_reveal` first reveals every earlier commit of the key whose reveal window the
next block belongs to (`chain.commit_reveal`), then commits the new weights with a fresh
random salt; it returns the commit's extrinsic hash. The salt and the weights stay in a
`PendingReveals` store until the reveal: in memory, or in a JSON file (mode 600) in a
folder (a validator's run folder) so that a restarted validator can still reveal.

Stores are shared within a process per (ledger, hotkey): a handle opened again
(`Chain.reopen`), or a `LocalChain` made per call, finds the secrets another one
committed. A validator that sets weights less often than once per epoch would miss its
reveal windows; `start_revealer` runs a daemon thread that reveals due commits at each
new window until nothing is pending (it stops on its own when the ledger stops producing
blocks). Submissions of the store's reveals and commits hold the store's lock, so the
thread and the caller do not race each other for nonces; `Ledger.submit_call` signs again
when one of the key's other calls took the nonce.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from chain.commit_reveal import commit_hash, pending_commits, reveal_window
from chain.errors import ChainError
from chain.interface import SigningKey
from chain.ledger import Ledger

logger = logging.getLogger(__name__)

FORMAT = "tensormine-pending-reveals"
SALT_BYTES = 16
STALL_BLOCKS = 20  # a revealer stops after this many block times without a new block
STALL_MIN_S = 60.0


@dataclass(frozen=True)
class PendingReveal:
    """What a commit hides: the wire weights and the salt, with the commit's and (once
    submitted) the reveal's extrinsic hashes."""

    commit_hash: str
    uids: tuple[int, ...]
    weights: tuple[int, ...]
    salt: str
    commit_xt: str | None = None
    reveal_xt: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "commit_hash": self.commit_hash,
            "uids": list(self.uids),
            "weights": list(self.weights),
            "salt": self.salt,
            "commit_xt": self.commit_xt,
            "reveal_xt": self.reveal_xt,
        }

    @classmethod
    def from_json(cls, data: Any) -> PendingReveal:
        fields = {"commit_hash", "uids", "weights", "salt", "commit_xt", "reveal_xt"}
        if not isinstance(data, dict) or set(data) != fields:
            raise ValueError(f"a pending reveal has exactly the fields {sorted(fields)}")
        uids, weights = data["uids"], data["weights"]
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in [*uids, *weights])
        texts = (data["commit_hash"], data["salt"])
        optional = (data["commit_xt"], data["reveal_xt"])
        if not (
            isinstance(uids, list)
            and isinstance(weights, list)
            and ints
            and all(isinstance(t, str) for t in texts)
            and all(v is None or isinstance(v, str) for v in optional)
        ):
            raise ValueError("a pending reveal's fields have the wrong types")
        return cls(data["commit_hash"], tuple(uids), tuple(weights), data["salt"], *optional)


class PendingReveals:
    """One hotkey's unrevealed commits on one ledger; thread-safe; written through to
    `path` (atomically, mode 600) when it has one."""

    _shared: ClassVar[dict[tuple[str, str], PendingReveals]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, genesis: str, hotkey: str, path: Path | None = None) -> None:
        self.genesis = genesis
        self.hotkey = hotkey
        self.path = path
        self.lock = threading.RLock()
        self._entries: dict[str, PendingReveal] = {}
        if path is not None and path.exists():
            self._entries = self._load(path)

    @staticmethod
    def file_for(folder: Path, genesis: str, hotkey: str) -> Path:
        return folder / f"pending-reveals-{genesis[:16]}-{hotkey}.json"

    @classmethod
    def shared(cls, genesis: str, hotkey: str, folder: Path | None = None) -> PendingReveals:
        """This process's store for (ledger, hotkey). Given a folder, the store keeps its
        file there (an in-memory store made earlier moves there, keeping its entries)."""
        with cls._shared_lock:
            store = cls._shared.get((genesis, hotkey))
            if store is None:
                path = None if folder is None else cls.file_for(folder, genesis, hotkey)
                store = cls(genesis, hotkey, path)
                cls._shared[(genesis, hotkey)] = store
            elif folder is not None and store.path is None:
                store.attach(cls.file_for(folder, genesis, hotkey))
            return store

    def attach(self, path: Path) -> None:
        """Keep this store in `path` from now on, merging what the file already holds."""
        with self.lock:
            if path.exists():
                self._entries = {**self._load(path), **self._entries}
            self.path = path
            self._save()

    def _load(self, path: Path) -> dict[str, PendingReveal]:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            if data.get("genesis") != self.genesis or data.get("hotkey") != self.hotkey:
                raise ValueError("it belongs to another ledger or hotkey")
            entries = [PendingReveal.from_json(e) for e in data["reveals"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ChainError(f"{path}: unreadable pending reveals ({exc})") from exc
        return {e.commit_hash: e for e in entries}

    def _save(self) -> None:
        if self.path is None:
            return
        body = {
            "format": FORMAT,
            "genesis": self.genesis,
            "hotkey": self.hotkey,
            "reveals": [e.to_json() for e in self._entries.values()],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)

    def entries(self) -> list[PendingReveal]:
        with self.lock:
            return list(self._entries.values())

    def get(self, digest: str) -> PendingReveal | None:
        with self.lock:
            return self._entries.get(digest)

    def put(self, entry: PendingReveal) -> None:
        with self.lock:
            self._entries[entry.commit_hash] = entry
            self._save()

    def drop(self, digest: str) -> None:
        with self.lock:
            if self._entries.pop(digest, None) is not None:
                self._save()

    def __len__(self) -> int:
        with self.lock:
            return len(self._entries)


def reveal_due(ledger: Ledger, key: SigningKey, store: PendingReveals) -> list[str]:
    """Submit a reveal for each stored commit whose reveal window is the next block's and
    forget the commits that can no longer be revealed (revealed, replaced by a later
    commit of the same window, expired, refused). Returns the reveals' extrinsic hashes;
    a reveal the ledger refuses at once is logged and left for the next call."""
    cfg = ledger.config
    hashes: list[str] = []
    with store.lock:
        window = reveal_window(ledger.block_number() + 1, cfg.netuid, cfg.tempo)
        on_chain = {c.commit_hash: c for c in pending_commits(ledger.conn, key.address)}
        for entry in store.entries():
            commit = on_chain.get(entry.commit_hash)
            if commit is None:
                # Still in the pool, or gone for good once the commit has a receipt.
                if entry.commit_xt is None or ledger.receipt(entry.commit_xt) is not None:
                    store.drop(entry.commit_hash)
                continue
            due = commit.epoch + cfg.reveal_period_epochs
            if due < window:
                logger.warning(
                    "the weights committed in block %d were not revealed in time (window %d, "
                    "now %d): they count for nothing",
                    commit.block,
                    due,
                    window,
                )
                store.drop(entry.commit_hash)
                continue
            if due > window:
                continue
            if entry.reveal_xt is not None and ledger.receipt(entry.reveal_xt) is None:
                continue  # its reveal waits in the pool
            args = {"uids": list(entry.uids), "weights": list(entry.weights), "salt": entry.salt}
            try:
                xt = ledger.submit_call(key, "reveal_weights", args)
            except ChainError as exc:  # e.g. the window turned meanwhile: the next call says
                logger.warning("revealing the commit of block %d: %s", commit.block, exc)
                continue
            store.put(replace(entry, reveal_xt=xt))
            hashes.append(xt)
    return hashes


@dataclass(frozen=True)
class Submitted:
    """The extrinsic hashes of one `commit_and_reveal`: the commit and the reveals."""

    commit: str
    reveals: tuple[str, ...]


def commit_and_reveal(
    ledger: Ledger,
    key: SigningKey,
    uids: Sequence[int],
    weights: Sequence[int],
    store: PendingReveals,
) -> Submitted:
    """Reveal what is due (`reveal_due`), then commit `weights` (wire u16 values) with a
    fresh salt. The secret is stored before the commit is submitted, so a crash in
    between loses nothing that can be revealed."""
    cfg = ledger.config
    salt = os.urandom(SALT_BYTES).hex()
    digest = commit_hash(ledger.genesis_hash, cfg.netuid, key.address, uids, weights, salt)
    entry = PendingReveal(digest, tuple(int(u) for u in uids), tuple(int(w) for w in weights), salt)
    with store.lock:
        reveals = reveal_due(ledger, key, store)
        store.put(entry)
        try:
            xt = ledger.submit_call(key, "commit_weights", {"commit_hash": digest})
        except ChainError:
            store.drop(digest)
            raise
        store.put(replace(entry, commit_xt=xt))
    return Submitted(xt, tuple(reveals))


def wait_reveals(ledger: Ledger, hashes: Sequence[str], timeout: float | None) -> None:
    """Wait for reveals to be included; a refused one is logged (its commit then counts
    for nothing), not raised: the caller's new commit stands on its own."""
    for xt in hashes:
        try:
            ledger.wait(xt, timeout=timeout)
        except ChainError as exc:
            logger.warning("weights reveal %s… refused: %s", xt[:12], exc)


class _Revealer(threading.Thread):
    def __init__(self, path: Path, key: SigningKey, store: PendingReveals) -> None:
        super().__init__(name=f"revealer-{key.address[:8]}", daemon=True)
        self.path, self.key, self.store = path, key, store

    def run(self) -> None:
        try:
            with Ledger(self.path) as ledger:
                self._loop(ledger)
        except (ChainError, sqlite3.Error, OSError) as exc:
            logger.warning("revealer for %s stopped: %s", self.key.address, exc)
        finally:
            self._deregister()

    def _deregister(self) -> None:
        with _revealers_lock:
            if _revealers.get((str(self.path), self.key.address)) is self:
                del _revealers[(str(self.path), self.key.address)]

    def _done(self) -> bool:
        # Under the registry's lock: a commit stored after this check finds no revealer
        # registered and starts one.
        with _revealers_lock:
            if len(self.store):
                return False
            if _revealers.get((str(self.path), self.key.address)) is self:
                del _revealers[(str(self.path), self.key.address)]
            return True

    def _loop(self, ledger: Ledger) -> None:
        block_time = ledger.config.block_time_s
        stall = max(STALL_MIN_S, STALL_BLOCKS * block_time)
        head, moved = -1, time.monotonic()
        while not self._done():
            now = ledger.block_number()
            if now != head:
                head, moved = now, time.monotonic()
                try:
                    reveal_due(ledger, self.key, self.store)
                except ChainError as exc:
                    logger.warning("revealing weights at block %d: %s", now + 1, exc)
            elif time.monotonic() - moved > stall:
                logger.warning("no new block on %s for %.0fs: revealer stops", self.path, stall)
                return
            time.sleep(min(1.0, block_time / 2))


_revealers: dict[tuple[str, str], _Revealer] = {}
_revealers_lock = threading.Lock()


def start_revealer(path: Path, key: SigningKey, store: PendingReveals) -> None:
    """Make sure a daemon thread reveals `store`'s commits on time (one per ledger file
    and key in this process; it ends when nothing is left to reveal)."""
    with _revealers_lock:
        running = _revealers.get((str(path), key.address))
        if running is not None and running.is_alive():
            return
        thread = _Revealer(path, key, store)
        _revealers[(str(path), key.address)] = thread
        thread.start()
