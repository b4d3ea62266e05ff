"""Commit-reveal defeats weight copying (issue 14), on a small seeded configuration of
`chain.copier.run_copier`, the function `benchmarks/bench_weight_copier.py` measures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chain.copier import CopierSetup, copied_weights, run_copier

SETUP = CopierSetup(miners=6, warmup=25, epochs=20, rho=0.8)


def test_a_copier_earns_the_honest_rate_without_commit_reveal_and_less_with_it(
    tmp_path: Path,
) -> None:
    off = run_copier(SETUP, commit_reveal=False, seed=1, folder=tmp_path)
    on = run_copier(SETUP, commit_reveal=True, seed=1, folder=tmp_path)
    assert len(off.copier) == len(on.copier) == SETUP.epochs
    assert 0.97 < off.ratio < 1.1, off.ratio  # copying today pays the honest rate (or more)
    assert on.ratio < 0.9, on.ratio  # stale weights: clipped, and bonds on yesterday's best
    assert all(sum(h) > 0 for h in on.honest)


def test_copied_weights_are_the_stake_weighted_median() -> None:
    # Validators 0, 1, 2 of stake 1, 1, 2 weigh UIDs 3 and 4; row-normalized their rows
    # are (.25, .75), (.75, .25), (.5, .5). Consensus: the largest c that validators
    # holding half the stake reach, .5 on both (and no weights on validators).
    rows = {0: [(3, 1), (4, 3)], 1: [(3, 3), (4, 1)], 2: [(3, 1), (4, 1)]}
    stake = np.array([1.0, 1.0, 2.0, 0.0, 0.0])
    assert copied_weights(rows, stake, kappa=0.5) == pytest.approx([0, 0, 0, 0.5, 0.5])
    # With kappa = .8 the .75 of the stake that reaches .5 is not enough: .25.
    assert copied_weights(rows, stake, kappa=0.8) == pytest.approx([0, 0, 0, 0.25, 0.25])
    assert copied_weights({}, stake, kappa=0.5).tolist() == [0.0] * 5
