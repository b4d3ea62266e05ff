"""The README's ledger walkthrough through the real `tensormine` entry point."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from chain.ledger import Ledger
from chain.node import run_producer
from tensormine.cli import main

FAST = [
    "--set", "chain.block_time_s=0.02",
    "--set", "chain.tempo=4",
    "--set", "chain.weights_rate_limit=0",
    "--set", "chain.validator_min_stake_rao=1000000000000",  # 1,000 τ: more than a miner earns
    "--set", "chain.faucet_rao=10000000000000",
]  # fmt: skip


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite"


def tm(*args: str) -> int:
    return main(list(args))


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tm("--help")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("keys", "chain", "demo"):
        assert command in out
    with pytest.raises(SystemExit):
        tm("chain", "--help")
    out = capsys.readouterr().out
    for action in (
        "init",
        "run",
        "status",
        "metagraph",
        "balances",
        "schedule",
        "simulate",
        "weights",
    ):
        assert action in out


def test_readme_flow(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tm("keys", "new", "alice") == 0
    assert tm("keys", "new", "bob") == 0
    assert tm("chain", "init", "--owner", "alice", "--db", str(db), *FAST) == 0
    stop = threading.Event()
    thread = threading.Thread(target=lambda: run_producer(Ledger(db), stop=stop), daemon=True)
    thread.start()
    try:
        d = ["--db", str(db)]
        assert tm("chain", "faucet", "--key", "alice", "--amount", "5000", *d) == 0
        assert tm("chain", "register", "--key", "alice", *d) == 0
        assert tm("chain", "stake", "add", "--key", "alice", "--amount", "2000", *d) == 0
        assert tm("chain", "faucet", "--key", "bob", "--amount", "1.5", *d) == 0
        assert tm("chain", "register", "--key", "bob", *d) == 0
        assert tm("chain", "weights", "--key", "alice", "--uids", "1", "--weights", "1.0", *d) == 0
        capsys.readouterr()
        # Bad input: a clear one-line error, exit status 2, nothing changed.
        assert tm("chain", "stake", "remove", "--key", "bob", "--amount", "3", *d) == 2
        # Bob holds no stake of his own; an epoch since alice weighed him may have staked
        # his incentive, so the message gives whatever he holds now.
        assert re.search(r"has \d+ rao staked, asked for 3000000000\b", capsys.readouterr().err)
        assert tm("chain", "weights", "--key", "bob", "--uids", "0", "--weights", "1", *d) == 2
        assert "no validator permit" in capsys.readouterr().err
        assert tm("chain", "weights", "--key", "alice", "--uids", "1", "--weights", "nan", *d) == 2
        assert "finite" in capsys.readouterr().err
        assert tm("chain", "faucet", "--key", "bob", "--amount", "0.0000000001", *d) == 2
        assert "9 decimals" in capsys.readouterr().err
        assert tm("chain", "register", "--key", "nobody", *d) == 2
        assert "tensormine keys new nobody" in capsys.readouterr().err
        with Ledger(db) as ledger:
            start = ledger.head().number
            while ledger.head().number < start + 12:
                pass
    finally:
        stop.set()
        thread.join(timeout=10)
    capsys.readouterr()
    assert tm("chain", "status", *d) == 0
    out = capsys.readouterr().out
    assert "next halving" in out and "total issuance" in out
    assert tm("chain", "metagraph", *d) == 0
    out = capsys.readouterr().out
    assert "✓" in out  # alice's validator permit
    assert tm("chain", "balances", *d) == 0
    out = capsys.readouterr().out
    assert "= issuance" in out and "alice" in out
    assert tm("chain", "schedule", *d) == 0
    out = capsys.readouterr().out
    assert "0.500000000 τ" in out  # the first halving's block reward
    assert tm("chain", "simulate", "--blocks", "11000000", *d) == 0
    out = capsys.readouterr().out
    assert "halvings crossed" in out and "owner" in out
    assert tm("chain", "verify", *d) == 0
    assert "matches" in capsys.readouterr().out


def test_config_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("chain:\n  tempoo: 3\n")
    assert tm("chain", "status", "--config", str(bad)) == 2
    assert "bad.yaml: chain.tempoo: unknown key" in capsys.readouterr().err


def test_console_script_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tensormine.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith("tensormine ")
