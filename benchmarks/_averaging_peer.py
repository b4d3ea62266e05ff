"""One averaging peer of `bench_averaging.py` (started by it, four at a time).

    .venv/bin/python benchmarks/_averaging_peer.py --index 0 --peers 4 --dir DIR \
        --host 127.0.0.1 --wires none,fp16,int8,topk --rounds 2

Peer i loads its pseudo-gradient Δ_i from DIR/delta_<i>.safetensors (written by the
benchmark), starts a hivemind DHT on `--host` (peer 0 first; the others bootstrap from the
address it writes to DIR), and for every wire codec runs `--rounds` all-reduce rounds of a
`ShardAverager` with the other peers. Peers meet at a file barrier before each round and
all pass the same `start_at` (the barrier time + `--lead` seconds), so the group forms at
`start_at` and ``end − start_at`` is the blocking all-reduce. Writes DIR/result_<i>.json.
"""

from __future__ import annotations

import os

# As in tests/averaging/conftest.py: no torch_shm_manager child; set before hivemind loads.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from averaging.dht import StaticDirectory, connect_peers, start_dht, visible_maddrs
from averaging.group import ShardAverager
from averaging.outer import mean_delta
from averaging.round import AveragingFailed
from averaging.settings import AveragingConfig, DHTConfig


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def wait_json(paths: list[Path], timeout: float) -> list[Any]:
    end = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if time.monotonic() > end:
            missing = [p.name for p in paths if not p.exists()]
            raise TimeoutError(f"waited {timeout:.0f} s for {missing}")
        time.sleep(0.05)
    return [json.loads(p.read_text()) for p in paths]


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    num = sum(float((got[n] - want[n]).double().norm() ** 2) for n in want)
    den = sum(float(want[n].double().norm() ** 2) for n in want)
    return float((num / den) ** 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--wires", default="none,fp16,int8,topk")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lead", type=float, default=4.0, help="barrier → start_at, seconds")
    parser.add_argument("--min-matchmaking", type=float, default=2.0)
    parser.add_argument("--sender-timeout", type=float, default=10.0, help="library default: 10")
    parser.add_argument(
        "--no-dial", dest="dial", action="store_false",
        help="do not dial every peer before a round (what the benchmark did before 2026-12-07)",
    )  # fmt: skip
    parser.add_argument("--part-size", type=int, default=1 << 17, help="library default: 128 KiB")
    args = parser.parse_args()
    i, n, root = args.index, args.peers, args.dir
    deltas = [load_file(root / f"delta_{j}.safetensors") for j in range(n)]
    mean = mean_delta(deltas)

    if i == 0:
        dht = start_dht(DHTConfig(host=args.host))
        write_json(root / "bootstrap.json", visible_maddrs(dht))
    else:
        (maddrs,) = wait_json([root / "bootstrap.json"], 180)
        dht = start_dht(DHTConfig(host=args.host, initial_peers=maddrs))
    write_json(root / f"peer_{i}.json", dht.peer_id.to_base58())
    write_json(root / f"maddrs_{i}.json", visible_maddrs(dht))
    ids = wait_json([root / f"peer_{j}.json" for j in range(n)], 180)
    everyone = [
        m for ms in wait_json([root / f"maddrs_{j}.json" for j in range(n)], 180) for m in ms
    ]
    directory = StaticDirectory({pid: f"peer-{j}" for j, pid in enumerate(ids)})

    rows = []
    for shard, wire in enumerate(args.wires.split(",")):
        config = AveragingConfig(
            wire=wire,
            min_matchmaking_time_s=args.min_matchmaking,
            request_timeout_s=min(1.0, args.min_matchmaking / 2),
            sender_timeout_s=args.sender_timeout,
            part_size_bytes=args.part_size,
            topk_part_size_bytes=args.part_size,
            allreduce_timeout_s=max(60.0, 4 * args.sender_timeout),
        )
        averager = ShardAverager(
            dht,
            "bench",
            shard,
            deltas[i],
            config=config,
            directory=directory,
            weight_of=lambda _hotkey: 1.0,
        )
        try:
            for r in range(args.rounds):
                tag = f"{wire}_{r}"
                write_json(root / f"ready_{tag}_{i}.json", time.time())
                times = wait_json([root / f"ready_{tag}_{j}.json" for j in range(n)], 300)
                start_at = max(times) + args.lead
                if args.dial:
                    # As a miner does before every round (`Participant.average_window`
                    # dials the ledger's committed peers): not only the bootstrap peer.
                    connect_peers(dht, everyone, timeout=args.lead)
                called = time.time()
                row: dict[str, Any] = {
                    "wire": wire,
                    "round": r,
                    "start_at": start_at,
                    "called": called,
                }
                try:
                    result = averager.average(
                        r, deltas[i], timeout=args.lead + 30, start_at=start_at
                    )
                except AveragingFailed as exc:
                    row.update(end=time.time(), error=str(exc))
                else:
                    row.update(
                        end=time.time(),
                        bytes_sent=result.bytes_sent,
                        bytes_received=result.bytes_received,
                        attempts=result.attempts,
                        members=len(result.members),
                        digest=digest(result.tensors),
                        relative_error=relative_error(result.tensors, mean),
                    )
                rows.append(row)
                print(
                    f"[peer {i}] {wire} round {r + 1}/{args.rounds}: all-reduce "
                    f"{row['end'] - start_at:.2f} s, sent {row.get('bytes_sent', 0):,} B"
                    + (f", FAILED: {row['error']}" if "error" in row else ""),
                    flush=True,
                )
        finally:
            averager.shutdown()
    write_json(root / f"result_{i}.json", rows)
    dht.shutdown()


if __name__ == "__main__":
    main()
