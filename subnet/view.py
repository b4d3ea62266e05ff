"""The live terminal view of `tensormine subnet up`: one rich renderable per refresh.

    with Live(render(snap, members, ...), console=console) as live:
        live.update(render(next_snap, members, ...))

The header says where the subnet is (block, window, held-out loss, issuance, next halving,
canonical checkpoints, and with several shards what each shard's miners scored — per
expert group for a mixture of experts); the table has one row per process: UID, role,
the miner's last window (shard, train and held-out loss), the validators' score, moving average and
weight and verdict on its last contribution, the emission it received so far, and
whether the process still runs.
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from chain.config import RAO_PER_TAO
from subnet.records import Member, Snapshot, first_number


def tau(rao: int, digits: int = 3) -> str:
    return f"{rao / RAO_PER_TAO:,.{digits}f} τ"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def header(snap: Snapshot, *, block_time_s: float, title: str) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    heldout = snap.heldout_by_window()
    if heldout:
        first_w, last_w = min(heldout), max(heldout)
        loss = f"{heldout[last_w]:.4f} (window {last_w}; {heldout[first_w]:.4f} at {first_w})"
    else:
        loss = "– (no window finished yet)"
    if snap.next_halving_block is None:
        halving = "none: emission has ended"
    else:
        blocks = snap.next_halving_block - snap.block
        days = blocks * block_time_s / 86400
        halving = f"block {snap.next_halving_block:,} (in {blocks:,} blocks, ~{days:,.1f} days)"
    ckpts = snap.checkpoints
    grid.add_row(title, "")
    grid.add_row("block / window", f"{snap.block:,} / {snap.window}")
    grid.add_row("held-out loss", loss)
    grid.add_row(
        "issuance",
        f"{tau(snap.issuance)} (pending {tau(snap.pending)}, {tau(snap.block_emission)}/block)",
    )
    grid.add_row("next halving", halving)
    grid.add_row(
        "checkpoints",
        "none yet" if not ckpts else f"{len(ckpts)}: windows {ckpts[0]}–{ckpts[-1]}",
    )
    per_shard = snap.shard_scores()
    if per_shard is not None and len(per_shard[1]) > 1:
        window, scores = per_shard
        grid.add_row(
            f"scores per shard (window {window})",
            ", ".join(f"{snap.shard_label(s)} {v:.3f}" for s, v in scores.items()),
        )
    return grid


def members_table(snap: Snapshot, members: list[Member]) -> Table:
    table = Table(
        "uid", "name", "role", "shard", "windows", "train loss", "held-out",
        "verdict", "score", "avg", "weight", "emission", "stake", "process",
    )  # fmt: skip
    stakes = {n.uid: n.stake for n in snap.neurons}
    for m in members:
        uid = snap.uid_of.get(m.name)
        rows = snap.miners.get(m.name, [])
        last = rows[-1] if rows else {}
        score, avg, weight = snap.latest_validator(uid) if uid is not None else (None,) * 3
        role = m.role if m.behaviour == "honest" else f"{m.role} ({m.behaviour})"
        if m.role == "validator":
            done = len(snap.validators.get(m.name, []))
            windows, shard, train, held = str(done), "", "", ""
        else:
            windows = str(len(rows))
            shard = snap.shard_label(last["shard"]) if isinstance(last.get("shard"), int) else "–"
            train = _fmt(first_number(last, "loss"))
            held = _fmt(first_number(last, "heldout_loss"))
        status = snap.status.get(m.name, "")
        table.add_row(
            "–" if uid is None else str(uid),
            m.name,
            role,
            shard,
            windows,
            train,
            held,
            snap.latest_verdict(uid) if uid is not None else "",
            _fmt(score, 4),
            _fmt(avg, 4),
            _fmt(weight, 3),
            "–" if uid is None else tau(snap.earned.get(uid, 0)),
            "–" if uid is None else tau(stakes.get(uid, 0), 1),
            Text(status, style="red" if status.startswith("exit") and status != "exit 0" else ""),
        )
    return table


def render(
    snap: Snapshot, members: list[Member], *, block_time_s: float, title: str, notes: list[str]
) -> RenderableType:
    parts: list[RenderableType] = [
        header(snap, block_time_s=block_time_s, title=title),
        members_table(snap, members),
    ]
    parts += [Text(n, style="yellow") for n in notes]
    return Group(*parts)


def status_line(snap: Snapshot) -> str:
    """One line per window for logs and pipes, where a live table cannot redraw."""
    heldout = snap.heldout_by_window()
    loss = f"{heldout[max(heldout)]:.4f}" if heldout else "–"
    paid = sum(snap.earned.get(uid, 0) for uid in snap.uid_of.values())
    return (
        f"block {snap.block} window {snap.window}: held-out {loss}, issuance "
        f"{tau(snap.issuance)}, paid to the subnet's hotkeys {tau(paid)}, "
        f"{len(snap.checkpoints)} checkpoints"
    )
