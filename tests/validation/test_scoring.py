"""The validator's pure arithmetic against closed forms and numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from validation.scoring import (
    OwnDataVerdict,
    clip_factor,
    compare_group_average,
    cosine_matrix,
    delta_norm,
    find_copies,
    find_replays,
    flatten,
    heldout_outcome,
    heldout_verdict,
    loss_delta,
    normalized_weights,
    own_data_outcome,
    own_data_verdict,
    probe_step,
    reference_norm,
    residual_cosines,
    update_ema,
    window_score,
)


def test_probe_step_is_the_share_of_the_aggregate_step() -> None:
    assert probe_step(0.7, 1) == pytest.approx(0.7)
    assert probe_step(1.0, 4) == pytest.approx(0.25)
    assert probe_step(1.0, 4, override=0.5) == 0.5  # a fixed step when configured
    with pytest.raises(ValueError, match="nothing to measure"):
        probe_step(1.0, 0)


def test_reference_norm_is_a_median_sybils_cannot_move() -> None:
    honest = [1.0, 1.2, 0.9]
    sybils = [100.0] * 4
    # Before any trust: every hotkey has the floor, and it is the plain (lower) median.
    assert reference_norm(honest + sybils, [1e-3] * 7) == 100.0
    # Once honest miners hold trust, four (or forty) fresh hotkeys do not lift it.
    trusted = [0.3, 0.3, 0.3]
    assert reference_norm(honest + sybils, trusted + [1e-3] * 4) == 1.0
    assert reference_norm(honest + [100.0] * 40, trusted + [1e-3] * 40) == 1.0
    # An honest Δ × 3 is then measured at the honest scale.
    assert clip_factor(3.0, reference_norm(honest + sybils, trusted + [1e-3] * 4), 1.0) == (
        pytest.approx(1 / 3)
    )
    assert reference_norm([2.0, 1.0], [1.0, 1.0]) == 1.0  # lower median of two
    with pytest.raises(ValueError):
        reference_norm([1.0], [0.0])
    with pytest.raises(ValueError):
        reference_norm([], [])


def test_clip_factor_brings_long_deltas_to_the_median() -> None:
    assert clip_factor(3.0, 1.0, 1.0) == pytest.approx(1 / 3)  # 3× the median: to 1×
    assert clip_factor(3.0, 1.0, 2.0) == pytest.approx(2 / 3)
    assert clip_factor(0.5, 1.0, 1.0) == 1.0  # shorter ones are measured as they are
    assert clip_factor(3.0, 1.0, 0.0) == 1.0  # off
    assert clip_factor(0.0, 1.0, 1.0) == 1.0 and clip_factor(math.inf, 1.0, 1.0) == 1.0
    assert clip_factor(2.0, 0.0, 1.0) == 1.0  # no reference
    # An inflated Δ (k × an honest one) is measured exactly like the honest one.
    honest, median = 2.0, 2.0
    for k in (1.5, 4.0, 100.0):
        assert k * honest * clip_factor(k * honest, median, 1.0) == pytest.approx(honest)


def test_heldout_outcome_costs_credit_only_for_flags_in_a_row() -> None:
    assert heldout_outcome(True, flagged_before=3, strikes=2) == "pass"
    assert heldout_outcome(False, flagged_before=0, strikes=2) == "grace"  # one window: luck?
    assert heldout_outcome(False, flagged_before=1, strikes=2) == "fail"  # again: no credit
    assert heldout_outcome(False, flagged_before=5, strikes=2) == "fail"
    assert heldout_outcome(False, flagged_before=0, strikes=1) == "fail"  # strict setting
    assert heldout_outcome(False, flagged_before=1, strikes=3) == "grace"


def test_loss_delta_is_base_minus_new() -> None:
    assert loss_delta(3.5, 3.25) == 0.25
    assert loss_delta(3.0, 3.5) == -0.5


def test_own_data_verdict_matches_a_paired_t_statistic() -> None:
    rng = np.random.default_rng(0)
    base_a, base_c = rng.normal(5, 1, 10), rng.normal(5, 1, 10)
    new_a, new_c = base_a - rng.normal(0.5, 0.1, 10), base_c - rng.normal(0.2, 0.1, 10)
    gaps = (base_a - new_a) - (base_c - new_c)
    t_ref = gaps.mean() / (gaps.std(ddof=1) / math.sqrt(10))
    got = own_data_verdict(
        *(torch.tensor(x) for x in (base_a, new_a, base_c, new_c)), min_margin=0.0, min_t=2.0
    )
    assert got.margin == pytest.approx(gaps.mean())
    assert got.t == pytest.approx(t_ref)
    assert got.pairs == 10 and got.ok
    # The same gap with the roles swapped (control learned more) fails.
    swapped = own_data_verdict(
        *(torch.tensor(x) for x in (base_c, new_c, base_a, new_a)), min_margin=0.0, min_t=2.0
    )
    assert swapped.margin == pytest.approx(-gaps.mean()) and not swapped.ok
    # A margin requirement above the gap fails even with a large t.
    assert not own_data_verdict(
        *(torch.tensor(x) for x in (base_a, new_a, base_c, new_c)), min_margin=1.0, min_t=0.0
    ).ok


def test_own_data_verdict_edge_cases() -> None:
    zero = torch.zeros(4)
    same = own_data_verdict(zero, zero, zero, zero, min_margin=0.0, min_t=0.0)
    assert same.margin == 0.0 and not same.ok  # a zero Δ never passes: the gap must be > 0
    empty = torch.zeros(0)
    assert not own_data_verdict(empty, empty, empty, empty, min_margin=0, min_t=0).ok
    one = own_data_verdict(
        torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([1.5]),
        min_margin=0.0, min_t=5.0,
    )  # fmt: skip
    assert one.margin == pytest.approx(0.5) and one.t == math.inf and one.ok
    with pytest.raises(ValueError, match="1-D"):
        own_data_verdict(torch.zeros(2), torch.zeros(3), zero, zero, min_margin=0, min_t=0)


def test_cosine_matrix_matches_numpy() -> None:
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    x[2] = 0.0
    got = cosine_matrix(x).numpy()
    arr = x.double().numpy()
    for i in range(4):
        for j in range(4):
            ni, nj = np.linalg.norm(arr[i]), np.linalg.norm(arr[j])
            ref = 0.0 if ni == 0 or nj == 0 else arr[i] @ arr[j] / (ni * nj)
            assert got[i, j] == pytest.approx(ref, abs=1e-12)


def _explicit_residual(
    x: torch.Tensor, ref: torch.Tensor | None, i: int, j: int, gap: float
) -> float:
    """`residual_cosines[i, j]` by explicit projections in the ambient space."""
    unit = [row / row.norm() for row in x]
    r = None if ref is None else ref / ref.norm()

    def cos_without(dirs: list[torch.Tensor]) -> float:
        a, b = unit[i].clone(), unit[j].clone()
        if dirs:
            q, _ = torch.linalg.qr(torch.stack(dirs, 1))
            a, b = a - q @ (q.T @ a), b - q @ (q.T @ b)
        return float(a @ b / (a.norm() * b.norm()))

    others = [k for k in range(len(x)) if k not in (i, j)]
    s = {k: cos_without([unit[k]] + ([r] if r is not None else [])) for k in others}
    shared = [
        sum(abs(float(unit[a] @ unit[b])) for b in range(len(x)) if b != a) / (len(x) - 1)
        for a in range(len(x))
    ]
    typical = float(torch.tensor(shared).median())
    voters = [k for k in others if shared[k] >= 0.5 * typical]
    keep = others
    if voters:
        median = float(torch.tensor([s[k] for k in voters]).median())
        keep = [k for k in others if s[k] >= median - gap]
    v = torch.zeros(x.shape[1], dtype=torch.float64)
    for k in keep:
        v += float(unit[k] @ unit[i] + unit[k] @ unit[j]) * unit[k]
    dirs = ([v] if float(v.norm()) > 1e-9 else []) + ([r] if r is not None else [])
    return cos_without(dirs)


def test_residual_cosines_match_an_explicit_projection() -> None:
    g = torch.Generator().manual_seed(2)
    common = torch.randn(40, generator=g, dtype=torch.float64)
    x = torch.stack([common + torch.randn(40, generator=g, dtype=torch.float64) for _ in range(5)])
    x[4] = 2.0 * x[0] + 0.2 * torch.randn(40, generator=g, dtype=torch.float64)  # a family
    ref = common + torch.randn(40, generator=g, dtype=torch.float64)
    for reference in (ref, None):
        got = residual_cosines(x, reference, family_gap=0.15)
        for i in range(5):
            for j in range(i + 1, 5):
                want = _explicit_residual(x, reference, i, j, 0.15)
                assert float(got[i, j]) == pytest.approx(want, abs=1e-9), (i, j)
                assert float(got[j, i]) == float(got[i, j])
    # Two rows and no reference: the plain cosine; with a reference, its direction goes.
    assert torch.allclose(residual_cosines(x[:2]), cosine_matrix(x[:2]))
    assert float(residual_cosines(x[:2], ref)[0, 1]) == pytest.approx(
        _explicit_residual(x[:2], ref, 0, 1, 0.15)
    )


def _honest_family(
    n: int, shared: float, d: int = 4000, seed: int = 0, extra: int = 0
) -> list[torch.Tensor]:
    """Δ of honest miners: a common direction (weight `shared`, plus `extra` weaker common
    directions, as trained Δ have) plus their own parts."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=g)
    more = [torch.randn(d, generator=g) for _ in range(extra)]
    rows = []
    for _ in range(n):
        row = shared * common + torch.randn(d, generator=g)
        for m in more:
            row += 0.7 * float(torch.randn(1, generator=g)) * m
        rows.append(row)
    return rows


