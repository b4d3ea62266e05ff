"""Peers that started alone (no commitments yet) join one DHT through the ledger."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hivemind.utils.timed_storage import get_dht_time

from averaging.dht import commitment_for, join_ledger_peers, start_dht
from averaging.settings import DHTConfig
from chain.keys import Keypair
from chain.ledger import Ledger
from chain.local import LocalChain
from tests.chain.conftest import do, fast_config, subnet


def test_islands_merge_through_the_ledger(tmp_path: Path) -> None:
    cfg = fast_config(tmp_path / "ledger.sqlite")
    with Ledger.create(cfg.db, cfg, Keypair.generate().address) as ledger:
        _, miners = subnet(ledger, 2, [])
        a, b = start_dht(DHTConfig()), start_dht(DHTConfig())  # two DHTs of one node each
        try:
            for kp, dht in zip(miners, (a, b), strict=True):
                do(
                    ledger,
                    kp,
                    "commit",
                    {"data": commitment_for(dht, LocalChain(ledger), kp.address, run="islands")},
                )
            b.store("before", "x", get_dht_time() + 60)
            assert a.get("before") is None
            assert join_ledger_peers(a, LocalChain(ledger)) == 1
            assert join_ledger_peers(a, LocalChain(ledger)) == 0  # already connected: nothing to do
            b.store("after", "y", get_dht_time() + 60)
            deadline = time.monotonic() + 10
            while a.get("after") is None and time.monotonic() < deadline:
                time.sleep(0.2)
            found = a.get("after")
            assert found is not None and found.value == "y"
        finally:
            a.shutdown()
            b.shutdown()


# One peer process: starts its DHT from the ledger's commitments with its identity file,
# prints its commitment (first life) or the seconds its start took (second), then waits.
PEER = """
import sys, time
from pathlib import Path
from averaging.dht import commitment_for, start_dht
from averaging.settings import DHTConfig
from chain.local import LocalChain
db, key, hotkey, mode = sys.argv[1:]
ledger = LocalChain.open(Path(db))
started = time.monotonic()
dht = start_dht(DHTConfig(startup_timeout_s=20), run="restart", ledger=ledger,
                identity_path=Path(key))
if mode == "first":
    print(commitment_for(dht, ledger, hotkey, run="restart"), flush=True)
    time.sleep(60)
print(f"up {time.monotonic() - started:.1f}", flush=True)
dht.shutdown()
"""


@pytest.mark.e2e
def test_peers_that_all_restart_at_once_start_again(tmp_path: Path) -> None:
    """Every committed peer is gone (say, a whole subnet was stopped and resumed): each
    restarting peer fails to bootstrap from the ledger, and must start alone quickly
    instead of hanging (a failed node killed mid-send once left hivemind's shared future
    lock held, and every later start in that process timed out)."""
    cfg = fast_config(tmp_path / "ledger.sqlite")
    with Ledger.create(cfg.db, cfg, Keypair.generate().address) as ledger:
        _, miners = subnet(ledger, 4, [])

        def start(i: int, mode: str) -> subprocess.Popen[str]:
            argv = [sys.executable, "-c", PEER, str(cfg.db), str(tmp_path / f"p{i}.key"),
                    miners[i].address, mode]  # fmt: skip
            return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)

        first = [start(i, "first") for i in range(4)]
        try:
            for i, proc in enumerate(first):
                assert proc.stdout is not None
                do(ledger, miners[i], "commit", {"data": proc.stdout.readline().strip()})
        finally:
            for proc in first:
                os.killpg(proc.pid, signal.SIGKILL)  # the peer, its DHT and its daemon
                proc.wait(timeout=10)
    again = [start(i, "again") for i in range(4)]
    try:
        outs = [proc.communicate(timeout=60)[0] for proc in again]
    finally:
        for proc in again:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert [p.returncode for p in again] == [0, 0, 0, 0], outs
    assert all(float(out.split()[-1]) < 15 for out in outs), outs
