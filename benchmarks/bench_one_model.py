"""One model against two trajectories: the held-out loss of every published checkpoint of
finished `subnet up` runs, on one fixed held-out sample, and how far the published model is
from the miners' own.

    # a run of today's code and one of the two-trajectory code (commit 1f64ee7), same config:
    tensormine subnet up --config configs/demo.yaml --windows 8 --set run.dir=runs/one-model
    git worktree add /tmp/two 1f64ee7 && (cd /tmp/two && PYTHONPATH=/tmp/two \\
        /work/main/.venv/bin/python -m tensormine.cli subnet up --config configs/demo.yaml \\
        --windows 8 --set run.dir=runs/two-trajectories)
    .venv/bin/python benchmarks/bench_one_model.py runs/one-model /tmp/two/runs/two-trajectories \\
        --labels "one model" "two trajectories" --png benchmarks/results/one_model.png

For each run: every checkpoint in its store is pulled (every sha256 checked) and its mean
loss measured on `--pages` held-out pages drawn with a fixed key (the same pages for every
run: same data config and seed); the miners' `windows.jsonl` gives their own θ_{w+1}
fingerprints, compared with the fingerprint of the checkpoint of w+1 (a checkpoint without
one, as the two-trajectory code wrote them, is compared by recomputing it), and the last
miner state on disk is compared with the last checkpoint by L2 distance.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _bench_data import pages_and_heldout  # noqa: E402

from store.api import open_store  # noqa: E402
from store.config import StoreConfig  # noqa: E402
from tensormine.config import load_config  # noqa: E402
from train.inner import mean_loss  # noqa: E402
from train.model import build_model, model_fingerprint  # noqa: E402
from train.startup import load_checkpoint_weights  # noqa: E402

KEY = b"tensormine/bench-one-model"


def miner_rows(run: Path) -> dict[str, list[dict[str, object]]]:
    out = {}
    for path in sorted((run / "miners").glob("*/windows.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[path.parent.name] = [r for r in rows if isinstance(r.get("window"), int)]
    return out


def last_miner_theta(run: Path) -> dict[str, torch.Tensor] | None:
    """The weights in the first miner's saved state (its θ after its last window)."""
    from safetensors.torch import load_file

    for pointer in sorted((run / "miners").glob("*/state/CURRENT")):
        folder = pointer.parent / pointer.read_text().strip()
        if (folder / "model.safetensors").is_file():
            return load_file(str(folder / "model.safetensors"))
    return None


def evaluate(run: Path, pages: int) -> dict[str, object]:
    cfg = load_config("configs/demo.yaml", [f"run.dir={run}"])
    _pages, held = pages_and_heldout(cfg, str(run / "data"), KEY, pages)
    store = open_store(StoreConfig(root=run / "store"), create=False)
    model = build_model(cfg.model, cfg.run.seed)
    losses: dict[int, float] = {}
    prints: dict[int, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ref in sorted(store.list_checkpoints(), key=lambda r: r.window):
            pulled = store.pull_checkpoint(
                Path(tmp) / ref.revision, window=ref.window, progress=False
            )
            weights = load_checkpoint_weights(pulled.path)
            model.load_state_dict(weights)
            losses[ref.window] = mean_loss(model, held, device=torch.device("cpu"))
            prints[ref.window] = model_fingerprint(weights)
        last = max(losses)
        final = {n: t.clone() for n, t in model.state_dict().items()}
    in_step, matched = 0, 0
    for rows in miner_rows(run).values():
        for row in rows:
            if row.get("synced") and isinstance(row.get("fingerprint"), str):
                w = int(row["window"]) + 1  # type: ignore[call-overload]
                if w in prints:
                    in_step += 1
                    matched += int(prints[w] == row["fingerprint"])
    theta = last_miner_theta(run)
    distance = None
    if theta is not None:
        distance = sum(float((theta[n].float() - final[n]).norm() ** 2) for n in final) ** 0.5
    return {"losses": losses, "last": last, "matched": matched, "in_step": in_step,
            "distance": distance}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="+")
    parser.add_argument("--pages", type=int, default=64)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    results = {
        label: evaluate(run, args.pages) for label, run in zip(labels, args.runs, strict=True)
    }
    windows = sorted({w for r in results.values() for w in r["losses"]})  # type: ignore[attr-defined]
    print("| window | " + " | ".join(labels) + " |")
    print("| --- |" + " --- |" * len(labels))
    for w in windows:
        cells = [f"{r['losses'].get(w, float('nan')):.4f}" for r in results.values()]  # type: ignore[attr-defined]
        print(f"| {w} | " + " | ".join(cells) + " |")
    for label, r in results.items():
        dist = "–" if r["distance"] is None else f"{r['distance']:.3f}"
        print(
            f"{label}: in-step miner windows whose θ_(w+1) is the published checkpoint: "
            f"{r['matched']}/{r['in_step']}; L2(last miner θ, last checkpoint) = {dist}"
        )
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, r in results.items():
            xs = sorted(r["losses"])  # type: ignore[call-overload]
            ax.plot(xs, [r["losses"][x] for x in xs], marker="o", label=label)  # type: ignore[index]
        ax.set_xlabel("checkpoint window")
        ax.set_ylabel(f"held-out loss ({args.pages} fixed pages)")
        ax.set_title("Published model: one model vs two trajectories")
        ax.legend()
        fig.tight_layout()
        args.png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=120)
        print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
