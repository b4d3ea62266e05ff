"""`subnet up` with stand-in miners: the real producer, ledger, funding, registration and
stake; Ctrl+C ends every child; a second `up` on the same folder adds nothing to the
ledger and reuses every key."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import subnet.up
from chain.config import RAO_PER_TAO
from chain.ledger import Ledger
from subnet import launch
from subnet.launch import Participant
from subnet.procs import group_alive, start_time
from subnet.records import read_jsonl
from subnet.up import Subnet, SubnetError, down, finish
from tensormine.config import RunConfig, load_config

# Stands in for `accelerate launch -m train.miner`: writes a window report like a miner,
# starts a grandchild, then exits ("finish") or waits to be stopped ("wait").
FAKE_MINER = """
import json, subprocess, sys, time
from pathlib import Path
run, name, mode = sys.argv[1:]
folder = Path(run) / "miners" / name
folder.mkdir(parents=True, exist_ok=True)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with (folder / "windows.jsonl").open("a") as fh:
    fh.write(json.dumps({"window": 1, "uid": 0, "shard": 0, "loss": 5.0,
                         "heldout_before": 6.0, "heldout_loss": 5.5}) + "\\n")
if mode == "wait":
    time.sleep(120)
"""

# Stands in for `python -m validation.validator`: has scored window 1, runs until stopped.
FAKE_VALIDATOR = """
import json, sys, time
from pathlib import Path
folder = Path(sys.argv[1]) / "validators" / sys.argv[2]
folder.mkdir(parents=True, exist_ok=True)
with (folder / "windows.jsonl").open("a") as fh:
    fh.write(json.dumps({"window": 1}) + "\\n")
time.sleep(120)
"""


def config(tmp_path: Path, *extra: str) -> tuple[RunConfig, list[str]]:
    run = tmp_path / "run"
    sets = [
        f"run.dir={run}", f"chain.db={run}/ledger.sqlite", f"store.root={run}/store",
        "chain.block_time_s=0.05", "chain.tempo=4", "subnet.miners=2", "subnet.validators=1",
        "chain.max_validators=1", "subnet.stop_grace_s=2", "subnet.refresh_s=0.1",
        "subnet.sample_tokens=0", *extra,
    ]  # fmt: skip
    return load_config("configs/demo.yaml", sets), sets


@pytest.fixture
def fake_miners(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    modes: dict[str, str] = {"mode": "finish"}

    def argv(p: Participant, **kwargs: Any) -> list[str]:
        run = kwargs["keys_dir"].parent
        return [sys.executable, "-c", FAKE_MINER, str(run), p.name, modes["mode"]]

    def validator(p: Participant, **kwargs: Any) -> list[str]:
        run = kwargs["keys_dir"].parent
        return [sys.executable, "-c", FAKE_VALIDATOR, str(run), p.name]

    monkeypatch.setattr(launch, "miner_argv", argv)
    monkeypatch.setattr(launch, "validator_argv", validator)
    return modes


def console() -> Console:
    return Console(width=200, file=io.StringIO())


def run_once(cfg: RunConfig, sets: list[str]) -> tuple[subnet.up.Outcome, Subnet]:
    sn = Subnet(cfg, "configs/demo.yaml", sets)
    try:
        return sn.run(console()), sn
    finally:
        sn.close()


def test_up_then_resume_adds_nothing(tmp_path: Path, fake_miners: dict[str, str]) -> None:
    cfg, sets = config(tmp_path, "subnet.windows=1")
    outcome, sn = run_once(cfg, sets)
    assert outcome.rc == 0, outcome
    assert (cfg.run.dir / "logs" / "validator-0.log").is_file()
    snap = outcome.snapshot
    assert snap is not None and snap.books_balance
    with Ledger(cfg.chain.db) as ledger:
        neurons = {n.hotkey: n for n in ledger.neurons()}
        head = ledger.block_number()
        xts = ledger.conn.execute("SELECT COUNT(*) FROM extrinsics").fetchone()[0]
    names = {m.name: m.address for m in sn.members}
    validator = neurons[names["validator-0"]]
    assert validator.validator_permit and validator.stake >= 1500 * RAO_PER_TAO
    assert not any(neurons[names[f"miner-{i}"]].validator_permit for i in range(2))
    assert [len(snap.miners[f"miner-{i}"]) for i in range(2)] == [1, 1]
    assert not (cfg.run.dir / "subnet" / "pids.json").exists()
    assert (cfg.run.dir / "logs" / "producer.log").is_file()
    assert finish(cfg, sn, outcome, console(), sample=False) == 0
    assert json.loads((cfg.run.dir / "subnet" / "summary.json").read_text())["members"]
    assert (cfg.run.dir / "plots" / "heldout_loss.png").is_file()

    again, sn2 = run_once(cfg, sets)
    assert again.rc == 0
    # The run's one window is trained: the resumed run starts no miner again.
    assert sum("has trained its 1 windows already" in n for n in sn2.notes) == 2
    assert not any("has trained" in n for n in again.notes)  # said once, at start-up
    assert [len(read_jsonl(cfg.run.dir / "miners" / f"miner-{i}" / "windows.jsonl"))
            for i in range(2)] == [1, 1]  # fmt: skip
    assert {m.name: m.address for m in sn2.members} == names  # keys reused
    with Ledger(cfg.chain.db) as ledger:
        assert ledger.block_number() > head  # the producer ran again ...
        # ... but nobody was funded, registered or staked twice.
        assert ledger.conn.execute("SELECT COUNT(*) FROM extrinsics").fetchone()[0] == xts
        after = {n.hotkey: n for n in ledger.neurons()}
    assert {h: n.uid for h, n in after.items()} == {h: n.uid for h, n in neurons.items()}
    assert after[names["validator-0"]].stake < validator.stake + 100 * RAO_PER_TAO


def test_ctrl_c_stops_every_child(tmp_path: Path, fake_miners: dict[str, str]) -> None:
    fake_miners["mode"] = "wait"
    cfg, sets = config(tmp_path)
    pidfile = cfg.run.dir / "subnet" / "pids.json"
    seen: dict[str, int] = {}

    def interrupt_when_up() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if pidfile.is_file():
                groups = json.loads(pidfile.read_text())["groups"]
                if {"producer", "miner-0", "miner-1"} <= set(groups):
                    seen.update({k: v[0] for k, v in groups.items()})
                    time.sleep(0.5)
                    os.kill(os.getpid(), signal.SIGINT)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=interrupt_when_up, daemon=True)
    thread.start()
    started = time.monotonic()
    outcome, _ = run_once(cfg, sets)
    thread.join()
    assert outcome.interrupted and outcome.rc == 130
    assert seen, "the children never came up"
    assert time.monotonic() - started < 60
    assert not any(group_alive(pgid) for pgid in seen.values())
    assert not pidfile.exists()


def test_second_up_next_to_a_running_one_is_refused(tmp_path: Path) -> None:
    cfg, sets = config(tmp_path)
    pidfile = cfg.run.dir / "subnet" / "pids.json"
    pidfile.parent.mkdir(parents=True)
    # A stand-in for a live `subnet up`, as its pid file names it.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    record = {"orchestrator": [other.pid, start_time(other.pid)], "groups": {}}
    pidfile.write_text(json.dumps(record))
    try:
        with pytest.raises(SubnetError, match="already running"):
            run_once(cfg, sets)
        assert not cfg.chain.db.exists()  # refused before touching anything
        assert down(cfg, console()) == 0  # `down` asks it to stop (SIGINT)
        assert other.wait(timeout=10) != 0
    finally:
        other.kill()
        other.wait()
