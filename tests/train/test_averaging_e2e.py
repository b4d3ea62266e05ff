"""Four miners average over hivemind, end every window with one model, and survive a kill.

Four miner processes (two shards, so each is a member of one group and an auxiliary peer
of the other) train against a real ledger and store, on the SparseLoCo wire with eager
overlap (`train.overlap`: the round of window w lands at the end of window w + 1). After
its first window one miner is SIGKILLed with its DHT, averagers and p2p daemon; the other
three go on without it and still end each window with bit-identical models. Restarted
once too much of the next window has passed for it to join that one, it downloads θ and
the outer momentum from a peer; having missed the round that lands in its first window
back it is out of step for it, loads a peer's state again, and ends the next window in
step with them, its own round landed. The survivors are stopped once they have ended
that window too.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from chain.keys import create_key
from chain.ledger import Ledger
from subnet.procs import group_alive
from tensormine.config import load_config
from train.windows import start_block

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

# The survivors' cap: they are stopped once they have ended the restarted miner's last window
# (five windows when it starts within half a window, as on an idle machine).
MAX_WINDOWS = 8
NAMES = ("m0", "m1", "m2", "m3")


def overrides(run: Path) -> list[str]:
    return [
        f"run.dir={run}",
        f"chain.db={run}/ledger.sqlite",
        f"store.root={run}/store",
        f"data.cache_dir={run}/data",
        "chain.block_time_s=0.2",
        "window.blocks=80",
        "window.publish_margin=5",
        "model.shards=2",
        "data.max_documents=120",
        "data.seq_len=64",
        "train.inner_steps=6",
        "train.batch_size=4",
        "train.warmup_steps=2",
        "train.lr=0.003",
        "train.eval_pages=4",
        "averaging.min_matchmaking_time_s=3",
        "averaging.request_timeout_s=1",
        "averaging.sender_timeout_s=2",
        "averaging.allreduce_timeout_s=10",
        "averaging.state_timeout_s=10",
        # The all-gathered SparseLoCo wire (the subnet e2e test runs the butterfly, int8).
        "averaging.wire=sparseloco",
        "averaging.overlap=eager",
        # No validator here: nobody would challenge the trajectories, so keep none.
        "train.pow_segments=0",
        # DiLoCo's momentum 0.9 overshoots at H = 6: held-out loss swings up and down by up to
        # 0.7 nats from window 3 on (once in CI it ended above where it began; see
        # benchmarks/RESULTS.md, Averaging). 0.5 still gives the restarted miner a momentum
        # that matters: loading a wrong one would put its θ_{w+1} off the others'.
        "outer.momentum=0.5",
        "wandb.mode=disabled",
    ]


def seed(name: str) -> bytes:
    return hashlib.sha256(f"averaging-e2e/{name}".encode()).digest()


def reports(run: Path, name: str) -> list[dict[str, Any]]:
    path = run / "miners" / name / "windows.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_four_miners_stay_in_step_and_survive_a_kill(tmp_path: Path) -> None:
    run, keys = tmp_path / "run", tmp_path / "keys"
    sets = overrides(run)
    cfg = load_config("configs/tiny.yaml", sets)
    # Keys (and so each miner's pages) from a fixed seed: the held-out check below comes
    # out alike every run, up to which round a peer happens to join.
    owner = create_key(keys, "owner", seed=seed("owner"))
    miners = {name: create_key(keys, name, seed=seed(name)) for name in NAMES}
    with Ledger.create(cfg.chain.db, cfg.chain, owner.address) as ledger:
        for kp in miners.values():
            ledger.submit_call(kp, "register", {})
        ledger.produce_block()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    producer = subprocess.Popen(
        [sys.executable, "-m", "tensormine.cli", "chain", "run", "--db", str(cfg.chain.db)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = [sys.executable, "-m", "train.miner", "--config", "configs/tiny.yaml",
            *[a for s in sets for a in ("--set", s)], "--keys-dir", str(keys)]  # fmt: skip

    def start(name: str, windows: int, log: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*base, "--hotkey", name, "--windows", str(windows)],
            stdout=(tmp_path / log).open("wb"), stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip

    procs = {name: start(name, MAX_WINDOWS, f"{name}.log") for name in NAMES}
    survivors_done: dict[str, int] = {}
    try:
        # Kill m3 once it has finished a window (between rounds: "before sending").
        deadline = time.monotonic() + 300
        while not reports(run, "m3"):
            assert procs["m3"].poll() is None, (tmp_path / "m3.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "m3 never finished a window"
            time.sleep(0.2)
        # The whole machine goes: the miner, its DHT and averager processes, its p2p daemon.
        os.killpg(procs["m3"].pid, signal.SIGKILL)
        procs["m3"].wait(timeout=10)
        killed_after = reports(run, "m3")[-1]["window"]
        # The machine comes back once more than half of the next window has passed: a miner
        # joins a window only while at most half of it is gone (`Miner.joinable_window`), so
        # that window surely runs without it, however fast it starts; it must catch up.
        missed = killed_after + 1
        back_from = start_block(missed, cfg.window) + cfg.window.blocks // 2 + 1
        with Ledger(cfg.chain.db) as ledger:
            deadline = time.monotonic() + 120
            while ledger.block_number() < back_from:
                assert time.monotonic() < deadline, "the ledger stopped producing blocks"
                time.sleep(0.2)
        procs["m3"] = start("m3", 2, "m3-restart.log")
        rc = procs["m3"].wait(timeout=400)
        assert rc == 0, (tmp_path / "m3-restart.log").read_text()[-4000:]
        # The survivors mine until they have ended the restarted miner's last window too (how
        # many windows that takes depends on how fast it started: ~10 s here, ~30 s on a
        # loaded CI machine), then they are stopped.
        last = reports(run, "m3")[-1]["window"]
        deadline = time.monotonic() + 120
        while not all(any(r["window"] >= last for r in reports(run, n)) for n in NAMES[:3]):
            for name in NAMES[:3]:
                assert procs[name].poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the survivors never reached the last window"
            time.sleep(0.2)
        survivors_done = {name: procs[name].poll() or 0 for name in NAMES[:3]}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # A killed miner's DHT and averager processes and p2p daemon take a moment to die.
        gone_by = time.monotonic() + 20
        while any(group_alive(p.pid) for p in procs.values()) and time.monotonic() < gone_by:
            time.sleep(0.1)
        producer.send_signal(signal.SIGINT)
        producer.wait(timeout=20)
    assert not any(survivors_done.values()), survivors_done

    survivors = {name: {r["window"]: r for r in reports(run, name)} for name in NAMES[:3]}
    windows = [w for w in sorted(survivors["m0"]) if w <= last]
    assert windows == list(range(windows[0], last + 1)), windows
    slips: list[tuple[int, str]] = []  # a survivor out of step after a window
    for window in windows:
        by_name = {name: survivors[name].get(window) for name in NAMES[:3]}
        rows = list(by_name.values())
        assert all(r is not None for r in rows), (window, rows)
        in_step = [r for r in rows if r["synced"]]  # type: ignore[index]
        # One model for all: the same θ_{w+1}, reached through averaging, not alone.
        assert len(in_step) >= 2, rows
        assert len({r["fingerprint"] for r in in_step}) == 1, rows  # type: ignore[index]
        # With overlap window w lands window w − 1's round: none in the first window.
        landed = window > windows[0]
        assert all(len(r["members"]) >= landed for r in in_step)  # type: ignore[index]
        slips += [(window, n) for n, r in by_name.items() if not r["synced"]]  # type: ignore[index]
    # hivemind's matchmaking now and then leaves one peer without a group (seen once in a
    # fresh-clone CI run: an auxiliary peer of the other shard, "could not find a group",
    # window 5). That miner is out of step for a window and loads a peer's state; more
    # than one such slip in a run would be a fault of ours.
    assert len(slips) <= 1, slips
    for window, name in slips:
        after = survivors[name].get(window + 1)
        assert after is None or after["synced"], (name, after)
    # Both shards were trained and averaged by two miners while all four were alive.
    first = [survivors[name][windows[0]] for name in NAMES[:3]]
    assert {r["shard"] for r in first} == {0, 1}
    # The round of the first window m3 missed lands a window later.
    after_kill = [survivors[name][killed_after + 2] for name in NAMES[:3]]
    hotkey_m3 = miners["m3"].address
    assert all(r["averaged_window"] == killed_after + 1 for r in after_kill), after_kill
    assert all(hotkey_m3 not in r["members"] for r in after_kill), after_kill
    # Held-out loss fell over the run: by 0.49 nats in four windows (three rounds landed, the
    # loss falling faster each), by 1.3–1.5 in five, on 2 busy cores.
    first_loss = survivors["m0"][windows[0]]["heldout_before"]
    assert survivors["m0"][windows[-1]]["heldout_loss"] < first_loss - 0.3, survivors["m0"]
    # The restarted miner loaded the peers' state and ended its second window in step
    # with them (its first lands a round it took no part in).
    first_back, back = [r for r in reports(run, "m3") if r["window"] > killed_after]
    assert not first_back["synced"] and back["window"] == first_back["window"] + 1
    others = [survivors[name].get(back["window"]) for name in NAMES[:3]]
    assert back["synced"] and all(o is not None for o in others), (back, others)
    in_step = [o for o in others if o["synced"]]  # type: ignore[index]
    assert {o["fingerprint"] for o in in_step} == {back["fingerprint"]}, (back, others)
    log = (tmp_path / "m3-restart.log").read_text()
    assert "loaded θ and outer momentum from" in log, log[-3000:]
