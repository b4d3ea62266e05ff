"""At which step should a validator measure one contribution? (the "probe step")

    .venv/bin/python benchmarks/bench_probe.py                 # ~3 minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_probe.py --windows 8 --plot benchmarks/results/probe.png

Runs the miners' own pieces in one process — n honest miners of the demo's shrunk `tiny`
preset (`configs/demo.yaml`: H inner AdamW steps on their assigned pages), their mean Δ,
plain averaging (outer lr 1) — for a few windows, and after each window measures every
miner's Δ alone on 32 held-out pages at several steps s: `L(θ_w) − L(θ_w − s·Δ_i)`.

The baseline in the same run is the whole outer step (s = outer lr), what a validator that
applies "the contribution with the outer learning rate" measures. A good probe step gives
honest miners a positive score in every window, since weights are shares of the scores
and a window where every honest Δ scores ≤ 0 hands the whole window to whoever cheats
best. The printed table: per window, L(θ_w), and per step the honest scores' minimum,
mean and how many of the n·windows scores were positive.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from _bench_data import pages_and_heldout
from accelerate import Accelerator

from averaging.outer import mean_delta, outer_step
from tensormine.config import load_config
from train.inner import inner_loop, mean_loss
from train.model import build_model
from train.pages import assigned_pages
from train.shards import apply_to_shard, make_trainable, shard_map, shard_state

Delta = dict[str, torch.Tensor]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--miners", type=int, default=4)
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--eval-pages", type=int, default=32)
    parser.add_argument("--plot", default=None, help="write a PNG of the scores here")
    parser.add_argument("--set", action="append", default=[], help="config override")
    args = parser.parse_args()
    run_dir = "runs/bench-probe"
    cfg = load_config("configs/demo.yaml", [f"run.dir={run_dir}", *args.set])
    cache = f"{run_dir}/data"
    pages, evaluation = pages_and_heldout(cfg, cache, b"bench-probe", args.eval_pages)
    n = args.miners
    steps = {"outer lr (baseline)": cfg.outer.lr, "outer lr / 2": cfg.outer.lr / 2}
    steps[f"outer lr / n = {cfg.outer.lr / n:g} (share)"] = cfg.outer.lr / n
    steps["outer lr / 10"] = cfg.outer.lr / 10
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; demo tiny, {n} miners, H = {cfg.train.inner_steps}, "
        f"batch {cfg.train.batch_size} × {cfg.data.seq_len} tokens, lr {cfg.train.lr}, "
        f"{args.windows} windows, {evaluation.shape[0]} held-out pages",
        flush=True,
    )
    accelerator = Accelerator(cpu=True)
    model = build_model(cfg.model, cfg.run.seed)
    names = shard_map(model, 1)[0]
    make_trainable(model, names)
    momentum: dict[str, torch.Tensor] = {}
    scores: dict[str, list[list[float]]] = {k: [] for k in steps}
    losses: list[float] = []
    started = time.perf_counter()
    for window in range(args.windows):
        start = shard_state(model, names)
        base = mean_loss(model, evaluation)
        losses.append(base)
        deltas: list[Delta] = []
        for i in range(n):
            apply_to_shard(model, names, start)
            order = assigned_pages(
                f"miner-{i}", window, cfg.run.seed, pages.train.shape[0],
                cfg.train.pages_per_window,
            )  # fmt: skip
            inner_loop(accelerator, model, names, torch.from_numpy(pages.train[order]), cfg.train)
            trained = shard_state(model, names)
            deltas.append({k: start[k] - trained[k] for k in names})
        for label, s in steps.items():
            row = []
            for delta in deltas:
                apply_to_shard(model, names, {k: start[k] - s * delta[k] for k in names})
                row.append(base - mean_loss(model, evaluation))
            scores[label].append(row)
        new, momentum = outer_step(start, mean_delta(deltas), momentum, cfg.outer)
        apply_to_shard(model, names, new)
        elapsed = time.perf_counter() - started
        eta = elapsed / (window + 1) * (args.windows - window - 1)
        print(
            f"window {window}: L(θ_w) {base:.3f}, "
            + ", ".join(
                f"{k.split(' (')[0]}: {min(v[-1]):+.3f}…{max(v[-1]):+.3f}"
                for k, v in scores.items()
            )
            + f"  [{elapsed:.0f}s, ETA {eta:.0f}s]",
            flush=True,
        )
    losses.append(mean_loss(model, evaluation))
    print(f"\nL(θ_w) per window: {' → '.join(f'{x:.3f}' for x in losses)}")
    print("\n| step s | min honest score | mean | positive scores | windows where all honest ≤ 0 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, rows in scores.items():
        flat = [x for r in rows for x in r]
        positive = sum(x > 0 for x in flat)
        lost = sum(all(x <= 0 for x in r) for r in rows)
        print(
            f"| {label} | {min(flat):+.4f} | {sum(flat) / len(flat):+.4f} | "
            f"{positive}/{len(flat)} | {lost}/{len(rows)} |"
        )
    if args.plot:
        plot(scores, args.plot)
        print(f"\nplot: {args.plot}")


def plot(scores: dict[str, list[list[float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, rows in scores.items():
        for i in range(len(rows[0])):
            ax.plot(
                range(len(rows)), [r[i] for r in rows], marker=".",
                color=f"C{list(scores).index(label)}", label=label if i == 0 else None, alpha=0.7,
            )  # fmt: skip
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_yscale("symlog", linthresh=0.05)
    ax.set_xlabel("window")
    ax.set_ylabel("L(θ_w) − L(θ_w − s·Δ_i), honest miners")
    ax.set_title("one honest Δ measured at step s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
