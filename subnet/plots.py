"""PNG plots of a finished (or interrupted) subnet run, into ``<run dir>/plots/``.

    paths = write_plots(snap, history, run_dir / "plots")

- ``heldout_loss.png``: held-out loss of θ_w per window (validators), and each miner's
  held-out loss after its outer step;
- ``emission.png``: emission each UID received, over the windows and in total;
- ``scores.png``: each UID's score per window, as the validators measured it.

matplotlib runs headless (the Agg backend); a plot with nothing to show is skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from chain.config import RAO_PER_TAO
from subnet.records import Snapshot, first_number

logger = logging.getLogger(__name__)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_windows(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _labels(snap: Snapshot) -> dict[int, str]:
    return {uid: f"{name} (uid {uid})" for name, uid in snap.uid_of.items()}


def plot_heldout(snap: Snapshot, path: Path) -> bool:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    drew = False
    for name, rows in snap.validators.items():
        # L(θ_w) per window, and L(θ_{w+1}) of the model published after the last one.
        by_window = {r.window: r.heldout_loss for r in rows if r.heldout_loss is not None}
        for r in rows:
            if r.next_heldout_loss is not None:
                by_window.setdefault(r.window + 1, r.next_heldout_loss)
        points = sorted(by_window.items())
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", linewidth=2, label=f"{name}: θ_w")
            drew = True
    for name, mrows in snap.miners.items():
        points = sorted(
            (int(m["window"]) + 1, v)
            for m in mrows
            if isinstance(m.get("window"), int)
            and (v := first_number(m, "heldout_loss")) is not None
        )
        if points:
            ax.plot(*zip(*points, strict=True), linestyle="--", marker=".", label=f"{name}")
            drew = True
    if not drew:
        plt.close(fig)
        return False
    _integer_windows(ax)
    ax.set_xlabel("window (model θ_w)")
    ax.set_ylabel("held-out loss")
    ax.set_title("held-out loss per window")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_emission(snap: Snapshot, history: list[dict[str, Any]], path: Path) -> bool:
    labels = _labels(snap)
    uids = sorted(labels)
    if not uids:
        return False
    plt = _pyplot()
    fig, (over, total) = plt.subplots(1, 2, figsize=(11, 4))
    # The history has a row per window the view saw, and another at the end of each run
    # (same window): the last row of a window is what was earned by then.
    last = {
        int(h["window"]): h["earned"]
        for h in history
        if isinstance(h.get("window"), int) and isinstance(h.get("earned"), dict)
    }
    for uid in uids:
        points = [
            (w, int(earned.get(str(uid), 0)) / RAO_PER_TAO) for w, earned in sorted(last.items())
        ]
        if points:
            over.plot(*zip(*points, strict=True), marker=".", label=labels[uid])
    _integer_windows(over)
    over.set_xlabel("window")
    over.set_ylabel("emission received so far (τ)")
    over.set_title("emission over the run")
    over.grid(alpha=0.3)
    over.legend(fontsize="small")
    amounts = [snap.earned.get(uid, 0) / RAO_PER_TAO for uid in uids]
    total.bar([labels[u] for u in uids], amounts, color="tab:green")
    total.set_ylabel("τ")
    total.set_title("emission per UID")
    total.tick_params(axis="x", labelrotation=45, labelsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _lines(series: dict[str, list[tuple[int, float]]], path: Path, ylabel: str, title: str) -> None:
    """One line per series over the windows, written to `path`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        ax.plot(*zip(*sorted(points), strict=True), marker="o", label=label)
    _integer_windows(ax)
    ax.set_xlabel("window")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_per_window(
    by_key: dict[int, dict[int, list[float]]],
) -> dict[int, list[tuple[int, float]]]:
    return {k: [(w, sum(v) / len(v)) for w, v in by_key[k].items()] for k in sorted(by_key)}


def plot_scores(snap: Snapshot, path: Path) -> bool:
    by_uid: dict[int, dict[int, list[float]]] = {}
    for rows in snap.validators.values():
        for r in rows:
            for uid, score in r.scores.items():
                by_uid.setdefault(uid, {}).setdefault(r.window, []).append(score)
    if not by_uid:
        return False
    labels = _labels(snap)
    series = {labels.get(u, f"uid {u}"): p for u, p in _mean_per_window(by_uid).items()}
    _lines(
        series,
        path,
        "score (held-out loss delta, mean over validators)",
        "scores per UID per window",
    )
    return True


def plot_shard_scores(snap: Snapshot, path: Path) -> bool:
    """Per shard, the sum of its miners' scores each window (mean over validators): for a
    mixture of experts, what each expert group earned. Drawn when there are 2+ shards."""
    by_shard: dict[int, dict[int, list[float]]] = {}
    for rows in snap.validators.values():
        for r in rows:
            for shard, score in r.shard_scores().items():
                by_shard.setdefault(shard, {}).setdefault(r.window, []).append(score)
    if len(by_shard) < 2:
        return False
    series = {snap.shard_label(s): p for s, p in _mean_per_window(by_shard).items()}
    _lines(series, path, "sum of the shard's miners' scores", "scores per shard per window")
    return True


def write_plots(snap: Snapshot, history: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Write the PNGs that have data; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    drawn = {
        "heldout_loss.png": plot_heldout(snap, folder / "heldout_loss.png"),
        "emission.png": plot_emission(snap, history, folder / "emission.png"),
        "scores.png": plot_scores(snap, folder / "scores.png"),
        "shard_scores.png": plot_shard_scores(snap, folder / "shard_scores.png"),
    }
    for name, ok in drawn.items():
        if ok:
            written.append(folder / name)
        else:
            logger.info("no data for %s yet; skipped", name)
    return written
