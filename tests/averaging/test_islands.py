"""Peers that started alone (no commitments yet) join one DHT through the ledger."""

from __future__ import annotations

import time
from pathlib import Path

from hivemind.utils.timed_storage import get_dht_time

from averaging.dht import commitment_for, join_ledger_peers, start_dht
from averaging.settings import DHTConfig
from chain.keys import Keypair
from chain.ledger import Ledger
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
                    {"data": commitment_for(dht, ledger, kp.address, run="islands")},
                )
            b.store("before", "x", get_dht_time() + 60)
            assert a.get("before") is None
            assert join_ledger_peers(a, ledger) == 1
            assert join_ledger_peers(a, ledger) == 0  # already connected: nothing to do
            b.store("after", "y", get_dht_time() + 60)
            deadline = time.monotonic() + 10
            while a.get("after") is None and time.monotonic() < deadline:
                time.sleep(0.2)
            found = a.get("after")
            assert found is not None and found.value == "y"
        finally:
            a.shutdown()
            b.shutdown()
