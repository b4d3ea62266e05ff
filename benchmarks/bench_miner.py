"""Miner benchmarks: inner-loop throughput against plain PyTorch, and memory by shard count.

    .venv/bin/python benchmarks/bench_miner.py              # ~2 minutes on 2 CPU cores

1. Tokens/s of `train.inner.inner_loop` (accelerate, the miner's loop) against a plain
   PyTorch loop over the same model, batch, pages and steps, alternated several times in
   this run; the ratio is what matters (target ≥ 0.97).
2. Peak resident memory and optimizer-state bytes of a miner process training one shard
   with S = 1 and S = 4 (the `small` preset by default, with a tiny batch so that
   weights, gradients and AdamW state dominate), each in a fresh process (peak RSS never
   goes down).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from tensormine.config import RunConfig, load_config
from train.config import TrainConfig


def _setup(preset: str) -> tuple[torch.nn.Module, torch.Tensor, RunConfig]:
    from train.model import build_model

    cfg = load_config(f"configs/{preset}.yaml")
    model = build_model(cfg.model, cfg.run.seed)
    g = torch.Generator().manual_seed(0)
    pages = torch.randint(
        0, cfg.model.vocab_size, (cfg.train.pages_per_window, cfg.data.seq_len), generator=g
    )
    return model, pages, cfg


def plain_loop(model: torch.nn.Module, pages: torch.Tensor, train_cfg: TrainConfig) -> float:
    from train.inner import lr_at, make_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, train_cfg)
    steps, batch = train_cfg.inner_steps, train_cfg.batch_size
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, train_cfg)
        ids = pages[step * batch : (step + 1) * batch].long()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
    return steps * batch * pages.shape[1] / (time.perf_counter() - start)


def miner_loop(model: torch.nn.Module, pages: torch.Tensor, train_cfg: TrainConfig) -> float:
    from accelerate import Accelerator

    from train.inner import inner_loop

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    stats = inner_loop(Accelerator(cpu=True), model, names, pages, train_cfg)
    return stats.tokens_per_second


def throughput(preset: str, rounds: int) -> None:
    model, pages, cfg = _setup(preset)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain, ours = [], []
    miner_loop(
        model, pages[: cfg.train.batch_size * 2], cfg.train.model_copy(update={"inner_steps": 2})
    )
    for _ in range(rounds):
        model.load_state_dict(state)
        plain.append(plain_loop(model, pages, cfg.train))
        model.load_state_dict(state)
        ours.append(miner_loop(model, pages, cfg.train))
    p, o = statistics.median(plain), statistics.median(ours)
    print(
        f"inner loop, {preset}: miner {o:,.0f} tokens/s vs plain PyTorch {p:,.0f} tokens/s "
        f"-> ratio {o / p:.3f} (median of {rounds} alternating rounds; "
        f"miner {[round(x) for x in ours]}, plain {[round(x) for x in plain]})"
    )


def memory_child(preset: str, shards: int) -> None:
    from accelerate import Accelerator

    from train.inner import inner_loop
    from train.shards import make_trainable, shard_map

    model, pages, cfg = _setup(preset)
    names = shard_map(model, shards)[0]
    make_trainable(model, names)
    # A small batch of short pages, so weights, gradients and AdamW state dominate the peak.
    train_cfg = cfg.train.model_copy(update={"inner_steps": 3, "batch_size": 2, "grad_accum": 1})
    pages = pages[:, :64]
    inner_loop(Accelerator(cpu=True), model, names, pages, train_cfg)
    trainable = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
    result = {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": trainable,
        "optimizer_state_mib": trainable * 2 * 4 / 2**20,  # AdamW: exp_avg + exp_avg_sq, fp32
    }
    print(json.dumps(result))


def memory(preset: str) -> None:
    rows = {}
    for shards in (1, 4):
        out = subprocess.run(
            [sys.executable, __file__, "--child", preset, str(shards)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows[shards] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = rows[1], rows[4]
    print(
        f"memory, {preset}: S=1 peak {a['peak_rss_mib']:.0f} MiB, optimizer state "
        f"{a['optimizer_state_mib']:.1f} MiB; S=4 (shard 0) peak {b['peak_rss_mib']:.0f} MiB, "
        f"optimizer state {b['optimizer_state_mib']:.1f} MiB -> optimizer state ratio "
        f"{b['optimizer_state_mib'] / a['optimizer_state_mib']:.3f}, peak ratio "
        f"{b['peak_rss_mib'] / a['peak_rss_mib']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-preset", default="small", help="preset for the memory test")
    parser.add_argument("--child", nargs=2, metavar=("PRESET", "SHARDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        memory_child(args.child[0], int(args.child[1]))
        return
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}"
    )
    throughput(args.preset, args.rounds)
    memory(args.memory_preset)


if __name__ == "__main__":
    main()
