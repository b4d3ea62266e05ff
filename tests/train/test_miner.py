"""The miner in one process: clear errors on bad setups, and restart safety."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from chain.keys import create_key, load_key
from chain.ledger import Ledger
from chain.node import run_producer
from store.api import open_store
from store.checkpoint import Provenance
from tensormine.config import RunConfig, load_config
from train.miner import Miner, main
from train.model import build_model, model_fingerprint
from train.window_start import serve_until_published
from train.windows import start_block, wait_for_block


@contextmanager
def producing(cfg: RunConfig) -> Iterator[None]:
    """Blocks made by a producer thread on the run's ledger meanwhile."""
    stop = threading.Event()
    producer = threading.Thread(
        target=lambda: run_producer(Ledger(cfg.chain.db), stop=stop), daemon=True
    )
    producer.start()
    try:
        yield
    finally:
        stop.set()
        producer.join(timeout=10)


def small_config(run: Path, **extra: str) -> list[str]:
    sets = {
        "run.dir": str(run),
        "chain.db": f"{run}/ledger.sqlite",
        "store.root": f"{run}/store",
        "data.cache_dir": f"{run}/data",
        "chain.block_time_s": "0.05",
        "window.blocks": "40",
        "data.max_documents": "40",
        "data.seq_len": "32",
        "train.inner_steps": "2",
        "train.batch_size": "2",
        "train.warmup_steps": "1",
        "train.eval_pages": "2",
        "wandb.mode": "disabled",
        **extra,
    }
    return [f"{k}={v}" for k, v in sets.items()]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[RunConfig, list[str], Path]]:
    run, keys = tmp_path / "run", tmp_path / "keys"
    sets = small_config(run)
    cfg = load_config("configs/tiny.yaml", sets)
    owner = create_key(keys, "owner")
    miner = create_key(keys, "m0")
    create_key(keys, "stranger")
    with Ledger.create(cfg.chain.db, cfg.chain, owner.address) as ledger:
        ledger.submit_call(miner, "register", {})
        ledger.produce_block()
    yield cfg, sets, keys


def args(sets: list[str], keys: Path, hotkey: str) -> list[str]:
    out = ["--config", "configs/tiny.yaml", "--hotkey", hotkey, "--keys-dir", str(keys)]
    for item in sets:
        out += ["--set", item]
    return out


