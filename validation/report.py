"""What a validator tells about each window: one JSON line per window, and tables of them.

    append_report(path, report)                    # <run.dir>/validators/<name>/windows.jsonl
    reports = read_reports(path, last=5)
    console.print(window_table(reports))
    append_report(path, SkipRecord(validator="v0", block=b, windows=[5, 6]))
    tracker.log(window_metrics(report), step=report.window)      # W&B, one step a window

One `WindowReport` per scored window: the held-out loss of θ_w, and for every miner of the
window (and every refused hotkey) its shard, status, admission reason, loss delta,
own-data margin, t and outcome, held-out excess, copy verdict, the verdict in one word,
score, moving average and weight; the hivemind group checks; counts, seconds spent and
what was published. A validator that fell behind writes a `SkipRecord` line naming the
windows it did not score (it has no ``window`` key, so readers of window lines pass over
it). `tensormine validator report` prints both.

`window_metrics` is the same window as W&B charts it: numbers only, one key per UID and
figure, and each UID's verdict in one word as a key of its own (``uid/3/verdict/late``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

SCORED = "scored"
REFUSED = "refused"


@dataclass
class MinerRow:
    uid: int | None
    hotkey: str
    shard: int | None
    status: str  # scored | refused
    reason: str | None = None  # admission reason code when refused
    detail: str | None = None
    loss_delta: float | None = None
    step: float | None = None  # the step along Δ at which loss_delta was measured
    own_margin: float | None = None
    own_t: float | None = None
    own_ok: bool | None = None
    copy_of: int | None = None  # UID whose earlier Δ this one duplicates
    copy_cosine: float | None = None
    own_outcome: str | None = None  # pass | grace | fail | off | pow (`scoring.own_data_outcome`)
    heldout_excess: float | None = None  # gain on public E beyond generic train pages
    heldout_ratio: float | None = None  # heldout_excess / the own pages' gain beyond them
    heldout_t: float | None = None  # heldout_excess / its standard error
    heldout_ok: bool | None = None
    heldout_outcome: str | None = None  # pass | grace | fail (`scoring.heldout_outcome`)
    verdict: str | None = None  # ok, copy, own_data, heldout_trained, no_gain, or the reason
    committed_block: int | None = None  # the ledger block that took its commitment
    revealed: bool | None = None  # its contribution was listed by the reveal deadline
    averaged: str | None = None  # in | mismatch: parts … | dropped | absent (its group's word)
    pow: str | None = None  # proof of work: pass | fail: <reason> (`validation.proof_of_work`)
    pow_detail: str | None = None
    pow_rel_error: float | None = None  # worst checked segment's
    pow_cosine: float | None = None
    score: float = 0.0
    ema: float = 0.0
    weight: float = 0.0


@dataclass
class WindowReport:
    window: int
    validator: str
    block: int
    heldout_loss: float  # L(θ_w; E)
    contributions: int  # listed at the deadline
    admitted: int
    seconds: float
    eval_seconds: float
    published: str | None = None  # revision of θ_{w+1}, if this validator published it
    adopted: str | None = None  # revision adopted instead (another validator was first)
    next_heldout_loss: float | None = None  # L(θ_{w+1}; E)
    weights_set: bool = False
    committed: int = 0  # commitments the ledger holds for the window
    fingerprint: str = ""  # of θ_{w+1} as this validator computed it
    sources: dict[str, str] = field(default_factory=dict)  # "shard<s>" -> "group" | "store"
    # The window whose average θ_{w+1} stepped (w − 1 with `averaging.overlap`; -1: none);
    # the group fields and `averaged` in the rows are of its groups.
    averaged_window: int = -1
    # "shard<s>" -> {"error": relative error, "ok": bool, "members": [UIDs],
    #               "bytes_sent": int, "bytes_received": int} per group
    group_checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    miners: list[MinerRow] = field(default_factory=list)
    # "<s>" -> the shard's name (`train.shards.shard_labels`: "shared", "experts 2–3", …)
    shard_labels: dict[str, str] = field(default_factory=dict)

    def label(self, shard: int | None) -> str:
        if shard is None:
            return "-"
        return self.shard_labels.get(str(shard), f"shard {shard}")

    def to_json(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        return _finite(body)  # type: ignore[no-any-return]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> WindowReport:
        rows = [MinerRow(**row) for row in body.get("miners", [])]
        return cls(**{**body, "miners": rows})


def verdict(row: MinerRow) -> str:
    """A scored contribution's verdict in one word (the reason it earned nothing, or ok)."""
    if row.copy_of is not None:
        return "copy"
    if row.own_ok is False:
        return "own_data"
    if row.heldout_ok is False:
        return "heldout_trained"
    if row.score <= 0:
        return "no_gain"
    return "ok"


