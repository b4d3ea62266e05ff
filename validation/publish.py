"""θ in and out of the store: the validator enters window w with θ_w and publishes θ_{w+1}.

    pulls = Pulls(store, validator_dir / "checkpoints")
    source, momentum = enter_window(model, pulls, w, own_window=state.window, device=dev)
    ctx = PublishContext(cfg, model, shards, shapes, store, ledger, tokenizer, seat,
                         pulls, device)
    momentum = next_model(ctx, w, admitted, rows, group_round, report, momentum=momentum,
                          pinned=ledger_weights_at_window_start, heldout=E)

θ_w is the store's canonical checkpoint of w when there is one (what miners start from),
else the validator's own θ_w from its last outer step, else the latest published
checkpoint before w (window 0 at worst); a checkpoint comes with the outer momentum it
was published with (none for window 0).

θ_{w+1} is the outer step (Nesterov SGD, DiLoCo, arXiv:2311.08105) with the persisted
momentum on each shard's average (`validation.next_model`): the same one every miner in
step takes. If the validator rebuilt a shard from the store (it missed that group's
average) and a miner in step shares θ_{w+1} that is this model up to the wire's
rounding, it takes the miners' bits instead, so that the published checkpoint is their
model. It then publishes θ_{w+1} with its momentum and provenance: contributors with
their scores and shares of the weight, held-out losses of θ_w and θ_{w+1}, and the
model's fingerprint. If another validator published w+1 first, it adopts that one
(warning when it is not the model it computed: `tensormine verify` says why).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from averaging.outer import outer_step
from averaging.participant import Participant
from averaging.round import AveragingFailed
from chain.interface import Chain
from store.api import Store
from store.checkpoint import Contributor, Provenance
from store.errors import NotFound, StoreConflict
from tensormine.config import RunConfig
from train.model import model_fingerprint
from train.peer_state import PeerStateError, unpack_state
from train.shards import apply_to_shard, shard_state
from train.startup import adopt_checkpoint as load_if_new
from validation.admission import Admitted
from validation.group_audit import GroupRound
from validation.next_model import shard_averages
from validation.probes import page_losses
from validation.report import MinerRow, WindowReport

logger = logging.getLogger(__name__)

Momentum = dict[str, torch.Tensor]


class Pulls:
    """Checkpoints pulled (and verified) from the store, one folder a window."""

    def __init__(self, store: Store, folder: Path) -> None:
        self.store = store
        self.folder = folder

    def pull(self, window: int) -> Path:
        """The checkpoint of `window`, pulled unless it is here; `NotFound` when none."""
        target = self.folder / f"window-{window}"
        if not target.exists():
            self.store.pull_checkpoint(target, window=window, progress=False)
        return target

    def forget(self, keep: int) -> None:
        """Pulled checkpoints other than window 0 (the tokenizer's) and `keep` are removed."""
        for folder in self.folder.glob("window-*"):
            if folder.name not in ("window-0", f"window-{keep}"):
                shutil.rmtree(folder, ignore_errors=True)


def adopt_checkpoint(model: torch.nn.Module, folder: Path, device: torch.device) -> Momentum | None:
    """Take a pulled checkpoint's θ into `model` and return the outer momentum that comes
    with it (empty for window 0) on `device`; None, and `model` untouched, when it holds
    that θ already."""
    momentum = load_if_new(model, folder)
    if momentum is None:
        return None
    return {n: t.to(device) for n, t in momentum.items()}


def enter_window(
    model: torch.nn.Module, pulls: Pulls, window: int, *, own_window: int, device: torch.device
) -> tuple[str, Momentum | None]:
    """Make `model` θ_window; returns where it came from ("store:window-<w>" or "own":
    our θ from the outer step of `own_window` - 1) and the momentum to take with it
    (None: keep ours)."""
    try:
        momentum = adopt_checkpoint(model, pulls.pull(window), device)
        source = f"store:window-{window}"
    except NotFound:
        momentum = None
        if own_window == window:
            source = "own"
        else:
            earlier = [r.window for r in pulls.store.list_checkpoints() if r.window < window]
            start = max(earlier, default=0)
            momentum = adopt_checkpoint(model, pulls.pull(start), device)
            source = f"store:window-{start}"
    pulls.forget(window)
    return source, momentum


@dataclass(frozen=True)
class PublishContext:
    """What computing and publishing θ_{w+1} reads: the run's config, the model holding
    θ_w (stepped in place), its shard map and shapes, the store, the ledger (its block
    goes into the provenance), the tokenizer published along, the validator's hivemind
    seat (None without averaging), its pulled checkpoints and the device."""

    cfg: RunConfig
    model: PreTrainedModel
    shards: list[list[str]]
    shapes: Mapping[int, Mapping[str, Sequence[int]]]
    store: Store
    ledger: Chain
    tokenizer: PreTrainedTokenizerBase
    seat: Participant | None
    pulls: Pulls
    device: torch.device


def next_model(
    ctx: PublishContext,
    window: int,
    admitted: list[Admitted],
    rows: list[MinerRow],
    groups: GroupRound | None,
    report: WindowReport,
    *,
    momentum: Momentum,
    pinned: Mapping[str, float],
    heldout: torch.Tensor,
) -> Momentum:
    """θ_{w+1} into `ctx.model`: the outer step on each shard's average
    (`validation.next_model`), the same one every miner in step takes; then publish it
    with its momentum, the members and their weights, and its fingerprint. `pinned` are
    the ledger weights at the window's start (used when `groups` carries none), `heldout`
    is E. Fills `report` and returns the momentum that goes with the model now."""
    cfg, model = ctx.cfg, ctx.model
    momentum = dict(momentum)
    results, weights = groups if groups is not None else ({}, {})
    if not weights:
        weights = dict(pinned)
    scores = {row.uid: row.score for row in rows if row.uid is not None}
    updates = shard_averages(
        ctx.shapes, admitted, results, weights, cfg.averaging,
        uid_of={row.hotkey: row.uid for row in rows if row.uid is not None},
    )  # fmt: skip
    contributors: list[Contributor] = []
    theta_w = {n: t.detach().clone() for n, t in model.state_dict().items()}
    for update in updates:
        names = ctx.shards[update.shard]
        theta = shard_state(model, names)
        average = {n: t.to(ctx.device) for n, t in update.average.items()}
        buffers = {n: momentum[n] for n in names if n in momentum}
        new_params, new_momentum = outer_step(theta, average, buffers, cfg.outer)
        apply_to_shard(model, names, new_params)
        momentum.update(new_momentum)
        report.sources[f"shard{update.shard}"] = update.source
        for uid, hotkey, share in update.members:
            if uid is None:  # a registered peer that is not a miner of this window
                logger.warning("window %d: %s is in the average but no miner", window, hotkey)
                continue
            contributors.append(
                Contributor(
                    uid=uid,
                    hotkey=hotkey,
                    shard=update.shard,
                    score=scores.get(uid, 0.0),
                    weight=share,
                )
            )
    if any(u.source == "store" for u in updates):
        peers = take_peers_model(ctx, window, theta_w, report)
        momentum = peers if peers is not None else momentum
    report.fingerprint = model_fingerprint(model.state_dict())
    if contributors:
        losses = page_losses(model, heldout, batch=cfg.validation.eval_batch, device=ctx.device)
        report.next_heldout_loss = float(losses.mean())
    else:
        report.next_heldout_loss = report.heldout_loss
    if not cfg.validation.publish_checkpoint:
        return momentum
    metrics = {"heldout_loss": report.next_heldout_loss, "base_heldout_loss": report.heldout_loss}
    prov = Provenance(
        run_id=cfg.run.name, window=window + 1, ledger_block=ctx.ledger.block_number(),
        contributors=contributors, metrics=metrics, run_config=cfg.to_json_dict(),
        fingerprint=report.fingerprint,
    )  # fmt: skip
    try:
        ref = ctx.store.publish_checkpoint(model, ctx.tokenizer, prov, outer_state=momentum)
        report.published = ref.revision
    except StoreConflict as exc:
        logger.info("window %d: %s; adopting the published one if any", window + 1, exc)
        try:
            theirs = ctx.store.read_provenance(ctx.store.resolve(window=window + 1))
        except NotFound:
            logger.warning("window %d: not published here, keeping our own θ", window + 1)
            return momentum
        if theirs.fingerprint != report.fingerprint:
            logger.warning(
                "window %d: the published checkpoint (fingerprint %s) is not the model we "
                "computed (%s); adopting it (`tensormine verify --window %d` says why)",
                window + 1, (theirs.fingerprint or "none")[:16], report.fingerprint[:16],
                window,
            )  # fmt: skip
            adopted = adopt_checkpoint(model, ctx.pulls.pull(window + 1), ctx.device)
            momentum = adopted if adopted is not None else momentum
        report.adopted = f"window-{window + 1}"
    return momentum


def take_peers_model(
    ctx: PublishContext, window: int, theta_w: Mapping[str, torch.Tensor], report: WindowReport
) -> Momentum | None:
    """This validator missed a group's average and rebuilt that shard from the store,
    which differs from the group's result by the wire's rounding. If a miner in step
    shares θ_{w+1} (with its momentum) and it is that model up to the wire's rounding,
    take the miners' bits into `ctx.model` instead, so that the published checkpoint is
    their model, and return their momentum; None (our model kept) otherwise."""
    if ctx.seat is None:
        return None
    own = ctx.model.state_dict()
    budget = 3 * sum(t.numel() * 4 for t in own.values()) + (1 << 20)
    try:
        got = ctx.seat.load_state(timeout=ctx.cfg.averaging.state_timeout_s, max_bytes=budget)
        if got is None:
            return None
        weights, momentum = unpack_state(got.metadata, got.tensors, expected=own, window=window + 1)
    except (AveragingFailed, PeerStateError) as exc:
        logger.info("window %d: no usable peer state to compare with: %s", window, exc)
        return None
    num = sum(float((weights[n] - own[n]).double().norm() ** 2) for n in own)
    den = sum(float((own[n] - theta_w[n]).double().norm() ** 2) for n in own)
    error = math.sqrt(num) / max(math.sqrt(den), 1e-30)
    if error > ctx.cfg.validation.group_tolerance:
        logger.warning(
            "window %d: %s's θ_%d differs from the one rebuilt from the store by %.3g; "
            "keeping ours", window, got.hotkey, window + 1, error,
        )  # fmt: skip
        return None
    ctx.model.load_state_dict(weights)
    report.sources["peer"] = got.hotkey
    logger.info(
        "window %d: took θ_%d from %s, in step with its groups (%.3g from ours)",
        window, window + 1, got.hotkey, error,
    )  # fmt: skip
    return {n: t.to(ctx.device) for n, t in momentum.items()}
