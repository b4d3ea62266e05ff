"""The validator's arithmetic: loss delta, own-data verdict, copy check, moving average, weights.

    from validation.scoring import (loss_delta, own_data_verdict, find_copies, window_score,
                                    update_ema, normalized_weights, compare_group_average)

    gain = loss_delta(base_E, new_E)                       # L(θ_w; E) − L(θ_w ⊕ Δ_i; E)
    own = own_data_verdict(base_A, new_A, base_C, new_C, min_margin=0.0, min_t=2.0)
    copies = find_copies(deltas, threshold=0.8, reference=momentum)   # later -> original
    score = window_score(gain, admitted=True, own_ok=own.ok, copied=False)
    ema = update_ema(ema, {uid: score, ...}, alpha=0.3)
    weights = normalized_weights(ema)                     # Σ = 1, or {} when all zero

Everything here is pure (tensors and numbers in, numbers out; no model, no I/O), so tests
check it against closed forms. The rules, and why:

- **Loss delta** on the held-out sample E is the score's core: how much loss the
  contribution removes when applied alone to θ_w with the outer learning rate. A negative
  delta (the update hurts) earns nothing, not a penalty: the moving average already
  forgets a miner that stops helping, and a negative score would let one bad window undo
  many good ones of an honest but unlucky miner.
- **Own-data check** (DESIGN "Proof of learning", 3): for each sampled assigned page `a_j`
  the control page `c_j` is an unassigned page next to it in the corpus (usually the same
  document). Pages are consecutive slices of concatenated documents, so the pair shares
  topic, style and vocabulary and the generic part of an improvement cancels in
  `d_j = gain(a_j) − gain(c_j)`; what remains is what training on `a_j` itself added. The
  pairing about halves the noise of the gap against unpaired random controls
  (measured on the stdlib corpus: standard error 0.05–0.09 against 0.10–0.16 nats), which is
  what makes the check usable with a handful of pages. The check passes when the mean gap
  exceeds `min_margin` and its t-statistic (mean / standard error) reaches `min_t`, so
  a miner trained elsewhere (gap ≈ 0 ± noise) rarely passes by luck.
- **Copy check**: cosine similarity ignores any rescaling, but honest miners that start
  from the same θ_w share a large common direction (measured on the tiny test model: raw
  cosine 0.5 → 0.86 between two honest miners over three windows, a copy with 30 % noise
  0.96), so a raw threshold would sooner or later flag honest miners. Pairs are compared
  after removing the direction shared by the *other* contributions and the outer momentum
  (`residual_cosines`), which brought honest pairs to 0.47–0.70 there while the noisy copy
  stayed at 0.87–0.94. Of a near-duplicate pair the later one (by the store's
  `received_at`) is the copy; a copier that adds noise larger than this hides from the
  check but also fails the own-data check and removes less loss.
- **Moving average**: `m ← (1 − α)·m + α·s` for every miner of the window (one without
  a contribution scores 0); weights are the averages normalized to sum 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


def loss_delta(base_loss: float, new_loss: float) -> float:
    """`L(θ_w; E) − L(θ_w ⊕ Δ; E)`: positive when the contribution lowers the loss."""
    return float(base_loss) - float(new_loss)


@dataclass(frozen=True)
class OwnDataVerdict:
    """The paired gap between a contribution's gain on its assigned pages and on controls."""

    margin: float  # mean over pairs of gain(assigned) − gain(control), in nats
    t: float  # margin / its standard error (inf when every gap is equal and positive)
    pairs: int
    ok: bool


def own_data_verdict(
    base_assigned: torch.Tensor,
    new_assigned: torch.Tensor,
    base_control: torch.Tensor,
    new_control: torch.Tensor,
    *,
    min_margin: float,
    min_t: float,
) -> OwnDataVerdict:
    """Judge per-page losses (before/after applying Δ) of paired assigned/control pages.

    All four are 1-D tensors of the same length n (pair j = assigned page j and its
    control). `ok` iff n ≥ 1, the mean gap > `min_margin` and t ≥ `min_t`; with one pair
    the standard error is unknown and only the margin counts.
    """
    shapes = {tuple(t.shape) for t in (base_assigned, new_assigned, base_control, new_control)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"need four 1-D tensors of one length, got shapes {sorted(shapes)}")
    n = int(base_assigned.shape[0])
    if n == 0:
        return OwnDataVerdict(margin=0.0, t=0.0, pairs=0, ok=False)
    gaps = (base_assigned.double() - new_assigned.double()) - (
        base_control.double() - new_control.double()
    )
    margin = float(gaps.mean())
    if n == 1:
        t = math.inf if margin > 0 else 0.0
    else:
        se = float(gaps.std(unbiased=True)) / math.sqrt(n)
        t = margin / se if se > 0 else (math.inf if margin > 0 else 0.0)
    ok = margin > min_margin and t >= min_t
    return OwnDataVerdict(margin=margin, t=t, pairs=n, ok=ok)


