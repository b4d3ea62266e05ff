from __future__ import annotations

from pathlib import Path

import pytest

from chain.keys import Keypair
from chain.ledger import Ledger
from chain.local import LocalChain
from tests.chain.conftest import fast_config
from train.config import WindowConfig
from train.windows import deadline, joinable_window, start_block, wait_for_block, window_of


def test_window_arithmetic() -> None:
    cfg = WindowConfig(blocks=30, publish_margin=2)
    assert [window_of(b, cfg) for b in (0, 29, 30, 59, 60)] == [0, 0, 1, 1, 2]
    assert start_block(2, cfg) == 60
    assert deadline(2, cfg) == 88  # contributions for window 2 are late from block 88 on
    with pytest.raises(ValueError, match="publish_margin"):
        WindowConfig(blocks=5, publish_margin=5)


def test_a_miner_joins_a_window_only_while_half_of_it_is_left() -> None:
    cfg = WindowConfig(blocks=30, publish_margin=2)
    # Window 2 is blocks 60..89: joinable up to block 75 (15 of 30 passed), then window 3.
    assert [joinable_window(b, cfg) for b in (60, 74, 75, 76, 89, 90)] == [2, 2, 2, 3, 3, 3]
    odd = WindowConfig(blocks=7, publish_margin=1)
    assert [joinable_window(b, odd) for b in (7, 10, 11)] == [1, 1, 2]  # 3 · 2 ≤ 7 < 4 · 2


def test_waiting_on_a_stalled_ledger_says_why(tmp_path: Path) -> None:
    cfg = fast_config(tmp_path / "l.sqlite")
    with Ledger.create(cfg.db, cfg, Keypair.generate().address) as ledger:
        ledger.produce_block()
        assert wait_for_block(LocalChain(ledger), 1, timeout=0.2) == 1
        with pytest.raises(TimeoutError, match="chain run"):
            wait_for_block(LocalChain(ledger), 5, timeout=0.3)
