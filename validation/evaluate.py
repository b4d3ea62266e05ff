"""Evaluation: what each admitted Δ of a window is worth, and whether it was earned.

    ctx = EvalContext(cfg, model, shards, pages.train, secret, device)
    base_loss, rows = evaluate(ctx, window, admitted, heldout=E, public=True,
                               pinned=ledger_weights_at_window_start,
                               momentum=outer_momentum, state=validator_state)

One forward pass of θ_w goes over the held-out sample E (drawn with the validator's
secret, `validation.probes`) and, with a public E, generic train pages, together with
every admitted miner's own-data pages (pages of its assignment at the inner loop's
strong-learning-rate steps, and as many control pages). Then, per contribution, θ_w −
lr·Δ is applied to its shard in place (`probes.patched_shard`), one forward pass goes
over the same pages of E and that miner's own-data pages, and θ_w is restored:

- the *score* is the loss delta on E at the Δ's share of its shard's aggregate step
  (`scoring.probe_step`), shortened for a Δ longer than `validation.norm_clip` × the
  shard's reference norm (`scoring.reference_norm`: the median weighted by the ledger
  weights pinned to the window's start, which sybils with no trust cannot move);
- the *own-data check* (`scoring.own_data_verdict`) asks whether, at the whole outer
  step, the Δ taught its assigned pages more than the controls; one inconclusive window
  after a pass is forgiven (`scoring.own_data_outcome`), and strikes persist in
  `validation.state`;
- the *held-out-rival check* (`scoring.heldout_verdict`, public E only) asks whether the
  Δ gained more on E than on generic train pages, relative to what it gained on its own
  pages and to the median of the window's cohort;
- the *copy check* (`scoring.find_copies`) marks a later near-duplicate of another Δ of
  the same shard, ordered by the ledger block of their commitments.

A contribution that fails a check scores zero (`scoring.window_score`); its row carries
the numbers and a one-word verdict (`report.verdict`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tensormine.config import RunConfig
from train.inner import lr_at
from train.pages import Affinity
from train.shards import holds_head, shard_state
from validation.admission import Admitted
from validation.probes import generic_pages, own_data_pages, page_losses, patched_shard
from validation.report import SCORED, MinerRow, verdict
from validation.scoring import (
    OWN_FAIL,
    OWN_GRACE,
    OWN_OFF,
    OWN_PASS,
    OWN_POW,
    clip_factor,
    delta_norm,
    find_copies,
    find_replays,
    flatten,
    heldout_outcome,
    heldout_verdict,
    loss_delta,
    own_data_outcome,
    own_data_verdict,
    probe_step,
    reference_norm,
    window_score,
)
from validation.state import ValidatorState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalContext:
    """What every window's evaluation reads: the run's config, the model holding θ_w
    (patched and restored in place), its shard map, the public train pages, the
    validator's sampling secret and the device to run on."""

    cfg: RunConfig
    model: torch.nn.Module
    shards: list[list[str]]
    train_pages: np.ndarray
    secret: bytes
    device: torch.device
    affinities: Mapping[int, Affinity] = field(default_factory=dict)
    """Each expert shard's page affinity (`train.data.shard_affinities`)."""


