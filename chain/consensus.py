"""Yuma consensus: one subnet epoch of Bittensor's subtensor, in float64 numpy.

What Yuma does. Validators score miners by setting weights. Each epoch, for every UID j,
the chain takes the stake-weighted median ("consensus") of the weights validators put on
j, clips every weight above that consensus down to it, and pays miners by the clipped,
stake-weighted weights (incentive). Validators earn dividends through bonds: a moving
average of the (clipped) weights they set, so a validator that backed a miner early and in
line with the majority owns more of that miner's incentive. Outlier weights buy nothing
above consensus; a validator that cannot muster `kappa` of the active stake cannot move a
miner's consensus up.

Symbols (n UIDs; i indexes validators / rows, j UIDs / columns):
    W      weights, W[i, j] = weight validator i sets on UID j, row-normalized after masking
    S      active stake: normalized stake with inactive and non-permitted UIDs zeroed,
           normalized again
    P      preranks, P_j = Σ_i W_ij S_i
    C      consensus, C_j = largest c such that the stake of {i : W_ij >= c} is >= κ
           (subtensor's `weighted_median_col_sparse`)
    W̄      clipped weights, W̄_ij = min(W_ij, C_j)
    V      validator trust, V_i = Σ_j W̄_ij
    R      ranks, R_j = Σ_i W̄_ij S_i;  T trust, T_j = R_j / P_j (0 where P_j = 0)
    I      incentive = R / ΣR (subtensor stores the normalized R as "rank", so rank == I)
    W_b    weights for bonds = W + β (W̄ - W), β the bonds penalty (β = 1: W_b = W̄)
    B      bonds, D dividends, α the bond EMA coefficient (1 - BondsMovingAverage / 10^6)
    κ      kappa, the majority ratio

Bonds, classic Yuma (`yuma3=False`):
    ΔB = column-normalize(W_b ◦ S)            (row i scaled by S_i)
    B' = column-normalize(α ΔB + (1 - α) column-normalize(B))
    D  = normalize(B' · I)
Bonds, Yuma3 (`yuma3=True`), per entry and without normalizing B:
    B'_ij = α_ij W_b,ij + (1 - α_ij) B_ij, where α_ij = α unless liquid alpha is on, in
    which case α_ij comes from a sigmoid of how far W_b,ij sits above C_j (buying) or
    below B_ij (selling), between `alpha_low` and `alpha_high`, capped so B' <= 1;
    D = normalize(S ◦ (column-normalize(B') · I))

Scale of `bonds`. Classic: the input may have any per-column scale (it is column-normalized
first, as subtensor does with the u16 values it reads); the output is column-normalized,
Σ_i B'_ij ∈ {0, 1}. Yuma3: input and output are per-entry proportions in [0, 1], never
normalized. `bonds_to_u16` / `bonds_from_u16` store and reload them exactly like the chain.

Reference: opentensor/subtensor, pallets/subtensor/src/epoch/run_epoch.rs
(`epoch_mechanism`, the sparse epoch the chain runs; `compute_bonds_sparse`,
`compute_liquid_alpha_values_sparse`, `alpha_sigmoid`) and pallets/subtensor/src/epoch/math.rs
(`weighted_median`, `weighted_median_col_sparse`, `col_clip_sparse`, `interpolate_sparse`,
`mat_ema_sparse`, `mat_ema_alpha_sparse`, `inplace_col_normalize_sparse`). The algorithm is
the chain's step by step, in float64 instead of I32F32 fixed point.

What the caller (the ledger) must do before calling, as subtensor does around the math:
- zero W[i, j] when i last set weights at or before j's registration (weights meant for
  the UID's previous holder), and any commit-reveal masking;
- zero the bond columns of UIDs registered since the last tempo;
- zero the stake of UIDs below the minimum validator stake;
- pass `active` (set weights within `activity_cutoff` blocks) and `validator_permit`;
- when storing the new bonds, clear the rows of UIDs that lose their permit;
- when incentive and dividends are all zero, pay validators by stake (emission fallback).

Usage:

    from chain.consensus import yuma_epoch, bonds_to_u16, bonds_from_u16
    result = yuma_epoch(weights, stake, np.zeros((n, n)), kappa=0.5, bond_alpha=0.1,
                        bonds_penalty=1.0, active=active, validator_permit=permits)
    stored = bonds_to_u16(result.bonds, yuma3=False)       # what the ledger keeps
    nxt = yuma_epoch(weights, stake, bonds_from_u16(stored, yuma3=False), ...)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

U16_MAX = 65535

# Defaults of the real chain (runtime/src/lib.rs parameter_types, pallets/subtensor/src/lib.rs).
DEFAULT_KAPPA = 0.5  # SubtensorInitialKappa = 32_767 (/65535 ≈ 0.5)
DEFAULT_BOND_ALPHA = 0.1  # 1 - SubtensorInitialBondsMovingAverage (900_000) / 10^6
DEFAULT_BONDS_PENALTY = 1.0  # SubtensorInitialBondsPenalty = u16::MAX
DEFAULT_ALPHA_LOW = 45875 / U16_MAX  # DefaultAlphaValues().0, ≈ 0.7
DEFAULT_ALPHA_HIGH = 58982 / U16_MAX  # DefaultAlphaValues().1, ≈ 0.9
DEFAULT_ALPHA_SIGMOID_STEEPNESS = 1000.0  # SubtensorInitialAlphaSigmoidSteepness (i16)

# substrate_fixed's exp fails when e^x overflows I32F32 (max ≈ 2^31); subtensor's
# `safe_exp` then returns 0.
_EXP_OVERFLOW = 31 * math.log(2.0)
# Float64 cannot hold k / 65535 exactly; flooring (k / 65535) * 65535 must still give k.
_U16_FLOOR_EPS = 1e-9

F64 = NDArray[np.float64]


@dataclass(frozen=True)
class EpochResult:
    """Per-UID outputs of one epoch, float64 arrays of length n (bonds: n×n)."""

    consensus: F64
    rank: F64
    trust: F64
    validator_trust: F64
    incentive: F64
    dividends: F64
    bonds: F64


def yuma_epoch(
    weights: ArrayLike,
    stake: ArrayLike,
    bonds: ArrayLike,
    *,
    kappa: float = DEFAULT_KAPPA,
    bond_alpha: float = DEFAULT_BOND_ALPHA,
    bonds_penalty: float = DEFAULT_BONDS_PENALTY,
    yuma3: bool = False,
    liquid_alpha: bool = False,
    active: ArrayLike | None = None,
    validator_permit: ArrayLike | None = None,
    owner_uid: int | None = None,
    alpha_low: float = DEFAULT_ALPHA_LOW,
    alpha_high: float = DEFAULT_ALPHA_HIGH,
    alpha_sigmoid_steepness: float = DEFAULT_ALPHA_SIGMOID_STEEPNESS,
) -> EpochResult:
    """Run one Yuma epoch; see the module docstring for the symbols and the caller's masks.

    weights: n×n, row i = validator i's raw weights (any non-negative scale).
    stake: length n, any non-negative scale. bonds: n×n, the previous call's
    `EpochResult.bonds` (or `bonds_from_u16` of what was stored), zeros at first.
    active / validator_permit: bool vectors, None = all True. owner_uid: the subnet
    owner's UID, whose self-weight subtensor keeps (None: every self-weight is masked).
    liquid_alpha only acts with yuma3, as in subtensor. alpha_sigmoid_steepness is in the
    chain's unit (divided by 100 inside the sigmoid).
    """
    s_raw = _vector("stake", stake)
    n = s_raw.shape[0]
    w_raw = _matrix("weights", weights, n)
    b_in = _matrix("bonds", bonds, n)
    act = _mask("active", active, n)
    permit = _mask("validator_permit", validator_permit, n)
    _unit("kappa", kappa)
    _unit("bond_alpha", bond_alpha)
    _unit("bonds_penalty", bonds_penalty)
    _unit("alpha_low", alpha_low)
    _unit("alpha_high", alpha_high)
    if alpha_low > alpha_high:
        raise ValueError(f"alpha_low ({alpha_low}) must not exceed alpha_high ({alpha_high})")
    if not math.isfinite(alpha_sigmoid_steepness):
        raise ValueError("alpha_sigmoid_steepness must be finite")
    if owner_uid is not None and not 0 <= owner_uid < n:
        raise ValueError(f"owner_uid must be a UID in [0, {n}), got {owner_uid}")
    if yuma3 and b_in.size and float(b_in.max()) > 1.0:
        raise ValueError("bonds must lie in [0, 1] with yuma3 (proportions, not normalized)")

    # Stake: normalize, then drop inactive and non-permitted UIDs and normalize again.
    stake_n = _normalize(s_raw)
    active_stake = _normalize(np.where(act & permit, stake_n, 0.0))

    # Weights: rows without permit and self-weights (bar the owner's) are masked, then
    # every row with a positive sum is normalized to sum 1.
    w = np.where(permit[:, None], w_raw, 0.0)
    diag = np.arange(n)
    keep = w[owner_uid, owner_uid] if owner_uid is not None else 0.0
    w[diag, diag] = 0.0
    if owner_uid is not None:
        w[owner_uid, owner_uid] = keep
    w = _row_normalize(w)

    preranks = active_stake @ w
    consensus = _weighted_median_cols(active_stake, w, kappa)
    clipped = np.minimum(w, consensus[None, :])
    validator_trust = np.minimum(clipped.sum(axis=1), 1.0)  # ≤ 1 up to float rounding
    ranks = active_stake @ clipped
    trust = np.zeros(n)
    np.divide(ranks, preranks, out=trust, where=preranks > 0)
    trust = np.minimum(trust, 1.0)
    incentive = _normalize(ranks)

    # β = 0 keeps the raw weights, β = 1 the clipped ones (exactly, as `interpolate_sparse`).
    if bonds_penalty == 0.0:
        w_bonds = w
    elif bonds_penalty == 1.0:
        w_bonds = clipped
    else:
        w_bonds = w + bonds_penalty * (clipped - w)

    if yuma3:
        new_bonds = _yuma3_bonds(
            w_bonds,
            b_in,
            consensus,
            bond_alpha=bond_alpha,
            liquid_alpha=liquid_alpha,
            alpha_low=alpha_low,
            alpha_high=alpha_high,
            steepness=alpha_sigmoid_steepness,
        )
        per_validator = _col_normalize(new_bonds) @ incentive
        dividends = _normalize(per_validator * active_stake)
    else:
        prev = _col_normalize(b_in)
        delta = _col_normalize(w_bonds * active_stake[:, None])
        new_bonds = _col_normalize(bond_alpha * delta + (1.0 - bond_alpha) * prev)
        dividends = _normalize(new_bonds @ incentive)

    return EpochResult(
        consensus=consensus,
        rank=incentive.copy(),
        trust=trust,
        validator_trust=validator_trust,
        incentive=incentive,
        dividends=dividends,
        bonds=new_bonds,
    )


def _weighted_median_cols(stake: F64, w: F64, kappa: float) -> F64:
    """Per column j: the stake-weighted median of W[:, j] at majority `kappa`.

    subtensor keeps only the rows with positive stake (zero weights count as scores of 0),
    renormalizes that stake, sets minority = Σ stake - κ and returns the score group whose
    stake interval [below, below + own) contains `minority`, i.e. the smallest score whose
    cumulative stake (all scores <= it) exceeds `minority`; the largest score when none
    does. Equal scores form one group, so how ties are ordered does not matter; we order
    them by stake so the float sums do not depend on UID order either.
    """
    n_cols = w.shape[1]
    rows = np.flatnonzero(stake > 0)
    if rows.size == 0:
        return np.zeros(n_cols)
    s = stake[rows] / _exact_sum(stake[rows])
    minority = _exact_sum(s) - kappa
    by_stake = np.argsort(s, kind="stable")
    s = s[by_stake]
    scores = np.ascontiguousarray(w[rows[by_stake]].T)  # one row per column of W
    order = np.argsort(scores, axis=1, kind="stable")
    cum = np.cumsum(s[order], axis=1)
    above = cum > minority
    pos = np.where(above.any(axis=1), above.argmax(axis=1), rows.size - 1)
    cols = np.arange(n_cols)
    return scores[cols, order[cols, pos]]


def _yuma3_bonds(
    w_bonds: F64,
    bonds: F64,
    consensus: F64,
    *,
    bond_alpha: float,
    liquid_alpha: bool,
    alpha_low: float,
    alpha_high: float,
    steepness: float,
) -> F64:
    """Per-entry bond EMA of Yuma3 (`compute_bonds_sparse`)."""
    if not (liquid_alpha and bool(np.any(consensus != 0))):
        # Fixed α; entries without weight decay by (1 - α).
        return np.asarray(bond_alpha * w_bonds + (1.0 - bond_alpha) * bonds, dtype=np.float64)
    alphas = _liquid_alphas(consensus, w_bonds, bonds, alpha_low, alpha_high, steepness)
    ema = np.minimum((1.0 - alphas) * bonds + np.maximum(alphas * w_bonds, 0.0), 1.0)
    # `mat_ema_alpha_sparse` only emits entries present in the (sparse) weights: a bond on
    # a UID the validator no longer weights is dropped, not decayed.
    return np.where(w_bonds > 0, ema, 0.0)


def _liquid_alphas(
    consensus: F64, w: F64, b: F64, low: float, high: float, steepness: float
) -> F64:
    """subtensor's `alpha_sigmoid` for every (validator, UID) pair."""
    c = consensus[None, :]
    buy = np.clip(w - c, 0.0, 1.0)  # weight above consensus
    sell = np.clip(b - w, 0.0, 1.0)  # weight below the bond held
    diff = np.where(w >= b, buy, sell)
    x = -(steepness / 100.0) * (diff - 0.5)
    e = np.where(x > _EXP_OVERFLOW, 0.0, np.exp(np.minimum(x, _EXP_OVERFLOW)))
    sigmoid = 1.0 / (1.0 + e)
    return np.asarray(np.clip(low + sigmoid * (high - low), low, high), dtype=np.float64)


