"""Aggregation rules for one part of the all-reduce: weighted mean and two robust ones.

Each reducer of the butterfly all-reduce holds, for its part of the vector, one row per
contributing miner: ``stack[i]`` is miner i's slice of its pseudo-gradient Δ_i (DiLoCo,
arXiv 2311.08105) and ``weights[i]`` the weight the *ledger* gives that miner. These
functions turn the rows into the part of the average. They are pure (no I/O, no state) so
that the tests can check them against closed forms.

- `weighted_mean`: Σ w_i x_i / Σ w_i, what plain hivemind computes.
- `trimmed_mean`: per coordinate, drop the `trim` fraction of the total weight from each
  tail and average the rest. With equal weights and an integer ``trim·n`` it is the
  textbook trimmed mean (drop ``trim·n`` values from each end); otherwise the rows at the
  cut keep the fraction of their weight that lies inside it.
- `centered_clip`: BTARD's CenteredClip (Gorbunov et al., arXiv 2106.11257, after
  Karimireddy et al., arXiv 2012.10333): ``v ← v + Σ w_i (x_i − v) min(1, τ/‖x_i − v‖) / Σ w_i``.
  A row far from the center moves it by at most ``τ · w_i / Σ w`` per iteration, so one
  miner sending ``10⁶ · Δ`` cannot drag the part away. It starts from the coordinate-wise
  weighted median.

`aggregate` picks one of them from a `RobustConfig`. All arithmetic on weights runs in
float64 so that a row cut by the trimmed mean contributes exactly nothing, however large.

The result must be the same bits on every machine that computes it (reducers, validators,
`tensormine verify`), whatever its thread count: sums over rows are explicit loops of
element-wise adds (`_sum_rows`) and a row's norm is NumPy's single-threaded pairwise sum
(`_row_norms`), never one of torch's reductions, which split a long sum over threads.
"""

from __future__ import annotations

import numpy as np
import torch

from averaging.settings import RobustConfig


def _check(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    if stack.dim() < 1 or stack.shape[0] == 0:
        raise ValueError("need at least one row to aggregate")
    if weights.shape != (stack.shape[0],):
        raise ValueError(f"{stack.shape[0]} rows but weights of shape {tuple(weights.shape)}")
    w = weights.to(torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weights must be finite and non-negative")
    if float(w.sum()) <= 0:
        raise ValueError("weights sum to zero")
    return w


def _per_row(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Weights shaped to broadcast against `like` (rows first)."""
    return w.view(-1, *([1] * (like.dim() - 1)))


def _sum_rows(t: torch.Tensor) -> torch.Tensor:
    """Σ over dim 0, row 0 first, by element-wise adds (the same bits on any thread count)."""
    total = t[0].clone()
    for row in t[1:]:
        total += row
    return total


def _row_norms(rows: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row of a 2-D float64 tensor, in one fixed order."""
    x = rows.detach().to("cpu", torch.float64).numpy()
    return torch.from_numpy(np.sqrt(np.add.reduce(x * x, axis=1)))


def weighted_mean(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ w_i x_i / Σ w_i over the rows of `stack`."""
    w = _check(stack, weights)
    total = _sum_rows(stack.to(torch.float64) * _per_row(w, stack)) / w.sum()
    return total.to(stack.dtype)


def _sorted_kept_mass(
    stack: torch.Tensor, w: torch.Tensor, lo: float, hi: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate: values sorted over rows, and how much of each row's weight lies in
    the cumulative-weight window [lo, hi]."""
    values, order = stack.to(torch.float64).sort(dim=0)
    w_sorted = _per_row(w, stack).expand_as(values).gather(0, order)
    upper = w_sorted.cumsum(0)
    lower = upper - w_sorted
    kept = (
        torch.minimum(upper, torch.tensor(hi, dtype=torch.float64))
        - torch.maximum(lower, torch.tensor(lo, dtype=torch.float64))
    ).clamp_(min=0.0)
    return values, kept


def trimmed_mean(stack: torch.Tensor, weights: torch.Tensor, trim: float) -> torch.Tensor:
    """Coordinate-wise mean after cutting `trim` of the total weight from each tail."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    w = _check(stack, weights)
    total = float(w.sum())
    values, kept = _sorted_kept_mass(stack, w, trim * total, (1.0 - trim) * total)
    return (_sum_rows(values * kept) / _sum_rows(kept)).to(stack.dtype)


def weighted_median(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise weighted median: the mean of the rows straddling half the weight.

    With equal weights and an even count this is the mean of the two middle values, as in
    the textbook median; it is the limit of `trimmed_mean` as `trim` → 0.5.
    """
    w = _check(stack, weights)
    half = float(w.sum()) / 2.0
    # A window of vanishing width around W/2; rows touching it share the median equally.
    eps = half * 1e-9
    values, kept = _sorted_kept_mass(stack, w, half - eps, half + eps)
    return (_sum_rows(values * kept) / _sum_rows(kept)).to(stack.dtype)


def centered_clip(
    stack: torch.Tensor,
    weights: torch.Tensor,
    tau: float,
    iterations: int,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """BTARD's CenteredClip with clipping radius `tau` (L2 norm over the whole row)."""
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    w = _check(stack, weights)
    rows = stack.to(torch.float64).reshape(stack.shape[0], -1)
    center = (
        (weighted_median(stack, weights) if init is None else init.to(stack.dtype))
        .to(torch.float64)
        .reshape(-1)
    )
    for _ in range(iterations):
        diff = rows - center
        norms = _row_norms(diff)
        scale = torch.where(norms > tau, tau / norms.clamp(min=1e-300), torch.ones_like(norms))
        center = center + _sum_rows((w * scale).unsqueeze(1) * diff) / w.sum()
    return center.reshape(stack.shape[1:]).to(stack.dtype)


def relative_tau(stack: torch.Tensor, weights: torch.Tensor, factor: float) -> float:
    """`factor` × the weighted median distance of the rows from their coordinate-wise median.

    Makes τ independent of the scale of Δ, which shrinks as training converges. Falls back
    to `factor` when all rows coincide.
    """
    w = _check(stack, weights)
    center = weighted_median(stack, weights).to(torch.float64).reshape(-1)
    dists = _row_norms(stack.to(torch.float64).reshape(stack.shape[0], -1) - center)
    median_dist = float(weighted_median(dists.unsqueeze(1), w).item())
    return factor * median_dist if median_dist > 0 else factor


def aggregate(stack: torch.Tensor, weights: torch.Tensor, config: RobustConfig) -> torch.Tensor:
    """Combine the rows of one part as `config` says."""
    if config.kind == "mean":
        return weighted_mean(stack, weights)
    if config.kind == "trimmed_mean":
        return trimmed_mean(stack, weights, config.trim)
    tau = relative_tau(stack, weights, config.clip_tau) if config.clip_relative else config.clip_tau
    return centered_clip(stack, weights, tau, config.clip_iterations)