def flatten(delta: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One fp32 vector of a Δ, in sorted name order (so two Δ of one shard line up)."""
    return torch.cat([delta[name].detach().reshape(-1).float() for name in sorted(delta)])


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the rows of `vectors` [n, d] (fp64; a zero row gives 0)."""
    rows = vectors.double()
    norms = rows.norm(dim=1)
    unit = rows / norms.clamp(min=1e-300).unsqueeze(1)
    sims = unit @ unit.T
    zero = norms == 0
    sims[zero, :] = 0.0
    sims[:, zero] = 0.0
    result: torch.Tensor = sims
    return result


@dataclass(frozen=True)
class CopyVerdict:
    original: int  # index (into the caller's list) of the earlier Δ it duplicates
    cosine: float  # residual cosine (common direction removed) of the pair


def _gram(rows: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """`rows @ rows.T` in fp64, a slice of columns at a time (no fp64 copy of all rows)."""
    gram = torch.zeros(rows.shape[0], rows.shape[0], dtype=torch.float64)
    for start in range(0, rows.shape[1], chunk):
        part = rows[:, start : start + chunk].double()
        gram += part @ part.T
    return gram


def residual_cosines(vectors: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise cosine of the rows of `vectors` [n, d] after removing what they share.

    For the pair (i, j) the common direction is `v = Σ_{k∉{i,j}} x_k/‖x_k‖ (+ r/‖r‖)`:
    the other contributions and the optional `reference` (e.g. the outer momentum, an
    average of past updates), each counted once whatever its norm. Both rows lose their
    component along v, and the cosine of what is left is returned; with nothing to form
    v from (two rows, no reference) it is the plain cosine. The pair itself never shapes
    v, so two copies cannot hide by defining the common direction. Everything is
    computed from the Gram matrix (one O(n²d) product, then O(n³)), never in d.
    """
    n = vectors.shape[0]
    rows = vectors.reshape(n, -1)
    allrows = rows if reference is None else torch.cat([rows, reference.reshape(1, -1)])
    gram = _gram(allrows)
    norms = gram.diagonal().clamp(min=0).sqrt()
    unit_w = torch.where(norms > 0, 1.0 / norms.clamp(min=1e-300), torch.zeros_like(norms))
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            if norms[i] == 0 or norms[j] == 0:
                continue
            c = unit_w.clone()
            c[i] = c[j] = 0.0  # v = Σ c_k x_k over the others (and the reference)
            vv = float(c @ gram @ c)
            gi, gj, gij = float(gram[i, i]), float(gram[j, j]), float(gram[i, j])
            if vv > 1e-30 * max(gi, gj):
                ai = float(gram[i] @ c) / math.sqrt(vv)
                aj = float(gram[j] @ c) / math.sqrt(vv)
                gi, gj, gij = gi - ai * ai, gj - aj * aj, gij - ai * aj
            if gi > 0 and gj > 0:
                out[i, j] = out[j, i] = gij / math.sqrt(gi * gj)
    out.fill_diagonal_(1.0)
    return out


def find_copies(
    vectors: Sequence[torch.Tensor], threshold: float, reference: torch.Tensor | None = None
) -> dict[int, CopyVerdict]:
    """Which Δ are near-duplicates of an earlier one, given in arrival order.

    `vectors[i]` is the flattened Δ that arrived i-th (ties broken by the caller); pairs
    are compared by `residual_cosines` (the direction every honest miner shares removed,
    so honest miners trained from the same θ_w are not mistaken for copies). Entry i maps
    to the earliest j < i whose residual cosine with i exceeds `threshold`; the earliest of
    a family of duplicates keeps its credit, every later member is a copy (also a copy of
    a copy: its original is still the earliest). Indices not in the result are not copies.
    """
    if not vectors:
        return {}
    sims = residual_cosines(torch.stack([v.reshape(-1) for v in vectors]), reference)
    copies: dict[int, CopyVerdict] = {}
    for i in range(1, len(vectors)):
        for j in range(i):
            if float(sims[i, j]) > threshold:
                root = copies[j].original if j in copies else j
                copies[i] = CopyVerdict(original=root, cosine=float(sims[i, j]))
                break
    return copies


def window_score(gain: float, *, admitted: bool, own_ok: bool, copied: bool) -> float:
    """A contribution's score for the window: its positive loss delta, if it earns credit."""
    if not admitted or not own_ok or copied or not math.isfinite(gain):
        return 0.0
    return max(0.0, gain)


def update_ema(
    ema: Mapping[int, float], scores: Mapping[int, float], alpha: float
) -> dict[int, float]:
    """`m ← (1 − α)·m + α·s` for each UID in `scores` (absent from `ema`: starts at 0).

    UIDs in `ema` but not in `scores` (no longer miners) are dropped: they earn no weight.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return {uid: (1.0 - alpha) * float(ema.get(uid, 0.0)) + alpha * s for uid, s in scores.items()}


def normalized_weights(ema: Mapping[int, float]) -> dict[int, float]:
    """The moving averages scaled to sum 1 (negatives count as 0); {} when none is positive."""
    positive = {uid: max(0.0, v) for uid, v in ema.items()}
    total = sum(positive.values())
    if total <= 0.0:
        return {}
    return {uid: v / total for uid, v in sorted(positive.items())}


def compare_group_average(
    group: Mapping[str, torch.Tensor],
    admitted: Mapping[str, torch.Tensor],
    *,
    tolerance: float = 0.05,
) -> tuple[float, bool]:
    """Check a hivemind group average against the average of the admitted contributions.

    Returns `(‖group − admitted‖ / ‖admitted‖, ok)` over all tensors together, with
    `ok` iff the relative error ≤ `tolerance`. Different names or shapes, or a non-finite
    value, give `(inf, False)`; two zero averages agree exactly.
    """
    if set(group) != set(admitted):
        return math.inf, False
    diff_sq, ref_sq = 0.0, 0.0
    for name, ref in admitted.items():
        got = group[name]
        if tuple(got.shape) != tuple(ref.shape):
            return math.inf, False
        g, r = got.detach().double(), ref.detach().double()
        if not (bool(torch.isfinite(g).all()) and bool(torch.isfinite(r).all())):
            return math.inf, False
        diff_sq += float(((g - r) ** 2).sum())
        ref_sq += float((r**2).sum())
    error = math.sqrt(diff_sq / ref_sq) if ref_sq > 0.0 else (0.0 if diff_sq == 0.0 else math.inf)
    return error, error <= tolerance
