"""The validator's arithmetic: loss delta, own-data verdict, copy check, moving average, weights.

    from validation.scoring import (probe_step, clip_factor, loss_delta, own_data_verdict,
                                    own_data_outcome, heldout_verdict, find_copies,
                                    window_score, update_ema, normalized_weights,
                                    compare_group_average)

    step = probe_step(outer_lr, n_shard) * clip_factor(norm_i, median_norm, clip=1.0)
    gain = loss_delta(base_E, new_E)                       # L(θ_w; E) − L(θ_w − step·Δ_i; E)
    own = own_data_verdict(base_A, new_A, base_C, new_C, min_margin=0.0, min_t=2.0)
    outcome = own_data_outcome(own, min_margin=0.0, grace_t=1.5, strikes=0)  # pass/grace/fail
    rival = heldout_verdict(gain_E, gain_generic, gain_A, max_ratio=0.5, min_t=2.0)
    copies = find_copies(deltas, threshold=0.8, reference=momentum)   # later -> original
    score = window_score(gain, admitted=True, own_ok=outcome != "fail", copied=False,
                         heldout_ok=rival.ok)
    ema = update_ema(ema, {uid: score, ...}, alpha=0.3)
    weights = normalized_weights(ema)                     # Σ = 1, or {} when all zero

Everything here is pure (tensors and numbers in, numbers out; no model, no I/O), so tests
check it against closed forms. The rules, and why:

- **Loss delta** on the held-out sample E is the score's core: how much loss the
  contribution removes when applied to θ_w at its share of the aggregate step,
  `outer.lr / n` for the n admitted contributions of its shard (`probe_step`), since that
  is what it moves the next global model by. Measured at the whole outer step instead, a
  lone Δ is a lone worker's model, and once the easy loss is gone its gain is dominated by
  the second-order term (its noise times the curvature): on the demo's tiny model each
  honest Δ alone *raised* the held-out loss by 0.03–0.18 from the fourth window on while
  their average lowered it, and at 1/4 of the step the same Δs lowered it by 0.01–0.05
  (`benchmarks/RESULTS.md`, "Probe step"). Before measuring, a Δ longer than `norm_clip` ×
  the median norm of its shard's Δs is scaled down to it (`clip_factor`), so that
  inflating a Δ to move further along a good direction earns nothing. A negative
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
  after removing the direction shared by the other contributions, leaving out the pair's
  own near-duplicates so that colluding copies cannot cancel each other, and the outer
  momentum (`residual_cosines`, which says how and what was measured). Of a
  near-duplicate pair the later one (by the store's `received_at`) is the copy; a copier
  that adds noise larger than this hides from the check but also fails the own-data
  check and removes less loss.
- **Held-out rival** (DESIGN "Data": training on the public held-out split must not pay):
  the gain on E beyond generic train pages must stay below `heldout_rival_ratio` × the
  gain on the miner's own pages beyond them (`heldout_verdict`).
- **Own-data outcome**: one inconclusive window after a pass is forgiven
  (`own_data_outcome`), since one noisy window must not cost an honest miner its share.
- **Moving average**: `m ← (1 − α)·m + α·s` for every miner of the window (one without
  a contribution scores 0); weights are the averages normalized to sum 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


def probe_step(outer_lr: float, contributions: int, override: float | None = None) -> float:
    """The step along Δ_i at which its loss delta is measured: `override` when set, else
    its share of the aggregate step, outer_lr / (admitted contributions of its shard)."""
    if override is not None:
        return float(override)
    if contributions < 1:
        raise ValueError(f"a shard with {contributions} contributions has nothing to measure")
    return float(outer_lr) / contributions


def reference_norm(norms: Sequence[float], weights: Sequence[float]) -> float:
    """The clip's reference for a shard: the median of its Δ norms weighted by each miner's
    ledger weight (the pinned `averaging.weights` the groups use: trust, at least the
    floor). Fresh or zero-trust hotkeys carry only the floor, so a crowd of sybils
    publishing huge Δ cannot lift it once honest miners have trust (before the first epoch
    everyone weighs the same and it is the plain median). The lower weighted median: the
    smallest norm at which the cumulative weight reaches half."""
    if len(norms) != len(weights) or not norms:
        raise ValueError("need one weight per norm, and at least one norm")
    pairs = sorted(zip(norms, weights, strict=True))
    total = sum(w for _, w in pairs)
    if not total > 0:
        raise ValueError("weights must sum to a positive number")
    running = 0.0
    for norm, weight in pairs:
        running += weight
        if running >= total / 2:
            return float(norm)
    return float(pairs[-1][0])


def clip_factor(norm: float, median_norm: float, clip: float) -> float:
    """The factor (≤ 1) that brings a Δ of `norm` down to `clip` × the shard's median norm;
    1 when `clip` is 0 (off), the norm is within bounds, or there is nothing to compare."""
    if clip <= 0 or not math.isfinite(norm) or norm <= 0 or not median_norm > 0:
        return 1.0
    return min(1.0, clip * median_norm / norm)


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


OWN_PASS = "pass"  # the paired gap beat the full bar (margin and t ≥ min_t)
OWN_GRACE = "grace"  # inconclusive (grace_t ≤ t < min_t) after a pass: credited, one strike
OWN_FAIL = "fail"  # t < grace_t, or inconclusive again: no credit
OWN_OFF = "off"  # the check is turned off (own_data_pairs = 0)
# The Δ of a shard without the LM head (inner layers, an expert group) with proof of work
# on: the paired gap is measured and reported, but proof of work decides (such a shard
# shows the pages it saw weakly: in benchmarks/bench_moe.py its median own-data t is ≈ 1
# for an expert group and 1.3–2.4 for inner layers, the head's shard's 2.2–2.5, an MoE's
# shared shard's about 3; `train.shards.holds_head`).
OWN_POW = "pow"


def own_data_outcome(
    verdict: OwnDataVerdict, *, min_margin: float, grace_t: float, strikes: int
) -> str:
    """What a window's own-data verdict means for the miner's credit, given `strikes`: how
    many windows in a row (before this one) it has not passed outright.

    `pass` when `verdict.ok`. An *inconclusive* verdict (mean gap > `min_margin`, `grace_t`
    ≤ t < the full bar) is `grace` (credited) when the miner passed its last checked window
    or has no history (strikes 0), else `fail`; a gap that is plainly absent (t < `grace_t`
    or mean gap ≤ `min_margin`) is always `fail`.

    Why (`validation.own_data_grace_t` = 1.5 by default): with 8 pairs an honest miner's t
    varies a lot. In the demo 31 of 32 honest verdicts had t = 2.3–7.7 and one t = 1.84
    (margin +0.25), in the window with by far the largest loss delta: zero credit there
    cost that miner nearly all its emission. Doubling the pairs would double the check's
    forward-pass cost (about +1× a pass over E); forgiving one inconclusive window after a
    pass costs nothing, and an honest miner then loses a window only on a plain failure or
    two inconclusive windows in a row (~0.1 % at the demo's rate). Miners trained on other
    pages showed t ≤ 0.7 in most windows of the tests (up to 1.8 in a few): they still fail
    every window below 1.5, and are forgiven at most once per outright pass (and in their
    first window), so their credit grows by at most the chance of 1.5 ≤ t < 2 once per
    pass. Pure noise reaches t ≥ 1.5 in ~7 % of first windows, with a loss delta of ~0.
    `grace_t` ≥ the full bar turns the grace off.
    """
    if verdict.ok:
        return OWN_PASS
    if strikes == 0 and verdict.pairs > 0 and verdict.margin > min_margin and verdict.t >= grace_t:
        return OWN_GRACE
    return OWN_FAIL


def heldout_outcome(ok: bool, *, flagged_before: int, strikes: int) -> str:
    """What a window's held-out-rival verdict means for the miner's credit: `pass` when
    `ok`; when flagged, `fail` (no credit) once this makes `strikes` flagged windows in a
    row (`flagged_before` of them came just before), else `grace` (credited).

    Why (`validation.heldout_rival_strikes` = 2 by default): a held-out trainer gains on E
    in every window, but one window's excess is weak evidence. E's pages are not
    independent (several come from one document, and the corpus has families of similar
    files), so a miner whose pages happen to share a topic with E shows an excess with a
    t that overstates it: in the demo an honest miner was flagged in one window by one
    validator (excess 0.14 nats, t 3.7, ratio 0.38; the other validator's E gave 0.04)
    and lost most of its run's emission. Such luck does not repeat with fresh pages, a
    held-out trainer's excess does, so two flagged windows in a row cost the credit.
    """
    if ok:
        return OWN_PASS
    return OWN_FAIL if flagged_before + 1 >= strikes else OWN_GRACE


@dataclass(frozen=True)
class HeldoutVerdict:
    """How a contribution's gain on the public held-out sample E compares with its gain on
    its own assigned pages, both beyond its gain on generic train pages."""

    excess: float  # mean gain on E − mean gain on the generic pages, in nats
    own_excess: float  # mean gain on the assigned pages − on the generic pages
    ratio: float  # excess / own_excess (inf when own_excess ≤ 0 < excess; 0 when excess ≤ 0)
    t: float  # excess / its standard error (Welch)
    ok: bool


def heldout_verdict(
    gain_heldout: torch.Tensor,
    gain_generic: torch.Tensor,
    gain_assigned: torch.Tensor,
    *,
    max_ratio: float,
    min_t: float,
    cohort_heldout: torch.Tensor | None = None,
    cohort_generic: torch.Tensor | None = None,
) -> HeldoutVerdict:
    """Did the contribution learn the public held-out split about as well as its own pages?

    Per-page gains (loss before − after applying Δ) on E, on generic train pages (drawn
    with the secret, the same for every miner) and on the miner's sampled assigned pages.
    Raw gains are mostly the generic improvement every page shares (on the tiny test model
    an honest miner's gain on E is 0.05–0.7 of its gain on its own pages, by window), so
    the held-out side is measured beyond the generic pages: `excess` = mean gain on E −
    mean gain on the generic pages, ≈ 0 for a miner that saw neither. With
    `cohort_heldout` / `cohort_generic` (per page, the median gain of the window's
    contributions) each page's gain is taken relative to the cohort's first: the pages'
    difficulty, the largest part of the noise, cancels pair by pair (as in the own-data
    check), and what is left is how much more this Δ gains on E than the others do. A
    miner that trained on held-out pages gains on E beyond generic pages: pages of one
    document teach each other, so E pays without being predictable. (The cohort pairing
    assumes Δ of about one scale, as one train config gives: a Δ k times the cohort's
    carries k − 1 times the window's E-versus-generic offset into its excess.)

    `own_excess` = mean gain on the assigned pages − on the generic pages (what it learned
    from its own data). Not `ok` iff the excess is real (its Welch t ≥ `min_t`) and
    rivals the own pages' (`excess` ≥ `max_ratio` × `own_excess`, or `own_excess` ≤ 0).

    The default `validation.heldout_rival_ratio` 0.3, measured on the tiny test model
    with 4 honest miners and one that trains on public held-out pages for half of its
    steps (`train.adversary`'s `heldout`), 6 runs × 3 windows, cohort-relative: honest
    ratios ≤ 0.24 (72 miner-windows, none flagged), the held-out trainer's 0.22–1.8; at
    0.3 it earned nothing in 16 of 18 windows (the own-data check caught some of those),
    at 0.5 in 11. The window from θ_0 is the weak spot (every page gains about alike).
    Without a cohort (fewer than 3 contributions) the unpaired comparison is noisier:
    honest ratios reached 0.35 in the same trials, so the validator doubles the bar.
    """
    e, g = gain_heldout.double(), gain_generic.double()
    own_excess = float(gain_assigned.double().mean() - g.mean())
    if cohort_heldout is not None and cohort_generic is not None:
        e, g = e - cohort_heldout.double(), g - cohort_generic.double()
    excess = float(e.mean() - g.mean())
    if excess <= 0:
        return HeldoutVerdict(excess, own_excess, 0.0, 0.0, True)
    var = sum(float(x.var(unbiased=True)) / x.numel() for x in (e, g) if x.numel() > 1)
    t = excess / math.sqrt(var) if var > 0 else math.inf
    ratio = excess / own_excess if own_excess > 0 else math.inf
    return HeldoutVerdict(excess, own_excess, ratio, t, not (t >= min_t and ratio >= max_ratio))


def delta_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """‖Δ‖ over all its tensors, as `flatten(delta).norm()` but without the copy."""
    return math.sqrt(sum(float(t.detach().float().norm()) ** 2 for t in delta.values()))


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


def _gram(
    rows: torch.Tensor, extra: torch.Tensor | None = None, chunk: int = 1 << 20
) -> torch.Tensor:
    """`rows @ rows.T` in fp64, with `extra` (one more vector) as a last row when given,
    a slice of columns at a time (no fp64 copy of all rows, no concatenated copy).

    Entry (a, b) involves rows a and b alone, so a non-finite row spoils only its own
    row and column (its diagonal is then inf or NaN).
    """
    n = rows.shape[0] + (extra is not None)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, rows.shape[1], chunk):
        part = rows[:, start : start + chunk].double()
        if extra is not None:
            part = torch.cat([part, extra[start : start + chunk].double().unsqueeze(0)])
        gram += part @ part.T
    return gram


def _unit_gram(vectors: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    """Cosines of the rows (and of `reference`, as the last row) [N, N] in fp64; a zero or
    non-finite row gets zeros everywhere, its diagonal included (it is as if absent)."""
    n = vectors.shape[0]
    gram = _gram(vectors.reshape(n, -1), None if reference is None else reference.reshape(-1))
    diag = gram.diagonal()
    good = torch.isfinite(diag) & (diag > 0)
    inv = torch.where(good, 1.0 / diag.sqrt().clamp(min=1e-300), torch.zeros_like(diag))
    both = good.unsqueeze(0) & good.unsqueeze(1)
    unit: torch.Tensor = torch.where(
        both, gram * inv.unsqueeze(0) * inv.unsqueeze(1), torch.zeros_like(gram)
    )
    return unit


def _pair_cosines(
    c: torch.Tensor, i: int, js: torch.Tensor, r: int | None, voters: torch.Tensor, gap: float
) -> torch.Tensor:
    """`residual_cosines` of row i with each row in `js` (see there), vectorized over j.

    `c` is the cosine matrix (the reference, if any, is row `r`); `voters` marks the rows
    whose single-removal cosines set the median (every nonzero row k ∉ {i, j} is a
    candidate). Closed forms on `c` only: projecting out the span of x̂_k (and r̂) from x̂_i
    and x̂_j leaves `p_ij = c_ij − g_iᵀ M⁻¹ g_j` with M the 2×2 Gram of {x̂_k, r̂}.
    """
    n = voters.shape[0]
    valid = c.diagonal()[:n] > 0
    ci, cj = c[i, :n], c[js, :n]  # [n], [J, n]
    cij = c[i, js].unsqueeze(1)
    if r is None:
        pij = cij - ci * cj
        pii, pjj = 1.0 - ci**2, 1.0 - cj**2
    else:
        ckr, cir, cjr = c[:n, r], c[i, r], c[js, r].unsqueeze(1)
        det = (1.0 - ckr**2).clamp(min=1e-12)

        def q(
            ak: torch.Tensor, ar: torch.Tensor, bk: torch.Tensor, br: torch.Tensor
        ) -> torch.Tensor:
            return (ak * bk - ckr * (ak * br + ar * bk) + ar * br) / det

        pij = cij - q(ci, cir, cj, cjr)
        pii, pjj = 1.0 - q(ci, cir, ci, cir), 1.0 - q(cj, cjr, cj, cjr)
    den = (pii.clamp(min=0) * pjj.clamp(min=0)).sqrt()
    single = torch.where(den > 1e-12, pij / den.clamp(min=1e-300), torch.zeros_like(pij))
    others = valid.unsqueeze(0).repeat(js.numel(), 1)
    others[:, i] = False
    others[torch.arange(js.numel()), js] = False
    # The upper median: with as many family rows as honest ones, the honest value decides.
    median = torch.where(others & voters, single, torch.nan).nanquantile(
        0.5, dim=1, interpolation="higher"
    )
    keep = others & ((single >= (median - gap).unsqueeze(1)) | median.isnan().unsqueeze(1))
    # v = Σ_kept (cos(k,i) + cos(k,j)) x̂_k, then r̂ and what of v is orthogonal to r̂ go.
    coef = torch.zeros(js.numel(), c.shape[0], dtype=torch.float64)
    coef[:, :n] = torch.where(keep, ci + cj, torch.zeros_like(cj))
    cv = coef @ c
    vv = (coef * cv).sum(1)
    vi, vj = cv[:, i], cv[torch.arange(js.numel()), js]
    pij, pii, pjj = c[i, js].clone(), torch.ones_like(vv), torch.ones_like(vv)
    if r is not None:
        ri, rj, vr = c[i, r], c[js, r], cv[:, r]
        pij, pii, pjj = pij - ri * rj, pii - ri * ri, pjj - rj * rj
        vv, vi, vj = vv - vr * vr, vi - vr * ri, vj - vr * rj
    some = vv > 1e-12
    safe = vv.clamp(min=1e-12)
    pij = torch.where(some, pij - vi * vj / safe, pij)
    pii = torch.where(some, pii - vi * vi / safe, pii)
    pjj = torch.where(some, pjj - vj * vj / safe, pjj)
    # i or j inside the removed span: nothing of its own is left to compare.
    left = (pii > 1e-12) & (pjj > 1e-12)
    cos = pij / (pii.clamp(min=1e-12) * pjj.clamp(min=1e-12)).sqrt()
    return torch.where(left, cos.clamp(-1.0, 1.0), torch.zeros_like(cos))


def residual_cosines(
    vectors: torch.Tensor,
    reference: torch.Tensor | None = None,
    *,
    family_gap: float = 0.15,
) -> torch.Tensor:
    """Pairwise cosine of the rows of `vectors` [n, d] after removing what honest rows share.

    For the pair (i, j), the others that speak for the common direction are every row
    k ∉ {i, j} except the pair's *family*: rows that are near-duplicates of i or j
    themselves. Removing a family member alone explains the pair's similarity away (its
    idiosyncratic part included) where removing an honest row explains only the shared
    part. So with `s_k` the pair's cosine once x_k (and the `reference`) is projected
    out, k is family iff `s_k < median − family_gap`, the (upper) median running over the
    rows that share more than chance with some other row (pure-noise rows neither vote
    nor get a say). What is left of i and j once the span of the `reference` (e.g. the
    outer momentum) and of `v = Σ_{k kept} (cos(k,i) + cos(k,j)) x̂_k` (rows aligned
    with the pair weigh more, noise rows nearly nothing) is projected out is compared by
    cosine. With no other row and no reference it is the plain cosine. Zero and
    non-finite rows compare as 0 with every row.

    Why not the sum of *all* others (the first design): k copies of one original then
    define the common direction for each other and cancel (with the copier's scale 1.7
    and noise 0.3, 3 copies among 4 honest rows all passed the 0.8 threshold). Measured
    on the tiny test model's Δ of 6 honest miners over 4 windows, plus such copies:
    honest pairs ≤ 0.43 (the old rule: ≤ 0.55); 1 to 4 copies of one original among 4
    honest rows all ≥ 0.84 (old: 0.62–0.93, none found from 3 copies on in 3 of 4
    windows); with 3 pure-noise rows among 4 honest ones, honest pairs ≤ 0.42 (old:
    ≤ 0.73). A family is told apart while it is at most as large as the honest rest of
    the pair's others; colluders that share one Δ which is not itself published (no
    original among the rows) lose their common part with the noise each adds and can
    stay under the threshold, as a lone copier with more noise does (it then also
    removes less loss and fails the own-data check). The price: with very few rows,
    honest miners that form a tight cluster (a direction two or three of them share and
    the rest lack) can look as alike as a family; in a synthetic with such clusters among
    4 honest rows their residual cosine rose from ≤ 0.67 to ≤ 0.79 (the real Δ above and
    the demo's 4 miners showed no such rise: ≤ 0.31 there, old rule ≤ 0.34).

    Cost: the Gram matrix once (O(n²d)), then O(n³) on it.
    """
    n = vectors.shape[0]
    c = _unit_gram(vectors, reference)
    r = n if reference is not None and float(c[n, n]) > 0 else None
    valid = c.diagonal()[:n] > 0
    # Rows that share more with some other row than chance (4 σ of the cosine of two
    # random directions in d dimensions) vote; pure noise shares nothing with anything.
    chance = 4.0 / math.sqrt(max(1, vectors[0].numel() if n else 1))
    nearest = (c[:n, :n] - torch.eye(n, dtype=torch.float64)).abs().amax(dim=1) if n > 1 else None
    counts = valid if nearest is None else valid & (nearest > chance)
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n - 1):
        js = torch.nonzero(valid[i + 1 :]).flatten() + i + 1
        if valid[i] and js.numel():
            out[i, js] = out[js, i] = _pair_cosines(c, i, js, r, counts, family_gap)
    out.fill_diagonal_(1.0)
    return out


def find_copies(
    vectors: Sequence[torch.Tensor],
    threshold: float,
    reference: torch.Tensor | None = None,
    *,
    family_gap: float = 0.15,
) -> dict[int, CopyVerdict]:
    """Which Δ are near-duplicates of an earlier one, given in arrival order.

    `vectors[i]` is the flattened Δ that arrived i-th (ties broken by the caller); pairs
    are compared by `residual_cosines` (the direction every honest miner shares removed,
    so honest miners trained from the same θ_w are not mistaken for copies). Entry i maps
    to the earliest j < i whose residual cosine with i exceeds `threshold`; the earliest of
    a family of duplicates keeps its credit, every later member is a copy (also a copy of
    a copy: its original is still the earliest). Indices not in the result are not copies.
    A zero or non-finite vector is neither a copy nor an original (admission refuses
    non-finite ones; here they are skipped so that they cannot spoil the others' cosines).
    """
    if not vectors:
        return {}
    stack = torch.stack([v.reshape(-1) for v in vectors])
    sims = residual_cosines(stack, reference, family_gap=family_gap)
    copies: dict[int, CopyVerdict] = {}
    for i in range(1, len(vectors)):
        for j in range(i):
            if float(sims[i, j]) > threshold:
                root = copies[j].original if j in copies else j
                copies[i] = CopyVerdict(original=root, cosine=float(sims[i, j]))
                break
    return copies


def find_replays(
    current: Sequence[torch.Tensor], earlier: Sequence[torch.Tensor], threshold: float
) -> dict[int, CopyVerdict]:
    """Which of this window's Δ replay a Δ admitted in an earlier window: entry i maps to
    the earlier Δ j with the highest plain cosine, when it reaches `threshold`.

    Plain, not residual, cosine: two windows' Δ were trained from different models on
    different pages, so honest ones are far from collinear (a Δ is never an earlier one
    again), while a replay, rescaled or not, points the same way. A replay hidden under
    noise falls below the threshold and then fails the own-data check instead (it was
    not trained on this window's pages). Zero vectors match nothing."""
    if not current or not earlier:
        return {}
    stack = torch.stack([v.reshape(-1) for v in [*current, *earlier]])
    sims = cosine_matrix(stack)[: len(current), len(current) :]
    found: dict[int, CopyVerdict] = {}
    for i in range(len(current)):
        j = int(torch.argmax(sims[i]))
        if float(sims[i, j]) >= threshold:
            found[i] = CopyVerdict(original=j, cosine=float(sims[i, j]))
    return found


def window_score(
    gain: float, *, admitted: bool, own_ok: bool, copied: bool, heldout_ok: bool = True
) -> float:
    """A contribution's score for the window: its positive loss delta, if it earns credit."""
    if not admitted or not own_ok or copied or not heldout_ok or not math.isfinite(gain):
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
