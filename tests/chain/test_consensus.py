"""Yuma consensus against hand-computed epochs, closed forms and properties.

The expected numbers are worked out in the comments from subtensor's algorithm
(pallets/subtensor/src/epoch/run_epoch.rs, math.rs), never taken from the implementation.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chain.consensus import (
    DEFAULT_ALPHA_HIGH,
    DEFAULT_ALPHA_LOW,
    DEFAULT_ALPHA_SIGMOID_STEEPNESS,
    DEFAULT_BOND_ALPHA,
    DEFAULT_BONDS_PENALTY,
    DEFAULT_KAPPA,
    EpochResult,
    bonds_from_u16,
    bonds_to_u16,
    weights_to_u16,
    yuma_epoch,
)

# The running example: UIDs 0, 1, 2 are validators with stake 50 : 30 : 20, UIDs 3 and 4
# are miners. Validators 0 and 1 give (3, 4) the weights 0.6 / 0.4; validator 2 is an
# outlier that puts everything on miner 4.
STAKE = np.array([50.0, 30.0, 20.0, 0.0, 0.0])
W = np.zeros((5, 5))
W[0, 3:] = [3.0, 2.0]  # normalized: 0.6, 0.4
W[1, 3:] = [6.0, 4.0]  # the same after row normalization
W[2, 4] = 7.0  # normalized: 0, 1
ZERO = np.zeros((5, 5))


def run(weights: np.ndarray, stake: np.ndarray, bonds: np.ndarray, **kw: object) -> EpochResult:
    return yuma_epoch(weights, stake, bonds, **kw)  # type: ignore[arg-type]


def test_defaults_are_subtensors() -> None:
    assert DEFAULT_KAPPA == 0.5  # 32767 / 65535 on chain
    assert pytest.approx(1 - 900_000 / 1_000_000) == DEFAULT_BOND_ALPHA
    assert DEFAULT_BONDS_PENALTY == 1.0  # u16::MAX / u16::MAX
    assert round(DEFAULT_ALPHA_LOW * 65535) == 45875  # ≈ 0.7
    assert round(DEFAULT_ALPHA_HIGH * 65535) == 58982  # ≈ 0.9
    assert DEFAULT_ALPHA_SIGMOID_STEEPNESS == 1000


def test_first_epoch_by_hand() -> None:
    r = run(W, STAKE, ZERO)
    # S = (0.5, 0.3, 0.2, 0, 0); κ = 0.5, so minority = 1 - 0.5 = 0.5.
    # Column 3: scores sorted 0 (s .2), .6 (s .5), .6 (s .3); cumulative .2, .7 -> first
    #   above .5 is .7, consensus .6.
    # Column 4: .4 (.5), .4 (.3), 1 (.2); cumulative .5, .8 -> .5 is not above .5, so .4.
    np.testing.assert_allclose(r.consensus, [0, 0, 0, 0.6, 0.4], atol=1e-15)
    # Validator 2's weight 1 on miner 4 is clipped to 0.4.
    np.testing.assert_allclose(r.validator_trust, [1, 1, 0.4, 0, 0], atol=1e-15)
    # preranks: P3 = .5·.6 + .3·.6 = .48, P4 = .5·.4 + .3·.4 + .2·1 = .52
    # ranks:    R3 = .48,                  R4 = .32 + .2·.4 = .40; ΣR = .88
    np.testing.assert_allclose(r.trust, [0, 0, 0, 1, 0.40 / 0.52], atol=1e-15)
    np.testing.assert_allclose(r.incentive, [0, 0, 0, 6 / 11, 5 / 11], atol=1e-15)
    np.testing.assert_allclose(r.rank, r.incentive)  # subtensor stores normalized ranks
    # β = 1: bonds from clipped weights. ΔB = W̄ ◦ S:
    #   col 3: .3, .18, 0 (sum .48) -> 5/8, 3/8, 0
    #   col 4: .2, .12, .08 (sum .40) -> 1/2, 3/10, 1/5
    # Previous bonds are 0, so B = col-normalize(0.1 ΔB) = ΔB.
    expected_b = np.zeros((5, 5))
    expected_b[:3, 3] = [5 / 8, 3 / 8, 0]
    expected_b[:3, 4] = [1 / 2, 3 / 10, 1 / 5]
    np.testing.assert_allclose(r.bonds, expected_b, atol=1e-15)
    # D_i = Σ_j B_ij I_j: 5/8·6/11 + 1/2·5/11 = 50/88, 3/8·6/11 + 3/10·5/11 = 30/88,
    # 1/5·5/11 = 8/88; they already sum to 1.
    np.testing.assert_allclose(r.dividends, [50 / 88, 30 / 88, 8 / 88, 0, 0], atol=1e-15)


def test_second_epoch_ema() -> None:
    first = run(W, STAKE, ZERO)
    # Validator 2 now agrees with the others: consensus (.6, .4), no clipping.
    w2 = W.copy()
    w2[2, 3:] = [3.0, 2.0]
    r = run(w2, STAKE, first.bonds)
    np.testing.assert_allclose(r.consensus[3:], [0.6, 0.4])
    np.testing.assert_allclose(r.incentive[3:], [0.6, 0.4])
    # ΔB col 3 and col 4 are both (.5, .3, .2) (= S). EMA with α = 0.1:
    #   col 3: .1·.5 + .9·5/8 = .6125, .1·.3 + .9·3/8 = .3675, .1·.2 + 0 = .02
    #   col 4: .1·.5 + .9·.5 = .5,     .1·.3 + .9·.3 = .3,     .1·.2 + .9·.2 = .2
    np.testing.assert_allclose(r.bonds[:3, 3], [0.6125, 0.3675, 0.02], atol=1e-15)
    np.testing.assert_allclose(r.bonds[:3, 4], [0.5, 0.3, 0.2], atol=1e-15)
    # D: .6125·.6 + .5·.4 = .5675, .3675·.6 + .3·.4 = .3405, .02·.6 + .2·.4 = .092
    np.testing.assert_allclose(r.dividends[:3], [0.5675, 0.3405, 0.092], atol=1e-15)


def test_bonds_penalty_zero_bonds_follow_raw_weights() -> None:
    r = run(W, STAKE, ZERO, bonds_penalty=0.0)
    # W_b = W: validator 2 keeps its full weight 1 on miner 4, ΔB col 4 = .2, .12, .2
    # (sum .52) -> 5/13, 3/13, 5/13. Consensus and incentive do not change.
    np.testing.assert_allclose(r.bonds[:3, 4], [5 / 13, 3 / 13, 5 / 13], atol=1e-15)
    np.testing.assert_allclose(r.incentive[3:], [6 / 11, 5 / 11], atol=1e-15)
    d = np.array([5 / 8 * 6 / 11 + 5 / 13 * 5 / 11, 3 / 8 * 6 / 11 + 3 / 13 * 5 / 11, 25 / 143])
    np.testing.assert_allclose(r.dividends[:3], d / d.sum(), atol=1e-15)


def test_kappa_moves_the_median() -> None:
    # κ = 0.9 (minority 0.1): column 3 scores 0 (.2), .6 (.8): cumulative .2 > .1 -> 0.
    # Only 80% of the stake backs 0.6 on miner 3, short of 90%.
    r = run(W, STAKE, ZERO, kappa=0.9)
    np.testing.assert_allclose(r.consensus[3:], [0.0, 0.4])
    # κ = 0.2 (minority 0.8): column 4 .4 (.5), .4 (.3), 1 (.2): cumulative .8 is not
    # above .8, so the outlier's 1 is consensus (20% of the stake suffices).
    r = run(W, STAKE, ZERO, kappa=0.2)
    np.testing.assert_allclose(r.consensus[3:], [0.6, 1.0])


def test_exact_half_split_takes_the_higher_score() -> None:
    # Two validators of equal stake disagree on miner 2: .25 vs .75. minority = .5 and
    # the lower group ends exactly at .5, which is not above it: consensus .75. Half
    # the stake at or above a value is enough to carry it.
    w = np.array([[0, 0, 1.0, 3.0], [0, 0, 3.0, 1.0], [0, 0, 0, 0], [0, 0, 0, 0]])
    r = run(w, np.array([1.0, 1.0, 0, 0]), np.zeros((4, 4)))
    np.testing.assert_allclose(r.consensus, [0, 0, 0.75, 0.75])


def test_all_agree() -> None:
    w = np.zeros((5, 5))
    for i, scale in enumerate([1.0, 7.0, 0.01]):
        w[i, 3:] = np.array([1.0, 3.0]) * scale
    r = run(w, np.array([5.0, 1.0, 2.0, 0.0, 0.0]), ZERO)
    np.testing.assert_allclose(r.consensus, [0, 0, 0, 0.25, 0.75])
    np.testing.assert_allclose(r.incentive, [0, 0, 0, 0.25, 0.75])
    np.testing.assert_allclose(r.validator_trust[:3], 1.0)
    np.testing.assert_allclose(r.trust[3:], 1.0)
    # Dividends are proportional to stake when everyone agrees: ΔB columns = S.
    np.testing.assert_allclose(r.dividends[:3], [5 / 8, 1 / 8, 2 / 8])


def test_majority_validator_decides() -> None:
    # Stake .6 / .25 / .15. Miner A (UID 3): scores 0 (.25), .7 (.6), 1 (.15): cumulative
    # .25, .85 -> .7. Miner B (UID 4): 0 (.15), .3 (.6), 1 (.25): .15, .75 -> .3.
    w = np.zeros((5, 5))
    w[0, 3:] = [0.7, 0.3]
    w[1, 3:] = [0.0, 1.0]
    w[2, 3:] = [1.0, 0.0]
    r = run(w, np.array([60.0, 25.0, 15.0, 0, 0]), ZERO)
    np.testing.assert_allclose(r.consensus[3:], [0.7, 0.3])
    assert r.validator_trust[0] == pytest.approx(1.0)


def test_minority_cannot_lift_its_favourite() -> None:
    # Validator 0 (45%) puts everything on miner A; 1 and 2 (55%) give A only .2.
    # Column A: .2 (.3), .2 (.25), 1 (.45): cumulative .3, .55 > .5 -> .2.
    # Column B: 0 (.45), .8 (.3), .8 (.25): .45, .75 -> .8.
    w = np.zeros((5, 5))
    w[0, 3:] = [1.0, 0.0]
    w[1, 3:] = [0.2, 0.8]
    w[2, 3:] = [0.2, 0.8]
    r = run(w, np.array([45.0, 30.0, 25.0, 0, 0]), ZERO)
    np.testing.assert_allclose(r.consensus[3:], [0.2, 0.8])
    # R_A = .45·.2 + .55·.2 = .2, R_B = .55·.8 = .44 -> I = 5/16, 11/16
    np.testing.assert_allclose(r.incentive[3:], [5 / 16, 11 / 16])
    assert r.validator_trust[0] == pytest.approx(0.2)


def test_self_weights_are_ignored() -> None:
    w = W.copy()
    w[0, 0] = 1000.0
    w[2, 2] = 5.0
    a, b = run(w, STAKE, ZERO), run(W, STAKE, ZERO)
    for field in ("consensus", "incentive", "dividends", "validator_trust", "bonds"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-15)


def test_owner_keeps_its_self_weight() -> None:
    # The subnet owner (UID 0, only validator) weights itself 1 and miner 1 by 1.
    w = np.array([[1.0, 1.0], [0.0, 0.0]])
    r = run(w, np.array([1.0, 0.0]), np.zeros((2, 2)), owner_uid=0)
    np.testing.assert_allclose(r.incentive, [0.5, 0.5])
    r = run(w, np.array([1.0, 0.0]), np.zeros((2, 2)))
    np.testing.assert_allclose(r.incentive, [0.0, 1.0])


def without_validator_2() -> EpochResult:
    stake = STAKE.copy()
    stake[2] = 0.0
    w = W.copy()
    w[2] = 0.0
    return run(w, stake, ZERO)


def test_rows_without_permit_are_ignored() -> None:
    r = run(W, STAKE, ZERO, validator_permit=np.array([True, True, False, True, True]))
    ref = without_validator_2()
    # Stake .5 / .3 renormalized to 5/8, 3/8; both give (.6, .4).
    np.testing.assert_allclose(r.consensus[3:], [0.6, 0.4])
    for field in ("consensus", "incentive", "dividends", "validator_trust", "bonds"):
        np.testing.assert_allclose(getattr(r, field), getattr(ref, field), atol=1e-15)
    assert r.validator_trust[2] == 0.0


def test_inactive_stake_is_ignored() -> None:
    r = run(W, STAKE, ZERO, active=np.array([True, True, False, True, True]))
    ref = without_validator_2()
    for field in ("consensus", "incentive", "dividends", "bonds"):
        np.testing.assert_allclose(getattr(r, field), getattr(ref, field), atol=1e-15)
    # Its weights still count for its own validator trust, as in subtensor.
    assert r.validator_trust[2] == pytest.approx(0.4)


def test_no_weights_gives_zeros_not_nan() -> None:
    r = run(np.zeros((3, 3)), np.array([1.0, 2.0, 0.0]), np.zeros((3, 3)))
    for field in ("consensus", "rank", "trust", "validator_trust", "incentive", "dividends"):
        assert np.all(getattr(r, field) == 0)
    r = run(W, np.zeros(5), ZERO)
    assert np.all(r.incentive == 0) and np.all(r.dividends == 0)
    r = yuma_epoch(np.zeros((0, 0)), np.zeros(0), np.zeros((0, 0)))
    assert r.incentive.shape == (0,)


def test_yuma3_by_hand() -> None:
    r = run(W, STAKE, ZERO, yuma3=True)
    # B' = 0.1·W̄ + 0.9·0: rows (.06, .04), (.06, .04), (0, .04) on miners 3, 4.
    np.testing.assert_allclose(r.bonds[:3, 3:], [[0.06, 0.04], [0.06, 0.04], [0, 0.04]])
    # Column-normalized: col 3 (.5, .5, 0), col 4 (1/3, 1/3, 1/3). With I = (6/11, 5/11):
    #   per validator .5·6/11 + 1/3·5/11 = 14/33 (twice), 1/3·5/11 = 5/33
    #   × S (.5, .3, .2) = 7/33, 4.2/33, 1/33 -> normalized 70/122, 42/122, 10/122
    np.testing.assert_allclose(r.dividends[:3], [70 / 122, 42 / 122, 10 / 122], atol=1e-15)
    # Second epoch with the same weights: B = W̄ (1 - 0.9²) = 0.19 W̄, no normalization.
    r2 = run(W, STAKE, r.bonds, yuma3=True)
    np.testing.assert_allclose(
        r2.bonds[:3, 3:], 0.19 * np.array([[0.6, 0.4], [0.6, 0.4], [0, 0.4]])
    )


def sig(diff: float) -> float:
    # subtensor's alpha_sigmoid at steepness 1000: 1 / (1 + e^(-(1000 / 100)(diff - 0.5)))
    return 1.0 / (1.0 + math.exp(-10.0 * (diff - 0.5)))


def test_liquid_alpha_by_hand() -> None:
    # Validators 0 (60%) and 1 (40%); miners 2, 3. β = 0, so W_b = W.
    w = np.array([[0, 0, 3.0, 1.0], [0, 0, 1.0, 3.0], [0, 0, 0, 0], [0, 0, 0, 0]])
    # Consensus: col 2 .25 (.4), .75 (.6) -> .75; col 3 .25 (.6) -> .25.
    bonds = np.array([[0, 0.3, 0.5, 0.5], [0, 0, 0.5, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    r = run(
        w,
        np.array([60.0, 40.0, 0, 0]),
        bonds,
        yuma3=True,
        liquid_alpha=True,
        bonds_penalty=0.0,
        alpha_low=0.7,
        alpha_high=0.9,
    )
    np.testing.assert_allclose(r.consensus, [0, 0, 0.75, 0.25])

    def alpha(diff: float) -> float:
        return 0.7 + 0.2 * sig(diff)

    # (0, 2): w .75 >= b .5, buying: diff = w - c = 0.
    a02 = alpha(0.0)
    # (0, 3): w .25 < b .5, selling: diff = b - w = .25. (1, 2) is the same.
    a_sell = alpha(0.25)
    # (1, 3): w .75 >= b 0, buying: diff = .75 - .25 = .5, sigmoid 1/2, α = 0.8.
    assert alpha(0.5) == pytest.approx(0.8)
    expected = np.zeros((4, 4))
    expected[0, 2] = (1 - a02) * 0.5 + a02 * 0.75
    expected[0, 3] = (1 - a_sell) * 0.5 + a_sell * 0.25
    expected[1, 2] = (1 - a_sell) * 0.5 + a_sell * 0.25
    expected[1, 3] = 0.8 * 0.75
    # (0, 1): a bond of .3 on a UID validator 0 no longer weights is dropped, as in
    # subtensor's sparse `mat_ema_alpha_sparse`.
    np.testing.assert_allclose(r.bonds, expected, atol=1e-15)

    # Without liquid alpha the same bond decays with the fixed α: .9 · .3.
    fixed = run(w, np.array([60.0, 40.0, 0, 0]), bonds, yuma3=True, bonds_penalty=0.0)
    assert fixed.bonds[0, 1] == pytest.approx(0.27)
    assert fixed.bonds[1, 3] == pytest.approx(0.1 * 0.75)


def test_liquid_alpha_falls_back_to_fixed_alpha_without_consensus() -> None:
    # Nobody has stake, so consensus is all zero: subtensor uses the fixed α. With β = 0
    # the raw weights feed the bonds: .1 · 1 + .9 · .5 = .55 and .1 · 1 + 0 = .1.
    w = np.array([[0, 1.0], [1.0, 0]])
    b = np.array([[0, 0.5], [0, 0]])
    r = run(w, np.zeros(2), b, yuma3=True, liquid_alpha=True, bonds_penalty=0.0)
    np.testing.assert_allclose(r.bonds, [[0, 0.1 + 0.45], [0.1, 0]])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"weights": np.ones((3, 2))}, "weights"),
        ({"weights": -np.ones((3, 3))}, "weights"),
        ({"bonds": np.full((3, 3), np.nan)}, "bonds"),
        ({"stake": np.ones(4)}, "weights"),
        ({"stake": -np.ones(3)}, "stake"),
        ({"stake": np.array([1.0, np.inf, 1.0])}, "stake"),
        ({"active": np.ones(2, dtype=bool)}, "active"),
        ({"validator_permit": np.array([0.5, 1, 1])}, "validator_permit"),
        ({"kappa": 1.5}, "kappa"),
        ({"bonds": np.full((3, 3), 2.0), "yuma3": True}, "bonds"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs: dict[str, object], name: str) -> None:
    args: dict[str, object] = {"weights": np.ones((3, 3)), "stake": np.ones(3)}
    args["bonds"] = np.zeros((3, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        yuma_epoch(**args)  # type: ignore[arg-type]


def test_dense_1024_runs() -> None:
    rng = np.random.default_rng(1)
    n = 1024
    w = rng.random((n, n)) * (rng.random((n, n)) < 0.5)
    r = yuma_epoch(w, rng.random(n), np.zeros((n, n)), yuma3=True, liquid_alpha=True)
    assert r.incentive.sum() == pytest.approx(1.0)
    assert r.bonds.shape == (n, n)


# ---------------------------------------------------------------- u16 storage


def test_weights_to_u16_max_upscale() -> None:
    # 1/4 · 65535 = 16383.75 -> 16384; 2/4 · 65535 = 32767.5 -> 32768 (half away from 0)
    assert weights_to_u16([1.0, 2.0, 4.0]) == [16384, 32768, 65535]
    # 65535 / 6 = 10922.5 rounds away from zero (banker's rounding would give 10922).
    assert weights_to_u16([1, 6]) == [10923, 65535]
    assert weights_to_u16([0.0, 0.0]) == [0, 0]
    assert weights_to_u16([]) == []
    assert weights_to_u16([65535, 1]) == [65535, 1]  # u16 input that is already upscaled
    with pytest.raises(ValueError, match="values"):
        weights_to_u16([1.0, -1.0])


def test_bonds_to_u16_classic_max_upscales_columns() -> None:
    b = np.zeros((3, 3))
    b[:, 1] = [0.6, 0.3, 0.1]
    # / .6 -> 1, .5, 1/6; × 65535 floored -> 65535, 32767, 10922
    q = bonds_to_u16(b, yuma3=False)
    assert q[:, 1].tolist() == [65535, 32767, 10922]
    assert not q[:, [0, 2]].any()
    # Yuma3 stores the proportions as they are.
    assert bonds_to_u16(b, yuma3=True)[:, 1].tolist() == [39321, 19660, 6553]


@given(st.integers(min_value=1, max_value=6), st.data())
def test_u16_bonds_round_trip(n: int, data: st.DataObject) -> None:
    raw = np.array(
        data.draw(st.lists(st.integers(0, 65535), min_size=n * n, max_size=n * n)), dtype=np.uint16
    ).reshape(n, n)
    assert np.array_equal(bonds_to_u16(bonds_from_u16(raw, yuma3=True), yuma3=True), raw)
    # Classic storage has max 65535 in every nonzero column; that form is a fixed point.
    stored = bonds_to_u16(bonds_from_u16(raw, yuma3=False), yuma3=False)
    assert np.array_equal(bonds_to_u16(bonds_from_u16(stored, False), False), stored)
    assert all(col.max() in (0, 65535) for col in stored.T)


def test_u16_bonds_feed_the_next_epoch_like_floats() -> None:
    first = run(W, STAKE, ZERO)
    # Classic bonds are column-normalized inside, so the max-upscaled u16 form gives
    # the same next epoch as the float bonds (up to the u16 quantization).
    q = bonds_from_u16(bonds_to_u16(first.bonds, yuma3=False), yuma3=False)
    a, b = run(W, STAKE, q), run(W, STAKE, first.bonds)
    np.testing.assert_allclose(a.bonds, b.bonds, atol=1e-4)


# ---------------------------------------------------------------- properties

pos = st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=10.0))


@st.composite
def epochs(draw: st.DrawFn) -> dict[str, object]:
    n = draw(st.integers(min_value=1, max_value=6))
    yuma3 = draw(st.booleans())
    mat = st.lists(pos, min_size=n * n, max_size=n * n)
    unit = st.lists(st.floats(0.0, 1.0), min_size=n * n, max_size=n * n)
    flags = st.lists(st.booleans(), min_size=n, max_size=n)
    return {
        "weights": np.array(draw(mat)).reshape(n, n),
        "stake": np.array(draw(st.lists(pos, min_size=n, max_size=n))),
        "bonds": np.array(draw(unit if yuma3 else mat)).reshape(n, n),
        "kappa": draw(st.floats(0.0, 1.0)),
        "bonds_penalty": draw(st.floats(0.0, 1.0)),
        "bond_alpha": draw(st.floats(0.0, 1.0)),
        "yuma3": yuma3,
        "liquid_alpha": draw(st.booleans()),
        "active": np.array(draw(flags)),
        "validator_permit": np.array(draw(flags)),
    }


def check_ranges(r: EpochResult, yuma3: bool) -> None:
    for field in ("consensus", "rank", "trust", "validator_trust", "incentive", "dividends"):
        v = getattr(r, field)
        assert np.all(np.isfinite(v)), field
        assert np.all((v >= 0) & (v <= 1)), field
    for v in (r.incentive, r.dividends):
        assert v.sum() == 0 or v.sum() == pytest.approx(1.0)
    assert np.all(np.isfinite(r.bonds)) and np.all((r.bonds >= 0) & (r.bonds <= 1))
    if not yuma3:
        sums = r.bonds.sum(axis=0)
        assert np.all((sums == 0) | np.isclose(sums, 1.0))


@given(epochs())
def test_outputs_are_finite_and_normalized(kw: dict[str, object]) -> None:
    check_ranges(yuma_epoch(**kw), bool(kw["yuma3"]))  # type: ignore[arg-type]


def close(a: EpochResult, b: EpochResult) -> None:
    for field in ("consensus", "rank", "trust", "validator_trust", "incentive", "dividends"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-12, err_msg=field)
    np.testing.assert_allclose(a.bonds, b.bonds, atol=1e-12)


@given(epochs(), st.randoms(use_true_random=False))
def test_permuting_uids_permutes_outputs(kw: dict[str, object], rnd: object) -> None:
    n = len(kw["stake"])  # type: ignore[arg-type]
    p = np.arange(n)
    rnd.shuffle(p)  # type: ignore[attr-defined]
    moved = dict(kw)
    for key in ("weights", "bonds"):
        moved[key] = kw[key][p][:, p]  # type: ignore[index]
    for key in ("stake", "active", "validator_permit"):
        moved[key] = kw[key][p]  # type: ignore[index]
    a, b = yuma_epoch(**kw), yuma_epoch(**moved)  # type: ignore[arg-type]
    permuted = EpochResult(
        **{f: getattr(a, f)[p] for f in ("consensus", "rank", "trust", "validator_trust")},
        incentive=a.incentive[p],
        dividends=a.dividends[p],
        bonds=a.bonds[p][:, p],
    )
    close(permuted, b)


@given(epochs(), st.data())
def test_scale_invariance(kw: dict[str, object], data: st.DataObject) -> None:
    # Powers of two scale floats exactly, so the medians' comparisons are unchanged.
    n = len(kw["stake"])  # type: ignore[arg-type]
    exps = st.integers(min_value=-8, max_value=8)
    row_scale = 2.0 ** np.array(data.draw(st.lists(exps, min_size=n, max_size=n)))
    scaled = dict(kw)
    scaled["stake"] = kw["stake"] * 2.0 ** data.draw(exps)  # type: ignore[operator]
    scaled["weights"] = kw["weights"] * row_scale[:, None]  # type: ignore[operator]
    close(yuma_epoch(**kw), yuma_epoch(**scaled))  # type: ignore[arg-type]


def test_scale_invariance_arbitrary_factors() -> None:
    w = W * np.array([3.0, 0.7, 11.0, 1.0, 1.0])[:, None]
    close(run(W, STAKE, ZERO), run(w, STAKE * 0.37, ZERO))


# ------------------------------------------- consensus against subtensor's pivot search


def pivot_median(stake: list[Fraction], score: list[Fraction], kappa: Fraction) -> Fraction:
    """subtensor's `weighted_median_col_sparse` + `weighted_median`, in exact rationals.

    Rows with zero stake are dropped and the rest renormalized; the search keeps a segment
    [lo, hi] of the stake integral and a candidate list, splits it around the middle
    candidate's score, and stops when the pivot's own stake interval straddles the
    minority (total - κ).
    """
    pairs = [(s, x) for s, x in zip(stake, score, strict=True) if s > 0]
    if not pairs:
        return Fraction(0)
    total = sum(s for s, _ in pairs)
    st_ = [s / total for s, _ in pairs]
    sc = [x for _, x in pairs]
    minority = sum(st_, Fraction(0)) - kappa
    cand = list(range(len(pairs)))
    lo, hi = Fraction(0), sum(st_, Fraction(0))
    while True:
        if len(cand) == 1:
            return sc[cand[0]]
        pivot = sc[cand[len(cand) // 2]]
        lower = [i for i in cand if sc[i] < pivot]
        upper = [i for i in cand if sc[i] > pivot]
        lo_st, hi_st = sum(st_[i] for i in lower), sum(st_[i] for i in upper)
        if minority < lo + lo_st and lower:
            cand, hi = lower, lo + lo_st
        elif hi - hi_st <= minority and upper:
            cand, lo = upper, hi - hi_st
        else:
            return pivot


@settings(max_examples=200)
@given(st.integers(min_value=2, max_value=7), st.data())
def test_consensus_matches_subtensors_pivot_search(n: int, data: st.DataObject) -> None:
    cells = data.draw(st.lists(st.integers(0, 4), min_size=n * n, max_size=n * n))
    w = [[0 if i == j else cells[i * n + j] for j in range(n)] for i in range(n)]
    stake = data.draw(st.lists(st.integers(0, 9), min_size=n - 1, max_size=n - 1))
    # The last UID takes the stake that makes the total a power of two, so normalized
    # stakes are exact in float64 and cumulative sums compare exactly, as in fixed point.
    stake.append(2 ** math.ceil(math.log2(sum(stake) + 1)) - sum(stake))
    kappa = data.draw(st.sampled_from([0.0, 0.25, 0.5, 0.625, 0.75, 1.0]))
    r = yuma_epoch(
        np.array(w, dtype=float), np.array(stake, dtype=float), np.zeros((n, n)), kappa=kappa
    )
    total = sum(stake)
    shares = [Fraction(s, total) for s in stake]
    for j in range(n):
        scores = [Fraction(row[j], sum(row)) if sum(row) else Fraction(0) for row in w]
        want = pivot_median(shares, scores, Fraction(kappa))
        assert r.consensus[j] == pytest.approx(float(want), abs=1e-15), j