def evaluate(
    ctx: EvalContext,
    window: int,
    admitted: Sequence[Admitted],
    *,
    heldout: torch.Tensor,
    public: bool,
    pinned: Mapping[str, float],
    momentum: Mapping[str, torch.Tensor],
    state: ValidatorState,
    earlier: Sequence[Admitted] = (),
) -> tuple[float, list[MinerRow]]:
    """Loss delta, own-data, held-out-rival and copy verdicts for each admitted
    contribution; returns L(θ_w; E) (`heldout`, from the public split when `public`) and
    one row per contribution (order of `admitted`). `pinned` are the ledger weights at the
    window's start (hotkey -> weight), `momentum` the outer momentum, `state` the strikes
    and flags of earlier windows, `earlier` the last window's admitted Δ (for replays)."""
    cfg, vcfg, model = ctx.cfg, ctx.cfg.validation, ctx.model
    n_train = ctx.train_pages.shape[0]
    held = heldout
    n_e = held.shape[0]
    # The held-out-rival check needs E public, the own pages and generic pages.
    rival = public and vcfg.own_data_pairs > 0 and vcfg.heldout_rival_pages > 0
    if rival:
        generic = generic_pages(ctx.secret, window, n_train, vcfg.heldout_rival_pages)
        held = torch.cat([held, torch.from_numpy(ctx.train_pages[generic])])
    n_head = held.shape[0]
    probes: list[torch.Tensor] = []
    peak = max(lr_at(s, cfg.train) for s in range(cfg.train.inner_steps))
    strong = [
        s
        for s in range(cfg.train.inner_steps)
        if lr_at(s, cfg.train) >= vcfg.own_data_lr_fraction * peak
    ]
    for a in admitted:
        assigned, control = own_data_pages(
            ctx.secret, a.hotkey, window, cfg.run.seed, n_train,
            cfg.train.pages_per_window, vcfg.own_data_pairs,
            batch_size=cfg.train.batch_size, steps=strong, affinity=ctx.affinities.get(a.shard),
        )  # fmt: skip
        probes.append(torch.from_numpy(ctx.train_pages[np.concatenate([assigned, control])]))
    # One base pass over E and every miner's own-data pages together.
    base = page_losses(model, torch.cat([held, *probes]), batch=vcfg.eval_batch, device=ctx.device)
    base_e = float(base[:n_e].mean())
    offsets = np.cumsum([n_head] + [p.shape[0] for p in probes])
    grace_t = min(vcfg.own_data_grace_t, vcfg.own_data_min_t)
    rows: list[MinerRow] = []
    rival_rows: list[MinerRow] = []
    head_gains: list[torch.Tensor] = []  # per page of E and the generic pages
    own_gains: list[torch.Tensor] = []  # per sampled assigned page
    steps = probe_steps(cfg, admitted, pinned)
    checks = vcfg.own_data_pairs > 0
    deferred = vcfg.pow_checks > 0 and cfg.train.pow_segments > 0
    for i, a in enumerate(admitted):
        names = ctx.shards[a.shard]
        theta = shard_state(model, names)
        # The checks compare how much a Δ taught its own pages, E and generic pages:
        # memorized pages stand out at the whole outer step (their thresholds were
        # calibrated there). The score is the loss the Δ removes at its share of the
        # aggregate step (`scoring.probe_step`): a second pass, over E alone.
        if checks:
            with patched_shard(model, names, theta, a.delta, cfg.outer.lr):
                new = page_losses(
                    model, torch.cat([held, probes[i]]), batch=vcfg.eval_batch,
                    device=ctx.device,
                )  # fmt: skip
        if not checks or steps[i] != cfg.outer.lr:
            with patched_shard(model, names, theta, a.delta, steps[i]):
                scored = page_losses(model, held[:n_e], batch=vcfg.eval_batch, device=ctx.device)
        else:
            scored = new[:n_e]
        gain = loss_delta(base_e, float(scored.mean()))
        row = MinerRow(
            uid=a.uid, hotkey=a.hotkey, shard=a.shard, status=SCORED, loss_delta=gain,
            step=steps[i],
        )  # fmt: skip
        rows.append(row)
        if vcfg.own_data_pairs == 0:
            row.own_outcome, row.own_ok = OWN_OFF, True
            continue
        half = probes[i].shape[0] // 2
        mine = base[offsets[i] : offsets[i + 1]]
        own = own_data_verdict(
            mine[:half], new[n_head : n_head + half], mine[half:], new[n_head + half :],
            min_margin=vcfg.own_data_min_margin, min_t=vcfg.own_data_min_t,
        )  # fmt: skip
        row.own_outcome = own_data_outcome(
            own, min_margin=vcfg.own_data_min_margin, grace_t=grace_t,
            strikes=strikes(state, a.uid, a.hotkey),
        )  # fmt: skip
        row.own_margin, row.own_t = own.margin, own.t
        row.own_ok = row.own_outcome in (OWN_PASS, OWN_GRACE)
        if deferred and not holds_head(names):
            # Blind without the LM head (inner layers, an expert group: scoring.OWN_POW):
            # proof of work, which recomputes its steps on its assigned pages, decides
            # whether it trained on them.
            row.own_outcome, row.own_ok = OWN_POW, True
        if rival:  # with private held-out files, training on the public split pays nothing
            head_gains.append(base[:n_head] - new[:n_head])
            own_gains.append(mine[:half] - new[n_head : n_head + half])
            rival_rows.append(row)
    copy_check(cfg, ctx.shards, admitted, rows, momentum, earlier)
    heldout_check(cfg, state, rival_rows, head_gains, own_gains, n_e)
    for a, row in zip(admitted, rows, strict=True):
        row.score = window_score(
            row.loss_delta if row.loss_delta is not None else math.nan,
            admitted=True, own_ok=bool(row.own_ok), copied=row.copy_of is not None,
            heldout_ok=row.heldout_ok is not False,
        )  # fmt: skip
        row.verdict = verdict(row)
        logger.debug("window %d uid %d: %s", window, a.uid, row)
    return base_e, rows


