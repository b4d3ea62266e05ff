"""Outer-optimizer settings for one miner: held-out loss per window (DiLoCo, arXiv 2311.08105).

    .venv/bin/python benchmarks/bench_outer.py            # ~2 minutes on 2 CPU cores

Runs the miner's own pieces in one process — inner loop (H AdamW steps on assigned pages),
pseudo-gradient, outer step — for a few windows of the `tiny` preset, once per outer
setting, from the same initial model and the same pages, and prints the held-out loss
after each window. The baseline in the same run is plain averaging (outer lr 1, no
momentum: θ_{w+1} is the locally trained θ), which a good outer setting should beat.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from _bench_data import pages_and_heldout
from accelerate import Accelerator

from averaging.config import OuterConfig
from averaging.outer import outer_step
from tensormine.config import load_config
from train.inner import inner_loop, mean_loss
from train.model import build_model
from train.pages import assigned_pages
from train.shards import apply_to_shard, make_trainable, shard_map, shard_state

SETTINGS = [
    OuterConfig(lr=1.0, momentum=0.0, nesterov=False),  # baseline: plain averaging
    OuterConfig(lr=0.7, momentum=0.9, nesterov=True),  # DiLoCo's defaults
    OuterConfig(lr=0.7, momentum=0.5, nesterov=True),
    OuterConfig(lr=0.5, momentum=0.0, nesterov=False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--documents", type=int, default=300, help="stdlib files in the corpus")
    parser.add_argument("--eval-pages", type=int, default=32)
    args = parser.parse_args()
    run_dir = "runs/bench-outer"
    cfg = load_config(
        "configs/tiny.yaml", [f"run.dir={run_dir}", f"data.max_documents={args.documents}"]
    )
    cache = f"{run_dir}/data"
    pages, evaluation = pages_and_heldout(cfg, cache, b"bench", args.eval_pages)
    accelerator = Accelerator(cpu=True)
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; tiny, H = {cfg.train.inner_steps}, batch "
        f"{cfg.train.batch_size} × {cfg.data.seq_len} tokens, {args.windows} windows, "
        f"{evaluation.shape[0]} held-out pages"
    )
    for outer in SETTINGS:
        model = build_model(cfg.model, cfg.run.seed)
        names = shard_map(model, 1)[0]
        make_trainable(model, names)
        momentum: dict[str, torch.Tensor] = {}
        losses = [mean_loss(model, evaluation)]
        started = time.perf_counter()
        for window in range(args.windows):
            start = shard_state(model, names)
            order = assigned_pages("bench-miner", window, cfg.run.seed, pages.train.shape[0],
                                   cfg.train.pages_per_window)  # fmt: skip
            batch = torch.from_numpy(pages.train[order])
            inner_loop(accelerator, model, names, batch, cfg.train)
            trained = shard_state(model, names)
            delta = {n: start[n] - trained[n] for n in names}
            new, momentum = outer_step(start, delta, momentum, outer)
            apply_to_shard(model, names, new)
            losses.append(mean_loss(model, evaluation))
        print(
            f"outer lr {outer.lr} momentum {outer.momentum} nesterov {outer.nesterov}: "
            f"held-out {' → '.join(f'{x:.3f}' for x in losses)} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
