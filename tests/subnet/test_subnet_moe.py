"""`tensormine subnet up --preset moe`: experts as shards through the real entry point.

Two miners and a validator train the `moe` preset (Mixtral, 8 experts in four groups of
two, S = 5 shards) on the demo config for two 20 s windows. With fewer miners than
shards the shared shard is trained every window and the other miner takes an expert
group (`train.shards.shard_for_miner`). At the end: each window's published checkpoint
is the miners' θ_{w+1} ("one model"), the validator scored the shared shard and an expert
group, judged the expert group's own data by proof of work (`scoring.OWN_POW`) and
labelled the rows by what each shard holds; the miners logged each expert's share of the
routed tokens; the last checkpoint was pulled and sampled with plain `transformers`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.subnet.test_subnet_e2e import env, window_rows

pytestmark = pytest.mark.e2e

WINDOWS = 2


def argv(run: Path) -> list[str]:
    sets = [
        f"run.dir={run}",
        f"chain.db={run}/ledger.sqlite",
        f"store.root={run}/store",
        "chain.block_time_s=0.2",
        "window.blocks=100",  # 20 s windows: room for proof of work on a slow CI machine
        "data.max_documents=120",
        "subnet.sample_tokens=8",
        "subnet.refresh_s=0.5",
        "subnet.stop_grace_s=4",
    ]
    return [
        sys.executable, "-m", "tensormine.cli", "subnet", "up", "--config", "configs/demo.yaml",
        "--preset", "moe", "--miners", "2", "--validators", "1", "--windows", str(WINDOWS),
        *[a for s in sets for a in ("--set", s)],
    ]  # fmt: skip


@pytest.mark.timeout(400)
def test_subnet_up_with_experts_as_shards(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.run(argv(run), env=env(), capture_output=True, text=True, timeout=380)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # One model: every window the miners ended in step, the checkpoint is their θ_{w+1}.
    line = next(x for x in out.splitlines() if x.startswith("one model:"))
    matched, total = map(int, re.match(r"one model: (\d+)/(\d+) windows", line).groups())  # type: ignore[union-attr]
    assert matched == total >= 1, line

    # Each miner trained its windows; in each window one took the shared shard and the
    # other an expert group, and both logged every expert's share of the routed slots.
    trained: dict[int, set[int]] = {}
    for name in ("miner-0", "miner-1"):
        rows = window_rows(run / "miners" / name / "windows.jsonl")
        assert len(rows) == WINDOWS, (name, rows)
        for r in rows:
            trained.setdefault(r["window"], set()).add(r["shard"])
            usage = r["expert_usage"]
            assert len(usage) >= 1 and all(len(layer) == 8 for layer in usage), usage
            for layer in usage:  # shares of top-2 slots: they sum to one per layer
                assert sum(layer) == pytest.approx(1.0, abs=1e-3), layer
    for window, shards in trained.items():
        assert 0 in shards and len(shards) == 2 and max(shards) <= 4, (window, shards)

    # The validator scored both kinds of shard, each row labelled by what it holds; proof
    # of work, not the own-data gap, judged the expert group's training.
    scored = window_rows(run / "validators" / "validator-0" / "windows.jsonl")
    assert scored, out[-4000:]
    rows = [m for r in scored for m in r["miners"] if m["status"] == "scored"]
    assert {m["shard"] == 0 for m in rows} == {True, False}, rows
    for m in rows:
        if m["shard"] != 0:
            assert m["own_outcome"] == "pow" and m["pow"] == "pass", m
        else:
            assert m["own_outcome"] != "pow", m
    labels = scored[-1]["shard_labels"]
    assert labels["0"] == "shared" and labels["1"].startswith("experts"), labels
    # The pulled checkpoint is a Mixtral that plain transformers loads and samples.
    summary = json.loads((run / "subnet" / "summary.json").read_text())
    final = max(summary["checkpoints"])
    config = json.loads((run / "final" / f"window-{final}" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 8, config
    # `--preset moe` brought the preset's half plain outer step with its model.
    meta = json.loads((run / "final" / f"window-{final}" / "tensormine.json").read_text())
    assert meta["run_config"]["outer"] == {"lr": 0.5, "momentum": 0.0, "nesterov": False}
    assert "sample (transformers" in out and "untrained initial model" not in out
