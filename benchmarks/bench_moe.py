"""Experts as shards: the `moe` preset against a dense model with the same active parameters.

    .venv/bin/python benchmarks/bench_moe.py                       # ~1 hour on 2 CPU cores
    .venv/bin/python benchmarks/bench_moe.py --windows 4 --settings moe   # a quick look

Runs the miners' own pieces in one process, as `bench_probe.py` does: 4 miners
(`--miners`), each window each trains the shard the ledger's rule gives it
(`train.shards.shard_for_miner`) for H inner AdamW steps on its assigned pages
(`train.pages.assigned_pages`, with its shard's `data.expert_affinity` when set), the Δ of
every shard is averaged over its miners and stepped with plain averaging (outer lr 1; the
wire is left out: both models would pay it alike, per parameter). Equal tokens: every
setting trains H × batch × seq_len tokens per miner per window (the `moe` preset's H = 20,
batch 8, 128 tokens).

Settings:
- `dense`: the tiny Llama (5.26 M parameters, all active), one shard: every miner trains
  the whole model. The baseline.
- `moe`: the `moe` preset (11.6 M parameters, 5.27 M active per token), S = 5: shard 0 the
  shared parameters, shards 1–4 two experts of every layer. With 4 miners, one shard is
  untrained each window.
- `moe-affinity`: the same with `data.expert_affinity = 0.75` (three quarters of an expert
  miner's pages from its group's partition of the corpus by stdlib package).
- `moe-s1`: the MoE as one shard (every miner trains all of it): what sharding costs.
- `dense-s4`: the tiny Llama in 4 layer shards, one miner per shard each window, as the
  MoE's shards have: what one miner per shard costs without experts.
- `moe-aux05`: `moe` with five times the router's load-balancing coefficient (0.05).
- `moe-lr05`, `dense-s4-lr05` (`-lr03`): `moe` and `dense-s4` with the outer step damped
  to 0.5 (0.3).
- `dense-nesterov`, `dense-s4-nesterov` (`-lr035`): `dense` and `dense-s4` with DiLoCo's
  Nesterov outer step (lr 0.7, momentum 0.9, as the `small` and `1b` presets), and the
  layer shards at half that step (0.35); `dense-s2-nesterov`, `dense-s2-lr05`: two layer
  shards (the `small` preset's S) with that step and with plain half steps.

Per window it records the held-out loss of the averaged model on 64 fixed held-out pages,
the bytes of each miner's Δ as the int8 publication encodes it (`averaging.compression`),
the routing (each expert's share of its layer's routed slots during the miners' steps),
and the own-data statistic a validator computes for every contribution
(`validation.scoring.own_data_verdict`: paired gain on assigned pages minus neighbouring
pages, t over 8 pairs as the default `validation.own_data_pairs`, and over 32) at the whole
outer step. Prints a table and writes a JSON and a PNG (loss, routing, own-data t).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _bench_data import pages_and_heldout
from accelerate import Accelerator

from averaging.compression import encode
from averaging.config import CompressionConfig
from averaging.outer import mean_delta, outer_step
from tensormine.config import RunConfig, load_config
from train.data import shard_affinities
from train.inner import inner_loop, mean_loss
from train.model import build_model
from train.pages import assigned_pages
from train.shards import (
    apply_to_shard,
    is_expert_shard,
    make_trainable,
    shard_for_miner,
    shard_map,
    shard_state,
)
from validation.probes import own_data_pages, page_losses, patched_shard
from validation.scoring import own_data_verdict

Delta = dict[str, torch.Tensor]

MINERS = 4  # the default of --miners
SECRET = b"bench-moe-validator-secret"
# The moe preset's inner loop for every setting: equal tokens per miner and window.
TRAIN = ["data.seq_len=128", "train.inner_steps=20", "train.batch_size=8", "train.lr=0.002",
         "train.warmup_steps=5", "train.mixed_precision=\"no\"", "outer.lr=1.0",
         "outer.momentum=0.0", "outer.nesterov=false"]  # fmt: skip
NESTEROV = ["outer.lr=0.7", "outer.momentum=0.9", "outer.nesterov=true"]
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "dense": ("configs/tiny.yaml", ["model.shards=1"]),
    "moe": ("configs/moe.yaml", []),
    "moe-affinity": ("configs/moe.yaml", ["data.expert_affinity=0.75"]),
    "moe-s1": ("configs/moe.yaml", ["model.shards=1"]),
    "dense-s4": ("configs/tiny.yaml", ["model.shards=4"]),
    # Load balancing five times the preset's (0.01): does it keep every expert in use?
    "moe-aux05": ("configs/moe.yaml", ["model.router_aux_loss_coef=0.05"]),
    # Shards trained apart from the same θ_w and stepped together are a parallel (Jacobi)
    # block update: does damping the outer step help?
    "moe-lr05": ("configs/moe.yaml", ["outer.lr=0.5"]),
    "dense-s4-lr05": ("configs/tiny.yaml", ["model.shards=4", "outer.lr=0.5"]),
    "moe-lr03": ("configs/moe.yaml", ["outer.lr=0.3"]),
    "dense-s4-lr03": ("configs/tiny.yaml", ["model.shards=4", "outer.lr=0.3"]),
    # DiLoCo's Nesterov outer step (the `small` and `1b` presets' 0.7 / 0.9), whole and in
    # layer shards, and in layer shards at half the step.
    "dense-nesterov": ("configs/tiny.yaml", ["model.shards=1", *NESTEROV]),
    "dense-s4-nesterov": ("configs/tiny.yaml", ["model.shards=4", *NESTEROV]),
    "dense-s2-nesterov": ("configs/tiny.yaml", ["model.shards=2", *NESTEROV]),
    "dense-s2-lr05": ("configs/tiny.yaml", ["model.shards=2", "outer.lr=0.5"]),
    "dense-s4-nesterov-lr035": (
        "configs/tiny.yaml",
        ["model.shards=4", *NESTEROV, "outer.lr=0.35"],
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--settings", default="dense,moe,moe-affinity,moe-s1")
    parser.add_argument("--eval-pages", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--miners", type=int, default=MINERS, help="miners per window")
    parser.add_argument("--out", default="benchmarks/results/moe")
    args = parser.parse_args()
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; {args.miners} miners, {args.windows} windows, "
        f"seed {args.seed}",
        flush=True,
    )
    results: dict[str, Any] = {}
    for name in args.settings.split(","):
        results[name] = run(name, args.windows, args.eval_pages, args.seed, args.miners)
        Path(f"{args.out}.json").parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(results, indent=1) + "\n")
    report(results)
    plot(results, f"{args.out}.png", args.miners)
    print(f"\nJSON: {args.out}.json, plot: {args.out}.png")


def run(name: str, windows: int, eval_pages: int, seed: int, miners: int) -> dict[str, Any]:
    preset, extra = SETTINGS[name]
    run_dir = "runs/bench-moe"
    sets = [f"run.dir={run_dir}", f"run.seed={seed}", *TRAIN, *extra]
    cfg = load_config(preset, sets)
    pages, evaluation = pages_and_heldout(cfg, f"{run_dir}/data", b"bench-moe", eval_pages)
    affinities = shard_affinities(pages, cfg.model, cfg.data)
    accelerator = Accelerator(cpu=True)
    model = build_model(cfg.model, cfg.run.seed)
    shards = shard_map(model, cfg.model.shards)
    sizes = [sum(dict(model.named_parameters())[n].numel() for n in s) for s in shards]
    print(
        f"\n## {name}: {preset} {' '.join(extra)}; S = {len(shards)}, shard sizes {sizes}",
        flush=True,
    )
    momentum: dict[str, torch.Tensor] = {}
    out: dict[str, Any] = {"loss": [mean_loss(model, evaluation)], "bytes": [], "usage": [],
                           "own": [], "shard_sizes": sizes, "seconds": 0.0}  # fmt: skip
    int8 = CompressionConfig(scheme="int8")
    started = time.perf_counter()
    for window in range(windows):
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        by_shard: dict[int, list[tuple[int, Delta]]] = {}
        usage: list[torch.Tensor] = []
        for i in range(miners):
            shard = shard_for_miner(
                i, range(miners), window, len(shards), shared=cfg.model.expert_shards
            )
            names = shards[shard]
            apply_to_shard(model, names, {n: theta[n] for n in names})
            make_trainable(model, names)
            order = assigned_pages(
                f"miner-{i}", window, cfg.run.seed, pages.train.shape[0],
                cfg.train.pages_per_window, affinities.get(shard),
            )  # fmt: skip
            stats = inner_loop(
                accelerator, model, names, torch.from_numpy(pages.train[order]), cfg.train
            )
            if stats.expert_usage is not None:
                usage.append(stats.expert_usage)
            trained = shard_state(model, names)
            by_shard.setdefault(shard, []).append((i, {n: theta[n] - trained[n] for n in names}))
            apply_to_shard(model, names, {n: theta[n] for n in names})
        # What a validator measures of each contribution, on θ_w, before the outer step.
        own_rows, sent = [], []
        for shard, contributions in sorted(by_shard.items()):
            for i, delta in contributions:
                sent.append(encode(delta, int8).nbytes)
                own_rows.append(own_data(cfg, model, pages.train, i, window, shard, delta,
                                         theta, shards[shard], affinities.get(shard)))  # fmt: skip
        for shard, contributions in by_shard.items():
            names = shards[shard]
            start = {n: theta[n] for n in names}
            new, momentum_s = outer_step(
                start, mean_delta([d for _, d in contributions]),
                {n: momentum[n] for n in names if n in momentum}, cfg.outer,
            )  # fmt: skip
            momentum.update(momentum_s)
            apply_to_shard(model, names, new)
        loss = mean_loss(model, evaluation)
        out["loss"].append(loss)
        out["bytes"].append(sent)
        out["own"].append(own_rows)
        if usage:
            out["usage"].append(torch.stack(usage).mean(0).tolist())
        elapsed = time.perf_counter() - started
        eta = elapsed / (window + 1) * (windows - window - 1)
        spread = ""
        if usage:
            u = torch.stack(usage).mean(0)
            spread = f", busiest expert {u.max(1).values.mean():.3f} (even {1 / u.shape[1]:.3f})"
        print(
            f"window {window}: held-out {loss:.3f}, own t "
            + " ".join(f"{r['kind'][0]}{r['t8']:+.1f}" for r in own_rows)
            + f"{spread}  [{elapsed:.0f}s, ETA {eta:.0f}s]",
            flush=True,
        )
    out["seconds"] = time.perf_counter() - started
    return out


def own_data(
    cfg: RunConfig,
    model: torch.nn.Module,
    train: np.ndarray,
    miner: int,
    window: int,
    shard: int,
    delta: Delta,
    theta: dict[str, torch.Tensor],
    names: list[str],
    affinity: Any,
) -> dict[str, Any]:
    """The own-data t of one contribution with 8 and 32 pairs, as `validation.evaluate`."""
    kind = "whole" if cfg.model.shards == 1 else "layers"  # a dense model's layer shards
    if cfg.model.expert_shards:
        kind = "expert" if is_expert_shard(cfg.model, shard) else "shared"
    row: dict[str, Any] = {"miner": miner, "shard": shard, "kind": kind}
    for pairs in (8, 32):
        assigned, control = own_data_pages(
            SECRET, f"miner-{miner}", window, cfg.run.seed, train.shape[0],
            cfg.train.pages_per_window, pairs, affinity=affinity,
        )  # fmt: skip
        ids = torch.from_numpy(train[np.concatenate([assigned, control])])
        base = page_losses(model, ids)
        with patched_shard(model, names, {n: theta[n] for n in names}, delta, cfg.outer.lr):
            new = page_losses(model, ids)
        k = assigned.size
        verdict = own_data_verdict(base[:k], new[:k], base[k:], new[k:], min_margin=0.0, min_t=2.0)
        row[f"t{pairs}"] = verdict.t
        row[f"margin{pairs}"] = verdict.margin
    return row


def report(results: dict[str, Any]) -> None:
    print("\n| setting | held-out after 0 / 5 / 10 / last window | bytes per miner per window "
          "(int8, mean) | own t, 8 pairs: shared / expert (median) | t ≥ 2 |")  # fmt: skip
    print("| --- | --- | ---: | --- | ---: |")
    for name, r in results.items():
        loss = r["loss"]
        picks = [loss[min(i, len(loss) - 1)] for i in (1, 6, 11)] + [loss[-1]]
        sent = [b for w in r["bytes"] for b in w]
        rows = [x for w in r["own"] for x in w]
        med = {
            k: float(np.median([x["t8"] for x in rows if x["kind"] == k]))
            for k in ("shared", "expert", "layers", "whole")
            if any(x["kind"] == k for x in rows)
        }
        passed = sum(x["t8"] >= 2.0 for x in rows)
        print(
            f"| {name} | {' / '.join(f'{x:.3f}' for x in picks)} | {np.mean(sent):,.0f} | "
            + ", ".join(f"{k} {v:+.2f}" for k, v in med.items())
            + f" | {passed}/{len(rows)} |"
        )


def plot(results: dict[str, Any], path: str, miners: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routed = any(r["usage"] for r in results.values())  # a dense-only run has no router
    fig, axes = plt.subplots(1, 3 if routed else 2, figsize=(15 if routed else 10, 4.5))
    ax_loss, ax_own = axes[0], axes[-1]
    ax_route = axes[1] if routed else None
    for i, (name, r) in enumerate(results.items()):
        ax_loss.plot(range(len(r["loss"])), r["loss"], marker=".", color=f"C{i}", label=name)
        if r["usage"] and ax_route is not None:
            usage = np.asarray(r["usage"])  # [windows, layers, experts]
            ax_route.plot(usage.max(2).mean(1), color=f"C{i}", label=f"{name}: busiest")
            ax_route.plot(usage.min(2).mean(1), color=f"C{i}", linestyle=":",
                          label=f"{name}: idlest")  # fmt: skip
        for kind, marker in (("shared", "s"), ("expert", "o"), ("layers", "D"), ("whole", "^")):
            pts = [(w, x["t8"]) for w, row in enumerate(r["own"]) for x in row if x["kind"] == kind]
            if pts:
                ax_own.scatter(*zip(*pts, strict=True), color=f"C{i}", marker=marker, s=14,
                               alpha=0.7, label=f"{name}: {kind}")  # fmt: skip
    ax_loss.set(
        xlabel="window", ylabel="held-out loss (nats)", title=f"held-out loss, {miners} miners"
    )
    if ax_route is not None:
        ax_route.axhline(1 / 8, color="black", linewidth=0.8)
        ax_route.set(xlabel="window", ylabel="share of a layer's routed slots (mean over layers)",
                     title="expert utilisation (even = 1/8)")  # fmt: skip
    ax_own.axhline(2.0, color="black", linewidth=0.8)
    ax_own.set(xlabel="window", ylabel="own-data t (8 pairs)",
               title="own-data check per contribution (pass: t ≥ 2)")  # fmt: skip
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
