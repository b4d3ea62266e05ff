"""Round reliability (issue 15): how many of N consecutive averaging rounds fail.

    .venv/bin/python benchmarks/bench_rounds.py --rounds 100                 # loopback, int8
    .venv/bin/python benchmarks/bench_rounds.py --rounds 100 --sender-timeout 1 --lead 2 \
        --min-matchmaking 1.5                                               # the tests' timeouts
    .venv/bin/python benchmarks/bench_rounds.py --rounds 30 --wire none --json out.json
    .venv/bin/python benchmarks/bench_rounds.py --rounds 100 --load 2   # + 2 busy processes

Four real peers (`_averaging_peer.py`, separate processes, each with its own hivemind DHT
on 127.0.0.1) run `--rounds` rounds of `ShardAverager.average` back to back, each on
random Δs of `--params` values. A round counts as **failed** when any peer raised
`AveragingFailed`, ended in a group of fewer than four, or when the peers' results differ
(not bit-identical). Prints the failure count, every distinct error with its count, and
the median / max round time. On a loaded machine (all four peers share its cores) failures
rise; the load average is printed with the result. `--load N` adds N processes that spin
on the CPU for the whole run, as a test suite or a training step would beside the peers.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from bench_averaging import WORKERS as PEERS
from bench_averaging import PeerArgs, run_peers
from safetensors.torch import save_file


def spin() -> None:
    while True:
        pass


def run(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    for i in range(PEERS):
        delta = {"w": torch.randn(args.params, generator=gen) * 0.01}
        save_file(delta, folder / f"delta_{i}.safetensors")
    peer = PeerArgs(
        wires=[args.wire],
        rounds=args.rounds,
        lead=args.lead,
        sender_timeout=args.sender_timeout,
        part_size=args.part_size,
        min_matchmaking=args.min_matchmaking,
    )
    return run_peers(folder, peer, shaped=False)


def summarize(rows: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    by_round: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in rows:
        by_round[r["round"]].append(r)
    failed, errors = [], collections.Counter[str]()
    for rnd in range(rounds):
        mine = by_round.get(rnd, [])
        bad = [r for r in mine if "error" in r or r.get("members") != PEERS]
        digests = {r.get("digest") for r in mine if "error" not in r}
        if bad or len(mine) != PEERS or len(digests) > 1:
            failed.append(rnd)
            for r in bad:
                # The message without its window number, so that equal causes group.
                errors[r.get("error", f"group of {r.get('members')}").split(": ", 1)[-1]] += 1
            if len(digests) > 1:
                errors["results differ between peers"] += 1
    seconds = [r["end"] - r["start_at"] for r in rows if "error" not in r]
    return {
        "rounds": rounds,
        "failed_rounds": failed,
        "errors": dict(errors),
        "median_s": statistics.median(seconds) if seconds else None,
        "max_s": max(seconds) if seconds else None,
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--wire", default="int8")
    parser.add_argument("--params", type=int, default=1 << 20, help="values in each Δ")
    parser.add_argument("--lead", type=float, default=3.0, help="barrier → start_at, seconds")
    parser.add_argument("--min-matchmaking", type=float, default=2.0)
    parser.add_argument("--sender-timeout", type=float, default=10.0, help="library default")
    parser.add_argument("--part-size", type=int, default=1 << 17, help="library default")
    parser.add_argument("--json", type=Path, help="write the summary here too")
    parser.add_argument("--load", type=int, default=0, help="busy processes beside the peers")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="tm-rounds-"))
    hogs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.load)]
    for hog in hogs:
        hog.start()
    try:
        summary = run(args, folder)
        result = summarize(summary, args.rounds) | {"settings": vars(args) | {"json": None}}
    finally:
        for hog in hogs:
            hog.terminate()
            hog.join(5)
        shutil.rmtree(folder, ignore_errors=True)
    n = len(result["failed_rounds"])
    print(f"\nfailed rounds: {n} of {args.rounds} ({args.wire}, loopback, {PEERS} peers)")
    for message, count in sorted(result["errors"].items(), key=lambda kv: -kv[1]):
        print(f"  {count:4d} × {message}")
    if result["median_s"] is not None:
        print(f"round time: median {result['median_s']:.2f} s, max {result['max_s']:.2f} s")
    print("load average at the end: {:.1f} {:.1f} {:.1f}".format(*result["load_average"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
