"""Block emission against closed forms and an exact-rational reference."""

from __future__ import annotations

import itertools
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from chain.emission import (
    TOTAL_SUPPLY_RAO,
    block_emission,
    blocks_to_reach,
    emission_over,
    next_emission_change,
    schedule,
)

TAO = 10**9


def reference_emission(issuance: int) -> int:
    """The formula with exact rationals: floor(1e9 / 2^floor(log2(1/(1 - I/21e15))))."""
    if issuance >= TOTAL_SUPPLY_RAO:
        return 0
    inverse = 1 / (1 - Fraction(issuance, TOTAL_SUPPLY_RAO))
    k = 0
    while Fraction(2) ** (k + 1) <= inverse:
        k += 1
    return TAO // 2**k


def test_first_era_and_first_halving() -> None:
    assert block_emission(0) == TAO
    assert block_emission(10_500_000 * TAO - 1) == TAO
    assert block_emission(10_500_000 * TAO) == TAO // 2
    assert block_emission(15_750_000 * TAO) == TAO // 4
    assert block_emission(TOTAL_SUPPLY_RAO) == 0
    assert block_emission(TOTAL_SUPPLY_RAO + 5) == 0


def test_thresholds_are_21m_times_one_minus_two_to_the_minus_k() -> None:
    # 21e15 is divisible by 2^15, so the first 15 thresholds are exact integers.
    issuance = 0
    for k in range(1, 16):
        issuance = next_emission_change(issuance)  # type: ignore[assignment]
        assert issuance == TOTAL_SUPPLY_RAO - TOTAL_SUPPLY_RAO // 2**k
        assert block_emission(issuance) == TAO >> k
        assert block_emission(issuance - 1) == TAO >> (k - 1)


@given(st.integers(min_value=0, max_value=TOTAL_SUPPLY_RAO + 10))
def test_matches_the_exact_reference_away_from_boundaries(issuance: int) -> None:
    # Fixed point truncates x to 2^-32; within 2^-32 · 21e15 ≈ 4.9e6 rao of a threshold the
    # chain's integer answer may legitimately differ from exact arithmetic.
    got = block_emission(issuance)
    near = any(
        abs(issuance - (TOTAL_SUPPLY_RAO - Fraction(TOTAL_SUPPLY_RAO, 2**k))) < 5_000_000
        for k in range(1, 40)
    )
    if not near:
        assert got == reference_emission(issuance)


def test_schedule_covers_every_era_to_the_end() -> None:
    eras = schedule()
    assert [e.emission_per_block for e in eras] == [TAO >> k for k in range(30)] + [0]
    assert eras[0].blocks == 10_500_000 and eras[1].start_issuance == 10_500_000 * TAO
    for a, b in itertools.pairwise(eras):
        assert a.blocks is not None
        assert b.start_block == a.start_block + a.blocks
        assert b.start_issuance == a.start_issuance + a.blocks * a.emission_per_block
        assert block_emission(b.start_issuance) == b.emission_per_block
        # The era's last block still minted at its own rate.
        assert block_emission(b.start_issuance - a.emission_per_block) == a.emission_per_block
    assert eras[-1].start_issuance < TOTAL_SUPPLY_RAO
    assert sum((e.blocks or 0) * e.emission_per_block for e in eras) == eras[-1].start_issuance


def test_emission_over_equals_block_by_block_across_a_halving() -> None:
    start = 10_500_000 * TAO - 7 * TAO - 3
    issuance, minted = start, 0
    for _ in range(40):
        e = block_emission(issuance)
        issuance += e
        minted += e
    assert emission_over(start, 40) == minted


def test_blocks_to_reach_is_a_ceiling() -> None:
    assert blocks_to_reach(0, 10, 3) == 4
    assert blocks_to_reach(0, 9, 3) == 3
    assert blocks_to_reach(10, 9, 3) == 0


@given(st.integers(min_value=0, max_value=TOTAL_SUPPLY_RAO))
def test_one_block_never_passes_the_cap(issuance: int) -> None:
    assert issuance + block_emission(issuance) <= TOTAL_SUPPLY_RAO


def test_emission_over_never_passes_the_cap() -> None:
    start = TOTAL_SUPPLY_RAO - 10**9
    assert start + emission_over(start, 10**12) < TOTAL_SUPPLY_RAO
