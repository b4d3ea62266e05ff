"""Several real processes on one ledger file: SIGKILL of the producer, parallel submitters."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chain.keys import Keypair, create_key
from chain.ledger import Ledger
from chain.replay import replay

from .conftest import TAO, fast_config, subnet

pytestmark = pytest.mark.e2e


def start_producer(db: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tensormine.cli", "chain", "run", "--db", str(db)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for_head(ledger: Ledger, number: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while ledger.head().number < number:
        assert time.monotonic() < deadline, f"head stuck at {ledger.head().number}"
        time.sleep(0.01)


def test_sigkill_between_blocks_loses_nothing(tmp_path: Path) -> None:
    cfg = fast_config(tmp_path / "l.sqlite", block_time_s=0.01, tempo=4)
    owner = Keypair.generate()
    with Ledger.create(cfg.db, cfg, owner.address) as ledger:
        (v,), _ = subnet(ledger, miners=3, validators=[100])
        ledger.submit_call(v, "set_weights", {"uids": [1, 2, 3], "weights": [3, 2, 1]})
    rng = random.Random(7)
    seen = 0
    for _ in range(6):
        proc = start_producer(cfg.db)
        with Ledger(cfg.db) as watcher:
            wait_for_head(watcher, seen + 3)
            time.sleep(rng.uniform(0.0, 0.15))
            seen = watcher.head().number  # committed and visible before the kill
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        with Ledger(cfg.db) as after:
            assert after.head().number >= seen
            seen = after.head().number
            replay(after)  # every block whole, every epoch whole, books consistent
            issuance, pending = after.issuance()
            assert sum(a.balance + a.stake for a in after.accounts()) + pending == issuance
    assert seen > 20


SUBMITTER = """
import sys
from pathlib import Path
from chain.keys import load_key
from chain.ledger import Ledger
db, keys, name, count, dest = sys.argv[1:]
kp = load_key(Path(keys), name)
with Ledger(db) as ledger:
    hashes = [ledger.submit_call(kp, "transfer", {"dest": dest, "amount": 1000 + i})
              for i in range(int(count))]
    for h in hashes:
        ledger.wait(h, timeout=60)
print("ok", len(hashes))
"""


def test_parallel_submitters_lose_nothing(tmp_path: Path) -> None:
    cfg = fast_config(tmp_path / "l.sqlite", block_time_s=0.02)
    owner = Keypair.generate()
    keys = tmp_path / "keys"
    names = [f"k{i}" for i in range(4)]
    pairs = [create_key(keys, n) for n in names]
    sink = Keypair.generate().address
    count = 25
    with Ledger.create(cfg.db, cfg, owner.address) as ledger:
        for kp in pairs:
            ledger.submit_call(kp, "faucet", {"amount": TAO})
        ledger.produce_block()
    producer = start_producer(cfg.db)
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", SUBMITTER, str(cfg.db), str(keys), n, str(count), sink],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for n in names
        ]
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()[-2000:]
            assert out.decode().strip() == f"ok {count}"
    finally:
        producer.send_signal(signal.SIGTERM)
        producer.wait(timeout=10)
    assert producer.returncode == 0
    with Ledger(cfg.db) as ledger:
        expected = len(names) * sum(1000 + i for i in range(count))
        assert ledger.account(sink).balance == expected
        for kp in pairs:
            assert ledger.account(kp.address).nonce == count + 1
        n_ok = ledger.conn.execute(
            "SELECT COUNT(*) FROM extrinsics WHERE status = 'ok'"
        ).fetchone()[0]
        assert n_ok == len(names) * (count + 1)
        replay(ledger)


def test_second_producer_is_refused(tmp_path: Path) -> None:
    cfg = fast_config(tmp_path / "l.sqlite", block_time_s=0.05)
    with Ledger.create(cfg.db, cfg, Keypair.generate().address) as ledger:
        first = start_producer(cfg.db)
        try:
            wait_for_head(ledger, 2)
            second = subprocess.run(
                [sys.executable, "-m", "tensormine.cli", "chain", "run", "--db", str(cfg.db)],
                capture_output=True,
                timeout=60,
            )
            assert second.returncode == 2
            assert b"another process is producing blocks" in second.stderr
        finally:
            first.send_signal(signal.SIGINT)
            first.wait(timeout=10)
        assert first.returncode == 0
        assert cfg.db.with_name(cfg.db.name + ".producer.lock").exists()