def test_bad_setups_fail_with_a_clear_message(
    setup: tuple[RunConfig, list[str], Path], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    _, sets, keys = setup
    assert main(args(sets, keys, "stranger")) == 2
    assert "tensormine chain register --key stranger" in caplog.text
    caplog.clear()
    assert main(args(sets, keys, "nobody")) == 2
    assert "tensormine keys new nobody" in caplog.text
    caplog.clear()
    elsewhere = small_config(tmp_path / "empty")
    assert main([*args(elsewhere, keys, "m0"), "--set", "chain.block_time_s=0.01"]) == 2
    assert "tensormine chain init" in caplog.text
    caplog.clear()
    assert main([*args(sets, keys, "m0"), "--set", "train.batch_sise=3"]) == 2
    assert "train.batch_sise: unknown key" in caplog.text


def test_restart_resumes_from_the_saved_state(setup: tuple[RunConfig, list[str], Path]) -> None:
    _, sets, keys = setup
    # Top-k on the wire: the error feedback owed to the group is part of the state.
    cfg = load_config("configs/tiny.yaml", [*sets, "averaging.wire=topk", "averaging.overlap=off"])
    with producing(cfg):
        first = Miner(cfg, load_key(keys, "m0"), "m0", Accelerator(cpu=True))
        reports = first.run(max_windows=1)
        saved = model_fingerprint(first.model.state_dict())
        # Whatever the window's round left owed (it depends on timing), a known residual
        # must come back exactly.
        assert first.seat is not None
        gen = torch.Generator().manual_seed(3)
        owed = {
            n: torch.randn(p.shape, generator=gen)
            for n, p in first.model.named_parameters()
            if n in first.shards[0]
        }
        first.seat.restore_wire_residuals(owed)
        first.save_state()
        first.close()
        # A new process (here: a new Miner) picks up where the last finished window left it.
        second = Miner(cfg, load_key(keys, "m0"), "m0", Accelerator(cpu=True))
        assert second.load_state()
        assert second.window == reports[0].window + 1
        assert model_fingerprint(second.model.state_dict()) == saved
        assert set(second.momentum) and all(
            torch.isfinite(t).all() for t in second.momentum.values()
        )
        assert second.seat is not None
        again = second.seat.wire_residuals()
        assert set(again) == set(owed) and all(torch.equal(owed[n], again[n]) for n in owed)
        second.close()
    lines = (cfg.run.dir / "miners" / "m0" / "windows.jsonl").read_text().splitlines()
    assert [json.loads(line)["window"] for line in lines] == [reports[0].window]
    # A half-written state folder from a kill mid-save is ignored: CURRENT still points home.
    state = cfg.run.dir / "miners" / "m0" / "state"
    (state / f".window-{reports[0].window + 5}.partial").mkdir()
    assert (state / "CURRENT").read_text() == f"window-{reports[0].window + 1}"


def test_canonical_checkpoints_win(setup: tuple[RunConfig, list[str], Path]) -> None:
    """Without averaging, the store's canonical checkpoint always wins when present."""
    _, sets, keys = setup
    cfg = load_config("configs/tiny.yaml", [*sets, "averaging.enabled=false"])
    miner = Miner(cfg, load_key(keys, "m0"), "m0", Accelerator(cpu=True))
    canonical = build_model(cfg.model, seed=99)  # stands in for a validator's θ_3
    open_store(cfg.store).publish_checkpoint(canonical, None, Provenance(run_id="t", window=3))
    wanted = model_fingerprint(canonical.state_dict())
    assert model_fingerprint(miner.model.state_dict()) != wanted
    miner._adopt(3)  # a miner whose model differs adopts the canonical one
    assert model_fingerprint(miner.model.state_dict()) == wanted
    with torch.no_grad():
        next(miner.model.parameters()).add_(1.0)  # its own outer step moved it on
    own = model_fingerprint(miner.model.state_dict())
    miner._adopt(4)  # nothing canonical for window 4: keep its own θ
    assert model_fingerprint(miner.model.state_dict()) == own
    miner.close()
    fresh = Miner(cfg, load_key(keys, "m0"), "m0", Accelerator(cpu=True))
    fresh._adopt(6)  # no state of its own: the latest canonical before window 6
    assert model_fingerprint(fresh.model.state_dict()) == wanted
    fresh.close()


def test_out_of_step_miner_waits_for_the_canonical_checkpoint(
    setup: tuple[RunConfig, list[str], Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A miner whose group failed, with no peer in step to copy, takes the validators'
    canonical θ_w as soon as it appears, and trains on its own θ only when none comes
    before `window.canonical_wait` of the window has passed."""
    _, sets, keys = setup
    cfg = load_config(
        "configs/tiny.yaml",
        [*sets, "window.blocks=60", "averaging.state_timeout_s=1", "window.canonical_wait=0.5"],
    )
    stop = threading.Event()
    producer = threading.Thread(
        target=lambda: run_producer(Ledger(cfg.chain.db), stop=stop), daemon=True
    )
    producer.start()
    miner = Miner(cfg, load_key(keys, "m0"), "m0", Accelerator(cpu=True))
    try:
        assert miner.seat is not None and not miner.synced
        # Its commitment says where its DHT listens and where its contributions are.
        wait_for_block(miner.ledger, miner.ledger.block_number() + 2)
        committed = json.loads(miner.ledger.commitments()[miner.keypair.address][0])
        assert committed["contributions"] == str(cfg.store.root.resolve())
        assert committed["dht"]
        window = miner.current_window() + 1
        wait_for_block(miner.ledger, start_block(window, cfg.window))
        miner.window = window  # its own outer step reached θ_window, but out of step
        canonical = build_model(cfg.model, seed=99)  # a validator's θ_window, a little late
        wanted = model_fingerprint(canonical.state_dict())
        publisher = threading.Timer(
            1.0,
            lambda: open_store(cfg.store).publish_checkpoint(
                canonical, None, Provenance(run_id="t", window=window)
            ),
        )
        caplog.set_level(logging.INFO, logger="train.window_start")
        publisher.start()
        miner._adopt(window)
        publisher.join()
        assert model_fingerprint(miner.model.state_dict()) == wanted
        assert "the canonical checkpoint appeared" in caplog.text
        # Nothing published for the next window: it waits half the window, then goes on.
        own = model_fingerprint(miner.model.state_dict())
        miner._adopt(window + 1)
        assert model_fingerprint(miner.model.state_dict()) == own
        half = start_block(window + 1, cfg.window) + cfg.window.blocks // 2
        assert half <= miner.ledger.block_number() < half + cfg.window.blocks // 4
        # A miner that stops stays until the validators publish the window after its last
        # (serving its θ to one that missed the round), and gives up after the timeout.
        later = window + 5
        started = time.monotonic()
        assert not serve_until_published(miner.store, miner.ledger, later, 0.6)
        assert time.monotonic() - started >= 0.6
        store = open_store(cfg.store)
        threading.Timer(
            0.5,
            lambda: store.publish_checkpoint(canonical, None, Provenance(run_id="t", window=later)),
        ).start()
        assert serve_until_published(miner.store, miner.ledger, later, 30.0)
        assert time.monotonic() - started < 10.0
    finally:
        miner.close()
        stop.set()
        producer.join(timeout=10)


def test_restart_keeps_the_round_in_flight(setup: tuple[RunConfig, list[str], Path]) -> None:
    """With overlap a window's round runs on after the window: a miner that stops (or is
    killed) before it lands finds it on disk when it restarts — the round's averages once
    it ended, and its own Δ for the eager start — next to its error feedback."""
    _, sets, keys = setup
    cfg = load_config(
        "configs/tiny.yaml",
        # Windows long enough to commit in time beside a busy test run (a late Δ is not sent).
        [
            *sets,
            "averaging.wire=sparseloco",
            "averaging.overlap=eager",
            "window.blocks=200",
            "averaging.sender_timeout_s=2",
            "averaging.allreduce_timeout_s=10",
            "averaging.min_matchmaking_time_s=3",
            "averaging.request_timeout_s=1",
        ],
    )
    with producing(cfg):
        first = Miner(cfg, load_key(keys, "m0"), "m0", Accelerator(cpu=True))
        (report,) = first.run(max_windows=1)
        pending = first.rounds.pending
        assert pending is not None and pending.window == report.window and pending.sent
        assert first.seat is not None
        residual = first.seat.wire_residuals()
        first.close()
        assert (first.state_dir / f"landed-{report.window}.safetensors").is_file()
        second = Miner(cfg, load_key(keys, "m0"), "m0", Accelerator(cpu=True))
        assert second.load_state() and second.window == report.window + 1
        kept = second.rounds.kept
        assert kept is not None and kept.window == report.window
        assert set(kept.sent) == set(pending.sent)
        assert all(torch.equal(kept.sent[n], pending.sent[n]) for n in pending.sent)
        # Alone on the subnet its round found no group: nothing averaged, so out of step.
        assert kept.averages == {} and not kept.in_step
        sent = second.rounds.sent_before(report.window + 1)
        assert all(torch.equal(sent[n], pending.sent[n]) for n in pending.sent)
        assert second.seat is not None
        again = second.seat.wire_residuals()
        assert set(again) == set(residual)
        assert all(torch.equal(again[n], residual[n]) for n in residual)
        second.close()