def weights_to_u16(values: Sequence[float] | ArrayLike) -> list[int]:
    """Max-upscale a weight vector to u16 as subtensor does in `do_set_weights`.

    pallets/subtensor/src/subnets/weights.rs calls math.rs `vec_u16_max_upscale_to_u16`:
    every value becomes round(v · 65535 / max), rounding halves away from zero (I32F32
    `round`), so the largest is 65535; an all-zero vector stays zero.
    """
    v = _vector("values", values)
    if v.size == 0:
        return []
    top = float(v.max())
    if top == 0.0:
        return [0] * int(v.size)
    scaled = np.floor(v / top * U16_MAX + 0.5)
    return [int(x) for x in np.clip(scaled, 0, U16_MAX)]


def bonds_to_u16(bonds: ArrayLike, yuma3: bool) -> NDArray[np.uint16]:
    """The u16 matrix subtensor stores for `EpochResult.bonds`.

    Classic: each column is max-upscaled (`inplace_col_max_upscale_sparse`, largest entry
    1) and then `fixed_proportion_to_u16`, i.e. floor(x · 65535). Yuma3: the proportions
    go straight through `fixed_proportion_to_u16`. Saturates at 0 and 65535.
    """
    b = np.asarray(bonds, dtype=np.float64)
    if b.ndim != 2 or b.shape[0] != b.shape[1]:
        raise ValueError(f"bonds must be a square matrix, got shape {b.shape}")
    if not np.all(np.isfinite(b)) or (b.size and float(b.min()) < 0):
        raise ValueError("bonds must be finite and non-negative")
    if not yuma3:
        col_max = b.max(axis=0, initial=0.0)
        b = np.divide(b, col_max, out=np.zeros_like(b), where=col_max > 0)
    q = np.floor(b * U16_MAX + _U16_FLOOR_EPS)
    return np.clip(q, 0, U16_MAX).astype(np.uint16)