@dataclass(frozen=True)
class ShardSummary:
    """One shard of one window: what its miners sent and earned."""

    shard: int
    label: str
    contributions: int  # rows of the window for this shard (refused ones included)
    scored: int
    mean_loss_delta: float | None  # over scored rows
    score: float  # the shard's miners' scores, summed


def shard_summaries(report: WindowReport) -> list[ShardSummary]:
    """Per shard of the window (by shard index): its contributions, mean ΔL, total score.
    For a mixture of experts this is the score per expert group."""
    by_shard: dict[int, list[MinerRow]] = {}
    for row in report.miners:
        if row.shard is not None:
            by_shard.setdefault(row.shard, []).append(row)
    out = []
    for shard in sorted(by_shard):
        rows = by_shard[shard]
        deltas = [
            r.loss_delta
            for r in rows
            if r.status == SCORED and r.loss_delta is not None and math.isfinite(r.loss_delta)
        ]
        out.append(
            ShardSummary(
                shard=shard,
                label=report.label(shard),
                contributions=len(rows),
                scored=sum(1 for r in rows if r.status == SCORED),
                mean_loss_delta=sum(deltas) / len(deltas) if deltas else None,
                score=sum(r.score for r in rows),
            )
        )
    return out


def window_metrics(report: WindowReport) -> dict[str, float | int]:
    """The window's W&B metrics: held-out losses, counts and seconds, each group check,
    and per UID its score, moving average, weight, verdict and check numbers."""
    metrics: dict[str, float | int] = {
        "eval/heldout_loss": report.heldout_loss,
        "window/seconds": report.seconds,
        "window/eval_seconds": report.eval_seconds,
        "window/contributions": report.contributions,
        "window/admitted": report.admitted,
        "window/refused": sum(1 for r in report.miners if r.status == REFUSED),
        "window/weights_set": int(report.weights_set),
    }
    if report.next_heldout_loss is not None:
        metrics["eval/next_heldout_loss"] = report.next_heldout_loss
    for name, check in report.group_checks.items():
        metrics[f"averaging/{name}_group_error"] = float(check["error"])
        metrics[f"averaging/{name}_group_ok"] = int(bool(check["ok"]))
        for key in ("bytes_sent", "bytes_received"):  # as an auxiliary peer
            if key in check:
                metrics[f"averaging/{name}_{key}"] = int(check[key])
    for row in report.miners:
        if row.uid is None:
            continue
        prefix = f"uid/{row.uid}"
        metrics[f"{prefix}/score"] = row.score
        metrics[f"{prefix}/ema"] = row.ema
        metrics[f"{prefix}/weight"] = row.weight
        metrics[f"{prefix}/admitted"] = int(row.status == SCORED)
        if row.pow is not None:
            metrics[f"{prefix}/pow_ok"] = int(row.pow == "pass")
            if row.pow_rel_error is not None:
                metrics[f"{prefix}/pow_rel_error"] = row.pow_rel_error
        # The verdict in one word as its own key (W&B charts numbers, not strings):
        # uid/3/verdict/late = 1, uid/5/verdict/copy = 1, uid/2/verdict/ok = 1, ...
        metrics[f"{prefix}/verdict/{row.verdict or row.reason or 'ok'}"] = 1
        for key in ("loss_delta", "own_margin", "own_t", "heldout_excess", "copy_cosine"):
            value = getattr(row, key)
            if value is not None and math.isfinite(value):
                metrics[f"{prefix}/{key}"] = value
        if row.own_ok is not None:
            metrics[f"{prefix}/own_ok"] = int(row.own_ok)
        if row.copy_of is not None:
            metrics[f"{prefix}/copy_of"] = row.copy_of
        # Commit, reveal, and what its group said of the parts it sent.
        metrics[f"{prefix}/committed"] = int(row.committed_block is not None)
        if row.revealed is not None:
            metrics[f"{prefix}/revealed"] = int(row.revealed)
        if row.averaged is not None:
            metrics[f"{prefix}/averaged/{row.averaged.split(':')[0]}"] = 1
    for summary in shard_summaries(report):
        prefix = f"shard/{summary.label.replace(' ', '_')}"
        metrics[f"{prefix}/score"] = summary.score
        metrics[f"{prefix}/scored"] = summary.scored
        if summary.mean_loss_delta is not None:
            metrics[f"{prefix}/loss_delta"] = summary.mean_loss_delta
    return metrics


