"""Validator throughput: scoring cost per contribution against one forward pass over E.

    .venv/bin/python benchmarks/bench_validator.py                      # 4, 16, 64 contributions
    .venv/bin/python benchmarks/bench_validator.py --counts 4 16 --repeats 3

Two measurements, both on the `tiny` preset (5.3 M parameters, seq_len 128, |E| =
`validation.heldout_pages` = 32, 8 own-data pairs):

1. **Scoring cost per contribution against one forward pass over E**, measured in
   alternation (so both see the same load on a shared machine; medians of `--repeats`
   rounds): a plain `train.inner.mean_loss` over E, against the validator's step for one
   contribution (apply θ − lr·Δ to the shard in place, `page_losses` over E plus the
   contribution's own-data pages in the same pass, restore θ, own-data verdict), with the
   own-data check (E + 16 pages) and without it (E alone). The window's base pass adds
   (|E| + 16·N) pages for N contributions, i.e. |E|/N + 16 pages per contribution; the
   table adds that share, scaled from the plain pass's time per page.
2. **Contributions per minute**: a real ledger and local store in a temporary folder, a
   staked validator and N miners with signed int8 contributions, and the whole of
   `Validator.process_window` (admission with sha256, signature and safetensors checks,
   decoding, scoring, copy check, aggregation, outer step, publishing θ_{w+1}, state
   save) for N = 4, 16, 64.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from averaging.compression import encode
from chain.config import RAO_PER_TAO
from chain.keys import create_key
from chain.ledger import Ledger
from store.manifest import Compression
from tensormine.config import RunConfig, load_config
from train.inner import mean_loss
from train.shards import shard_state
from train.windows import deadline
from validation.probes import page_losses, patched_shard
from validation.scoring import own_data_verdict
from validation.validator import Validator

TAO = RAO_PER_TAO


def make_config(root: Path, data: Path, pairs: int) -> RunConfig:
    sets = {
        "run.dir": root,
        "chain.db": root / "ledger.sqlite",
        "store.root": root / "store",
        "data.cache_dir": data,
        "data.max_documents": 400,
        "chain.tempo": 9,
        "chain.weights_rate_limit": 0,
        "chain.validator_min_stake_rao": 1000 * TAO,
        "chain.faucet_rao": 100_000 * TAO,
        "window.blocks": 20,
        "validation.own_data_pairs": pairs,
        "wandb.mode": "disabled",
    }
    return load_config("configs/tiny.yaml", [f"{k}={v}" for k, v in sets.items()])


def one_window(root: Path, data: Path, n: int, pairs: int) -> tuple[Validator, float, float]:
    """(validator, scoring seconds, whole-window seconds) for n contributions."""
    cfg = make_config(root, data, pairs)
    keys = root / "keys"
    owner, vkey = create_key(keys, "owner"), create_key(keys, "v0")
    ledger = Ledger.create(cfg.chain.db, cfg.chain, owner.address)
    ledger.submit_call(vkey, "faucet", {"amount": 2001 * TAO})
    ledger.submit_call(vkey, "register", {})
    ledger.submit_call(vkey, "add_stake", {"amount": 2000 * TAO})
    ledger.produce_block()
    miners = [create_key(keys, f"m{i}") for i in range(n)]
    for kp in miners:
        ledger.submit_call(kp, "register", {})
    ledger.produce_block()
    ledger.advance(cfg.chain.tempo + 2)  # an epoch gives the validator its permit
    validator = Validator(cfg, vkey, "v0")
    forward_over_e(validator, 2)  # the first passes of a process pay one-time costs
    window = 1
    ledger.advance(window * cfg.window.blocks - ledger.block_number())
    names = validator.shards[0]
    theta = shard_state(validator.model, names)
    gen = torch.Generator().manual_seed(0)
    for kp in miners:
        uid = ledger.uid_of(kp.address)
        assert uid is not None
        delta = {k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in theta.items()}
        enc = encode(delta, cfg.compression, None)
        validator.store.publish_contribution(
            enc.tensors, keypair=kp, uid=uid, window=window, shard=0,
            compression=Compression(scheme=cfg.compression.scheme, params=enc.params),
        )  # fmt: skip
    ledger.advance(deadline(window, cfg.window) - ledger.block_number())
    report = validator.process_window(window)
    assert report.admitted == n, report
    ledger.close()
    return validator, report.eval_seconds, report.seconds


def forward_over_e(validator: Validator, repeats: int) -> float:
    """Median seconds of a plain forward pass over E (also warms the model up)."""
    cfg = validator.cfg
    n = validator.pages.heldout.shape[0]
    idx = torch.arange(min(cfg.validation.heldout_pages, n))
    held = torch.from_numpy(validator.pages.heldout[idx.numpy()])
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        mean_loss(validator.model, held, batch=cfg.validation.eval_batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def micro(validator: Validator, repeats: int) -> tuple[float, float, float]:
    """Medians (plain fwd(E), scoring step with own-data, scoring step without), seconds."""
    cfg = validator.cfg
    held = torch.from_numpy(validator.pages.heldout[: cfg.validation.heldout_pages])
    own = torch.from_numpy(validator.pages.train[: 2 * cfg.validation.own_data_pairs])
    names = validator.shards[0]
    theta = shard_state(validator.model, names)
    gen = torch.Generator().manual_seed(1)
    delta = {k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in theta.items()}
    base = page_losses(validator.model, torch.cat([held, own]))
    pairs = cfg.validation.own_data_pairs

    def step(ids: torch.Tensor) -> None:
        with patched_shard(validator.model, names, theta, delta, cfg.outer.lr):
            new = page_losses(validator.model, ids, batch=cfg.validation.eval_batch)
        if ids.shape[0] > held.shape[0]:
            n = held.shape[0]
            own_data_verdict(base[n : n + pairs], new[n : n + pairs], base[n + pairs :],
                             new[n + pairs :], min_margin=0.0, min_t=2.0)  # fmt: skip

    plain: list[float] = []
    with_own: list[float] = []
    without: list[float] = []
    for _ in range(repeats):
        for bucket, fn in (
            (plain, lambda: mean_loss(validator.model, held, batch=cfg.validation.eval_batch)),
            (with_own, lambda: step(torch.cat([held, own]))),
            (without, lambda: step(held)),
        ):
            started = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - started)
    return statistics.median(plain), statistics.median(with_own), statistics.median(without)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    windows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        for n in args.counts:
            validator, _, total = one_window(Path(tmp) / f"n{n}", data, n, pairs=8)
            if n == args.counts[0]:
                plain, with_own, without = micro(validator, args.repeats)
                e_pages = validator.cfg.validation.heldout_pages
                own_pages = 2 * validator.cfg.validation.own_data_pairs
            validator.close()
            windows.append((n, total / n, 60 * n / total))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"plain forward over E ({e_pages} pages): {plain:.3f} s (median of {args.repeats})")
    print(f"scoring step with own-data check:    {with_own:.3f} s = {with_own / plain:.2f}x")
    print(f"scoring step without own-data check: {without:.3f} s = {without / plain:.2f}x")
    per_page = plain / e_pages
    print("| contributions N | step + base share, own-data on | own-data off | "
          "window s/contribution | contributions/min |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n, per, per_min in windows:
        on = (with_own + per_page * (e_pages / n + own_pages)) / plain
        off = (without + per_page * e_pages / n) / plain
        print(f"| {n} | {on:.2f}x | {off:.2f}x | {per:.3f} | {per_min:.0f} |")


if __name__ == "__main__":
    main()
