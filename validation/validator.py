"""The validator process: score every contribution of every window, set weights, publish θ_{w+1}.

    python -m validation.validator --config configs/tiny.yaml --hotkey validator-0
    tensormine validator run --config configs/tiny.yaml --hotkey validator-0 --windows 5
    tensormine validator report --config configs/tiny.yaml --hotkey validator-0 --last 3

`Validator` runs the window; each step lives in a module of its own. Every window w,
before the deadline it joins w's hivemind groups as an auxiliary peer
(`validation.group_audit`), and once the ledger reaches w's reveal deadline it
1. enters with θ_w: the store's canonical checkpoint of w when there is one (what miners
   start from), else its own θ_w from its last outer step, else the latest published
   checkpoint before w (window 0 at worst, which it writes if no miner has yet:
   `train.startup`) — `validation.publish`;
2. lists the contributions of w in every miner's own store, each hotkey's only from the
   location it committed on the ledger (`validation.listing`), and admits each one:
   signature, window and shard, commitment before the deadline block and a reveal that
   matches it, sha256, shapes and dtypes, finite values (decoded too), size, compression;
   a refusal, or a miner with nothing revealed, scores 0 with its reason code
   (`validation.admission`); and challenges each admitted one to prove its work: a few
   segments of its committed inner trajectory, drawn after the deadline
   (`validation.proof_of_work`);
3. evaluates the admitted Δ against θ_w on its held-out sample E (drawn with its own
   secret, from its private `validation.heldout_files` when it has some, else the public
   split): the loss delta on E, the own-data, held-out-rival and copy checks
   (`validation.evaluate`, `validation.probes`, `validation.scoring`);
4. takes what the groups said of each miner (a mismatch scores 0);
5. takes the outer step on each shard's group average (or what the group would have
   sent, rebuilt from the admitted Δ) and publishes θ_{w+1} with provenance; if another
   validator published w+1 first, it adopts that one (`validation.publish`,
   `validation.next_model`; with `averaging.overlap` the average is window w − 1's,
   whose groups ran while w trained: `train.overlap`); then it checks the miners'
   answers to its challenges by recomputing the segments (a failure scores 0, a strike
   and a reset of the moving average), updates the moving averages, strikes and flags
   per UID, and every `validation.weights_every` windows sets the normalized moving
   averages as weights (`validation.bookkeeping`);
6. saves its state atomically (`validation.state`), checks the group averages against
   the admitted Δ (`validation.group_audit`), appends the window's record to
   ``<run.dir>/validators/<name>/windows.jsonl``, logs it to W&B at step w and prints a
   table (`validation.report`). Windows it falls too far behind to score are named in a
   warning, a skip record of windows.jsonl and W&B.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from averaging.participant import Participant
from averaging.weights import LedgerWeights
from chain.interface import Chain, Identity, SigningKey
from chain.types import ContributionCommitment
from common.errors import TensormineError
from common.tracking import Tracker
from store.api import Store, open_store
from store.backend import ContributionRef
from tensormine.config import RunConfig, load_config
from train.corpus import DataError
from train.data import Pages, load_pages, shard_affinities
from train.model import build_model
from train.overlap import start_for
from train.shards import shard_labels, shard_map
from train.startup import (
    StartupError,
    align_special_tokens,
    commit_contributions_location,
    data_cache,
    ensure_window_zero,
    join_averaging,
    load_identity,
    load_tokenizer_from,
    open_run_chain,
    register_hint,
)
from train.windows import deadline, reveal_deadline, start_block, wait_for_block, window_of
from validation.admission import Admitted, Refused, Roster, admit_window
from validation.bookkeeping import WeightSetter, apply_verdicts, update_scores
from validation.evaluate import EvalContext, evaluate
from validation.group_audit import (
    GroupAudit,
    GroupRound,
    GroupSeats,
    check_group_average,
    check_groups,
    group_round,
    mark_averaged,
)
from validation.listing import contribution_sources, list_contributions
from validation.probes import (
    heldout_sample,
    private_heldout_pages,
    read_secret_file,
    signing_seed,
    validator_secret,
)
from validation.proof_of_work import SpotChecker
from validation.publish import PublishContext, Pulls, enter_window, next_model
from validation.report import (
    REFUSED,
    MinerRow,
    SkipRecord,
    WindowReport,
    append_report,
    window_metrics,
    window_table,
)
from validation.state import ValidatorState, load_state, save_state

logger = logging.getLogger("validation.validator")


class ValidatorError(TensormineError, RuntimeError):
    """The validator cannot go on; the message says what to do."""


def resolve_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class Validator:
    """One validator (one hotkey) of a run."""

    def __init__(
        self,
        cfg: RunConfig,
        identity: Identity | SigningKey,
        name: str,
        *,
        console: Console | None = None,
        chain: Chain | None = None,
    ) -> None:
        self.cfg = cfg
        self.vcfg = cfg.validation
        if not isinstance(identity, Identity):
            identity = Identity.single(identity)
        self.identity = identity
        self.keypair = keypair = identity.hotkey
        self.name = name
        self.console = console
        self.dir = cfg.run.dir / "validators" / name
        try:
            # `chain`: a handle made elsewhere (tests: Bittensor on an in-memory node).
            self.ledger = (
                chain if chain is not None else open_run_chain(cfg, identity, state_dir=self.dir)
            )
        except StartupError as exc:
            raise ValidatorError(str(exc)) from None
        uid = self.ledger.uid_of(keypair.address)
        if uid is None:
            raise ValidatorError(
                f"hotkey {name} ({keypair.address}) is not registered on "
                f"{self.ledger.describe}; {register_hint(cfg, name)}, and stake it"
            )
        self.uid = uid
        self.store: Store = open_store(cfg.store)
        self.pulls = Pulls(self.store, self.dir / "checkpoints")
        self.device = resolve_device(self.vcfg.device)
        self.secret = (
            read_secret_file(self.vcfg.secret_file)
            if self.vcfg.secret_file is not None
            else validator_secret(signing_seed(keypair, self.dir))
        )
        self.model = build_model(cfg.model, cfg.run.seed, device=self.device)
        self.shards = shard_map(self.model, cfg.model.shards)
        labels = shard_labels(cfg.model)
        # Named in the reports only where a name says more than the index (experts).
        self.shard_labels = (
            {str(k): v for k, v in enumerate(labels)} if cfg.model.arch == "mixtral" else {}
        )
        params = dict(self.model.named_parameters())
        self.shapes = {
            s: {n: tuple(params[n].shape) for n in names} for s, names in enumerate(self.shards)
        }
        self.state = ValidatorState(window=-1)
        self.momentum: dict[str, torch.Tensor] = {}
        self.weight_setter = WeightSetter(self.ledger, every=self.vcfg.weights_every)
        # The last scored window's admitted Δ by UID, for checking hivemind group averages.
        self.last_admitted: dict[int, Admitted] = {}
        self._last_window = -1  # the window `last_admitted` belongs to (replays look back one)
        # With `averaging.overlap`, θ_{w+1} steps window w − 1's average: its inputs wait here.
        self._waiting: StepInputs | None = None
        # What each member of a group weighs in its average: the same ledger field and
        # floor every group member reads (`averaging.weights`).
        self.group_weights = LedgerWeights(
            self.ledger, cfg.averaging.weights, cfg.averaging.weight_floor
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
            self.seat = join_averaging(cfg, self.ledger, self.dir, self.model, self.shards)
        self._seats: GroupSeats | None = None  # the seat's thread, started by `run`
        # Proof of work: challenges go into our store, where miners look for them.
        self.checker = SpotChecker(
            cfg, keypair, self.store, self.secret, self.shards, self.shapes,
            self.pages.train, self.device, self.affinities,
        )  # fmt: skip
        if self.checker.enabled:
            commit_contributions_location(self.ledger, self.store.contributions_location)

    # ---- start-up ------------------------------------------------------------------------
    @property
    def data_cache(self) -> Path:
        return data_cache(self.cfg)

    @property
    def reports_path(self) -> Path:
        return self.dir / "windows.jsonl"

    def _prepare_genesis_and_data(self) -> None:
        """Window 0 in the store (written here if no miner has yet), tokenizer, pages."""
        ensure_window_zero(self.store, self.ledger, self.cfg, self.model)
        self.tokenizer = load_tokenizer_from(self.pulls.pull(0))
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
        self.affinities = shard_affinities(self.pages, self.cfg.model, self.cfg.data)
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

    # ---- the steps' inputs ---------------------------------------------------------------
    def adopt(self, window: int) -> str:
        """Make the model θ_window (`validation.publish.enter_window`); returns where it
        came from."""
        source, momentum = enter_window(
            self.model, self.pulls, window, own_window=self.state.window, device=self.device
        )
        if momentum is not None:
            self.momentum = momentum
        return source

    def roster(self, window: int) -> Roster:
        return Roster.from_neurons(self.ledger.neurons(), model=self.cfg.model, window=window)

    def contribution_sources(self, roster: Roster) -> dict[str, str]:
        """hotkey -> where each miner of `roster` keeps its contributions
        (`validation.listing`)."""
        return contribution_sources(
            roster, self.ledger.commitments(), own=self.store.contributions_location,
            backend=self.cfg.store.backend,
        )  # fmt: skip

    def list_contributions(self, window: int, roster: Roster) -> list[ContributionRef]:
        """The contributions of `window` from every miner's committed location
        (`validation.listing`)."""
        own = self.store.contributions_location
        return list_contributions(self.store, window, self.contribution_sources(roster), own=own)

    def admit(
        self, window: int, roster: Roster
    ) -> tuple[
        dict[str, ContributionCommitment], list[ContributionRef], list[Admitted], list[Refused]
    ]:
        """`window`'s commitments, the contributions listed and what admission made of them
        (`validation.admission.admit_window`)."""
        cfg = self.cfg
        # Read as of the reveal deadline: on Bittensor a hotkey's next commitment replaces
        # this one, and a late one (after the deadline) must still be seen to be refused.
        commitments = self.ledger.contribution_commitments(
            window, block=reveal_deadline(window, cfg.window)
        )
        refs = self.list_contributions(window, roster)
        admitted, refused = admit_window(
            self.store, refs, roster=roster, window=window, shapes=self.shapes,
            commitments=commitments, deadline_block=deadline(window, cfg.window), cfg=cfg,
        )  # fmt: skip
        return commitments, refs, admitted, refused

    def rebuild_step(self, window: int) -> StepInputs:
        """The inputs of the step that lands window `window`'s average, read back from the
        store when this validator did not score that window (it started, or restarted,
        after it): what its groups would have sent, rebuilt from its admitted Δ."""
        roster = Roster.from_neurons(self.ledger.neurons(), model=self.cfg.model, window=window)
        _, _, admitted, _ = self.admit(window, roster)
        logger.info(
            "window %d: rebuilding its average from the store (%d admitted) to land it",
            window, len(admitted),
        )  # fmt: skip
        pinned = self.group_weights.table(start_block(window, self.cfg.window))
        return StepInputs(window, admitted, [], pinned, None)

    def group_audit(self, admitted: Mapping[int, Admitted] | None = None) -> GroupAudit:
        """What checking group averages reads: `admitted` (UID -> Δ; default the last
        scored window's)."""
        return GroupAudit(
            shapes=self.shapes, averaging=self.cfg.averaging,
            tolerance=self.vcfg.group_tolerance, weight_of=self.group_weights,
            admitted=self.last_admitted if admitted is None else dict(admitted),
            hotkeys=self.state.hotkeys,
        )  # fmt: skip

    def check_group_average(
        self,
        shard: int,
        group_average: dict[str, torch.Tensor],
        members: Sequence[int],
        weights: Mapping[str, float] | None = None,
    ) -> tuple[float, bool]:
        """A group's average on `shard` against its `members`' (UIDs) admitted Δ of the
        last scored window (`validation.group_audit.check_group_average`)."""
        return check_group_average(self.group_audit(), shard, group_average, members, weights)

    # ---- one window ----------------------------------------------------------------------
    def process_window(
        self,
        window: int,
        roster: Roster | None = None,
        groups: concurrent.futures.Future[GroupRound] | None = None,
    ) -> WindowReport:
        """Score window `window` (its reveal deadline block must exist) and act on it.

        `groups` is this validator's seat in the window's hivemind groups (`join_groups`):
        their averages are checked against the admitted Δ before the window's record is
        written, so the record and the W&B step carry the group checks.
        """
        started = time.perf_counter()
        cfg = self.cfg
        roster = roster or self.roster(window)
        if self.ledger.block(reveal_deadline(window, cfg.window)) is None:
            raise ValidatorError(
                f"window {window}: its reveal deadline block "
                f"{reveal_deadline(window, cfg.window)} is not made yet"
            )
        source = self.adopt(window)
        theta_w = (
            {k: v.detach().to("cpu").clone() for k, v in self.model.state_dict().items()}
            if self.checker.enabled
            else {}
        )
        commitments, refs, admitted, refused = self.admit(window, roster)
        issued = []
        earlier = list(self.last_admitted.values()) if self._last_window == window - 1 else []
        # Eager miners start from θ_w with their own Δ of w − 1 stepped in: checking their
        # trajectories needs what we admitted of w − 1 (a restarted validator lacks it).
        eager = cfg.averaging.overlap_mode == "eager"
        momentum_w = (
            {k: v.detach().to("cpu") for k, v in self.momentum.items()}
            if eager and self.checker.enabled
            else {}
        )
        if self.checker.enabled and (not eager or window == 0 or earlier):
            due = self.ledger.block(deadline(window, cfg.window))
            assert due is not None  # the reveal deadline, later, exists
            issued = self.checker.issue(window, admitted, block=due.number, block_hash=due.hash)
        elif self.checker.enabled:
            logger.info("window %d: nothing admitted of %d to check against", window, window - 1)
        answers_due = time.monotonic() + self.vcfg.pow_answer_s
        self.last_admitted = {a.uid: a for a in admitted}
        self._last_window = window
        eval_started = time.perf_counter()
        held, public = self.heldout_pages(window)
        pinned = self.group_weights.table(start_block(window, cfg.window))
        ctx = EvalContext(
            cfg, self.model, self.shards, self.pages.train, self.secret, self.device,
            self.affinities,
        )  # fmt: skip
        base_loss, rows = evaluate(
            ctx, window, admitted, heldout=held, public=public, pinned=pinned,
            momentum=self.momentum, state=self.state, earlier=earlier,
        )  # fmt: skip
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
        now = StepInputs(window, admitted, rows, pinned, groups)
        step: StepInputs | None = now
        if cfg.averaging.overlap_mode != "off":
            # θ_{w+1} = outer(θ_w, A_{w−1}): this window's groups land in the next one.
            waiting, self._waiting = self._waiting, now
            if waiting is not None and waiting.window == window - 1:
                step = waiting
            else:
                step = self.rebuild_step(window - 1) if window > 0 else None
        got = group_round(cfg, step.window, step.groups) if step is not None else None
        if got is not None and step is not None:
            # With overlap: what window w − 1's groups say of each miner (a mismatch or a
            # drop there scores 0 here, one window later).
            mark_averaged(rows, got[0], {a.hotkey: a.shard for a in step.admitted})
        report = WindowReport(
            window=window, validator=self.name, block=self.ledger.block_number(),
            heldout_loss=base_loss, contributions=len(refs), admitted=len(admitted),
            seconds=0.0, eval_seconds=eval_seconds, miners=rows,
            committed=len(commitments), shard_labels=self.shard_labels,
        )  # fmt: skip
        publish = PublishContext(
            cfg, self.model, self.shards, self.shapes, self.store, self.ledger, self.tokenizer,
            self.seat, self.pulls, self.device,
        )  # fmt: skip
        report.averaged_window = step.window if step is not None else -1
        self.momentum = next_model(
            publish, window, step.admitted if step else [], step.rows if step else [], got,
            report, momentum=self.momentum, pinned=step.pinned if step else pinned, heldout=held,
        )  # fmt: skip
        # θ_{w+1} is out (proof of work never changes it); now the spot checks gate the
        # scores (the provenance lists the loss-delta scores before them).
        if issued:
            before = {a.hotkey: a.delta for a in earlier} if eager else {}

            def start_of(a: Admitted) -> Mapping[str, torch.Tensor]:
                return start_for(theta_w, before.get(a.hotkey), momentum_w, cfg.outer)

            verdicts = self.checker.settle(
                window, issued, theta_w, until=answers_due, start_of=start_of
            )
            apply_verdicts(rows, verdicts)
        update_scores(
            self.state, roster, rows, alpha=self.vcfg.ema_alpha,
            pow_fail_resets=self.vcfg.pow_fail_resets,
        )  # fmt: skip
        report.weights_set = self.weight_setter.maybe_set(self.state, window)
        self.state.window = window + 1
        save_state(self.dir / "state", self.state, self.model.state_dict(), self.momentum)
        if got is not None and step is not None:
            audit = self.group_audit({a.uid: a for a in step.admitted})
            report.group_checks = check_groups(audit, step.window, roster, got)
        report.seconds = time.perf_counter() - started
        append_report(self.reports_path, report)
        self._log(report, source)
        return report

    def _log(self, report: WindowReport, source: str) -> None:
        """The window to W&B (`report.window_metrics`), the log and the console."""
        self.tracker.log(window_metrics(report), step=report.window)
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
        if self.seat is not None and self._seats is None:
            self._seats = GroupSeats(
                self.seat, self.ledger, self.cfg, self.group_weights, first=next_window
            )
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
            wait_for_block(self.ledger, reveal_deadline(next_window, self.cfg.window))
            groups = self._seats.take(next_window) if self._seats is not None else None
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

    def close(self) -> None:
        if self._seats is not None:
            self._seats.close()
        if self.seat is not None:
            self.seat.close()
        self.tracker.finish()
        self.ledger.close()


@dataclass(frozen=True)
class StepInputs:
    """What the outer step of a θ is built from: window `window`'s admitted Δ, its score
    rows (the provenance's scores), the ledger weights pinned at its start, and this
    validator's seat in its groups (`join_groups`; None: none)."""

    window: int
    admitted: list[Admitted]
    rows: list[MinerRow]
    pinned: Mapping[str, float]
    groups: concurrent.futures.Future[GroupRound] | None


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
        identity = load_identity(cfg, args.hotkey, args.keys_dir)
        from common.cli import make_console

        validator = Validator(cfg, identity, args.hotkey, console=make_console())
        validator.run(args.windows)
    except (TensormineError, TimeoutError) as exc:
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
