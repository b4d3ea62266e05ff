"""Reading what the processes write: the validator's real report format, torn lines, and
the view and plots built from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from subnet.plots import write_plots
from subnet.records import Member, Snapshot, ValidatorWindow, read_jsonl
from subnet.view import render
from validation.report import MinerRow, WindowReport, append_report


def report(window: int, rows: list[MinerRow], heldout: float) -> WindowReport:
    return WindowReport(
        window=window, validator="validator-0", block=10 * window, heldout_loss=heldout,
        contributions=len(rows), admitted=len(rows), seconds=1.0, eval_seconds=0.5,
        next_heldout_loss=heldout - 0.5, published=f"window-{window + 1}", miners=rows,
    )  # fmt: skip


def test_validator_reports_parse(tmp_path: Path) -> None:
    path = tmp_path / "windows.jsonl"
    append_report(
        path,
        report(3, [
            MinerRow(uid=1, hotkey="a", shard=0, status="scored", loss_delta=0.4, own_ok=True,
                     score=0.4, ema=0.12, weight=0.7),
            MinerRow(uid=2, hotkey="b", shard=0, status="scored", loss_delta=0.4, own_ok=True,
                     copy_of=1, score=0.0, ema=0.0, weight=0.0),
            MinerRow(uid=3, hotkey="c", shard=0, status="refused", reason="missing"),
            MinerRow(uid=4, hotkey="d", shard=0, status="scored", loss_delta=0.4, own_ok=True,
                     score=0.0, verdict="mismatch", averaged="mismatch: parts 0-2, 5",
                     committed_block=17, revealed=True),
            MinerRow(uid=5, hotkey="e", shard=0, status="refused", reason="unrevealed",
                     committed_block=18, revealed=False),
        ], 7.5),
    )  # fmt: skip
    with path.open("a") as fh:
        fh.write('{"window": 4, "heldout_lo')  # a line still being written
    rows = read_jsonl(path)
    assert len(rows) == 1
    parsed = ValidatorWindow.parse(rows[0])
    assert parsed is not None
    assert parsed.window == 3 and parsed.heldout_loss == 7.5 and parsed.next_heldout_loss == 7.0
    assert parsed.scores == {1: 0.4, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.0}
    assert parsed.weights[1] == 0.7 and parsed.ema[1] == 0.12
    assert parsed.verdicts == {
        1: "ok", 2: "copy of 1", 3: "missing", 4: "mismatch: parts 0-2, 5", 5: "unrevealed",
    }  # fmt: skip
    assert parsed.published == "window-4"
    assert ValidatorWindow.parse({"window": "x"}) is None


def snap() -> Snapshot:
    def vw(window: int, score: float, verdict: str, loss: float) -> ValidatorWindow:
        return ValidatorWindow(
            window, loss, loss - 0.1, {2: score, 3: 0.0}, {2: score / 2, 3: 0.0},
            {2: 1.0, 3: 0.0}, {2: verdict, 3: "ok"}, None,
        )  # fmt: skip

    return Snapshot(
        block=200, window=5, issuance=10**12, pending=10**9, block_emission=10**9,
        next_halving_block=10**7, next_halving_issuance=10**16, neurons=[],
        earned={2: 5 * 10**9, 3: 0}, uid_of={"miner-0": 2, "miner-1": 3},
        miners={"miner-0": [{"window": 2, "loss": 6.0, "heldout_loss": 6.5, "shard": 0}],
                "miner-1": []},
        validators={"validator-0": [vw(2, 0.5, "ok", 8.0), vw(3, 0.0, "missing", 7.0)]},
        checkpoints=[0, 3, 4], accounts_total=10**12 - 10**9,
    )  # fmt: skip


def test_latest_score_skips_windows_the_miner_missed() -> None:
    s = snap()
    assert s.latest_validator(2) == (0.5, 0.25, 1.0)  # window 2, not the missed window 3
    assert s.latest_verdict(2) == "ok"
    assert s.heldout_by_window() == {2: 8.0, 3: 7.0}
    assert s.books_balance


def test_view_and_plots_render(tmp_path: Path) -> None:
    members = [Member("miner-0", "miner", "honest", "a"), Member("miner-1", "miner", "noise", "b")]
    console = Console(width=200, record=True)
    console.print(render(snap(), members, block_time_s=0.25, title="t", notes=["note"]))
    text = console.export_text()
    assert "miner (noise)" in text and "5.000 τ" in text and "windows 0–4" in text
    history = [{"window": w, "earned": {"2": w * 10**9, "3": 0}} for w in range(5)]
    written = write_plots(snap(), history, tmp_path)
    assert sorted(p.name for p in written) == ["emission.png", "heldout_loss.png", "scores.png"]
    assert all(p.stat().st_size > 1000 for p in written)
    json.dumps([str(p) for p in written])


def test_scores_per_expert_shard_in_the_report_view_and_plots(tmp_path: Path) -> None:
    """A mixture-of-experts run: the validator names its shards, and the report's summary,
    W&B metrics, live view and plots add up each expert group's miners."""
    from validation.report import shard_summaries, shard_table, window_metrics

    labels = {"0": "shared", "1": "experts 0–1", "2": "experts 2–3"}
    rows = [
        MinerRow(uid=1, hotkey="a", shard=0, status="scored", loss_delta=0.3, score=0.3),
        MinerRow(uid=2, hotkey="b", shard=1, status="scored", loss_delta=0.2, score=0.2),
        MinerRow(uid=3, hotkey="c", shard=1, status="scored", loss_delta=0.1, score=0.05),
        MinerRow(uid=4, hotkey="d", shard=2, status="refused", reason="missing"),
    ]
    rep = report(3, rows, 7.5)
    rep.shard_labels = labels
    summaries = {s.label: s for s in shard_summaries(rep)}
    assert summaries["experts 0–1"].score == 0.25 and summaries["experts 0–1"].scored == 2
    assert summaries["experts 0–1"].mean_loss_delta == pytest.approx(0.15)
    assert summaries["experts 2–3"].contributions == 1 and summaries["experts 2–3"].score == 0
    assert summaries["experts 2–3"].mean_loss_delta is None
    metrics = window_metrics(rep)
    assert metrics["shard/experts_0–1/score"] == 0.25 and metrics["shard/shared/scored"] == 1
    console = Console(width=200, record=True)
    console.print(shard_table([rep]))
    assert "1 (experts 0–1)" in console.export_text()

    path = tmp_path / "windows.jsonl"
    append_report(path, rep)
    parsed = ValidatorWindow.parse(read_jsonl(path)[0])
    assert parsed is not None and parsed.shard_scores() == {0: 0.3, 1: 0.25, 2: 0.0}
    moe = snap()
    moe.validators = {"validator-0": [parsed]}
    assert moe.shard_label(1) == "1 (experts 0–1)" and moe.shard_label(7) == "7"
    assert moe.shard_scores() == (3, {0: 0.3, 1: 0.25, 2: 0.0})
    members = [Member("miner-0", "miner", "honest", "a")]
    console = Console(width=240, record=True)
    console.print(render(moe, members, block_time_s=0.25, title="t", notes=[]))
    text = console.export_text()
    assert "scores per shard (window 3)" in text and "2 (experts 2–3) 0.000" in text
    history = [{"window": w, "earned": {"2": w * 10**9}} for w in range(4)]
    written = write_plots(moe, history, tmp_path / "plots")
    assert "shard_scores.png" in {p.name for p in written}
