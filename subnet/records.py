"""What the live view, the plots and the summary read: the ledger and the jsonl files.

    snap = snapshot(ledger, run_dir, roster, book)

Miners append one line per window to ``<run dir>/miners/<name>/windows.jsonl`` and
validators to ``<run dir>/validators/<name>/windows.jsonl``; a line being written while
we read is skipped until it is whole. The validator's record is read by field name with
a few accepted spellings (`ValidatorWindow`), so a renamed field degrades the view to
a blank column instead of breaking the run.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chain.emission import blocks_to_reach, next_emission_change
from chain.ledger import Ledger
from chain.types import Neuron
from store.api import open_store
from store.config import StoreConfig
from store.errors import StoreError
from subnet.launch import StakeBook

logger = logging.getLogger(__name__)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Whole JSON-object lines of `path` ([] when absent)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line still being written, or noise
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def first_number(row: Mapping[str, Any], *keys: str) -> float | None:
    for k in keys:
        if (v := _number(row.get(k))) is not None:
            return v
    return None


def per_uid(row: Mapping[str, Any], *keys: str, inner: tuple[str, ...] = ()) -> dict[int, float]:
    """UID -> number from ``{"3": 0.5}`` or ``[{"uid": 3, "score": 0.5}, ...]`` under the
    first of `keys` present; `inner` names the number inside list items."""
    for k in keys:
        value = row.get(k)
        out: dict[int, float] = {}
        if isinstance(value, Mapping):
            for uid, v in value.items():
                if isinstance(v, Mapping):
                    v = first_number(v, *inner)
                if (num := _number(v)) is not None and str(uid).lstrip("-").isdigit():
                    out[int(uid)] = num
        elif isinstance(value, list):
            for item in value:
                if (
                    isinstance(item, Mapping)
                    and isinstance(item.get("uid"), int)
                    and (num := first_number(item, *inner)) is not None
                ):
                    out[int(item["uid"])] = num
        else:
            continue
        return out
    return {}


def verdict_of(row: Mapping[str, Any]) -> str:
    """A validator's verdict on one contribution, in a word: ok, copy of <uid>, own-data,
    heldout-trained, no-gain, the parts its group refused ("mismatch: parts …"), or the
    admission refusal's reason (missing, uncommitted, late, unrevealed, ...)."""
    if row.get("status") == "refused":
        return str(row.get("reason") or "refused")
    if row.get("copy_of") is not None:
        return f"copy of {row['copy_of']}"
    averaged = row.get("averaged")
    if isinstance(averaged, str) and averaged.startswith("mismatch"):
        return averaged  # "mismatch: parts 0-3, 9": what it sent is not what it committed
    if isinstance(row.get("verdict"), str):  # the validator's own word for it
        return str(row["verdict"]).replace("_", "-")
    if row.get("own_ok") is False:
        return "own-data"
    return "ok"


