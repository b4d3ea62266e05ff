"""Block emission and the halving schedule, as subtensor computes them.

Every block mints `block_emission(total_issuance)` rao. Subtensor's
`get_block_emission_for_issuance` works in I96F32 fixed point (32 fractional bits):

    x        = issuance / 21e15                      (truncated to 2^-32)
    residual = log2(1 / (1 - x))                      (1/(1-x) truncated to 2^-32)
    k        = floor(residual)
    emission = floor(10^9 / 2^k)                      (0 once issuance >= 21e15)

so the block reward is 1 TAO until issuance reaches 10.5 M TAO and halves each time
issuance crosses 21 M·(1 − 2⁻ᵏ). `block_emission` reproduces that arithmetic exactly with
Python integers (no floats), and the rest of this module derives the schedule from it:
era boundaries are found by bisection on `block_emission` itself, so they can never
disagree with what the ledger mints.

    >>> block_emission(0), block_emission(10_500_000 * 10**9)
    (1000000000, 500000000)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

RAO_PER_TAO = 1_000_000_000
TOTAL_SUPPLY_RAO = 21_000_000 * RAO_PER_TAO
DEFAULT_BLOCK_EMISSION_RAO = RAO_PER_TAO
_FRAC_BITS = 32
_ONE = 1 << _FRAC_BITS


def halving_level(issuance: int) -> int:
    """k = floor(log2(1 / (1 - issuance / 21e15))) in I96F32 arithmetic."""
    if issuance < 0:
        raise ValueError(f"issuance must be >= 0 rao, got {issuance}")
    if issuance >= TOTAL_SUPPLY_RAO:
        raise ValueError("issuance has reached the cap; there is no halving level")
    ratio = (issuance << _FRAC_BITS) // TOTAL_SUPPLY_RAO  # < 2^32 because issuance < cap
    inverse = (_ONE << _FRAC_BITS) // (_ONE - ratio)  # 1/(1-x), >= 1.0
    return inverse.bit_length() - 1 - _FRAC_BITS


def block_emission(issuance: int) -> int:
    """Rao minted by one block when `issuance` rao have been issued so far."""
    if issuance >= TOTAL_SUPPLY_RAO:
        return 0
    k = halving_level(issuance)
    # 1/2^k has no fractional bits left beyond k = 32; 10^9 >> k is 0 from k = 30 on anyway.
    return 0 if k > _FRAC_BITS else DEFAULT_BLOCK_EMISSION_RAO >> k


def next_emission_change(issuance: int) -> int | None:
    """The smallest issuance above `issuance` at which the block emission drops, or None."""
    current = block_emission(issuance)
    if current == 0:
        return None
    lo, hi = issuance, TOTAL_SUPPLY_RAO  # emission(lo) == current, emission(hi) == 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if block_emission(mid) == current:
            lo = mid
        else:
            hi = mid
    return hi


def blocks_to_reach(issuance: int, target: int, emission: int) -> int:
    """Blocks of constant `emission` until issuance is at least `target` (ceil division)."""
    if target <= issuance:
        return 0
    if emission <= 0:
        raise ValueError("issuance never grows with zero emission")
    return -(-(target - issuance) // emission)


@dataclass(frozen=True)
class Era:
    """One stretch of constant block emission."""

    index: int  # halving level k: the emission is 10^9 >> k
    start_block: int
    start_issuance: int  # rao issued at the first block of the era
    emission_per_block: int  # rao
    blocks: int | None  # None for the last (zero-emission) era


@cache
def _era_starts() -> tuple[int, ...]:
    starts = [0]
    while (nxt := next_emission_change(starts[-1])) is not None:
        starts.append(nxt)
    return tuple(starts)


def schedule(issuance: int = 0, block: int = 0) -> list[Era]:
    """Every era from the current state to the end of emission, with no other minting.

    Issuance grows in whole blocks, so an era starts at the first block whose issuance
    has crossed the boundary; the overshoot carries into the next era.
    """
    eras: list[Era] = []
    while True:
        emission = block_emission(issuance)
        level = halving_level(issuance) if issuance < TOTAL_SUPPLY_RAO else len(_era_starts())
        if emission == 0:
            eras.append(Era(level, block, issuance, 0, None))
            return eras
        boundary = next_emission_change(issuance)
        assert boundary is not None  # emission > 0 implies a later drop
        blocks = blocks_to_reach(issuance, boundary, emission)
        eras.append(Era(level, block, issuance, emission, blocks))
        issuance += blocks * emission
        block += blocks


def emission_over(issuance: int, blocks: int) -> int:
    """Total rao minted by `blocks` consecutive blocks starting at `issuance` (closed form)."""
    minted = 0
    while blocks > 0:
        emission = block_emission(issuance)
        if emission == 0:
            break
        boundary = next_emission_change(issuance)
        assert boundary is not None
        span = min(blocks, blocks_to_reach(issuance, boundary, emission))
        minted += span * emission
        issuance += span * emission
        blocks -= span
    return minted
