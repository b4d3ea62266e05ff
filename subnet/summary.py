"""The end of `tensormine subnet up`: summary table, final checkpoint and its text sample,
and where the W&B runs are.

    console.print(summary_table(snap, members))
    pulled = pull_final(cfg, run_dir / "final")            # what `tensormine pull` does
    text = sample_text(pulled.folder, "def ", 48)            # transformers only

The sample is generated from the checkpoint folder with `AutoModelForCausalLM` and
`AutoTokenizer` alone, which is the proof that the published model is a plain Hugging Face
model. When no validator has published a checkpoint past window 0 (the store then holds
only the random initial model), the sample uses an honest miner's own θ instead, and says so.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from store.api import open_store
from store.errors import NotFound
from subnet.records import Member, Snapshot, first_number, miner_dir
from subnet.view import tau
from tensormine.config import RunConfig

logger = logging.getLogger(__name__)


def summary_table(snap: Snapshot, members: list[Member]) -> Table:
    """One row per process: what it did over the whole run and what it earned."""
    table = Table(
        "uid", "name", "role", "windows", "held-out first → last", "last score", "weight",
        "emission", title="subnet summary",
    )  # fmt: skip
    for m in members:
        uid = snap.uid_of.get(m.name)
        role = m.role if m.behaviour == "honest" else f"{m.role} ({m.behaviour})"
        if m.role == "miner":
            rows = snap.miners.get(m.name, [])
            before = first_number(rows[0], "heldout_before") if rows else None
            after = first_number(rows[-1], "heldout_loss") if rows else None
            windows = len(rows)
        else:
            vrows = snap.validators.get(m.name, [])
            losses = [r.heldout_loss for r in vrows if r.heldout_loss is not None]
            before, after = (losses[0], losses[-1]) if losses else (None, None)
            windows = len(vrows)
        loss = "–" if before is None or after is None else f"{before:.4f} → {after:.4f}"
        score, _, weight = snap.latest_validator(uid) if uid is not None else (None, None, None)
        table.add_row(
            "–" if uid is None else str(uid),
            m.name,
            role,
            str(windows),
            loss,
            "–" if score is None else f"{score:.4f}",
            "–" if weight is None else f"{weight:.3f}",
            "–" if uid is None else tau(snap.earned.get(uid, 0)),
        )
    return table


@dataclass(frozen=True)
class Final:
    folder: Path
    window: int
    weights_from: str | None  # a miner's state used instead of the store's weights


def pull_final(cfg: RunConfig, dest_root: Path, members: list[Member]) -> Final | None:
    """Pull the latest checkpoint into ``dest_root/window-<w>`` (verified, as `tensormine
    pull` does); None when the store holds none."""
    store = open_store(cfg.store, create=False)
    latest = store.latest()
    if latest is None:
        return None
    dest = dest_root / f"window-{latest.window}"
    if dest.exists():
        shutil.rmtree(dest)
    try:
        store.pull_checkpoint(dest, window=latest.window, progress=False)
    except NotFound:
        return None
    weights_from = None
    if latest.window == 0:
        for m in members:
            state = miner_dir(cfg.run.dir, m.name) / "state"
            pointer = state / "CURRENT"
            if m.role == "miner" and m.behaviour == "honest" and pointer.is_file():
                weights_from = str(state / pointer.read_text().strip() / "model.safetensors")
                break
    return Final(dest, latest.window, weights_from)


def sample_text(final: Final, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
    """Load the checkpoint with `transformers` and continue `prompt`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(final.folder))
    model: Any = AutoModelForCausalLM.from_pretrained(str(final.folder))
    if final.weights_from is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(final.weights_from))
    model.eval()
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            top_k=40,
            temperature=0.8,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return str(tokenizer.decode(out[0], skip_special_tokens=True))


def wandb_runs(run_dir: Path) -> list[Path]:
    """Every offline W&B run under the run folder."""
    return sorted(p for p in run_dir.glob("**/wandb/offline-run-*") if p.is_dir())


def wandb_hint(run_dir: Path) -> list[str]:
    runs = wandb_runs(run_dir)
    if not runs:
        return [
            "no offline W&B runs (tracking disabled, or online: see your W&B project)",
        ]
    lines = [f"{len(runs)} offline W&B runs:"]
    lines += [f"  {p}" for p in runs]
    lines += [
        f"view them in the terminal:  wandb leet {runs[0].parent}",
        f"upload them to W&B:         wandb sync {' '.join(str(p) for p in runs[:2])}"
        + (" ..." if len(runs) > 2 else ""),
    ]
    return lines


def write_summary_json(path: Path, snap: Snapshot, members: list[Member]) -> None:
    """The numbers of the summary, for scripts and tests."""
    body = {
        "block": snap.block,
        "window": snap.window,
        "issuance": snap.issuance,
        "pending": snap.pending,
        "accounts_total": snap.accounts_total,
        "checkpoints": snap.checkpoints,
        "heldout_by_window": {str(k): v for k, v in snap.heldout_by_window().items()},
        "members": [
            {
                "name": m.name,
                "role": m.role,
                "behaviour": m.behaviour,
                "uid": snap.uid_of.get(m.name),
                "earned": snap.earned.get(snap.uid_of.get(m.name, -1), 0),
                "windows": len(snap.miners.get(m.name, []))
                if m.role == "miner"
                else len(snap.validators.get(m.name, [])),
                "status": snap.status.get(m.name, ""),
            }
            for m in members
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1))
