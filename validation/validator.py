"""The validator process: score every contribution of every window, set weights, publish θ_{w+1}.

    python -m validation.validator --config configs/tiny.yaml --hotkey validator-0
    tensormine validator run --config configs/tiny.yaml --hotkey validator-0 --windows 5
    tensormine validator report --config configs/tiny.yaml --hotkey validator-0 --last 3

Every window w, once the ledger reaches w's deadline block, the validator
1. enters with θ_w: the store's canonical checkpoint of w when there is one (what miners
   start from), else its own θ_w from its last outer step, else the latest published
   checkpoint before w (window 0 at worst, which it writes if no miner has yet);
2. lists the contributions of w in every miner's own store (the location in its ledger
   commitment, `store.sources`; its own store for miners that committed none), taking a
   hotkey's contributions only from the location that hotkey committed, and admits each
   one (`validation.admission`): signature, window and shard, sha256, shapes and dtypes,
   finite values (decoded too), size, compression, and arrival before the deadline block;
   a refusal scores 0 with its reason code;
3. runs one forward pass of θ_w over its held-out sample E (drawn with its own secret,
   from its private `validation.heldout_files` when it has some, else the public split)
   and, with a public E, generic train pages, together with every admitted miner's
   own-data pages; then, per contribution, applies θ_w − lr·Δ to the contribution's shard
   in place, makes one forward pass over the same pages of E and that miner's own-data
   pages, and restores θ_w (`validation.probes`);
4. scores: loss delta on E, zero when the own-data check fails (one inconclusive window
   after a pass is forgiven; the strikes persist), when the gain on a public E rivals the
   gain on the miner's own pages, or when the Δ copies an earlier one
   (`validation.scoring`); updates the moving average per UID and, every
   `validation.weights_every` windows, sets the normalized averages as weights;
5. aggregates the credited Δ of each shard weighted by score (`averaging.robust`), takes
   the outer Nesterov step with its persisted momentum, and publishes θ_{w+1} with
   provenance (contributors, scores, held-out losses); if another validator published
   w+1 first, it adopts that one;
6. saves its state atomically (`validation.state`), checks the hivemind group averages of
   w it took part in as an auxiliary peer against the admitted Δ, appends the window's
   record (group checks included) to ``<run.dir>/validators/<name>/windows.jsonl``, logs
   it to W&B at step w (per UID: score, verdict, admission, own-data and copy numbers)
   and prints a table. Windows it falls too far behind to score are named in a warning,
   a skip record of windows.jsonl and W&B.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import math
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from averaging.group import AverageResult, AveragingFailed, LedgerWeights
from averaging.outer import outer_step
from averaging.participant import Participant
from averaging.parts import reduce_parts
from chain.client import LedgerClient
from chain.errors import ChainError
from chain.keys import KeyFileError, Keypair, default_keys_dir, load_key
from chain.ledger import Ledger
from store.api import Store, open_store
from store.backend import ContributionRef
from store.checkpoint import Contributor, Provenance
from store.errors import NotFound, StoreConflict, StoreError
from store.sources import parse_contributions_location
from tensormine.config import ConfigError, RunConfig, load_config
from tensormine.tracking import Tracker
from train.corpus import DataError
from train.data import Pages, load_pages
from train.inner import lr_at
from train.miner import (
    align_special_tokens,
    join_averaging,
    load_checkpoint_momentum,
    load_checkpoint_weights,
    load_tokenizer_from,
)
from train.model import build_model, model_fingerprint
from train.peer_state import PeerStateError, unpack_state
from train.shards import apply_to_shard, shard_map, shard_state
from train.tokenizer import load_tokenizer
from train.windows import (
    block_time,
    deadline,
    meeting_block,
    reveal_deadline,
    start_block,
    wait_for_block,
    window_of,
)
from validation.admission import (
    MISSING,
    UNREVEALED,
    Admitted,
    Refused,
    Roster,
    admit,
    run_scheme,
)
from validation.next_model import shard_averages
from validation.probes import (
    generic_pages,
    heldout_sample,
    own_data_pages,
    page_losses,
    patched_shard,
    private_heldout_pages,
    read_secret_file,
    validator_secret,
)
from validation.report import (
    REFUSED,
    SCORED,
    MinerRow,
    SkipRecord,
    WindowReport,
    append_report,
    window_table,
)
from validation.scoring import (
    OWN_FAIL,
    OWN_GRACE,
    OWN_OFF,
    OWN_PASS,
    clip_factor,
    compare_group_average,
    delta_norm,
    find_copies,
    flatten,
    heldout_outcome,
    heldout_verdict,
    loss_delta,
    normalized_weights,
    own_data_outcome,
    own_data_verdict,
    probe_step,
    reference_norm,
    update_ema,
    window_score,
)
from validation.state import ValidatorState, load_state, save_state

logger = logging.getLogger("validation.validator")

GroupResults = dict[int, AverageResult | AveragingFailed]
# A window's group results, and each hotkey's weight in them (pinned to the window's start).
GroupRound = tuple[GroupResults, dict[str, float]]


class ValidatorError(RuntimeError):
    """The validator cannot go on; the message says what to do."""


def resolve_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class Validator:
    """One validator (one hotkey) of a run."""

    def __init__(
        self, cfg: RunConfig, keypair: Keypair, name: str, *, console: Console | None = None
    ) -> None:
        self.cfg = cfg
        self.vcfg = cfg.validation
        self.keypair = keypair
        self.name = name
        self.console = console
        self.dir = cfg.run.dir / "validators" / name
        try:
            self.ledger = Ledger(cfg.chain.db)
        except FileNotFoundError as exc:
            raise ValidatorError(str(exc)) from None
        uid = self.ledger.uid_of(keypair.address)
        if uid is None:
            raise ValidatorError(
                f"hotkey {name} ({keypair.address}) is not registered on {cfg.chain.db}; "
                f"register and stake it: `tensormine chain register --key {name}`, "
                f"`tensormine chain stake add --key {name} --amount ...`"
            )
        self.uid = uid
        self.store: Store = open_store(cfg.store)
        self.device = resolve_device(self.vcfg.device)
        self.secret = (
            read_secret_file(self.vcfg.secret_file)
            if self.vcfg.secret_file is not None
            else validator_secret(keypair.seed)
        )
        self.model = build_model(cfg.model, cfg.run.seed, device=self.device)
        self.shards = shard_map(self.model, cfg.model.shards)
        params = dict(self.model.named_parameters())
        self.shapes = {
            s: {n: tuple(params[n].shape) for n in names} for s, names in enumerate(self.shards)
        }
        self.state = ValidatorState(window=-1)
        self.momentum: dict[str, torch.Tensor] = {}
        self._pending_weights: str | None = None  # extrinsic hash of the last set_weights
        # The last scored window's admitted Δ by UID, for checking hivemind group averages.
        self.last_admitted: dict[int, Admitted] = {}
        # What each member of a group weighs in its average: the same ledger field and
        # floor every group member reads (`averaging.weights`).
        self.group_weights = LedgerWeights(
            cfg.chain.db, cfg.averaging.weights, cfg.averaging.weight_floor
        )
        self.tracker = Tracker.start(
            cfg.wandb, run_dir=self.dir, name=f"validator-{name}", group=cfg.run.name,
            job_type="validator", config=cfg.to_json_dict(),
        )  # fmt: skip
        self._prepare_genesis_and_data()
        # An auxiliary peer of every shard's hivemind group: it receives the averages the
        # miners agree on and checks them against the contributions it admitted.
        self.seat: Participant | None = None
        if cfg.averaging.enabled:
            self.seat = join_averaging(cfg, self.ledger, keypair, self.dir, self.model, self.shards)

    # ---- start-up ------------------------------------------------------------------------
    @property
    def data_cache(self) -> Path:
        return self.cfg.data.cache_dir or self.cfg.run.dir / "data"

    @property
    def reports_path(self) -> Path:
        return self.dir / "windows.jsonl"

    def _prepare_genesis_and_data(self) -> None:
        """Window 0 in the store (written here if no miner has yet), tokenizer, pages."""
        try:
            self.store.resolve(window=0)
        except NotFound:
            tokenizer = load_tokenizer(self.cfg.data, self.cfg.model.vocab_size, self.data_cache)
            align_special_tokens(self.model, tokenizer)
            prov = Provenance(
                run_id=self.cfg.run.name, window=0, ledger_block=self.ledger.block_number(),
                run_config=self.cfg.to_json_dict(),
            )  # fmt: skip
            try:
                self.store.publish_checkpoint(self.model, tokenizer, prov)
            except StoreConflict:
                logger.info("another process wrote window 0 first")
        genesis = self._pull(0)
        self.tokenizer = load_tokenizer_from(genesis)
        align_special_tokens(self.model, self.tokenizer)
        self.pages: Pages = load_pages(
            self.cfg.data, self.tokenizer, self.data_cache,
            min_train_pages=self.cfg.train.pages_per_window,
        )  # fmt: skip
        if self.pages.train.shape[0] <= self.cfg.train.pages_per_window:
            raise ValidatorError(
                f"{self.pages.train.shape[0]} train pages leave none outside a miner's "
                f"{self.cfg.train.pages_per_window}: use more data or fewer train steps"
            )
        # E comes from the operator's private files when it has some, else the public split.
        self.private_heldout: np.ndarray | None = None
        if self.vcfg.heldout_files:
            try:
                self.private_heldout = private_heldout_pages(
                    self.vcfg.heldout_files, self.cfg.data, self.tokenizer
                )
            except DataError as exc:
                raise ValidatorError(str(exc)) from None
            logger.info("E is drawn from %d private held-out pages", self.private_heldout.shape[0])

    def heldout_pages(self, window: int) -> tuple[torch.Tensor, bool]:
        """E of `window` (drawn with the secret) and whether it is from the public split."""
        public = self.private_heldout is None
        pool = self.pages.heldout if self.private_heldout is None else self.private_heldout
        n = pool.shape[0]
        e_idx = heldout_sample(self.secret, window, n, min(self.vcfg.heldout_pages, n))
        return torch.from_numpy(pool[e_idx]), public

    def _pull(self, window: int) -> Path:
        target = self.dir / "checkpoints" / f"window-{window}"
        if not target.exists():
            self.store.pull_checkpoint(target, window=window, progress=False)
        return target

    def _forget_pulls(self, keep: int) -> None:
        """Pulled checkpoints other than window 0 (the tokenizer's) and `keep` are removed."""
        for folder in (self.dir / "checkpoints").glob("window-*"):
            if folder.name not in ("window-0", f"window-{keep}"):
                shutil.rmtree(folder, ignore_errors=True)

    def resume(self) -> bool:
        """Load the saved state, if any; returns whether there was one."""
        shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        loaded = load_state(self.dir / "state", shapes)
        if loaded is None:
            return False
        self.model.load_state_dict(loaded.theta)
        self.momentum = {k: v.to(self.device) for k, v in loaded.momentum.items()}
        self.state = loaded.state
        return True

    # ---- θ_w -----------------------------------------------------------------------------
    def _adopt_checkpoint(self, folder: Path) -> None:
        """Take a pulled checkpoint's θ and the outer momentum that comes with it (none
        for window 0), unless we hold that θ already."""
        weights = load_checkpoint_weights(folder)
        if model_fingerprint(weights) != model_fingerprint(self.model.state_dict()):
            self.model.load_state_dict(weights)
            momentum = load_checkpoint_momentum(folder, self.model)
            self.momentum = {n: t.to(self.device) for n, t in momentum.items()}

    def adopt(self, window: int) -> str:
        """Make the model θ_window; returns where it came from."""
        try:
            self._adopt_checkpoint(self._pull(window))
            source = f"store:window-{window}"
        except NotFound:
            if self.state.window == window:
                source = "own"
            else:
                earlier = [r.window for r in self.store.list_checkpoints() if r.window < window]
                start = max(earlier, default=0)
                self._adopt_checkpoint(self._pull(start))
                source = f"store:window-{start}"
        self._forget_pulls(window)
        return source

    def roster(self, window: int) -> Roster:
        return Roster.from_neurons(
            self.ledger.neurons(), shards=self.cfg.model.shards, window=window
        )

    # ---- contributions of every miner's store ----------------------------------------------
    def contribution_sources(self, roster: Roster) -> dict[str, str]:
        """hotkey -> where each miner of `roster` keeps its contributions: the location in
        its ledger commitment (`store.sources`), else this validator's own store."""
        own = self.store.contributions_location
        commitments = self.ledger.commitments()
        where: dict[str, str] = {}
        for hotkey in roster.miners:
            entry = commitments.get(hotkey)
            location = None
            if entry is not None:
                location = parse_contributions_location(entry[0], backend=self.cfg.store.backend)
            if location is not None and self.cfg.store.backend == "local":
                location = str(Path(location).resolve())  # as `LocalBackend` names its refs
            where[hotkey] = location or own
        return where

    def list_contributions(self, window: int, roster: Roster) -> list[ContributionRef]:
        """The contributions of `window` from every miner's location. A hotkey's
        contributions count only from the location it committed (its own store, not one
        that re-hosts or replays its files), so listing a location twice, or a miner
        pointing at another's repo, neither duplicates nor moves credit; a location that
        fails to list is logged and skipped."""
        where = self.contribution_sources(roster)
        own = self.store.contributions_location
        refs: list[ContributionRef] = []
        for source in sorted(set(where.values()) | {own}):
            try:
                listed = self.store.list_contributions(window, sources=[source])
            except StoreError as exc:
                logger.warning(
                    "window %d: cannot list contributions at %s: %s", window, source, exc
                )
                continue
            for ref in listed:
                if where.get(ref.hotkey, own) == ref.source:
                    refs.append(ref)
                else:
                    logger.info(
                        "window %d: ignoring %s's contribution at %s (it committed %s)",
                        window, ref.hotkey, ref.source, where.get(ref.hotkey, own),
                    )  # fmt: skip
        return refs

    # ---- one window ----------------------------------------------------------------------
    def process_window(
        self,
        window: int,
        roster: Roster | None = None,
        groups: concurrent.futures.Future[GroupRound] | None = None,
    ) -> WindowReport:
        """Score window `window` (its deadline block must exist) and act on the result.

        `groups` is this validator's seat in the window's hivemind groups (`_join_groups`):
        their averages are checked against the admitted Δ before the window's record is
        written, so the record and the W&B step carry the group checks.
        """
        started = time.perf_counter()
        cfg = self.cfg
        roster = roster or self.roster(window)
        due = deadline(window, cfg.window)
        if self.ledger.block(reveal_deadline(window, cfg.window)) is None:
            raise ValidatorError(
                f"window {window}: its reveal deadline block "
                f"{reveal_deadline(window, cfg.window)} is not made yet"
            )
        source = self.adopt(window)
        commitments = self.ledger.contribution_commitments(window)
        refs = self.list_contributions(window, roster)
        admitted: list[Admitted] = []
        refused: list[Refused] = []
        scheme, wire = run_scheme(cfg)
        for ref in refs:
            outcome = admit(
                self.store, ref, roster=roster, window=window, shapes=self.shapes,
                scheme=scheme, commitment=commitments.get(ref.hotkey), deadline_block=due,
                wire=wire,
            )  # fmt: skip
            if isinstance(outcome, Refused):
                logger.info("window %d: refused %s: %s", window, ref.hotkey, outcome.reason)
                refused.append(outcome)
            else:
                admitted.append(outcome)
        listed = {a.uid for a in admitted} | {r.uid for r in refused if r.uid is not None}
        for hotkey, uid in sorted(roster.miners.items(), key=lambda kv: kv[1]):
            if uid in listed:
                continue
            committed = commitments.get(hotkey)
            if committed is None:
                reason, detail = MISSING, "no commitment and nothing revealed"
            else:
                reason = UNREVEALED
                detail = (
                    f"committed in block {committed.block}, nothing revealed by the reveal deadline"
                )
            refused.append(Refused(uid, hotkey, roster.shard_of(uid), reason, detail))
        self.last_admitted = {a.uid: a for a in admitted}
        eval_started = time.perf_counter()
        base_loss, rows = self._evaluate(window, admitted)
        eval_seconds = time.perf_counter() - eval_started
        rows += [
            MinerRow(uid=r.uid, hotkey=r.hotkey, shard=r.shard, status=REFUSED,
                     reason=r.reason, detail=r.detail, verdict=r.reason)
            for r in refused
        ]  # fmt: skip
        committed_at = {h: c.block for h, c in commitments.items()}
        revealed = {r.hotkey for r in refs}
        for row in rows:
            row.committed_block = committed_at.get(row.hotkey)
            row.revealed = row.hotkey in revealed
        group_round = self._group_round(window, groups)
        if group_round is not None:
            self._mark_averaged(rows, group_round[0])
        self._update_scores(roster, rows)
        report = WindowReport(
            window=window, validator=self.name, block=self.ledger.block_number(),
            heldout_loss=base_loss, contributions=len(refs), admitted=len(admitted),
            seconds=0.0, eval_seconds=eval_seconds, miners=rows,
            committed=len(commitments),
        )  # fmt: skip
        self._next_model(window, admitted, rows, group_round, report)
        report.weights_set = self._maybe_set_weights(window)
        self.state.window = window + 1
        save_state(self.dir / "state", self.state, self.model.state_dict(), self.momentum)
        if group_round is not None:
            report.group_checks = self._check_groups(window, roster, group_round)
        report.seconds = time.perf_counter() - started
        append_report(self.reports_path, report)
        self._log(report, source)
        return report

    def _evaluate(self, window: int, admitted: list[Admitted]) -> tuple[float, list[MinerRow]]:
        """Loss delta, own-data, held-out-rival and copy verdicts for each admitted
        contribution; returns L(θ_w; E) and one row per contribution (order of `admitted`)."""
        cfg, vcfg = self.cfg, self.vcfg
        held, public = self.heldout_pages(window)
        n_e = held.shape[0]
        # The held-out-rival check needs E public, the own pages and generic pages.
        rival = public and vcfg.own_data_pairs > 0 and vcfg.heldout_rival_pages > 0
        if rival:
            generic = generic_pages(
                self.secret, window, self.pages.train.shape[0], vcfg.heldout_rival_pages
            )
            held = torch.cat([held, torch.from_numpy(self.pages.train[generic])])
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
                self.secret, a.hotkey, window, cfg.run.seed, self.pages.train.shape[0],
                cfg.train.pages_per_window, vcfg.own_data_pairs,
                batch_size=cfg.train.batch_size, steps=strong,
            )  # fmt: skip
            probes.append(torch.from_numpy(self.pages.train[np.concatenate([assigned, control])]))
        # One base pass over E and every miner's own-data pages together.
        base = page_losses(
            self.model, torch.cat([held, *probes]), batch=vcfg.eval_batch, device=self.device
        )
        base_e = float(base[:n_e].mean())
        offsets = np.cumsum([n_head] + [p.shape[0] for p in probes])
        grace_t = min(vcfg.own_data_grace_t, vcfg.own_data_min_t)
        rows: list[MinerRow] = []
        rival_rows: list[MinerRow] = []
        head_gains: list[torch.Tensor] = []  # per page of E and the generic pages
        own_gains: list[torch.Tensor] = []  # per sampled assigned page
        steps = self._probe_steps(window, admitted)
        checks = vcfg.own_data_pairs > 0
        for i, a in enumerate(admitted):
            names = self.shards[a.shard]
            theta = shard_state(self.model, names)
            # The checks compare how much a Δ taught its own pages, E and generic pages:
            # memorized pages stand out at the whole outer step (their thresholds were
            # calibrated there). The score is the loss the Δ removes at its share of the
            # aggregate step (`scoring.probe_step`): a second pass, over E alone.
            if checks:
                with patched_shard(self.model, names, theta, a.delta, cfg.outer.lr):
                    new = page_losses(
                        self.model, torch.cat([held, probes[i]]), batch=vcfg.eval_batch,
                        device=self.device,
                    )  # fmt: skip
            if not checks or steps[i] != cfg.outer.lr:
                with patched_shard(self.model, names, theta, a.delta, steps[i]):
                    scored = page_losses(
                        self.model, held[:n_e], batch=vcfg.eval_batch, device=self.device
                    )
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
            verdict = own_data_verdict(
                mine[:half], new[n_head : n_head + half], mine[half:], new[n_head + half :],
                min_margin=vcfg.own_data_min_margin, min_t=vcfg.own_data_min_t,
            )  # fmt: skip
            row.own_outcome = own_data_outcome(
                verdict, min_margin=vcfg.own_data_min_margin, grace_t=grace_t,
                strikes=self._strikes(a.uid, a.hotkey),
            )  # fmt: skip
            row.own_margin, row.own_t = verdict.margin, verdict.t
            row.own_ok = row.own_outcome in (OWN_PASS, OWN_GRACE)
            if rival:  # with private held-out files, training on the public split pays nothing
                head_gains.append(base[:n_head] - new[:n_head])
                own_gains.append(mine[:half] - new[n_head : n_head + half])
                rival_rows.append(row)
        self._copy_check(admitted, rows)
        self._heldout_check(rival_rows, head_gains, own_gains, n_e)
        for a, row in zip(admitted, rows, strict=True):
            row.score = window_score(
                row.loss_delta if row.loss_delta is not None else math.nan,
                admitted=True, own_ok=bool(row.own_ok), copied=row.copy_of is not None,
                heldout_ok=row.heldout_ok is not False,
            )  # fmt: skip
            row.verdict = _verdict(row)
            logger.debug("window %d uid %d: %s", window, a.uid, row)
        return base_e, rows

    def _probe_steps(self, window: int, admitted: list[Admitted]) -> list[float]:
        """The step along each admitted Δ at which it is measured: its share of its shard's
        aggregate step, shortened for a Δ longer than `norm_clip` × its shard's reference
        norm (`scoring.reference_norm`: the median weighted by the ledger weights pinned to
        the window's start, which sybils with no trust cannot move)."""
        pinned = self.group_weights.table(start_block(window, self.cfg.window))
        floor = self.cfg.averaging.weight_floor
        norms = [delta_norm(a.delta) for a in admitted]
        steps = []
        for a, norm in zip(admitted, norms, strict=True):
            peers = [(b, n) for b, n in zip(admitted, norms, strict=True) if b.shard == a.shard]
            reference = reference_norm(
                [n for _, n in peers], [pinned.get(b.hotkey, floor) for b, _ in peers]
            )
            step = probe_step(self.cfg.outer.lr, len(peers), self.vcfg.probe_lr)
            steps.append(step * clip_factor(norm, reference, self.vcfg.norm_clip))
        return steps

    def _heldout_check(
        self,
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
        peers = [g for r, g in zip(rows, head_gains, strict=True) if r.copy_of is None and r.own_ok]
        cohort = torch.stack(peers).median(dim=0).values if len(peers) >= 3 else None
        # Unpaired, the pages' difficulty stays in the noise (honest ratios reached 0.35 in
        # trials): twice the bar then.
        max_ratio = self.vcfg.heldout_rival_ratio * (1.0 if cohort is not None else 2.0)
        for row, gains, own in zip(rows, head_gains, own_gains, strict=True):
            rival = heldout_verdict(
                gains[:n_e], gains[n_e:], own,
                max_ratio=max_ratio, min_t=self.vcfg.own_data_min_t,
                cohort_heldout=None if cohort is None else cohort[:n_e],
                cohort_generic=None if cohort is None else cohort[n_e:],
            )  # fmt: skip
            row.heldout_excess, row.heldout_ratio = rival.excess, rival.ratio
            row.heldout_t = rival.t
            row.heldout_outcome = heldout_outcome(
                rival.ok, flagged_before=self._heldout_flags(row),
                strikes=self.vcfg.heldout_rival_strikes,
            )  # fmt: skip
            row.heldout_ok = row.heldout_outcome != OWN_FAIL

    def _heldout_flags(self, row: MinerRow) -> int:
        """Held-out-rival flags of `row`'s UID in the windows just before (0 when the UID
        changed hands since)."""
        if row.uid is None or self.state.hotkeys.get(row.uid) != row.hotkey:
            return 0
        return self.state.heldout_flags.get(row.uid, 0)

    def _strikes(self, uid: int, hotkey: str) -> int:
        """Own-data strikes of `uid` (0 when the UID changed hands since)."""
        if self.state.hotkeys.get(uid) != hotkey:
            return 0
        return self.state.own_strikes.get(uid, 0)

    def _copy_check(self, admitted: list[Admitted], rows: list[MinerRow]) -> None:
        """Mark later near-duplicates within each shard (by the ledger block of their
        commitments, then hotkey)."""
        for shard in sorted({a.shard for a in admitted}):
            members = sorted(
                (i for i, a in enumerate(admitted) if a.shard == shard),
                key=lambda i: (admitted[i].committed_block, admitted[i].hotkey),
            )
            names = sorted(self.shards[shard])
            # The outer momentum (a running sum of past updates) helps name the direction
            # every honest Δ shares, so that it does not count as copying.
            reference = (
                flatten({n: self.momentum[n].cpu() for n in names})
                if all(n in self.momentum for n in names)
                else None
            )
            copies = find_copies(
                [flatten(admitted[i].delta) for i in members], self.vcfg.copy_threshold,
                reference, family_gap=self.vcfg.copy_family_gap,
            )  # fmt: skip
            for pos, verdict in copies.items():
                row = rows[members[pos]]
                row.copy_of = admitted[members[verdict.original]].uid
                row.copy_cosine = verdict.cosine

    def _update_scores(self, roster: Roster, rows: list[MinerRow]) -> None:
        scores = {uid: 0.0 for uid in roster.miners.values()}
        for row in rows:
            if row.uid is not None and row.uid in scores:
                # A UID may also have a refused entry (e.g. a second shard): keep its best.
                scores[row.uid] = max(scores[row.uid], row.score)
        # A UID that now belongs to another hotkey (re-registration) starts from zero.
        by_uid = {uid: hk for hk, uid in roster.miners.items()}
        ema = {
            uid: v
            for uid, v in self.state.ema.items()
            if self.state.hotkeys.get(uid) == by_uid.get(uid)
        }
        self.state.ema = update_ema(ema, scores, self.vcfg.ema_alpha)
        # Own-data strikes: a pass clears them, anything else adds one; a UID that did not
        # publish keeps its count, one that changed hands starts again from zero.
        strikes = {
            uid: n for uid, n in self.state.own_strikes.items()
            if self.state.hotkeys.get(uid) == by_uid.get(uid)
        }  # fmt: skip
        for row in rows:
            if row.uid is None or row.own_outcome in (None, OWN_OFF):
                continue
            before = strikes.get(row.uid, 0)
            strikes[row.uid] = 0 if row.own_outcome == OWN_PASS else before + 1
        self.state.own_strikes = {uid: n for uid, n in sorted(strikes.items()) if n > 0}
        flags = {
            uid: n for uid, n in self.state.heldout_flags.items()
            if self.state.hotkeys.get(uid) == by_uid.get(uid)
        }  # fmt: skip
        for row in rows:
            if row.uid is not None and row.heldout_outcome is not None:
                flags[row.uid] = 0 if row.heldout_outcome == OWN_PASS else flags.get(row.uid, 0) + 1
        self.state.heldout_flags = {uid: n for uid, n in sorted(flags.items()) if n > 0}
        self.state.hotkeys = by_uid
        weights = normalized_weights(self.state.ema)
        for row in rows:
            if row.uid is not None:
                row.ema = self.state.ema.get(row.uid, 0.0)
                row.weight = weights.get(row.uid, 0.0)

    def _next_model(
        self,
        window: int,
        admitted: list[Admitted],
        rows: list[MinerRow],
        groups: GroupRound | None,
        report: WindowReport,
    ) -> None:
        """θ_{w+1}: the outer step on each shard's average (`validation.next_model`), the
        same one every miner in step takes; then publish it with its momentum, the
        members and their weights, and its fingerprint."""
        results, weights = groups if groups is not None else ({}, {})
        if not weights:
            weights = self.group_weights.table(start_block(window, self.cfg.window))
        scores = {row.uid: row.score for row in rows if row.uid is not None}
        updates = shard_averages(
            self.shapes, admitted, results, weights, self.cfg.averaging,
            uid_of={row.hotkey: row.uid for row in rows if row.uid is not None},
        )  # fmt: skip
        contributors: list[Contributor] = []
        theta_w = {n: t.detach().clone() for n, t in self.model.state_dict().items()}
        for update in updates:
            names = self.shards[update.shard]
            theta = shard_state(self.model, names)
            average = {n: t.to(self.device) for n, t in update.average.items()}
            momentum = {n: self.momentum[n] for n in names if n in self.momentum}
            new_params, new_momentum = outer_step(theta, average, momentum, self.cfg.outer)
            apply_to_shard(self.model, names, new_params)
            self.momentum.update(new_momentum)
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
            self._take_peers_model(window, theta_w, report)
        report.fingerprint = model_fingerprint(self.model.state_dict())
        if contributors:
            held, _ = self.heldout_pages(window)
            losses = page_losses(self.model, held, batch=self.vcfg.eval_batch, device=self.device)
            report.next_heldout_loss = float(losses.mean())
        else:
            report.next_heldout_loss = report.heldout_loss
        if not self.vcfg.publish_checkpoint:
            return
        metrics = {
            "heldout_loss": report.next_heldout_loss,
            "base_heldout_loss": report.heldout_loss,
        }
        prov = Provenance(
            run_id=self.cfg.run.name, window=window + 1, ledger_block=self.ledger.block_number(),
            contributors=contributors, metrics=metrics, run_config=self.cfg.to_json_dict(),
            fingerprint=report.fingerprint,
        )  # fmt: skip
        try:
            ref = self.store.publish_checkpoint(
                self.model, self.tokenizer, prov, outer_state=self.momentum
            )
            report.published = ref.revision
        except StoreConflict as exc:
            logger.info("window %d: %s; adopting the published one if any", window + 1, exc)
            try:
                theirs = self.store.read_provenance(self.store.resolve(window=window + 1))
            except NotFound:
                logger.warning("window %d: not published here, keeping our own θ", window + 1)
                return
            if theirs.fingerprint != report.fingerprint:
                logger.warning(
                    "window %d: the published checkpoint (fingerprint %s) is not the model we "
                    "computed (%s); adopting it (`tensormine verify --window %d` says why)",
                    window + 1, (theirs.fingerprint or "none")[:16], report.fingerprint[:16],
                    window,
                )  # fmt: skip
                self._adopt_checkpoint(self._pull(window + 1))
            report.adopted = f"window-{window + 1}"

    def _take_peers_model(
        self, window: int, theta_w: dict[str, torch.Tensor], report: WindowReport
    ) -> None:
        """This validator missed a group's average and rebuilt that shard from the store,
        which differs from the group's result by the wire's rounding. If a miner in step
        shares θ_{w+1} (with its momentum) and it is that model up to the wire's rounding,
        take the miners' bits instead, so that the published checkpoint is their model."""
        if self.seat is None:
            return
        own = self.model.state_dict()
        budget = 3 * sum(t.numel() * 4 for t in own.values()) + (1 << 20)
        try:
            got = self.seat.load_state(timeout=self.cfg.averaging.state_timeout_s, max_bytes=budget)
            if got is None:
                return
            weights, momentum = unpack_state(
                got.metadata, got.tensors, expected=own, window=window + 1
            )
        except (AveragingFailed, PeerStateError) as exc:
            logger.info("window %d: no usable peer state to compare with: %s", window, exc)
            return
        num = sum(float((weights[n] - own[n]).double().norm() ** 2) for n in own)
        den = sum(float((own[n] - theta_w[n]).double().norm() ** 2) for n in own)
        error = math.sqrt(num) / max(math.sqrt(den), 1e-30)
        if error > self.vcfg.group_tolerance:
            logger.warning(
                "window %d: %s's θ_%d differs from the one rebuilt from the store by %.3g; "
                "keeping ours", window, got.hotkey, window + 1, error,
            )  # fmt: skip
            return
        self.model.load_state_dict(weights)
        self.momentum = {n: t.to(self.device) for n, t in momentum.items()}
        report.sources["peer"] = got.hotkey
        logger.info(
            "window %d: took θ_%d from %s, in step with its groups (%.3g from ours)",
            window, window + 1, got.hotkey, error,
        )  # fmt: skip

    def check_group_average(
        self,
        shard: int,
        group_average: dict[str, torch.Tensor],
        members: Sequence[int],
        weights: Mapping[str, float] | None = None,
    ) -> tuple[float, bool]:
        """Compare the average a hivemind group of `members` (UIDs) reached on `shard` in
        the last scored window with the average of those members' admitted Δ that the
        groups should have reached — their parts weighted by the ledger field
        `averaging.weights`, reduced by `averaging.robust` and encoded as every reducer does
        (`averaging.parts.reduce_parts`: the same bits when the group is honest) — and log
        a mismatch naming the group. Members without an admitted Δ make it a mismatch. `weights`
        (hotkey -> weight) are the ones the round used (`LedgerWeights.table` pinned to
        the window's first block); without them, the ledger's current ones."""
        missing = [u for u in members if u not in self.last_admitted]
        if not members or missing:
            logger.warning(
                "group average on shard %d: members %s of the group %s have no admitted Δ",
                shard, missing, self._name_members(members),
            )  # fmt: skip
            return math.inf, False
        ordered = sorted(members, key=lambda u: self.last_admitted[u].hotkey)
        known = weights or {}
        avg = self.cfg.averaging
        admitted = reduce_parts(
            [self.last_admitted[u].delta for u in ordered],
            [known.get(h, self.group_weights(h)) for h in
             (self.last_admitted[u].hotkey for u in ordered)],
            self.shapes[shard], avg.wire, avg.wire_part_size_bytes, avg.robust,
        )  # fmt: skip
        error, ok = compare_group_average(
            group_average, admitted, tolerance=self.vcfg.group_tolerance
        )
        if not ok:
            logger.warning(
                "group average on shard %d differs from the admitted Δ of its members %s "
                "(relative error %.3g > %.3g)",
                shard, self._name_members(members), error, self.vcfg.group_tolerance,
            )  # fmt: skip
        return error, ok

    def _name_members(self, members: Sequence[int]) -> str:
        """'UID 3 (5Fabc…), UID 4 (5Gdef…)': who was in a group, for the log."""
        hotkeys = {a.uid: a.hotkey for a in self.last_admitted.values()}
        hotkeys |= {u: h for u, h in self.state.hotkeys.items() if u not in hotkeys}
        return ", ".join(
            f"UID {u} ({hotkeys[u][:8]}…)" if u in hotkeys else f"UID {u}" for u in sorted(members)
        )

    def _maybe_set_weights(self, window: int) -> bool:
        """Submit the normalized moving averages as weights when they are due."""
        if self._pending_weights is not None:
            receipt = self.ledger.receipt(self._pending_weights)
            if receipt is not None and not receipt.ok:
                logger.warning("last set_weights failed in its block: %s", receipt.error)
            self._pending_weights = None
        last = self.state.weights_window
        if last is not None and window - last < self.vcfg.weights_every:
            return False
        weights = normalized_weights(self.state.ema)
        if not weights:
            logger.info("window %d: no miner has a positive score yet; no weights set", window)
            return False
        uids = sorted(weights)
        try:
            # Not waiting for inclusion: submission already checks and dry-runs the call.
            xt = LedgerClient(self.ledger, self.keypair).set_weights(
                uids, [weights[u] for u in uids], wait=False
            )
        except ChainError as exc:
            logger.warning("window %d: set_weights refused: %s", window, exc)
            return False
        self._pending_weights = str(xt)
        self.state.weights_window = window
        return True

    def _log(self, report: WindowReport, source: str) -> None:
        metrics: dict[str, float | int] = {
            "eval/heldout_loss": report.heldout_loss,
            "window/seconds": report.seconds,
            "window/eval_seconds": report.eval_seconds,
            "window/contributions": report.contributions,
            "window/admitted": report.admitted,
            "window/refused": sum(1 for r in report.miners if r.status == REFUSED),
            "window/weights_set": int(report.weights_set),
        }
        if report.next_heldout_loss is not None:
            metrics["eval/next_heldout_loss"] = report.next_heldout_loss
        for name, check in report.group_checks.items():
            metrics[f"averaging/{name}_group_error"] = float(check["error"])
            metrics[f"averaging/{name}_group_ok"] = int(bool(check["ok"]))
            for key in ("bytes_sent", "bytes_received"):  # as an auxiliary peer
                if key in check:
                    metrics[f"averaging/{name}_{key}"] = int(check[key])
        for row in report.miners:
            if row.uid is None:
                continue
            prefix = f"uid/{row.uid}"
            metrics[f"{prefix}/score"] = row.score
            metrics[f"{prefix}/ema"] = row.ema
            metrics[f"{prefix}/weight"] = row.weight
            metrics[f"{prefix}/admitted"] = int(row.status == SCORED)
            # The verdict in one word as its own key (W&B charts numbers, not strings):
            # uid/3/verdict/late = 1, uid/5/verdict/copy = 1, uid/2/verdict/ok = 1, ...
            metrics[f"{prefix}/verdict/{row.verdict or row.reason or 'ok'}"] = 1
            for key in ("loss_delta", "own_margin", "own_t", "heldout_excess", "copy_cosine"):
                value = getattr(row, key)
                if value is not None and math.isfinite(value):
                    metrics[f"{prefix}/{key}"] = value
            if row.own_ok is not None:
                metrics[f"{prefix}/own_ok"] = int(row.own_ok)
            if row.copy_of is not None:
                metrics[f"{prefix}/copy_of"] = row.copy_of
        self.tracker.log(metrics, step=report.window)
        logger.info(
            "window %d (θ from %s): L(θ_w;E) %.4f -> %.4f, %d/%d admitted, %s, %.1fs",
            report.window, source, report.heldout_loss, report.next_heldout_loss or math.nan,
            report.admitted, report.contributions,
            f"published {report.published}" if report.published else "not published",
            report.seconds,
        )  # fmt: skip
        if self.console is not None:
            self.console.print(window_table([report]))

    # ---- the loop ------------------------------------------------------------------------
    def run(self, max_windows: int | None = None) -> list[WindowReport]:
        """Validate until `max_windows` windows were scored (forever when None)."""
        resumed = self.resume()
        head = self.ledger.block_number()
        current = window_of(head, self.cfg.window)
        next_window = self.state.window if resumed else current
        reports: list[WindowReport] = []
        while max_windows is None or len(reports) < max_windows:
            head = self.ledger.block_number()
            current = window_of(head, self.cfg.window)
            if next_window < current - 1:
                self._skip(list(range(next_window, current - 1)), head)
                next_window = current - 1
            roster = None
            if head < start_block(next_window, self.cfg.window) + 1:
                # Read who mines at the window's start, as the miners do.
                wait_for_block(self.ledger, start_block(next_window, self.cfg.window))
                roster = self.roster(next_window)
            roster = roster or self.roster(next_window)
            groups = self._join_groups(next_window)
            wait_for_block(self.ledger, reveal_deadline(next_window, self.cfg.window))
            reports.append(self.process_window(next_window, roster, groups))
            next_window += 1
        return reports

    def _skip(self, windows: list[int], head: int) -> None:
        """Say that `windows` go unscored (their miners get nothing from this validator):
        a warning, a `SkipRecord` line in windows.jsonl and a W&B count."""
        logger.warning(
            "behind at block %d: skipping windows %d..%d (%d unscored)",
            head, windows[0], windows[-1], len(windows),
        )  # fmt: skip
        append_report(
            self.reports_path, SkipRecord(validator=self.name, block=head, windows=windows)
        )
        self.tracker.log({"window/skipped": len(windows)}, step=windows[-1])

    def _join_groups(self, window: int) -> concurrent.futures.Future[GroupRound] | None:
        """Join every shard's group of `window` as an auxiliary peer, in the background.
        The groups meet at the deadline (`train.windows.meeting_block`), so matchmaking
        must start a little before it."""
        if self.seat is None:
            return None
        cfg = self.cfg
        lead = math.ceil((cfg.averaging.min_matchmaking_time_s + 1) / cfg.chain.block_time_s)
        meeting = meeting_block(window, cfg.window)
        head = wait_for_block(self.ledger, max(start_block(window, cfg.window), meeting - lead))
        if head >= meeting:
            return None  # too late to meet this window's groups
        start_at = block_time(self.ledger, meeting, anchor=start_block(window, cfg.window))
        tail = cfg.window.publish_margin * cfg.chain.block_time_s
        timeout = max(start_at - time.time() + tail, cfg.averaging.min_matchmaking_time_s + 0.5)
        seat = self.seat

        first = start_block(window, cfg.window)

        def meet() -> GroupRound:
            # The weights every member's reducer uses: the ledger's as the last epoch at or
            # before the window's first block left them (the miners pin the same block).
            weights = self.group_weights.table(first)
            results = seat.average_window(
                window, {}, start_at=start_at, timeout=timeout, weights_block=first
            )
            return results, weights

        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aux-averaging")
        future = pool.submit(meet)
        pool.shutdown(wait=False)
        return future

    def _mark_averaged(self, rows: list[MinerRow], results: GroupResults) -> None:
        """What each miner's group says of what it sent: `averaged` is "in" (its parts are
        in the average), "mismatch" (a reducer refused parts that were not what it
        committed to: no score this window, and a strike), "dropped" or "absent"."""
        members: dict[str, str] = {}
        for result in results.values():
            if isinstance(result, AverageResult):
                for hotkey in result.dropped:
                    members[hotkey] = "dropped"
                for hotkey in result.members:
                    members[hotkey] = "in"
            for hotkey, parts in (result.mismatched or {}).items():
                members[hotkey] = f"mismatch: parts {_spans(parts)}"
        got = any(isinstance(r, AverageResult) for r in results.values())
        for row in rows:
            if row.uid is None:
                continue
            row.averaged = members.get(row.hotkey, "absent" if got else None)
            if row.averaged is not None and row.averaged.startswith("mismatch"):
                logger.warning(
                    "UID %d (%s…) sent parts into its group that are not what it committed "
                    "to (%s): no score this window", row.uid, row.hotkey[:8], row.averaged,
                )  # fmt: skip
                row.score = 0.0
                row.verdict = "mismatch"
                row.own_outcome = OWN_FAIL  # counts as a strike, as the other checks do

    def _group_round(
        self, window: int, groups: concurrent.futures.Future[GroupRound] | None
    ) -> GroupRound | None:
        """The window's group results as this validator received them, and the pinned
        weights the members used; None when it took no part or they never came."""
        if groups is None:
            return None
        limit = self.cfg.averaging.allreduce_timeout_s + 30
        try:
            return groups.result(timeout=limit)
        except TimeoutError:
            logger.warning("window %d: no group average within %.0fs", window, limit)
            return None

    def _check_groups(
        self, window: int, roster: Roster, group_round: GroupRound
    ) -> dict[str, dict[str, Any]]:
        """Each group's average against the mean of its members' admitted Δ, as the
        window record's `group_checks`: "shard<s>" -> error, ok, members (UIDs) and the
        bytes this validator sent and received in the group as an auxiliary peer."""
        results, weights = group_round
        checks: dict[str, dict[str, Any]] = {}
        for shard, result in sorted(results.items()):
            if not isinstance(result, AverageResult):
                continue  # no group formed (no miners, or they failed): nothing to check
            uids = sorted(roster.miners[h] for h in result.members if h in roster.miners)
            error, ok = self.check_group_average(shard, result.tensors, uids, weights or None)
            logger.info(
                "window %d shard %d: group of %s averaged; relative error vs admitted %.3g (%s)",
                window, shard, uids, error, "ok" if ok else "MISMATCH",
            )  # fmt: skip
            checks[f"shard{shard}"] = {
                "error": error, "ok": ok, "members": uids,
                "bytes_sent": result.bytes_sent, "bytes_received": result.bytes_received,
            }  # fmt: skip
        return checks

    def close(self) -> None:
        if self.seat is not None:
            self.seat.close()
        self.tracker.finish()
        self.ledger.close()


def _spans(parts: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out: list[str] = []
    for p in sorted(parts):
        if out and int(out[-1].split("-")[-1]) == p - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{p}"
        else:
            out.append(str(p))
    return ", ".join(out)


def _verdict(row: MinerRow) -> str:
    """A scored contribution's verdict in one word (the reason it earned nothing, or ok)."""
    if row.copy_of is not None:
        return "copy"
    if row.own_ok is False:
        return "own_data"
    if row.heldout_ok is False:
        return "heldout_trained"
    if row.score <= 0:
        return "no_gain"
    return "ok"


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="validation.validator", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--config", "-c", help="run config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--hotkey", required=True, help="name of the validator's key")
    parser.add_argument("--keys-dir", help="key directory (default $TENSORMINE_HOME/keys)")
    parser.add_argument("--windows", type=int, help="stop after this many windows")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    validator: Validator | None = None
    try:
        cfg = load_config(args.config, args.overrides)
        keypair = load_key(
            Path(args.keys_dir) if args.keys_dir else default_keys_dir(), args.hotkey
        )
        from tensormine.cli import make_console

        validator = Validator(cfg, keypair, args.hotkey, console=make_console())
        validator.run(args.windows)
    except (ValidatorError, ConfigError, ChainError, KeyFileError, StoreError, TimeoutError) as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        logger.info("interrupted; the last finished window's state is saved")
        return 130
    finally:
        if validator is not None:
            validator.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