def _copy_of(x: torch.Tensor, seed: int, scale: float = 1.7, noise: float = 0.3) -> torch.Tensor:
    """What `train.adversary`'s copier publishes: rescaled, plus noise of `noise` × its norm."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(x.shape, generator=g)
    return scale * x + noise * scale * float(x.norm()) * n / n.norm()


def test_copies_are_found_after_rescaling_and_noise_and_honest_miners_are_not() -> None:
    honest = _honest_family(4, shared=2.0)  # raw cosine between them ≈ 0.8
    assert float(cosine_matrix(torch.stack(honest))[0, 1]) > 0.7
    copy = _copy_of(honest[1], seed=9, scale=3.0)
    found = find_copies([*honest, copy], threshold=0.8)
    assert set(found) == {4}
    assert found[4].original == 1 and found[4].cosine > 0.8
    # A copy of the copy still points at the earliest original; a negated copy (it undoes
    # the update) is no copy, and a zero vector matches nothing.
    again = find_copies([*honest, copy, 0.5 * copy, -copy, torch.zeros(4000)], threshold=0.8)
    assert {i: v.original for i, v in again.items()} == {4: 1, 5: 1}


@pytest.mark.parametrize("shared", [1.0, 2.0, 2.5])  # honest raw cosine ≈ 0.5, 0.8, 0.86
@pytest.mark.parametrize("copiers", [1, 2, 3])
def test_colluding_copiers_of_one_original_are_all_found(shared: float, copiers: int) -> None:
    honest = _honest_family(4, shared=shared, extra=2, seed=int(shared * 10))
    rows = [*honest, *(_copy_of(honest[2], seed=100 + k) for k in range(copiers))]
    want = {4 + k: 2 for k in range(copiers)}
    assert {i: v.original for i, v in find_copies(rows, threshold=0.8).items()} == want
    # With the outer momentum as the reference (a past common direction): the same.
    g = torch.Generator().manual_seed(5)
    ref = torch.stack(honest).sum(0) + 3.0 * torch.randn(4000, generator=g)
    found = find_copies(rows, threshold=0.8, reference=ref)
    assert {i: v.original for i, v in found.items()} == want


def test_noise_rows_neither_hide_copies_nor_make_honest_pairs_copies() -> None:
    honest = _honest_family(4, shared=2.5, seed=3)
    g = torch.Generator().manual_seed(11)
    noise = [torch.randn(4000, generator=g) * float(honest[0].norm()) / 63.0 for _ in range(3)]
    sims = residual_cosines(torch.stack([*honest, *noise]))
    assert float(sims[:4, :4].fill_diagonal_(0).max()) < 0.5  # the sum of all others: 0.76
    found = find_copies([*honest, *noise, _copy_of(honest[0], seed=1)], threshold=0.8)
    assert {i: v.original for i, v in found.items()} == {7: 0}


def test_a_non_finite_delta_is_skipped_and_spoils_nobody_else() -> None:
    honest = _honest_family(4, shared=2.5, seed=4)
    copy = _copy_of(honest[1], seed=2)
    bad = honest[0].clone()
    bad[7] = float("inf")
    nan = honest[3].clone()
    nan[0] = float("nan")
    rows = [bad, honest[1], honest[2], nan, copy]
    sims = residual_cosines(torch.stack(rows))
    assert bool(torch.isfinite(sims).all())
    assert float(sims[0, 1:].abs().max()) == 0.0 and float(sims[3, :3].abs().max()) == 0.0
    found = find_copies(rows, threshold=0.8)
    assert {i: v.original for i, v in found.items()} == {4: 1}  # as if 0 and 3 were absent
    alone = find_copies([honest[1], honest[2], copy], threshold=0.8)
    assert found[4].cosine == pytest.approx(alone[2].cosine)
    # A non-finite reference is ignored rather than spoiling every pair.
    again = find_copies(rows, threshold=0.8, reference=torch.full((4000,), float("inf")))
    assert {i: v.original for i, v in again.items()} == {4: 1}


def test_window_score_credits_only_positive_admitted_original_own_data_gains() -> None:
    assert window_score(0.3, admitted=True, own_ok=True, copied=False) == 0.3
    assert window_score(-0.3, admitted=True, own_ok=True, copied=False) == 0.0
    assert window_score(0.3, admitted=False, own_ok=True, copied=False) == 0.0
    assert window_score(0.3, admitted=True, own_ok=False, copied=False) == 0.0
    assert window_score(0.3, admitted=True, own_ok=True, copied=True) == 0.0
    assert window_score(math.nan, admitted=True, own_ok=True, copied=False) == 0.0


def test_ema_closed_form_and_normalized_weights() -> None:
    alpha, k = 0.3, 7
    ema: dict[int, float] = {}
    for _ in range(k):
        ema = update_ema(ema, {1: 2.0, 2: 0.0, 3: 1.0}, alpha)
    assert ema[1] == pytest.approx(2.0 * (1 - (1 - alpha) ** k))
    assert ema[3] == pytest.approx(1.0 * (1 - (1 - alpha) ** k))
    assert ema[2] == 0.0
    weights = normalized_weights(ema)
    assert weights == pytest.approx({1: 2 / 3, 2: 0.0, 3: 1 / 3})
    assert sum(weights.values()) == pytest.approx(1.0)
    assert normalized_weights({1: 0.0, 2: -1.0}) == {}
    assert update_ema({5: 1.0}, {1: 1.0}, 0.5) == {1: 0.5}  # UID 5 is no longer a miner
    with pytest.raises(ValueError):
        update_ema({}, {}, 0.0)


def test_compare_group_average() -> None:
    g = torch.Generator().manual_seed(3)
    a = {"w": torch.randn(10, 10, generator=g), "b": torch.randn(10, generator=g)}
    assert compare_group_average(a, a) == (0.0, True)
    off = {"w": a["w"] + 0.01, "b": a["b"]}
    err = math.sqrt(100 * 0.01**2) / float(flatten(a).norm())
    got, ok = compare_group_average(off, a, tolerance=0.05)
    assert got == pytest.approx(err) and ok == (err <= 0.05)
    assert compare_group_average({"w": a["w"]}, a) == (math.inf, False)
    assert compare_group_average({"w": a["w"], "b": a["b"][:5]}, a) == (math.inf, False)
    zero = {"w": torch.zeros(3)}
    assert compare_group_average(zero, zero) == (0.0, True)
    assert compare_group_average({"w": torch.ones(3)}, zero) == (math.inf, False)


def test_own_data_outcome_forgives_one_inconclusive_window_after_a_pass() -> None:
    def verdict(margin: float, t: float) -> OwnDataVerdict:
        return OwnDataVerdict(margin=margin, t=t, pairs=8, ok=margin > 0.0 and t >= 2.0)

    def outcome(v: OwnDataVerdict, strikes: int) -> str:
        return own_data_outcome(v, min_margin=0.0, grace_t=1.0, strikes=strikes)

    assert outcome(verdict(0.5, 4.0), strikes=3) == "pass"
    # The demo's honest miner: margin +0.249, t = 1.84 in its first window.
    assert outcome(verdict(0.249, 1.84), strikes=0) == "grace"
    assert outcome(verdict(0.249, 1.84), strikes=1) == "fail"  # twice in a row: no credit
    assert outcome(verdict(0.05, 0.7), strikes=0) == "fail"  # the wrong-data miner's t
    assert outcome(verdict(-0.1, 1.5), strikes=0) == "fail"
    none = OwnDataVerdict(margin=0.0, t=0.0, pairs=0, ok=False)
    assert outcome(none, strikes=0) == "fail"
    # grace_t at the full bar turns the grace off.
    off = own_data_outcome(verdict(0.249, 1.84), min_margin=0.0, grace_t=2.0, strikes=0)
    assert off == "fail"


def test_heldout_verdict_compares_gains_beyond_generic_pages() -> None:
    g = torch.Generator().manual_seed(0)

    def gains(mean: float, n: int) -> torch.Tensor:
        return mean + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)

    generic, own = gains(0.8, 16), gains(1.2, 16)  # own pages: +0.4 beyond generic
    honest = heldout_verdict(gains(0.8, 32), generic, own, max_ratio=0.5, min_t=2.0)
    assert honest.ok and abs(honest.excess) < 0.05
    assert honest.own_excess == pytest.approx(float(own.mean() - generic.mean()))
    cheat = heldout_verdict(gains(1.05, 32), generic, own, max_ratio=0.5, min_t=2.0)
    assert not cheat.ok and cheat.ratio == pytest.approx(cheat.excess / cheat.own_excess)
    assert cheat.t > 2.0 and cheat.ratio > 0.5
    # Rivalling the own pages but not beyond noise is no evidence; below the ratio neither.
    noisy = heldout_verdict(
        torch.tensor([3.2, -1.0, 3.2, -1.0], dtype=torch.float64),
        generic,
        own,
        max_ratio=0.5,
        min_t=2.0,
    )
    assert noisy.ratio > 0.5 and noisy.t < 2.0 and noisy.ok
    mild = heldout_verdict(gains(0.9, 32), generic, own, max_ratio=0.5, min_t=2.0)
    assert mild.ok and 0 < mild.ratio < 0.5
    # No gain on the own pages at all: any real held-out excess is too much.
    none = heldout_verdict(gains(1.0, 32), generic, generic, max_ratio=0.5, min_t=2.0)
    assert not none.ok and none.ratio == math.inf


def test_window_score_needs_the_heldout_check_too() -> None:
    assert window_score(0.3, admitted=True, own_ok=True, copied=False, heldout_ok=False) == 0.0
    assert window_score(0.3, admitted=True, own_ok=True, copied=False, heldout_ok=True) == 0.3


def test_delta_norm_is_the_norm_of_the_flattened_delta() -> None:
    gen = torch.Generator().manual_seed(0)
    delta = {"b": torch.randn(3, 5, generator=gen), "a": torch.randn(7, generator=gen).half()}
    assert delta_norm(delta) == pytest.approx(float(flatten(delta).double().norm()), rel=1e-6)
    assert delta_norm({"z": torch.zeros(4)}) == 0.0


def test_replays_are_found_by_plain_cosine() -> None:
    g = torch.Generator().manual_seed(0)
    earlier = [torch.randn(500, generator=g) for _ in range(3)]
    fresh = torch.randn(500, generator=g)
    noisy = earlier[1] * 2 + 0.5 * torch.randn(500, generator=g)  # cosine ≈ 0.97
    found = find_replays([fresh, 3 * earlier[2], noisy, torch.zeros(500)], earlier, 0.95)
    assert set(found) == {1, 2}
    assert found[1].original == 2 and found[1].cosine == pytest.approx(1.0)
    assert found[2].original == 1 and 0.95 < found[2].cosine < 1.0
    assert find_replays([fresh], [], 0.95) == {} and find_replays([], earlier, 0.95) == {}