def bonds_from_u16(q: ArrayLike, yuma3: bool) -> F64:
    """Stored u16 bonds back into the `bonds` argument of the next `yuma_epoch`.

    Yuma3 reads them as proportions, q / 65535 (`get_bonds_sparse_fixed_proportion`).
    Classic reads the raw u16 values (`get_bonds_sparse`) and column-normalizes them
    inside the epoch, so their scale is irrelevant; we return q / 65535 as well, i.e. the
    column max-upscaled bonds.
    """
    a = np.asarray(q)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"q must be a square matrix, got shape {a.shape}")
    if a.size and (
        not np.issubdtype(a.dtype, np.integer) or int(a.min()) < 0 or int(a.max()) > U16_MAX
    ):
        raise ValueError("q must hold integers in [0, 65535]")
    return np.asarray(a, dtype=np.float64) / U16_MAX


def _exact_sum(x: F64) -> float:
    """Correctly rounded sum: the same whatever the order of `x`."""
    return math.fsum(x.tolist())


def _normalize(x: F64) -> F64:
    """x / Σx, or zeros when Σx = 0 (subtensor's `inplace_normalize`)."""
    total = _exact_sum(x)
    if total <= 0:
        return np.zeros_like(x)
    return np.asarray(x / total, dtype=np.float64)


