"""Validator throughput: scoring cost per contribution against one forward pass over E.

    .venv/bin/python benchmarks/bench_validator.py                      # 4, 16, 64 contributions
    .venv/bin/python benchmarks/bench_validator.py --counts 4 16 --repeats 3

Two measurements, both on the `tiny` preset (5.3 M parameters, seq_len 128, |E| =
`validation.heldout_pages` = 32, 8 own-data pairs):

1. **Scoring cost per contribution against one forward pass over E**, measured in
   alternation (so all see the same load on a shared machine; medians of `--repeats`
   rounds): a plain `train.inner.mean_loss` over E, against the validator's two passes
   for one contribution: the score (θ − s·Δ at the share step, over E) and the checks
   (θ − lr·Δ at the outer step, over E, 8 generic pages and 16 own-data pages, own-data
   verdict), each applied to the shard in place and restored. The window's base pass
   covers (|E| + 8 + 16·N) pages for N contributions; the table adds each contribution's
   share of it, scaled from the plain pass's time per page. With the checks off
   (`own_data_pairs: 0`) only the scoring pass and E/N of the base pass remain.
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
        # The validator alone, as scorer: no hivemind seat (no miners average here, and its
        # DHT commitment would wait for blocks nobody produces).
        "averaging.enabled": "false",
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
    """Medians (plain fwd(E), the scoring pass, the checks' pass), seconds.

    The scoring pass applies θ − s·Δ at the share step s and runs over E alone; the
    checks' pass applies θ − lr·Δ at the outer step and runs over E, the generic pages of
    the held-out-rival check and the contribution's own-data pages, then computes the
    own-data verdict. Each restores θ afterwards."""
    cfg, vcfg = validator.cfg, validator.cfg.validation
    held = torch.from_numpy(validator.pages.heldout[: vcfg.heldout_pages])
    generic = torch.from_numpy(validator.pages.train[-vcfg.heldout_rival_pages :])
    own = torch.from_numpy(validator.pages.train[: 2 * vcfg.own_data_pairs])
    names = validator.shards[0]
    theta = shard_state(validator.model, names)
    gen = torch.Generator().manual_seed(1)
    delta = {k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in theta.items()}
    checked = torch.cat([held, generic, own])
    base = page_losses(validator.model, checked)
    pairs, n_head = vcfg.own_data_pairs, held.shape[0] + generic.shape[0]

    def score() -> None:
        with patched_shard(validator.model, names, theta, delta, cfg.outer.lr / 4):
            page_losses(validator.model, held, batch=vcfg.eval_batch)

    def checks() -> None:
        with patched_shard(validator.model, names, theta, delta, cfg.outer.lr):
            new = page_losses(validator.model, checked, batch=vcfg.eval_batch)
        mine, theirs = slice(n_head, n_head + pairs), slice(n_head + pairs, None)
        own_data_verdict(base[mine], new[mine], base[theirs], new[theirs],
                         min_margin=0.0, min_t=2.0)  # fmt: skip

    plain: list[float] = []
    scoring: list[float] = []
    checking: list[float] = []
    for _ in range(repeats):
        for bucket, fn in (
            (plain, lambda: mean_loss(validator.model, held, batch=vcfg.eval_batch)),
            (scoring, score),
            (checking, checks),
        ):
            started = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - started)
    return statistics.median(plain), statistics.median(scoring), statistics.median(checking)


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
                plain, scoring, checking = micro(validator, args.repeats)
                vcfg = validator.cfg.validation
                e_pages = vcfg.heldout_pages
                head_pages = e_pages + vcfg.heldout_rival_pages
                own_pages = 2 * vcfg.own_data_pairs
            validator.close()
            windows.append((n, total / n, 60 * n / total))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"plain forward over E ({e_pages} pages): {plain:.3f} s (median of {args.repeats})")
    print(f"scoring pass (share step, E):           {scoring:.3f} s = {scoring / plain:.2f}x")
    print(f"checks' pass (outer step, E + {head_pages - e_pages} + {own_pages} pages): "
          f"{checking:.3f} s = {checking / plain:.2f}x")  # fmt: skip
    per_page = plain / e_pages
    print("| contributions N | passes + base share, checks on | checks off | "
          "window s/contribution | contributions/min |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n, per, per_min in windows:
        on = (scoring + checking + per_page * (head_pages / n + own_pages)) / plain
        off = (scoring + per_page * e_pages / n) / plain
        print(f"| {n} | {on:.2f}x | {off:.2f}x | {per:.3f} | {per_min:.0f} |")


if __name__ == "__main__":
    main()
