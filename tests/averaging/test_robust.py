"""The aggregation rules against their closed forms (BTARD, arXiv 2106.11257)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from averaging.robust import (
    aggregate,
    centered_clip,
    relative_tau,
    trimmed_mean,
    weighted_mean,
    weighted_median,
)
from averaging.settings import RobustConfig


def rows(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 8), d=st.integers(1, 16), seed=st.integers(0, 10_000))
def test_weighted_mean_is_the_formula(n: int, d: int, seed: int) -> None:
    x = rows(n, d, seed)
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1)) + 0.1
    expected = (w[:, None] * x).sum(0) / w.sum()
    torch.testing.assert_close(weighted_mean(x, w), expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 10), k=st.integers(0, 4), d=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_trimmed_mean_with_equal_weights_drops_k_from_each_end(
    n: int, k: int, d: int, seed: int
) -> None:
    k = min(k, (n - 1) // 2)
    x = rows(n, d, seed)
    expected = x.sort(dim=0).values[k : n - k].mean(0)
    got = trimmed_mean(x, torch.ones(n), trim=k / n)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.integers(1, 4), min_size=2, max_size=6),
    seed=st.integers(0, 10_000),
)
def test_integer_weights_act_like_repeated_rows(counts: list[int], seed: int) -> None:
    """A row of weight 3 is three equal rows: compare with the unweighted closed form."""
    x = rows(len(counts), 5, seed)
    total = sum(counts)
    k = (total - 1) // 4
    repeated = torch.cat([x[i : i + 1].expand(c, -1) for i, c in enumerate(counts)])
    expected = repeated.sort(dim=0).values[k : total - k].mean(0)
    got = trimmed_mean(x, torch.tensor(counts, dtype=torch.float64), trim=k / total)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_trimmed_mean_ignores_one_huge_row() -> None:
    x = torch.tensor([[1.0, -2.0], [2.0, 0.0], [3.0, 1.0], [1e9, -1e9]])
    got = trimmed_mean(x, torch.ones(4), trim=0.25)
    # Per coordinate, the middle two of four values.
    torch.testing.assert_close(got, torch.tensor([2.5, -1.0]))


def test_weighted_median_odd_even_and_weighted() -> None:
    x = torch.tensor([[1.0], [5.0], [2.0]])
    assert weighted_median(x, torch.ones(3)).item() == pytest.approx(2.0)
    x4 = torch.tensor([[1.0], [5.0], [2.0], [4.0]])
    assert weighted_median(x4, torch.ones(4)).item() == pytest.approx(3.0)
    # Weight 3 on the largest row puts more than half the mass on it.
    assert weighted_median(x, torch.tensor([1.0, 3.0, 1.0])).item() == pytest.approx(5.0)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 7), d=st.integers(1, 10), seed=st.integers(0, 10_000))
def test_centered_clip_with_infinite_radius_is_the_weighted_mean(n: int, d: int, seed: int) -> None:
    """One step from any center v: v + Σ w (x − v) / Σ w = Σ w x / Σ w."""
    x = rows(n, d, seed)
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed)) + 0.5
    got = centered_clip(x, w, tau=math.inf, iterations=1, init=torch.full((d,), 7.0))
    torch.testing.assert_close(got, weighted_mean(x, w), rtol=1e-5, atol=1e-5)


def test_centered_clip_step_closed_form() -> None:
    """Two rows at distance 4 and 2 from the center, τ = 1: each moves it by one unit."""
    x = torch.tensor([[4.0, 0.0], [0.0, -2.0]])
    got = centered_clip(x, torch.ones(2), tau=1.0, iterations=1, init=torch.zeros(2))
    torch.testing.assert_close(got, torch.tensor([0.5, -0.5]))


def test_centered_clip_bounds_an_outlier() -> None:
    honest = rows(5, 64, 3) * 0.1
    attacked = torch.cat([honest, honest[:1] * 1e6])
    tau, iters = 0.5, 10
    clean = centered_clip(honest, torch.ones(5), tau=tau, iterations=iters)
    dirty = centered_clip(attacked, torch.ones(6), tau=tau, iterations=iters)
    # Each iteration the outlier moves the center by at most τ · w / Σw.
    assert (dirty - clean).norm().item() <= iters * tau / 6 + 1e-4
    assert (dirty - honest.mean(0)).norm().item() < 1.0


def test_relative_tau_ignores_the_outlier_scale() -> None:
    honest = rows(4, 32, 9)
    tau_clean = relative_tau(honest, torch.ones(4), 1.0)
    tau_dirty = relative_tau(torch.cat([honest, honest[:1] * 1e6]), torch.ones(5), 1.0)
    assert tau_dirty < 3 * tau_clean
    assert relative_tau(torch.zeros(3, 4), torch.ones(3), 2.0) == 2.0


@pytest.mark.parametrize("kind", ["mean", "trimmed_mean", "centered_clip"])
def test_aggregate_agrees_with_the_mean_on_identical_rows(kind: str) -> None:
    x = torch.tensor([[1.0, 2.0, 3.0]]).expand(4, -1)
    got = aggregate(x, torch.tensor([1.0, 2.0, 3.0, 4.0]), RobustConfig(kind=kind))  # type: ignore[arg-type]
    torch.testing.assert_close(got, x[0])


def test_aggregate_keeps_the_part_shape() -> None:
    x = rows(3, 6, 1).reshape(3, 2, 3)
    assert aggregate(x, torch.ones(3), RobustConfig(kind="centered_clip")).shape == (2, 3)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, -1.0], "non-negative"),
        ([0.0, 0.0], "zero"),
        ([1.0], "rows but"),
        ([math.nan, 1.0], "finite"),
    ],
)
def test_bad_weights_are_refused(weights: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        weighted_mean(torch.zeros(2, 3), torch.tensor(weights))


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean(torch.zeros(2, 3), torch.ones(2), trim=0.5)
    with pytest.raises(ValueError, match="tau"):
        centered_clip(torch.zeros(2, 3), torch.ones(2), tau=0.0, iterations=1)
    with pytest.raises(ValueError, match="at least one row"):
        weighted_mean(torch.zeros(0, 3), torch.zeros(0))