def _row_normalize(m: F64) -> F64:
    """Rows with a positive sum are scaled to sum 1; the sum is taken in sorted order so
    that it does not depend on the order of the columns."""
    sums = np.sort(m, axis=1).sum(axis=1)[:, None]
    out = np.zeros_like(m)
    np.divide(m, sums, out=out, where=sums > 0)
    return out


def _col_normalize(m: F64) -> F64:
    """Columns with a nonzero sum are scaled to sum 1 (`inplace_col_normalize`)."""
    sums = m.sum(axis=0)[None, :]
    out = np.zeros_like(m)
    np.divide(m, sums, out=out, where=sums > 0)
    return out


def _vector(name: str, x: ArrayLike) -> F64:
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{name} must be a vector, got shape {v.shape}")
    if not np.all(np.isfinite(v)) or (v.size and float(v.min()) < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    return v


def _matrix(name: str, x: ArrayLike, n: int) -> F64:
    m = np.array(x, dtype=np.float64)  # a copy: we mask in place
    if m.shape != (n, n):
        raise ValueError(f"{name} must have shape ({n}, {n}) to match stake, got {m.shape}")
    if not np.all(np.isfinite(m)) or (m.size and float(m.min()) < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    return m


def _mask(name: str, x: ArrayLike | None, n: int) -> NDArray[np.bool_]:
    if x is None:
        return np.ones(n, dtype=bool)
    m = np.asarray(x)
    if m.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match stake, got {m.shape}")
    if m.dtype == np.bool_:
        return m
    if np.issubdtype(m.dtype, np.integer) and bool(np.all((m == 0) | (m == 1))):
        return m.astype(bool)
    raise ValueError(f"{name} must be a bool vector, got dtype {m.dtype}")


def _unit(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
