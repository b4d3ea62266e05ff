"""Compute utilization with and without overlap, from measured averaging rounds (issue 15).

    .venv/bin/python benchmarks/overlap_utilization.py runs/bench-averaging/net-shaped/rows.json

Reads the per-peer, per-round rows that `bench_averaging.py --parts shaped` writes (each
with the shared `start_at` and the peer's `end`: its blocking round time r) and prints the
compute utilization at H = 20, 50, 100 inner steps of `--step-s` seconds each:

- synchronous: a window computes H·t, then blocks for its round: H·t / (H·t + r);
- with `averaging.overlap`: the round of window w runs while w + 1 computes, so a peer
  blocks only for what its round takes beyond the next window's compute, max(0, r − H·t);
- both again with the wire's encode on the critical path (the message must exist before
  the commitment, whatever the schedule): the SparseLoCo encode of a Δ the size of the
  tiny model, timed here (`--params`, median of 5).

Every peer-round counts (sums over them, not the median), so a slow first round weighs in.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from averaging.sparseloco import ErrorFeedback, SparseSpec

TINY_PARAMS = 5_261_568


def encode_seconds(params: int, repeats: int = 5) -> float:
    """Median wall time of one SparseLoCo compress (error feedback + top-k + packing)."""
    g = torch.Generator().manual_seed(0)
    delta = {"w": 1e-3 * torch.randn(params, generator=g)}
    times = []
    for _ in range(repeats):
        feedback = ErrorFeedback(0.95)
        started = time.perf_counter()
        sent = feedback.compress(delta, SparseSpec(chunk=4096, k=64, positions="rice"))
        sent.message.to_bytes()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path, help="rows.json of a bench_averaging shaped run")
    parser.add_argument(
        "--step-s",
        type=float,
        default=1024 / 4439,
        help="one inner step (default: RESULTS.md's quiet-box tiny miner, 0.231 s)",
    )
    parser.add_argument("--params", type=int, default=TINY_PARAMS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [r for r in json.loads(args.rows.read_text()) if "error" not in r]
    encode = encode_seconds(args.params)
    print(f"{len(rows)} peer-rounds from {args.rows}; step {args.step_s * 1e3:.0f} ms; "
          f"SparseLoCo encode {encode:.3f} s")  # fmt: skip
    for wire in sorted({r["wire"] for r in rows}):
        took = [r["end"] - r["start_at"] for r in rows if r["wire"] == wire]
        print(f"\n### wire {wire}: round median {statistics.median(took):.2f} s, "
              f"max {max(took):.2f} s, {len(took)} peer-rounds")  # fmt: skip
        print("| H | synchronous | overlap | synchronous + encode | overlap + encode "
              "| rounds longer than the next window's compute |")  # fmt: skip
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for h in (20, 50, 100):
            compute = h * args.step_s
            total = compute * len(took)
            sync = sum(took)
            hidden = sum(max(0.0, r - compute) for r in took)
            enc = encode * len(took)
            over = sum(1 for r in took if r > compute)
            print(
                f"| {h} | {total / (total + sync):.1%} | {total / (total + hidden):.2%} | "
                f"{total / (total + sync + enc):.1%} | {total / (total + hidden + enc):.2%} | "
                f"{over} |"
            )


if __name__ == "__main__":
    main()
