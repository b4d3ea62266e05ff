"""The validator as a real process next to a block producer: killed, restarted, resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.validation.conftest import Subnet
from train.windows import start_block, window_of

pytestmark = pytest.mark.e2e

Factory = Callable[..., Subnet]


def _lines(path: Path) -> list[dict[str, object]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_killed_validator_resumes_its_moving_averages(subnet_factory: Factory) -> None:
    # The own-data check is off: this test is about the process, not about the statistics.
    net = subnet_factory(
        ["honest", "free_rider"],
        **{"chain.block_time_s": 0.1, "window.blocks": 100, "validation.own_data_pairs": 0},
    )
    net.producer = True
    args = [sys.executable, "-m", "validation.validator", "--config", "configs/tiny.yaml",
            *[a for s in net.sets for a in ("--set", s)], "--hotkey", "v0",
            "--keys-dir", str(net.keys)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = net.cfg.run.dir.parent / "validator.log"
    producer = subprocess.Popen(
        [sys.executable, "-m", "tensormine.cli", "chain", "run", "--db", str(net.cfg.chain.db)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    reports = net.cfg.run.dir / "validators" / "v0" / "windows.jsonl"
    first = second = None
    try:
        first = subprocess.Popen([*args, "--windows", "5"], stdout=log.open("wb"),
                                 stderr=subprocess.STDOUT, env=env)  # fmt: skip
        window = window_of(net.ledger.block_number(), net.cfg.window) + 1
        net.to_block(start_block(window, net.cfg.window))
        net.mine(window)
        deadline_s = time.monotonic() + 240
        # The first process may score the (empty) window it started in, then ours.
        while window not in [r["window"] for r in _lines(reports)]:
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline_s, log.read_text()[-3000:]
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)  # no chance to clean up
        first.wait(timeout=10)
        second = subprocess.Popen([*args, "--windows", "1"], stdout=log.open("ab"),
                                  stderr=subprocess.STDOUT, env=env)  # fmt: skip
        net.mine(window + 1)
        assert second.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        producer.send_signal(signal.SIGINT)
        producer.wait(timeout=20)
    lines = _lines(reports)[-2:]
    assert [r["window"] for r in lines] == [window, window + 1], log.read_text()[-3000:]
    honest = net.uid("honest")
    rows = [{m["uid"]: m for m in r["miners"]} for r in lines]  # type: ignore[attr-defined]
    alpha = net.cfg.validation.ema_alpha
    assert rows[0][honest]["score"] > 0, lines[0]
    expected = (1 - alpha) * rows[0][honest]["ema"] + alpha * rows[1][honest]["score"]
    assert rows[1][honest]["ema"] == pytest.approx(expected)
    assert lines[1]["published"] == f"window-{window + 2}"
