"""Two miners under `accelerate launch` against a real ledger and store, for several windows.

One miner runs as a single process, the other as two DDP processes (gloo on CPU). Both
must publish a verified contribution in every window they train, average it with the
other over hivemind and end the window with the same model, their held-out loss must
fall, and each must leave an offline W&B run behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from averaging.parts import decode_payload
from chain.keys import Keypair, create_key
from chain.ledger import Ledger
from store.api import Store, open_store
from store.manifest import commitment_digest
from tensormine.config import RunConfig, load_config
from train.model import build_model
from train.shards import shard_map
from train.windows import deadline

pytestmark = pytest.mark.e2e

WINDOWS = 3


def overrides(run: Path) -> list[str]:
    return [
        f"run.dir={run}",
        f"chain.db={run}/ledger.sqlite",
        f"store.root={run}/store",
        f"data.cache_dir={run}/data",
        "chain.block_time_s=0.2",
        "chain.faucet_rao=1000000000000",
        "chain.weights_rate_limit=0",
        "window.blocks=80",
        "window.publish_margin=3",
        "data.max_documents=120",
        "data.seq_len=64",
        "train.inner_steps=8",
        "train.batch_size=4",
        "train.warmup_steps=2",
        "train.lr=0.003",
        "train.eval_pages=8",
        "averaging.min_matchmaking_time_s=3",
        "averaging.request_timeout_s=1",
        # The synchronous round (the averaging e2e test runs the tiny preset's overlap).
        "averaging.overlap=off",
        "wandb.mode=offline",
        # 4 kept states of the whole model per window (2-step segments), not 8: the disk
        # writes inside the inner loop slowed both miners enough to miss a round once.
        "train.pow_segments=4",
    ]


def launch(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", *args],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip


def test_two_miners_train_publish_and_improve(tmp_path: Path) -> None:
    run = tmp_path / "run"
    keys = tmp_path / "keys"
    sets = overrides(run)
    cfg = load_config("configs/tiny.yaml", sets)
    owner = create_key(keys, "owner")
    miners = {name: create_key(keys, name) for name in ("m0", "m1")}
    with Ledger.create(cfg.chain.db, cfg.chain, owner.address) as ledger:
        for kp in miners.values():
            ledger.submit_call(kp, "register", {})
        ledger.produce_block()
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    producer = subprocess.Popen(
        [sys.executable, "-m", "tensormine.cli", "chain", "run", "--db", str(cfg.chain.db)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    miner_args = ["--config", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)]]
    procs = {}
    try:
        procs["m0"] = launch(
            ["--num_processes", "1", "-m", "train.miner", *miner_args, "--hotkey", "m0",
             "--keys-dir", str(keys), "--windows", str(WINDOWS)],
            env, tmp_path / "m0.log",
        )  # fmt: skip
        procs["m1"] = launch(
            ["--multi_gpu", "--num_processes", "2", "-m", "train.miner", *miner_args,
             "--hotkey", "m1", "--keys-dir", str(keys), "--windows", str(WINDOWS)],
            env, tmp_path / "m1.log",
        )  # fmt: skip
        for name, proc in procs.items():
            rc = proc.wait(timeout=600)
            assert rc == 0, (tmp_path / f"{name}.log").read_text()[-4000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        producer.send_signal(signal.SIGINT)
        producer.wait(timeout=20)

    store = open_store(cfg.store)
    model = build_model(cfg.model, cfg.run.seed)
    params = dict(model.named_parameters())
    shards = shard_map(model, cfg.model.shards)
    by_window: dict[str, dict[int, dict[str, object]]] = {}
    for name, kp in miners.items():
        reports = [
            json.loads(line)
            for line in (run / "miners" / name / "windows.jsonl").read_text().splitlines()
        ]
        assert len(reports) == WINDOWS
        assert [r["window"] for r in reports] == list(
            range(reports[0]["window"], reports[0]["window"] + WINDOWS)
        )
        # Held-out loss falls: the last model beats the one the first window started from.
        assert reports[-1]["heldout_loss"] < reports[0]["heldout_before"] - 0.1, reports
        for report in reports:
            assert not report["late"], report
            refs = [
                r
                for r in store.list_contributions(report["window"], shard=report["shard"])
                if r.hotkey == kp.address
            ]
            assert len(refs) == 1
            # What a validator does: shapes from the model; with averaging on, the payload
            # is the wire parts the miner sent into its group, each checked by its digest.
            manifest = store.read_manifest(refs[0])
            shapes = {n: tuple(params[n].shape) for n in shards[report["shard"]]}
            assert manifest.compression.scheme == "wire"
            got = store.load_contribution(
                refs[0], hotkey=kp.address, uid=report["uid"], window=report["window"],
                shard=report["shard"],
            )  # fmt: skip
            delta = decode_payload(
                got.tensors, manifest.compression.params, shapes, wire=cfg.averaging.wire,
                part_size_bytes=cfg.averaging.wire_part_size_bytes,
                sparse=cfg.averaging.sparse_spec,
            )  # fmt: skip
            # Committed on the ledger before the window's deadline, and this is it.
            with Ledger(cfg.chain.db) as ledger:
                commitment = ledger.contribution_commitment(kp.address, report["window"])
            assert commitment is not None and commitment.digest == commitment_digest(manifest)
            assert commitment.block < deadline(report["window"], cfg.window)
            assert set(delta) == set(shapes)
            assert all(bool(t.abs().sum() > 0) for t in delta.values())
        by_window[name] = {r["window"]: r for r in reports}
        runs = list((run / "miners" / name / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        assert list(runs[0].glob("*.wandb")), "the offline run has no data file"
    # Averaged together: they end windows with one model (the DDP miner's second process
    # gets it by broadcast) made from both Δs. A miner that started a window earlier than
    # the other trained it alone; the first shared window then shows they started from
    # different models, and the one that lost the tie loads the other's state.
    common = sorted(set(by_window["m0"]) & set(by_window["m1"]))
    assert len(common) >= WINDOWS - 1, by_window
    in_step = [
        w
        for w in common
        if by_window["m0"][w]["synced"]
        and by_window["m1"][w]["synced"]
        and by_window["m0"][w]["fingerprint"] == by_window["m1"][w]["fingerprint"]
    ]
    assert common[-1] in in_step and len(in_step) >= len(common) - 1, by_window
    both = sorted(kp.address for kp in miners.values())
    assert all(by_window["m0"][w]["members"] == both for w in in_step)
    check_trajectories(cfg, run, store, miners, by_window)


def check_trajectories(
    cfg: RunConfig,
    run: Path,
    store: Store,
    miners: dict[str, Keypair],
    by_window: dict[str, dict[int, dict[str, object]]],
) -> None:
    """Proof of work: the states each miner committed for its last window are the ones it
    kept, and every segment after the first recomputes in this one process (as a validator
    would) within the validators' tolerance: the two-process DDP miner's too. (With one
    shard the state at a segment's start is the whole model, so θ_w is not needed.)"""
    from train.data import load_pages
    from train.startup import data_cache, load_tokenizer_from
    from train.trajectory import TrajectoryKeeper, digest_of_state, segment_bounds
    from validation.proof_of_work import SpotChecker, compare_update

    assert cfg.model.shards == 1
    store.pull_checkpoint(run / "pulled-0", window=0, progress=False)
    tokenizer = load_tokenizer_from(run / "pulled-0")
    pages = load_pages(cfg.data, tokenizer, data_cache(cfg))
    model = build_model(cfg.model, cfg.run.seed)
    names = shard_map(model, 1)[0]
    shapes = {0: {n: tuple(p.shape) for n, p in model.named_parameters()}}
    bounds = segment_bounds(cfg.train.inner_steps, cfg.train.trajectory_segments)
    for name, kp in miners.items():
        window = max(by_window[name])
        keeper = TrajectoryKeeper(run / "miners" / name / "trajectory")
        assert keeper.meta(window) == (0, bounds)
        ref = next(r for r in store.list_contributions(window, shard=0) if r.hotkey == kp.address)
        trajectory = store.read_manifest(ref).trajectory
        assert trajectory is not None and list(trajectory.bounds) == bounds
        checker = SpotChecker(
            cfg, kp, store, b"", [names], shapes, pages.train, torch.device("cpu")
        )
        for index in range(1, len(bounds) - 1):
            start, end = keeper.load(window, bounds[index]), keeper.load(window, bounds[index + 1])
            assert start is not None and end is not None
            for step, state in ((bounds[index], start), (bounds[index + 1], end)):
                assert (
                    digest_of_state(step, state, state, names)
                    == trajectory.states[bounds.index(step) - 1]
                )
            params = {n: start[n] for n in names}
            moments = {k: v for k, v in start.items() if "::" in k}
            again = checker.recompute(
                kp.address, window, names, params, params, moments,
                bounds[index], bounds[index + 1],
            )  # fmt: skip
            rel, cos = compare_update(params, {n: end[n] for n in names}, again)
            print(f"{name} window {window} segment {index}: relative error {rel:.3g}, cos {cos}")
            assert rel <= cfg.validation.pow_max_rel_error, (name, index, rel)
            assert cos >= cfg.validation.pow_min_cosine, (name, index, cos)
