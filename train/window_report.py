"""What a miner records of each window: one line of ``windows.jsonl`` and W&B's window metrics.

report = WindowReport(window=w, uid=uid, shard=s, ...)
round_report(report, outcomes, shard)    # members, bytes, seconds of a round
tracker.log(step_metrics(stat, w, s))    # every inner step
tracker.log(window_metrics(report, moe_report(report, stats)))
logger.info("%s", summary(report))       # the miner's one line per window
"""

from __future__ import annotations

from dataclasses import dataclass, field

from averaging.round import AverageResult, AveragingFailed
from train.group_round import Outcomes
from train.inner import InnerStats, StepStats


@dataclass
class WindowReport:
    """One window of one miner. With `averaging.overlap` the averaging fields (members,
    bytes, seconds, synced) are those of the round that landed in this window, the one of
    `averaged_window` = window − 1."""

    window: int
    uid: int
    shard: int
    loss: float
    heldout_before: float  # held-out loss of θ_w, the model the window started from
    heldout_loss: float  # held-out loss of θ_{w+1}, after the outer step
    tokens_per_second: float
    published_bytes: int
    late: bool
    fingerprint: str = ""  # of θ_{w+1}: miners in step with their groups agree on it
    committed_block: int = -1  # the ledger block that took our commitment (-1: none)
    canonical: str = ""  # the published θ_w vs ours: match, differs, out-of-step, absent
    synced: bool = False  # every group of the window averaged (θ_{w+1} is the group's)
    members: list[str] = field(default_factory=list)  # hotkeys averaged in our shard's group
    dropped: list[str] = field(default_factory=list)
    averaging_bytes_sent: int = 0
    averaging_bytes_received: int = 0
    averaging_seconds: float = 0.0
    averaging_attempts: int = 0  # groups the rounds went through (> 1 after a retry)
    averaging_delivered: float = 0.0  # of a failed round: share of our Δ in some average
    averaged_window: int = -1  # the window whose round the averaging fields describe
    # Mixture of experts: [layer][expert] share of routed token slots over the window's
    # inner steps (rows sum to 1; an even router gives 1/E each), and the mean
    # load-balancing loss (unweighted). Empty / None for a dense model.
    expert_usage: list[list[float]] = field(default_factory=list)
    aux_loss: float | None = None


def moe_report(report: WindowReport, stats: InnerStats) -> dict[str, float]:
    """Fill `report`'s expert fields from the inner loop's stats; the W&B metrics for them
    (each expert's share averaged over layers, the largest share anywhere, the aux loss)."""
    usage = stats.expert_usage
    if usage is None:
        return {}
    report.expert_usage = [[round(float(v), 5) for v in row] for row in usage.cpu()]
    aux = [s.aux_loss for s in stats.steps if s.aux_loss is not None]
    report.aux_loss = sum(aux) / len(aux) if aux else None
    per_expert = usage.mean(dim=0)
    metrics = {f"moe/expert_{j}_share": float(v) for j, v in enumerate(per_expert)}
    metrics["moe/max_share"] = float(usage.max())
    if report.aux_loss is not None:
        metrics["moe/aux_loss"] = report.aux_loss
    return metrics


def round_report(report: WindowReport, outcomes: Outcomes, shard: int) -> None:
    """Fill `report`'s averaging fields from a round's `outcomes` (`shard`: ours in it)."""
    own = outcomes.get(shard)
    if isinstance(own, AverageResult):
        report.members, report.dropped = own.members, own.dropped
    for outcome in outcomes.values():  # a failed round's bytes were spent all the same
        report.averaging_bytes_sent += outcome.bytes_sent
        report.averaging_bytes_received += outcome.bytes_received
        report.averaging_seconds = max(report.averaging_seconds, outcome.seconds)
        report.averaging_attempts = max(report.averaging_attempts, outcome.attempts)
    if isinstance(own, AveragingFailed):
        report.averaging_delivered = own.delivered


def step_metrics(stat: StepStats, window: int, shard: int) -> dict[str, float | int]:
    """W&B's metrics of one inner step."""
    return {
        "train/loss": stat.loss,
        "train/lr": stat.lr,
        "train/grad_norm": stat.grad_norm,
        "train/tokens_per_s": stat.tokens / max(stat.seconds, 1e-9),
        "train/step_time_s": stat.seconds,
        "window": window,
        "shard": shard,
    }


def window_metrics(report: WindowReport, moe: dict[str, float]) -> dict[str, float | int]:
    """W&B's metrics of a finished window (`moe`: `moe_report`'s)."""
    return {
        "eval/heldout_loss": report.heldout_loss,
        "window/train_loss": report.loss,
        "window/tokens_per_s": report.tokens_per_second,
        "window/published_bytes": report.published_bytes,
        "window/late": int(report.late),
        "averaging/synced": int(report.synced),
        "averaging/members": len(report.members),
        "averaging/dropped": len(report.dropped),
        "averaging/bytes_sent": report.averaging_bytes_sent,
        "averaging/bytes_received": report.averaging_bytes_received,
        "averaging/seconds": report.averaging_seconds,
        "averaging/attempts": report.averaging_attempts,
        "averaging/delivered": report.averaging_delivered,
        **moe,
    }


def summary(report: WindowReport) -> str:
    """The miner's log line for a finished window."""
    r = report
    return (
        f"window {r.window} shard {r.shard}: loss {r.loss:.4f}, held-out {r.heldout_loss:.4f}, "
        f"{r.tokens_per_second:.0f} tokens/s, published {r.published_bytes} bytes"
        f"{' (late)' if r.late else ''}; averaged with {len(r.members)} "
        f"({'in step' if r.synced else 'out of step'}), sent {r.averaging_bytes_sent} "
        f"received {r.averaging_bytes_received} bytes in {r.averaging_seconds:.1f}s"
    )
