"""Ledger benchmarks: Yuma epoch time and block production throughput.

    .venv/bin/python benchmarks/bench_chain.py            # ~1 minute on 2 cores

Prints, each against a baseline measured in the same run:
1. `yuma_epoch` on dense n×n weights for n = 256 and 1024, against one column-wise sort
   of the same matrix (the floor cost of any stake-weighted median);
2. a whole ledger epoch (read the metagraph from SQLite, Yuma, payouts, write back) with
   n UIDs and 64 permitted validators setting weights on every UID;
3. blocks per second of block production with 64 signed transfers per block, against
   verifying the same 64 Ed25519 signatures alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from chain.config import RAO_PER_TAO, ChainConfig
from chain.consensus import yuma_epoch
from chain.epoch import run_epoch
from chain.extrinsics import sign_extrinsic
from chain.keys import Keypair
from chain.ledger import Ledger
from chain.runtime import Runtime

TAO = RAO_PER_TAO


def best_of(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_yuma(n: int, repeat: int) -> None:
    rng = np.random.default_rng(0)
    weights = rng.random((n, n))
    stake = rng.random(n)
    bonds = rng.random((n, n))
    bonds /= bonds.sum(axis=0, keepdims=True)
    baseline = best_of(lambda: np.sort(weights, axis=0), repeat)
    for yuma3 in (False, True):
        took = best_of(
            lambda y=yuma3: yuma_epoch(
                weights,
                stake,
                bonds,
                kappa=0.5,
                bond_alpha=0.1,
                bonds_penalty=1.0,
                yuma3=y,
                liquid_alpha=y,
            ),
            repeat,
        )
        name = "yuma3+liquid" if yuma3 else "classic"
        print(
            f"yuma_epoch {name:13s} n={n:5d}: {took * 1e3:8.1f} ms  = "
            f"{took / baseline:5.1f}x a column sort ({baseline * 1e3:.1f} ms)"
        )


def bench_ledger_epoch(n: int, validators: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ChainConfig(
            db=Path(tmp) / "l.sqlite",
            max_uids=n,
            tempo=10**4,
            weights_rate_limit=0,
            validator_min_stake_rao=TAO,
            faucet_rao=10**6 * TAO,
            max_validators=validators,
            commit_reveal=False,  # weights set in one call: the epoch is what is measured
        )
        ledger = Ledger.create(cfg.db, cfg, Keypair.generate().address)
        keys = [Keypair.generate() for _ in range(n)]
        rng = np.random.default_rng(1)
        for i, kp in enumerate(keys):
            if i < validators:
                ledger.submit_call(kp, "faucet", {"amount": 1000 * TAO})
            ledger.submit_call(kp, "register", {})
            if i < validators:
                ledger.submit_call(kp, "add_stake", {"amount": int(rng.integers(10, 1000)) * TAO})
            if (i + 1) % 200 == 0:
                ledger.produce_block()
        ledger.produce_block()
        for kp in keys[:validators]:
            w = rng.integers(1, 65535, size=n).tolist()
            ledger.submit_call(kp, "set_weights", {"uids": list(range(n)), "weights": w})
        ledger.produce_block()

        def one_epoch() -> None:
            ledger.conn.execute("BEGIN IMMEDIATE")
            rt = Runtime(ledger.conn, ledger.config, ledger.owner, ledger.genesis_hash)
            run_epoch(rt, rt.block())
            ledger.conn.execute("ROLLBACK")

        took = best_of(one_epoch, repeat)
        w = rng.random((n, n))
        base = best_of(lambda: np.sort(w, axis=0), repeat)
        print(
            f"ledger epoch  n={n:5d}, {validators} validators: {took * 1e3:8.1f} ms  = "
            f"{took / base:5.1f}x a column sort"
        )
        ledger.close()


def bench_blocks(per_block: int, blocks: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ChainConfig(db=Path(tmp) / "l.sqlite", faucet_rao=10**6 * TAO, tempo=10)
        ledger = Ledger.create(cfg.db, cfg, Keypair.generate().address)
        senders = [Keypair.generate() for _ in range(per_block)]
        for kp in senders:
            ledger.submit_call(kp, "faucet", {"amount": 1000 * TAO})
        ledger.produce_block()
        sink = Keypair.generate().address
        signed = []
        for b in range(blocks):
            signed.append(
                [
                    sign_extrinsic(
                        kp, "transfer", {"dest": sink, "amount": 1 + b}, 1 + b, ledger.genesis_hash
                    )
                    for kp in senders
                ]
            )
        produce_times, submit_times = [], []
        for batch in signed:
            t = time.perf_counter()
            for xt in batch:
                ledger.submit(xt)
            submit_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            ledger.produce_block()
            produce_times.append(time.perf_counter() - t)
        verify = best_of(lambda: [xt.check_signature() for xt in signed[0]], 5)
        produce = statistics.median(produce_times)
        submit = statistics.median(submit_times)
        print(
            f"block with {per_block} transfers: produce {produce * 1e3:6.1f} ms -> "
            f"{1 / produce:6.1f} blocks/s ({produce / verify:4.1f}x verifying the {per_block} "
            f"signatures, {verify * 1e3:.1f} ms); "
            f"admitting them to the pool {submit * 1e3:6.1f} ms"
        )
        ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
        f"numpy {np.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    for n in (256, 1024):
        bench_yuma(n, args.repeat)
    for n in (256, 1024):
        bench_ledger_epoch(n, 64, args.repeat)
    bench_blocks(64, 20)


if __name__ == "__main__":
    main()