def probe_steps(
    cfg: RunConfig, admitted: Sequence[Admitted], pinned: Mapping[str, float]
) -> list[float]:
    """The step along each admitted Δ at which it is measured: its share of its shard's
    aggregate step, shortened for a Δ longer than `norm_clip` × its shard's reference
    norm (`scoring.reference_norm`: the median weighted by the ledger weights `pinned` to
    the window's start, which sybils with no trust cannot move)."""
    floor = cfg.averaging.weight_floor
    norms = [delta_norm(a.delta) for a in admitted]
    steps = []
    for a, norm in zip(admitted, norms, strict=True):
        peers = [(b, n) for b, n in zip(admitted, norms, strict=True) if b.shard == a.shard]
        reference = reference_norm(
            [n for _, n in peers], [pinned.get(b.hotkey, floor) for b, _ in peers]
        )
        step = probe_step(cfg.outer.lr, len(peers), cfg.validation.probe_lr)
        steps.append(step * clip_factor(norm, reference, cfg.validation.norm_clip))
    return steps


def heldout_check(
    cfg: RunConfig,
    state: ValidatorState,
    rows: list[MinerRow],
    head_gains: list[torch.Tensor],
    own_gains: list[torch.Tensor],
    n_e: int,
) -> None:
    """The held-out-rival verdict of each row (`scoring.heldout_verdict`). Each page's
    gain is taken relative to the median gain on that page of the cohort: the window's
    contributions that are no copies and pass the own-data check, when there are three
    or more (a majority that trains on held-out pages is not caught, but then it gains
    nothing on the others either: weights are shares); with fewer, the comparison is
    unpaired and the ratio bar doubles."""
    if not rows:
        return
    vcfg = cfg.validation
    peers = [g for r, g in zip(rows, head_gains, strict=True) if r.copy_of is None and r.own_ok]
    cohort = torch.stack(peers).median(dim=0).values if len(peers) >= 3 else None
    # Unpaired, the pages' difficulty stays in the noise (honest ratios reached 0.35 in
    # trials): twice the bar then.
    max_ratio = vcfg.heldout_rival_ratio * (1.0 if cohort is not None else 2.0)
    for row, gains, own in zip(rows, head_gains, own_gains, strict=True):
        rival = heldout_verdict(
            gains[:n_e], gains[n_e:], own,
            max_ratio=max_ratio, min_t=vcfg.own_data_min_t,
            cohort_heldout=None if cohort is None else cohort[:n_e],
            cohort_generic=None if cohort is None else cohort[n_e:],
        )  # fmt: skip
        row.heldout_excess, row.heldout_ratio = rival.excess, rival.ratio
        row.heldout_t = rival.t
        row.heldout_outcome = heldout_outcome(
            rival.ok, flagged_before=heldout_flags(state, row),
            strikes=vcfg.heldout_rival_strikes,
        )  # fmt: skip
        row.heldout_ok = row.heldout_outcome != OWN_FAIL


def heldout_flags(state: ValidatorState, row: MinerRow) -> int:
    """Held-out-rival flags of `row`'s UID in the windows just before (0 when the UID
    changed hands since)."""
    if row.uid is None or state.hotkeys.get(row.uid) != row.hotkey:
        return 0
    return state.heldout_flags.get(row.uid, 0)


def strikes(state: ValidatorState, uid: int, hotkey: str) -> int:
    """Own-data strikes of `uid` (0 when the UID changed hands since)."""
    if state.hotkeys.get(uid) != hotkey:
        return 0
    return state.own_strikes.get(uid, 0)


def copy_check(
    cfg: RunConfig,
    shards: list[list[str]],
    admitted: Sequence[Admitted],
    rows: list[MinerRow],
    momentum: Mapping[str, torch.Tensor],
    earlier: Sequence[Admitted] = (),
) -> None:
    """Mark later near-duplicates within each shard (by the ledger block of their
    commitments, then hotkey), and replays of a Δ admitted in the last window
    (`scoring.find_replays`)."""
    for shard in sorted({a.shard for a in admitted}):
        members = sorted(
            (i for i, a in enumerate(admitted) if a.shard == shard),
            key=lambda i: (admitted[i].committed_block, admitted[i].hotkey),
        )
        names = sorted(shards[shard])
        # The outer momentum (a running sum of past updates) helps name the direction
        # every honest Δ shares, so that it does not count as copying.
        reference = (
            flatten({n: momentum[n].cpu() for n in names})
            if all(n in momentum for n in names)
            else None
        )
        copies = find_copies(
            [flatten(admitted[i].delta) for i in members], cfg.validation.copy_threshold,
            reference, family_gap=cfg.validation.copy_family_gap,
        )  # fmt: skip
        for pos, found in copies.items():
            row = rows[members[pos]]
            row.copy_of = admitted[members[found.original]].uid
            row.copy_cosine = found.cosine
        before = [b for b in earlier if b.shard == shard]
        replays = find_replays(
            [flatten(admitted[i].delta) for i in members], [flatten(b.delta) for b in before],
            cfg.validation.replay_threshold,
        )  # fmt: skip
        for pos, found in replays.items():
            row = rows[members[pos]]
            if row.copy_of is None:
                row.copy_of = before[found.original].uid
                row.copy_cosine = found.cosine