@dataclass(frozen=True)
class ValidatorWindow:
    """One line of a validator's ``windows.jsonl`` (`validation.report.WindowReport`):
    L(θ_w; E), L(θ_{w+1}; E) and, per miner UID, score, moving average, weight, verdict."""

    window: int
    heldout_loss: float | None
    next_heldout_loss: float | None
    scores: dict[int, float]
    ema: dict[int, float]
    weights: dict[int, float]
    verdicts: dict[int, str]
    published: str | None
    shards: dict[int, int] = field(default_factory=dict)  # uid -> the shard it sent
    shard_labels: dict[str, str] = field(default_factory=dict)  # "<s>" -> "experts 0–1", …

    def shard_scores(self) -> dict[int, float]:
        """Shard -> the sum of its miners' scores in this window."""
        out: dict[int, float] = {}
        for uid, shard in self.shards.items():
            out[shard] = out.get(shard, 0.0) + self.scores.get(uid, 0.0)
        return dict(sorted(out.items()))

    @classmethod
    def parse(cls, row: Mapping[str, Any]) -> ValidatorWindow | None:
        window = row.get("window")
        if not isinstance(window, int):
            return None
        miners = row.get("miners")
        items = [m for m in miners if isinstance(m, Mapping)] if isinstance(miners, list) else []
        verdicts = {int(m["uid"]): verdict_of(m) for m in items if isinstance(m.get("uid"), int)}
        published = row.get("published")
        shards = {
            int(m["uid"]): int(m["shard"])
            for m in items
            if isinstance(m.get("uid"), int) and isinstance(m.get("shard"), int)
        }
        labels = row.get("shard_labels")
        return cls(
            window=window,
            heldout_loss=first_number(row, "heldout_loss"),
            next_heldout_loss=first_number(row, "next_heldout_loss"),
            scores=per_uid(row, "miners", inner=("score",)),
            ema=per_uid(row, "miners", inner=("ema",)),
            weights=per_uid(row, "miners", inner=("weight",)),
            verdicts=verdicts,
            published=published if isinstance(published, str) else None,
            shards=shards,
            shard_labels=(
                {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
            ),
        )


@dataclass(frozen=True)
class Member:
    """One process of the roster, as the view lists it."""

    name: str
    role: str
    behaviour: str
    address: str


@dataclass
class Snapshot:
    block: int
    window: int
    issuance: int
    pending: int
    block_emission: int
    next_halving_block: int | None
    next_halving_issuance: int | None
    neurons: list[Neuron]
    earned: dict[int, int]  # uid -> emission received so far (stake beyond what was given)
    miners: dict[str, list[dict[str, Any]]]
    validators: dict[str, list[ValidatorWindow]]
    checkpoints: list[int]
    uid_of: dict[str, int]
    accounts_total: int  # free + staked over every account (the owner's too)
    status: dict[str, str] = field(default_factory=dict)

    @property
    def books_balance(self) -> bool:
        """The ledger's invariant: issuance == every balance and stake + pending."""
        return self.issuance == self.accounts_total + self.pending

    def heldout_by_window(self) -> dict[int, float]:
        """Held-out loss of θ_w per window: the validators' mean, else the miners' mean."""
        out: dict[int, list[float]] = {}
        for rows in self.validators.values():
            for r in rows:
                if r.heldout_loss is not None:
                    out.setdefault(r.window, []).append(r.heldout_loss)
        if not out:
            for mrows in self.miners.values():
                for m in mrows:
                    if isinstance(m.get("window"), int):
                        v = first_number(m, "heldout_loss")
                        if v is not None:
                            out.setdefault(int(m["window"]) + 1, []).append(v)
        return {w: sum(v) / len(v) for w, v in sorted(out.items())}

    def _latest_row(self, rows: list[ValidatorWindow], uid: int) -> ValidatorWindow | None:
        """The newest window in which `uid` contributed (not merely was missing)."""
        for row in reversed(rows):
            if uid in row.scores and row.verdicts.get(uid) != "missing":
                return row
        return None

    def latest_validator(self, uid: int) -> tuple[float | None, float | None, float | None]:
        """(score, moving average, weight) of `uid` in the newest window it contributed to,
        averaged over validators."""
        acc: list[list[float]] = [[], [], []]
        for rows in self.validators.values():
            last = self._latest_row(rows, uid)
            if last is None:
                continue
            for i, table in enumerate((last.scores, last.ema, last.weights)):
                if uid in table:
                    acc[i].append(table[uid])
        s, e, w = (sum(a) / len(a) if a else None for a in acc)
        return s, e, w

    def shard_label(self, shard: int) -> str:
        """The validators' name for a shard ("experts 2–3"), or its index."""
        for rows in self.validators.values():
            for row in reversed(rows):
                if str(shard) in row.shard_labels:
                    return f"{shard} ({row.shard_labels[str(shard)]})"
        return str(shard)

    def shard_scores(self) -> tuple[int, dict[int, float]] | None:
        """The newest window any validator scored: per shard the sum of its miners'
        scores, averaged over the validators that scored it."""
        latest = [rows[-1] for rows in self.validators.values() if rows]
        if not latest:
            return None
        window = max(r.window for r in latest)
        acc: dict[int, list[float]] = {}
        for row in latest:
            if row.window == window:
                for shard, score in row.shard_scores().items():
                    acc.setdefault(shard, []).append(score)
        return window, {s: sum(v) / len(v) for s, v in sorted(acc.items())}

    def latest_verdict(self, uid: int) -> str:
        """The verdicts on `uid`'s newest contribution, one per validator that judged it."""
        seen = [
            last.verdicts[uid]
            for rows in self.validators.values()
            if (last := self._latest_row(rows, uid)) is not None and uid in last.verdicts
        ]
        return "/".join(dict.fromkeys(seen)) if seen else ""


def miner_dir(run_dir: Path, name: str) -> Path:
    return run_dir / "miners" / name


def validator_dir(run_dir: Path, name: str) -> Path:
    return run_dir / "validators" / name


def list_checkpoint_windows(store_cfg: StoreConfig) -> list[int]:
    """Windows with a published checkpoint (the store's own listing)."""
    try:
        return sorted(ref.window for ref in open_store(store_cfg, create=False).list_checkpoints())
    except (StoreError, OSError) as exc:
        logger.debug("store not readable yet: %s", exc)
        return []


@dataclass(frozen=True)
class OneModel:
    """Per window whose round succeeded (some miner ended it in step): whether every
    in-step miner's θ_{w+1} is the published checkpoint of w+1, fingerprint for fingerprint."""

    matched: list[int]  # windows w whose checkpoint w+1 every in-step miner holds
    differs: dict[int, list[str]]  # window -> miners in step whose θ_{w+1} is not it
    unpublished: list[int]  # in-step windows with no checkpoint (or no fingerprint) yet

    @property
    def windows(self) -> int:
        return len(self.matched) + len(self.differs)

    def line(self) -> str:
        text = f"one model: {len(self.matched)}/{self.windows} windows"
        if self.differs:
            text += "; differs in " + ", ".join(
                f"window {w} ({', '.join(names)})" for w, names in sorted(self.differs.items())
            )
        if self.unpublished:
            text += f"; not published yet: {', '.join(map(str, self.unpublished))}"
        return text


def one_model(miners: Mapping[str, list[dict[str, Any]]], published: Mapping[int, str]) -> OneModel:
    """Compare each in-step miner's θ_{w+1} fingerprint (`windows.jsonl`) with the
    fingerprint of the published checkpoint of w+1 (`published`: window -> fingerprint)."""
    in_step: dict[int, dict[str, str]] = {}
    for name, rows in miners.items():
        for row in rows:
            if row.get("synced") and isinstance(row.get("fingerprint"), str):
                in_step.setdefault(int(row["window"]), {})[name] = row["fingerprint"]
    matched, differs, unpublished = [], {}, []
    for window, prints in sorted(in_step.items()):
        theirs = published.get(window + 1)
        if theirs is None:
            unpublished.append(window)
            continue
        off = sorted(name for name, fp in prints.items() if fp != theirs)
        if off:
            differs[window] = off
        else:
            matched.append(window)
    return OneModel(matched, differs, unpublished)


def published_fingerprints(store_cfg: StoreConfig) -> dict[int, str]:
    """window -> the fingerprint each published checkpoint's provenance names."""
    out: dict[int, str] = {}
    try:
        store = open_store(store_cfg, create=False)
        for ref in store.list_checkpoints():
            fingerprint = store.read_provenance(ref).fingerprint
            if fingerprint is not None:
                out[ref.window] = fingerprint
    except (StoreError, OSError) as exc:
        logger.debug("store not readable yet: %s", exc)
    return out


def snapshot(
    ledger: Ledger,
    run_dir: Path,
    members: list[Member],
    book: StakeBook,
    *,
    window_blocks: int,
    checkpoints: list[int],
) -> Snapshot:
    issuance, pending = ledger.issuance()
    block = ledger.block_number()
    emission = ledger.block_emission()
    change = next_emission_change(issuance)
    halving_block = None
    if change is not None and emission > 0:
        halving_block = block + blocks_to_reach(issuance, change, emission)
    neurons = ledger.neurons()
    uid_of = {}
    by_addr = {m.address: m.name for m in members}
    for n in neurons:
        if n.hotkey in by_addr:
            uid_of[by_addr[n.hotkey]] = n.uid
    earned = {n.uid: max(0, n.stake - book.given(n.hotkey)) for n in neurons}
    miners = {
        m.name: read_jsonl(miner_dir(run_dir, m.name) / "windows.jsonl")
        for m in members
        if m.role == "miner"
    }
    validators: dict[str, list[ValidatorWindow]] = {}
    for m in members:
        if m.role == "validator":
            rows = read_jsonl(validator_dir(run_dir, m.name) / "windows.jsonl")
            validators[m.name] = [v for r in rows if (v := ValidatorWindow.parse(r)) is not None]
    return Snapshot(
        block=block,
        window=block // window_blocks,
        issuance=issuance,
        pending=pending,
        block_emission=emission,
        next_halving_block=halving_block,
        next_halving_issuance=change,
        neurons=neurons,
        earned=earned,
        miners=miners,
        validators=validators,
        checkpoints=checkpoints,
        uid_of=uid_of,
        accounts_total=sum(a.balance + a.stake for a in ledger.accounts()),
    )


def append_ledger_history(path: Path, snap: Snapshot) -> None:
    """One line per window: what each UID had earned (for the emission plot)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {
        "window": snap.window,
        "block": snap.block,
        "issuance": snap.issuance,
        "pending": snap.pending,
        "earned": {str(k): v for k, v in snap.earned.items()},
    }
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