def _finite(value: Any) -> Any:
    """JSON has no inf/NaN: write them as strings that say so."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


@dataclass
class SkipRecord:
    """Windows a validator did not score because it fell behind (restarted late, or a
    window took longer than a window): their miners got no score from it."""

    validator: str
    block: int  # the ledger's head when it noticed
    windows: list[int]
    event: str = "skipped"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def append_report(path: Path, report: WindowReport | SkipRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(report.to_json()) + "\n")


def read_skips(path: Path) -> list[SkipRecord]:
    """The skip records in `path`, oldest first."""
    if not path.is_file():
        return []
    skips = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            body = json.loads(line)
            if isinstance(body, dict) and body.get("event") == "skipped":
                skips.append(SkipRecord(**body))
        except (ValueError, TypeError):
            continue
    return skips


def read_reports(path: Path, last: int | None = None) -> list[WindowReport]:
    """The reports in `path`, oldest first (the `last` ones only); a torn last line is skipped."""
    if not path.is_file():
        return []
    reports = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            body = json.loads(line)
            if isinstance(body, dict) and body.get("event") == "skipped":
                continue
            reports.append(WindowReport.from_json(body))
        except (ValueError, TypeError):
            continue  # a line cut short by a kill mid-write
    return reports[-last:] if last else reports


def _num(value: float | str | None, fmt: str = "{:+.4f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return fmt.format(value)


def window_table(reports: Sequence[WindowReport]) -> Table:
    """One row per (window, miner): what was measured and what it earned."""
    table = Table(title="validator windows", show_lines=False)
    columns = ("window", "L(θ_w;E)", "uid", "shard", "committed", "averaged", "work", "status",
               "ΔL", "own margin", "own t", "copy of", "score", "EMA", "weight")  # fmt: skip
    for name in columns:
        table.add_column(name, justify="left" if name == "status" else "right")
    for rep in reports:
        first = True
        for row in sorted(rep.miners, key=lambda r: (r.uid is None, r.uid or 0, r.hotkey)):
            status = row.reason if row.status == REFUSED else "ok"
            if row.status == SCORED and row.own_ok is False:
                status = "own-data"
            if row.heldout_ok is False:
                status = "heldout"
            if row.copy_of is not None:
                status = "copy"
            if row.own_outcome == "grace" and status == "ok":
                status = "ok (grace)"
            if row.verdict == "mismatch":
                status = "mismatch"
            committed = "-" if row.committed_block is None else f"block {row.committed_block}"
            table.add_row(
                str(rep.window) if first else "",
                f"{rep.heldout_loss:.4f}" if first else "",
                "-" if row.uid is None else str(row.uid),
                "-"
                if row.shard is None
                else f"{row.shard} ({rep.label(row.shard)})"
                if rep.shard_labels
                else str(row.shard),
                committed + ("" if row.revealed is not False else ", unrevealed"),
                row.averaged or "-",
                row.pow or "-",
                status or "-",
                _num(row.loss_delta),
                _num(row.own_margin),
                _num(row.own_t, "{:.2f}"),
                "-" if row.copy_of is None else str(row.copy_of),
                f"{row.score:.4f}",
                f"{row.ema:.4f}",
                f"{row.weight:.3f}",
            )
            first = False
        table.add_section()
    return table


def shard_table(reports: Sequence[WindowReport]) -> Table:
    """One row per (window, shard): contributions, scored, mean ΔL and the shard's total
    score — for a mixture of experts, what each expert group earned."""
    table = Table(title="scores per shard", show_lines=False)
    for name in ("window", "shard", "contributions", "scored", "mean ΔL", "score"):
        table.add_column(name, justify="left" if name == "shard" else "right")
    for rep in reports:
        first = True
        for summary in shard_summaries(rep):
            table.add_row(
                str(rep.window) if first else "",
                f"{summary.shard} ({summary.label})",
                str(summary.contributions),
                str(summary.scored),
                _num(summary.mean_loss_delta),
                f"{summary.score:.4f}",
            )
            first = False
        table.add_section()
    return table
