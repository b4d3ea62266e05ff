"""Splitting an epoch's pending emission into integer payouts (pure, no I/O).

Given the rao accumulated since the last epoch and the epoch's Yuma outputs:

    owner  = pending · owner_cut / 65535                   (11796/65535 ≈ 18 % by default)
    rest   = pending − owner
    miner_i     = rest · incentive_i / (Σ incentive + Σ dividends)
    validator_i = rest · dividends_i / (Σ incentive + Σ dividends)

so miners and validators share the rest 50/50 whenever both vectors are normalized, as in
subtensor's epoch. When nobody earned incentive or dividends (no weights yet, or all
stale), subtensor pays the rest to validators by their active stake (by total stake if
no stake is active); so do we. Every amount is floored to whole rao, and whatever the
flooring leaves over is carried into the next epoch, so no rao is created or lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

U16_MAX = 65535


@dataclass(frozen=True)
class Payout:
    owner: int
    miner: list[int]  # per UID: the incentive part
    validator: list[int]  # per UID: the dividends part
    carried: int  # rao left pending for the next epoch

    @property
    def per_uid(self) -> list[int]:
        return [m + v for m, v in zip(self.miner, self.validator, strict=True)]

    @property
    def total(self) -> int:
        return self.owner + sum(self.miner) + sum(self.validator) + self.carried


def _floor_shares(amount: int, shares: Sequence[float], denominator: float) -> list[int]:
    """floor(amount · share_i / denominator), never summing above `amount`."""
    if denominator <= 0 or amount <= 0:
        return [0] * len(shares)
    out = [max(0, int(amount * (s / denominator))) for s in shares]
    excess = sum(out) - amount
    # Float rounding can overshoot by a few rao in total; take it back from the largest.
    while excess > 0:
        i = max(range(len(out)), key=out.__getitem__)
        take = min(excess, out[i])
        out[i] -= take
        excess -= take
    return out


def split_emission(
    pending: int,
    incentive: Sequence[float],
    dividends: Sequence[float],
    active_stake: Sequence[float],
    stake: Sequence[float],
    owner_cut_u16: int,
) -> Payout:
    """Divide `pending` rao between the owner, miners (incentive) and validators."""
    if pending < 0:
        raise ValueError(f"pending emission cannot be negative: {pending}")
    if not 0 <= owner_cut_u16 <= U16_MAX:
        raise ValueError(f"owner cut must be a u16, got {owner_cut_u16}")
    n = len(incentive)
    if not (len(dividends) == len(active_stake) == len(stake) == n):
        raise ValueError("incentive, dividends and stakes must have one entry per UID")
    owner = pending * owner_cut_u16 // U16_MAX
    rest = pending - owner
    total = float(sum(incentive)) + float(sum(dividends))
    if total > 0:
        # One floor over both vectors so the float rounding bound covers their sum.
        parts = _floor_shares(rest, [*incentive, *dividends], total)
        miner, validator = parts[:n], parts[n:]
    else:
        fallback = active_stake if sum(active_stake) > 0 else stake
        miner = [0] * n
        validator = _floor_shares(rest, fallback, float(sum(fallback)))
    carried = pending - owner - sum(miner) - sum(validator)
    return Payout(owner, miner, validator, carried)
