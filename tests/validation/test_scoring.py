"""The validator's pure arithmetic against closed forms and numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from validation.scoring import (
    compare_group_average,
    cosine_matrix,
    find_copies,
    flatten,
    loss_delta,
    normalized_weights,
    own_data_verdict,
    residual_cosines,
    update_ema,
    window_score,
)


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


def test_residual_cosines_match_an_explicit_projection() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 30, generator=g, dtype=torch.float64)
    ref = torch.randn(30, generator=g, dtype=torch.float64)
    got = residual_cosines(x, ref)
    for i in range(4):
        for j in range(4):
            if i == j:
                continue
            others = [x[k] / x[k].norm() for k in range(4) if k not in (i, j)] + [ref / ref.norm()]
            v = torch.stack(others).sum(0)
            v = v / v.norm()
            ri, rj = x[i] - (x[i] @ v) * v, x[j] - (x[j] @ v) * v
            assert float(got[i, j]) == pytest.approx(float(ri @ rj / (ri.norm() * rj.norm())))
    # Two rows and no reference: the plain cosine.
    assert torch.allclose(residual_cosines(x[:2]), cosine_matrix(x[:2]))


def _honest_family(n: int, shared: float, d: int = 4000, seed: int = 0) -> list[torch.Tensor]:
    """Δ of honest miners: a common direction (weight `shared`) plus their own parts."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=g)
    return [shared * common + torch.randn(d, generator=g) for _ in range(n)]


def test_copies_are_found_after_rescaling_and_noise_and_honest_miners_are_not() -> None:
    honest = _honest_family(4, shared=2.0)  # raw cosine between them ≈ 0.8
    assert float(cosine_matrix(torch.stack(honest))[0, 1]) > 0.7
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(4000, generator=g)
    copy = 3.0 * honest[1] + 0.3 * 3.0 * honest[1].norm() * noise / noise.norm()
    found = find_copies([*honest, copy], threshold=0.8)
    assert set(found) == {4}
    assert found[4].original == 1 and found[4].cosine > 0.8
    # A copy of the copy still points at the earliest original; a negated copy (it undoes
    # the update) is no copy, and a zero vector matches nothing.
    again = find_copies([*honest, copy, 0.5 * copy, -copy, torch.zeros(4000)], threshold=0.8)
    assert {i: v.original for i, v in again.items()} == {4: 1, 5: 1}


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
