"""The validator process: score every contribution of every window, set weights, publish θ_{w+1}.

    python -m validation.validator --config configs/tiny.yaml --hotkey validator-0
    tensormine validator run --config configs/tiny.yaml --hotkey validator-0 --windows 5
    tensormine validator report --config configs/tiny.yaml --hotkey validator-0 --last 3

Every window w, once the ledger reaches w's deadline block, the validator
1. enters with θ_w: the store's canonical checkpoint of w when there is one (what miners
   start from), else its own θ_w from its last outer step, else the latest published
   checkpoint before w (window 0 at worst, which it writes if no miner has yet);
2. lists the contributions of w and admits each one (`validation.admission`): signature,
   window and shard, sha256, shapes and dtypes, finite values, size, compression, and
   arrival before the deadline block; a refusal scores 0 with its reason code;
3. runs one forward pass of θ_w over its held-out sample E (drawn with its own secret)
   together with every admitted miner's own-data pages, then, per contribution, applies
   θ_w − lr·Δ to the contribution's shard in place, makes one forward pass over E and that
   miner's own-data pages, and restores θ_w (`validation.probes`);
4. scores: loss delta on E, zero without the own-data check or when the Δ copies an
   earlier one (`validation.scoring`); updates the moving average per UID and, every
   `validation.weights_every` windows, sets the normalized averages as weights;
5. aggregates the credited Δ of each shard weighted by score (`averaging.robust`), takes
   the outer Nesterov step with its persisted momentum, and publishes θ_{w+1} with
   provenance (contributors, scores, held-out losses); if another validator published
   w+1 first, it adopts that one;
6. saves its state atomically (`validation.state`), appends to
   ``<run.dir>/validators/<name>/windows.jsonl``, logs to W&B and prints a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from averaging.group import AverageResult, AveragingFailed
from averaging.outer import outer_step
from averaging.participant import Participant
from averaging.robust import aggregate
from chain.client import LedgerClient
from chain.errors import ChainError
from chain.keys import KeyFileError, Keypair, default_keys_dir, load_key
from chain.ledger import Ledger
from store.api import Store, open_store
from store.checkpoint import Contributor, Provenance
from store.errors import NotFound, StoreConflict, StoreError
from tensormine.config import ConfigError, RunConfig, load_config
from tensormine.tracking import Tracker
from train.data import Pages, load_pages
from train.inner import lr_at
from train.miner import (
    align_special_tokens,
    join_averaging,
    load_checkpoint_weights,
    load_tokenizer_from,
)
from train.model import build_model, model_fingerprint
from train.shards import apply_to_shard, shard_map, shard_state
from train.tokenizer import load_tokenizer
from train.windows import block_time, deadline, start_block, wait_for_block, window_of
from validation.admission import MISSING, Admitted, Refused, Roster, admit
from validation.probes import (
    heldout_sample,
    own_data_pages,
    page_losses,
    patched_shard,
    read_secret_file,
    validator_secret,
)
from validation.report import REFUSED, SCORED, MinerRow, WindowReport, append_report, window_table
from validation.scoring import (
    compare_group_average,
    find_copies,
    flatten,
    loss_delta,
    normalized_weights,
    own_data_verdict,
    update_ema,
    window_score,
)
from validation.state import ValidatorState, load_state, save_state

logger = logging.getLogger("validation.validator")

AGGREGATE_CHUNK = 1 << 20  # coordinates per robust-aggregation slice (bounds fp64 memory)


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
    def _load_weights(self, folder: Path) -> None:
        weights = load_checkpoint_weights(folder)
        if model_fingerprint(weights) != model_fingerprint(self.model.state_dict()):
            self.model.load_state_dict(weights)

    def adopt(self, window: int) -> str:
        """Make the model θ_window; returns where it came from."""
        try:
            self._load_weights(self._pull(window))
            source = f"store:window-{window}"
        except NotFound:
            if self.state.window == window:
                source = "own"
            else:
                earlier = [r.window for r in self.store.list_checkpoints() if r.window < window]
                start = max(earlier, default=0)
                self._load_weights(self._pull(start))
                source = f"store:window-{start}"
        self._forget_pulls(window)
        return source

    def roster(self, window: int) -> Roster:
        return Roster.from_neurons(
            self.ledger.neurons(), shards=self.cfg.model.shards, window=window
        )

    # ---- one window ----------------------------------------------------------------------
    def process_window(self, window: int, roster: Roster | None = None) -> WindowReport:
        """Score window `window` (its deadline block must exist) and act on the result."""
        started = time.perf_counter()
        cfg = self.cfg
        roster = roster or self.roster(window)
        due = deadline(window, cfg.window)
        header = self.ledger.block(due)
        if header is None:
            raise ValidatorError(f"window {window}: its deadline block {due} is not made yet")
        source = self.adopt(window)
        refs = self.store.list_contributions(window)
        admitted: list[Admitted] = []
        refused: list[Refused] = []
        for ref in refs:
            outcome = admit(
                self.store, ref, roster=roster, window=window, shapes=self.shapes,
                scheme=cfg.compression.scheme, deadline_time=header.timestamp,
            )  # fmt: skip
            if isinstance(outcome, Refused):
                logger.info("window %d: refused %s: %s", window, ref.hotkey, outcome.reason)
                refused.append(outcome)
            else:
                admitted.append(outcome)
        published = {a.uid for a in admitted} | {r.uid for r in refused if r.uid is not None}
        for hotkey, uid in sorted(roster.miners.items(), key=lambda kv: kv[1]):
            if uid not in published:
                refused.append(
                    Refused(
                        uid, hotkey, roster.shard_of(uid), MISSING, "nothing listed at deadline"
                    )
                )
        self.last_admitted = {a.uid: a for a in admitted}
        eval_started = time.perf_counter()
        base_loss, rows = self._evaluate(window, admitted)
        eval_seconds = time.perf_counter() - eval_started
        rows += [
            MinerRow(uid=r.uid, hotkey=r.hotkey, shard=r.shard, status=REFUSED,
                     reason=r.reason, detail=r.detail)
            for r in refused
        ]  # fmt: skip
        self._update_scores(roster, rows)
        report = WindowReport(
            window=window, validator=self.name, block=self.ledger.block_number(),
            heldout_loss=base_loss, contributions=len(refs), admitted=len(admitted),
            seconds=0.0, eval_seconds=eval_seconds, miners=rows,
        )  # fmt: skip
        scored = rows[: len(admitted)]  # _evaluate's rows, in the order of `admitted`
        credited = [(a, row) for a, row in zip(admitted, scored, strict=True) if row.score > 0]
        self._outer_step(window, credited, report)
        report.weights_set = self._maybe_set_weights(window)
        self.state.window = window + 1
        save_state(self.dir / "state", self.state, self.model.state_dict(), self.momentum)
        report.seconds = time.perf_counter() - started
        append_report(self.reports_path, report)
        self._log(report, source)
        return report

    def _evaluate(self, window: int, admitted: list[Admitted]) -> tuple[float, list[MinerRow]]:
        """Loss delta, own-data verdict and copy verdict for each admitted contribution;
        returns L(θ_w; E) and one row per contribution (same order as `admitted`)."""
        cfg, vcfg = self.cfg, self.vcfg
        n_heldout = self.pages.heldout.shape[0]
        e_idx = heldout_sample(self.secret, window, n_heldout, min(vcfg.heldout_pages, n_heldout))
        held = torch.from_numpy(self.pages.heldout[e_idx])
        n_e = held.shape[0]
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
        offsets = np.cumsum([n_e] + [p.shape[0] for p in probes])
        rows: list[MinerRow] = []
        for i, a in enumerate(admitted):
            names = self.shards[a.shard]
            theta = shard_state(self.model, names)
            with patched_shard(self.model, names, theta, a.delta, cfg.outer.lr):
                new = page_losses(
                    self.model, torch.cat([held, probes[i]]), batch=vcfg.eval_batch,
                    device=self.device,
                )  # fmt: skip
            gain = loss_delta(base_e, float(new[:n_e].mean()))
            half = probes[i].shape[0] // 2
            mine = base[offsets[i] : offsets[i + 1]]
            verdict = own_data_verdict(
                mine[:half], new[n_e : n_e + half], mine[half:], new[n_e + half :],
                min_margin=vcfg.own_data_min_margin, min_t=vcfg.own_data_min_t,
            )  # fmt: skip
            if vcfg.own_data_pairs == 0:
                verdict = type(verdict)(margin=0.0, t=0.0, pairs=0, ok=True)
            rows.append(
                MinerRow(
                    uid=a.uid, hotkey=a.hotkey, shard=a.shard, status=SCORED, loss_delta=gain,
                    own_margin=verdict.margin, own_t=verdict.t, own_ok=verdict.ok,
                )
            )  # fmt: skip
        self._copy_check(admitted, rows)
        for a, row in zip(admitted, rows, strict=True):
            row.score = window_score(
                row.loss_delta if row.loss_delta is not None else math.nan,
                admitted=True, own_ok=bool(row.own_ok), copied=row.copy_of is not None,
            )  # fmt: skip
            logger.debug("window %d uid %d: %s", window, a.uid, row)
        return base_e, rows

    def _copy_check(self, admitted: list[Admitted], rows: list[MinerRow]) -> None:
        """Mark later near-duplicates within each shard (arrival order, then hotkey)."""
        for shard in sorted({a.shard for a in admitted}):
            members = sorted(
                (i for i, a in enumerate(admitted) if a.shard == shard),
                key=lambda i: (admitted[i].received_at, admitted[i].hotkey),
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
                [flatten(admitted[i].delta) for i in members], self.vcfg.copy_threshold, reference
            )
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
        self.state.hotkeys = by_uid
        weights = normalized_weights(self.state.ema)
        for row in rows:
            if row.uid is not None:
                row.ema = self.state.ema.get(row.uid, 0.0)
                row.weight = weights.get(row.uid, 0.0)

    def _outer_step(
        self, window: int, credited: list[tuple[Admitted, MinerRow]], report: WindowReport
    ) -> None:
        """θ_{w+1}: per shard, the score-weighted robust aggregate of the credited Δ, then
        the outer step; shards nobody earned credit on stay as they are."""
        contributors: list[Contributor] = []
        for shard, names in enumerate(self.shards):
            members = [(a, row) for a, row in credited if a.shard == shard]
            if not members:
                continue
            scores = torch.tensor([row.score for _, row in members], dtype=torch.float64)
            stack = torch.stack([flatten(a.delta) for a, _ in members])
            mixed = self._aggregate(stack, scores)
            delta, offset = {}, 0
            for name in sorted(names):
                numel = int(np.prod(self.shapes[shard][name]))
                delta[name] = mixed[offset : offset + numel].view(self.shapes[shard][name])
                offset += numel
            theta = shard_state(self.model, names)
            momentum = {n: self.momentum[n] for n in names if n in self.momentum}
            new_params, new_momentum = outer_step(theta, delta, momentum, self.cfg.outer)
            apply_to_shard(self.model, names, new_params)
            self.momentum.update(new_momentum)
            share = (scores / scores.sum()).tolist()
            contributors += [
                Contributor(uid=a.uid, hotkey=a.hotkey, score=row.score, weight=w)
                for (a, row), w in zip(members, share, strict=True)
            ]
        if contributors:
            n_heldout = self.pages.heldout.shape[0]
            e_idx = heldout_sample(
                self.secret, window, n_heldout, min(self.vcfg.heldout_pages, n_heldout)
            )
            held = torch.from_numpy(self.pages.heldout[e_idx])
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
        )  # fmt: skip
        try:
            ref = self.store.publish_checkpoint(self.model, self.tokenizer, prov)
            report.published = ref.revision
        except StoreConflict as exc:
            logger.info("window %d: %s; adopting the published one if any", window + 1, exc)
            try:
                self._load_weights(self._pull(window + 1))
                report.adopted = f"window-{window + 1}"
            except NotFound:
                logger.warning("window %d: not published here, keeping our own θ", window + 1)

    def check_group_average(
        self, shard: int, group_average: dict[str, torch.Tensor], members: Sequence[int]
    ) -> tuple[float, bool]:
        """Compare the average a hivemind group of `members` (UIDs) reached on `shard` in
        the last scored window with the plain mean of those members' admitted Δ, and log a
        mismatch naming the group. Members without an admitted Δ make it a mismatch."""
        names = self.shards[shard]
        missing = [u for u in members if u not in self.last_admitted]
        if not members or missing:
            logger.warning(
                "group average on shard %d: members %s have no admitted Δ", shard, missing
            )
            return math.inf, False
        admitted = {
            n: torch.stack([self.last_admitted[u].delta[n] for u in members]).mean(0) for n in names
        }
        error, ok = compare_group_average(
            group_average, admitted, tolerance=self.vcfg.group_tolerance
        )
        if not ok:
            logger.warning(
                "group average on shard %d differs from the admitted Δ of members %s "
                "(relative error %.3g > %.3g)",
                shard, sorted(members), error, self.vcfg.group_tolerance,
            )  # fmt: skip
        return error, ok

    def _aggregate(self, stack: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        robust = self.cfg.averaging.robust
        if stack.shape[0] == 1:
            return stack[0]
        if robust.kind == "centered_clip":  # its clipping uses whole-row norms: no slicing
            return aggregate(stack, scores, robust)
        parts = [
            aggregate(stack[:, i : i + AGGREGATE_CHUNK], scores, robust)
            for i in range(0, stack.shape[1], AGGREGATE_CHUNK)
        ]
        return torch.cat(parts)

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
        for row in report.miners:
            if row.uid is None:
                continue
            prefix = f"uid/{row.uid}"
            metrics[f"{prefix}/score"] = row.score
            metrics[f"{prefix}/ema"] = row.ema
            metrics[f"{prefix}/weight"] = row.weight
            if row.loss_delta is not None:
                metrics[f"{prefix}/loss_delta"] = row.loss_delta
            if row.own_margin is not None:
                metrics[f"{prefix}/own_margin"] = row.own_margin
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
                logger.warning("behind: skipping windows %d..%d", next_window, current - 2)
                next_window = current - 1
            roster = None
            if head < start_block(next_window, self.cfg.window) + 1:
                # Read who mines at the window's start, as the miners do.
                wait_for_block(self.ledger, start_block(next_window, self.cfg.window))
                roster = self.roster(next_window)
            roster = roster or self.roster(next_window)
            aux = self._join_groups(next_window)
            wait_for_block(self.ledger, deadline(next_window, self.cfg.window))
            reports.append(self.process_window(next_window, roster))
            if aux is not None:
                self._check_groups(next_window, roster, aux)
            next_window += 1
        return reports

    def _join_groups(
        self, window: int
    ) -> concurrent.futures.Future[dict[int, AverageResult | AveragingFailed]] | None:
        """Join every shard's group of `window` as an auxiliary peer, in the background.
        The groups meet at the deadline, so matchmaking must start a little before it."""
        if self.seat is None:
            return None
        cfg = self.cfg
        due = deadline(window, cfg.window)
        lead = math.ceil((cfg.averaging.min_matchmaking_time_s + 1) / cfg.chain.block_time_s)
        head = wait_for_block(self.ledger, max(start_block(window, cfg.window), due - lead))
        if head >= due:
            return None  # too late to meet this window's groups
        start_at = block_time(self.ledger, due, anchor=start_block(window, cfg.window))
        tail = cfg.window.publish_margin * cfg.chain.block_time_s
        timeout = max(start_at - time.time() + tail, cfg.averaging.min_matchmaking_time_s + 0.5)
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aux-averaging")
        future = pool.submit(
            self.seat.average_window, window, {}, start_at=start_at, timeout=timeout
        )
        pool.shutdown(wait=False)
        return future

    def _check_groups(
        self,
        window: int,
        roster: Roster,
        aux: concurrent.futures.Future[dict[int, AverageResult | AveragingFailed]],
    ) -> None:
        """Each group's average against the mean of its members' admitted Δ."""
        limit = self.cfg.averaging.allreduce_timeout_s + 30
        try:
            results = aux.result(timeout=limit)
        except TimeoutError:
            logger.warning("window %d: no group average within %.0fs", window, limit)
            return
        for shard, result in sorted(results.items()):
            if not isinstance(result, AverageResult):
                continue  # no group formed (no miners, or they failed): nothing to check
            uids = [roster.miners[h] for h in result.members if h in roster.miners]
            error, ok = self.check_group_average(shard, result.tensors, uids)
            logger.info(
                "window %d shard %d: group of %s averaged; relative error vs admitted %.3g (%s)",
                window, shard, sorted(uids), error, "ok" if ok else "MISMATCH",
            )  # fmt: skip
            self.tracker.log({f"averaging/shard{shard}_group_error": error, "window": window})

    def close(self) -> None:
        if self.seat is not None:
            self.seat.close()
        self.tracker.finish()
        self.ledger.close()


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
