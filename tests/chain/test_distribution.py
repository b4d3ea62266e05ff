from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chain.distribution import split_emission


def test_owner_cut_then_fifty_fifty() -> None:
    # 65535 rao: owner 11796, rest 53739 split by inc (1,0) and div (0,1) -> halves.
    p = split_emission(65535, [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], 11796)
    assert p.owner == 11796
    assert p.miner == [26869, 0] and p.validator == [0, 26869]
    assert p.carried == 1  # 53739 is odd: one rao waits for the next epoch
    assert p.total == 65535


def test_shares_follow_incentive_and_dividends() -> None:
    p = split_emission(1_000_000, [0.75, 0.25, 0.0], [0.0, 0.0, 1.0], [0, 0, 1], [0, 0, 1], 0)
    assert p.miner == [375_000, 125_000, 0]
    assert p.validator == [0, 0, 500_000]
    assert p.carried == 0


def test_no_weights_pays_validators_by_active_stake_then_by_stake() -> None:
    p = split_emission(1000, [0, 0, 0], [0, 0, 0], [3.0, 1.0, 0.0], [3.0, 1.0, 4.0], 0)
    assert p.validator == [750, 250, 0] and p.miner == [0, 0, 0]
    q = split_emission(1000, [0, 0], [0, 0], [0.0, 0.0], [1.0, 3.0], 0)
    assert q.validator == [250, 750]
    r = split_emission(1000, [0, 0], [0, 0], [0.0, 0.0], [0.0, 0.0], 0)
    assert r.carried == 1000


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        split_emission(-1, [1.0], [0.0], [0.0], [0.0], 0)
    with pytest.raises(ValueError):
        split_emission(1, [1.0], [0.0, 1.0], [0.0], [0.0], 0)


weights = st.lists(st.floats(min_value=0, max_value=1, allow_nan=False), min_size=1, max_size=12)


@given(st.integers(min_value=0, max_value=10**17), weights, st.data())
def test_conservation(pending: int, inc: list[float], data: st.DataObject) -> None:
    n = len(inc)
    div = data.draw(st.lists(st.floats(min_value=0, max_value=1), min_size=n, max_size=n))
    stake = data.draw(st.lists(st.floats(min_value=0, max_value=1e6), min_size=n, max_size=n))
    cut = data.draw(st.integers(min_value=0, max_value=65535))
    p = split_emission(pending, inc, div, stake, stake, cut)
    assert p.total == pending
    assert min([p.owner, p.carried, *p.miner, *p.validator]) >= 0
    assert p.carried <= max(pending - p.owner, 0)
