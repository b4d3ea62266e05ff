"""The whole subnet through its real entry point: `tensormine subnet up`, tiny and short.

One validator and two miners (the second a free-rider) run two windows of the shrunk
tiny preset against a real ledger and store. Asserted: every trained window has a
canonical checkpoint, held-out loss fell, the honest miner was paid and the free-rider
was not, issuance equals every balance and stake plus what is pending, and no process of
the run is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.e2e

WINDOWS = 2


def overrides(run: Path) -> list[str]:
    return [
        f"run.dir={run}",
        f"chain.db={run}/ledger.sqlite",
        f"store.root={run}/store",
        "chain.block_time_s=0.2",
        "window.blocks=64",
        "window.publish_margin=3",
        "data.max_documents=120",
        "data.seq_len=64",
        "train.inner_steps=8",
        "train.batch_size=4",
        "train.warmup_steps=2",
        "train.lr=0.003",
        "train.eval_pages=8",
        "validation.own_data_pairs=16",  # the statistical own-data check, less noisy
        "subnet.sample_tokens=8",
        "subnet.refresh_s=0.5",
        "subnet.stop_grace_s=4",
    ]


def leftovers(run: Path) -> list[str]:
    """Processes anywhere on the machine whose command line names this run's folder."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(run) in cmdline and proc.pid != os.getpid():
            found.append(f"{proc.pid}: {cmdline[:160]}")
    return found


@pytest.mark.timeout(540)
def test_subnet_up_trains_scores_and_pays(tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = [
        sys.executable, "-m", "tensormine.cli", "subnet", "up", "--config", "configs/demo.yaml",
        "--miners", "2", "--validators", "1", "--windows", str(WINDOWS),
        "--adversaries", "free-rider",
        *[a for s in overrides(run) for a in ("--set", s)],
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=480)
    took = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert not leftovers(run), leftovers(run)
    assert not (run / "subnet" / "pids.json").exists()

    summary = json.loads((run / "subnet" / "summary.json").read_text())
    members = {m["name"]: m for m in summary["members"]}
    reports = [
        json.loads(line)
        for line in (run / "miners" / "miner-0" / "windows.jsonl").read_text().splitlines()
    ]
    assert len(reports) == WINDOWS
    # The ledger's books: every rao minted is in a balance, a stake or still pending.
    assert summary["issuance"] == summary["accounts_total"] + summary["pending"]
    # The honest miner's own held-out loss fell over its windows.
    assert reports[-1]["heldout_loss"] < reports[0]["heldout_before"] - 0.1, reports
    assert (run / "logs" / "miner-0.log").is_file() and (run / "plots").is_dir()
    # Every window the miners trained has its canonical checkpoint θ_{w+1}.
    for r in reports:
        assert r["window"] + 1 in summary["checkpoints"], (r["window"], summary["checkpoints"])
    # The validator's global model improved: θ after its last window beats θ_1.
    scored = [
        json.loads(line)
        for line in (run / "validators" / "validator-0" / "windows.jsonl").read_text().splitlines()
    ]
    assert scored[-1]["next_heldout_loss"] < scored[0]["heldout_loss"] - 0.1, scored
    assert members["miner-0"]["earned"] > 0, members
    assert "sample (transformers" in out
    assert members["miner-1"]["earned"] == 0, members
    # The miners averaged over hivemind, and the validator, an auxiliary peer of their
    # group, found the group's average equal to the mean of the Δs it admitted.
    miner_log = (run / "logs" / "miner-0.log").read_text()
    assert "averaged with 2 (in step)" in miner_log, miner_log[-3000:]
    validator_log = (run / "logs" / "validator-0.log").read_text()
    assert "relative error vs admitted" in validator_log, validator_log[-3000:]
    assert "MISMATCH" not in validator_log
    print(f"subnet e2e: {took:.0f}s")
