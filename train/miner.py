"""The miner process: train the assigned shard each window and publish the pseudo-gradient.

    accelerate launch -m train.miner --config configs/tiny.yaml --hotkey alice
    accelerate launch --num_processes 2 -m train.miner --config configs/tiny.yaml --hotkey alice
    tensormine miner --config configs/tiny.yaml --hotkey alice        # one process

Every window w (ledger blocks [w·B, (w+1)·B)) the miner
1. enters with θ_w (`train.window_start`): its own when its last round left it in step
   with its groups, else a registered peer's in step (θ_w and the outer momentum), else
   the store's canonical checkpoint of w (waiting for it a while), else the latest one
   before it, else the run's deterministic window-0 checkpoint (which the first miner to
   start writes: `train.startup`). Without averaging the canonical checkpoint always wins
   when present;
2. trains its shard (a deterministic, balanced function of the miner UIDs and w) for H
   AdamW steps on its assigned pages (a function of its hotkey, w and the run seed);
3. forms Δ = θ_w − θ on the shard, encodes it (the wire's parts with averaging on),
   commits to it on the ledger before the window's deadline block and reveals it in its
   store, with a manifest signed by its hotkey, once the deadline block exists
   (`train.contribution`; a late Δ is not revealed);
4. at the deadline, all-reduces that Δ with the other miners of its shard over hivemind
   (a member of its shard's group, an auxiliary peer of the other shards' groups, all at
   once) and applies the outer step (Nesterov SGD, DiLoCo) to every shard's average,
   giving θ_{w+1}, identical on every miner in step (`train.group_round`); with
   `averaging.overlap` the round runs on while w + 1 trains, θ_{w+1} steps window w − 1's
   average, and an eager miner starts w from θ_w with its own Δ of w − 1 stepped in
   (`train.overlap`);
5. saves its state atomically (`train.miner_state`: a killed miner restarts into the
   current window), appends a line to ``<run dir>/miners/<name>/windows.jsonl``, and logs
   loss, learning rate, grad norm, tokens/s, step time, bytes published, window, shard
   and held-out loss to W&B (offline unless an API key is set).

`--behaviour` makes an adversarial miner for demos and tests (`train.misbehaviour`).

Several accelerate processes form one miner (DDP inside the inner loop); the main
process alone talks to the ledger, the store and the DHT, and hands decisions to the
others as integer tensors and the model as a broadcast of its weights.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast

from averaging.outer import load_outer_state
from averaging.participant import Participant
from chain.interface import Chain, Identity, SigningKey
from common.errors import TensormineError
from common.tracking import Tracker
from store.api import Store, open_store
from store.manifest import Compression, Trajectory, commitment_body
from tensormine.config import RunConfig
from train.adversary import training_rows
from train.behaviours import BEHAVIOURS
from train.cheats import backdate
from train.contribution import commit_before_deadline, committed_digests
from train.data import Pages, load_pages, shard_affinities
from train.group_round import (
    Outcomes,
    contribution_payload,
    in_step,
    outer_steps,
    start_round,
    step_averages,
)
from train.inner import StepStats, inner_loop, mean_loss
from train.miner_state import StateMismatch, load_state, save_state
from train.misbehaviour import misbehave, poisoned
from train.model import build_model, model_fingerprint
from train.overlap import PendingRound, Rounds, eager_start
from train.pages import miner_eval_rows
from train.responder import Responder
from train.shards import (
    apply_to_shard,
    make_trainable,
    shard_for_miner,
    shard_map,
    shard_state,
    trained_shards,
)
from train.startup import (
    align_special_tokens,
    commit_contributions_location,
    data_cache,
    ensure_window_zero,
    join_averaging,
    load_tokenizer_from,
    open_run_chain,
    register_hint,
)
from train.trajectory import TrajectoryKeeper, segment_bounds
from train.window_report import (
    WindowReport,
    moe_report,
    round_report,
    step_metrics,
    summary,
    window_metrics,
)
from train.window_start import (
    StateOffer,
    check_canonical,
    choose_start,
    pull,
    serve_until_published,
)
from train.windows import deadline, joinable_window, start_block, wait_for_block, window_of

logger = logging.getLogger("train.miner")


class MinerError(TensormineError, RuntimeError):
    """The miner cannot go on; the message says what to do."""


class Miner:
    """One miner (one hotkey), possibly spread over several accelerate processes."""

    def __init__(
        self,
        cfg: RunConfig,
        identity: Identity | SigningKey,
        name: str,
        accelerator: Accelerator,
        behaviour: str = "honest",
        *,
        chain: Chain | None = None,
    ):
        if behaviour not in BEHAVIOURS:
            raise MinerError(f"unknown behaviour {behaviour!r}; one of {', '.join(BEHAVIOURS)}")
        self.behaviour = behaviour
        self.cfg = cfg
        if not isinstance(identity, Identity):
            identity = Identity.single(identity)
        self.identity = identity
        self.keypair = keypair = identity.hotkey
        self.name = name
        self.acc = accelerator
        self.main = accelerator.is_main_process
        self.dir = cfg.run.dir / "miners" / name
        # `chain`: a handle made elsewhere (tests: a Bittensor chain on an in-memory node).
        self.ledger = chain if chain is not None else open_run_chain(cfg, identity)
        uid = self.ledger.uid_of(keypair.address)
        if uid is None:
            raise MinerError(
                f"hotkey {name} ({keypair.address}) is not registered on "
                f"{self.ledger.describe}; {register_hint(cfg, name)}"
            )
        self.uid = uid
        self.store: Store = open_store(cfg.store)
        self.tracker = (
            Tracker.start(
                cfg.wandb,
                run_dir=self.dir,
                name=f"miner-{name}",
                group=cfg.run.name,
                job_type="miner",
                config=cfg.to_json_dict(),
            )
            if self.main
            else Tracker(None, "disabled")
        )
        self.global_step = 0
        self.model = build_model(cfg.model, cfg.run.seed)
        self.shards = shard_map(self.model, cfg.model.shards)
        self.momentum: dict[str, torch.Tensor] = {}
        self.residual: dict[str, torch.Tensor] = {}
        self.window = -1  # the window the model's weights belong to
        self._heldout: float | None = None  # held-out loss of the current weights, if known
        self._prepare_genesis_and_data()
        # Averaging (main process only): `synced` means the model is the groups' θ_window.
        self.seat: Participant | None = None
        self.synced = False
        self._start_fingerprint = ""  # of θ_w, the model the current window started from
        # Overlap (`train.overlap`): the round still running, and the last one that ended.
        wait_s = cfg.averaging.allreduce_timeout_s + 30
        self.rounds = Rounds(self.dir / "state", keypair.address, wait_s)
        self.offer: StateOffer | None = None  # our θ for late joiners, while in step
        if self.main and cfg.averaging.enabled:
            self.seat = join_averaging(cfg, self.ledger, self.dir, self.model, self.shards)
            self.offer = StateOffer(self.seat)
        if self.main:
            commit_contributions_location(self.ledger, self.store.contributions_location)
        # Proof of work: the trajectory's states stay on disk until their challenges close,
        # and a thread answers validators' challenges from them (`train.responder`).
        self.keeper: TrajectoryKeeper | None = None
        self.responder: Responder | None = None
        if self.main and cfg.train.pow_segments:
            self.keeper = TrajectoryKeeper(self.dir / "trajectory")
            self.responder = Responder(
                self.store, keypair, self.keeper, self.shards,
                chain=self.ledger, backend=cfg.store.backend,
            )  # fmt: skip
            self.responder.start()

    # ---- start-up ------------------------------------------------------------------------
    def _prepare_genesis_and_data(self) -> None:
        """Window 0 in the store (deterministic, first miner writes it), tokenizer, pages."""
        genesis = self.pulls / "window-0"
        if self.main:
            ensure_window_zero(self.store, self.ledger, self.cfg, self.model)
            pull(self.store, self.pulls, 0)
        self.acc.wait_for_everyone()
        self.tokenizer = load_tokenizer_from(genesis)
        align_special_tokens(self.model, self.tokenizer)
        with self.acc.main_process_first():
            self.pages: Pages = load_pages(
                self.cfg.data,
                self.tokenizer,
                data_cache(self.cfg),
                min_train_pages=self.cfg.train.batch_size,
            )
        needed = self.cfg.train.pages_per_window
        if self.pages.train.shape[0] < needed:
            raise MinerError(
                f"the corpus gives {self.pages.train.shape[0]} train pages; a window needs "
                f"{needed} (train.inner_steps × train.batch_size): use more data or fewer steps"
            )
        # Every expert shard's pages come partly from its topics (data.expert_affinity).
        self.affinities = shard_affinities(self.pages, self.cfg.model, self.cfg.data)
        rows = miner_eval_rows(self.pages.heldout.shape[0], self.cfg.train.eval_pages)
        self.eval_pages = torch.from_numpy(self.pages.heldout[rows])

    @property
    def pulls(self) -> Path:
        """Where pulled checkpoints are kept."""
        return self.dir / "checkpoints"

    # ---- state ---------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    def save_state(self) -> None:
        """Weights, outer momentum, residuals and window, atomically (main process;
        `train.miner_state`)."""
        if not self.main:
            return
        save_state(
            self.state_dir, window=self.window, uid=self.uid, weights=self.model.state_dict(),
            momentum=self.momentum, residual=self.residual,
            wire_residual=self.seat.wire_residuals() if self.seat is not None else None,
        )  # fmt: skip

    def load_state(self) -> bool:
        """Resume from the saved state, if any; returns whether there was one."""
        shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        try:
            saved = load_state(self.state_dir, shapes)
        except StateMismatch as exc:
            raise MinerError(f"{exc} {self.cfg.model}") from None
        if saved is None:
            return False
        self.model.load_state_dict(saved.weights)
        self._heldout = None
        self.momentum, self.residual = saved.momentum, saved.residual
        if self.seat is not None and saved.wire_residual is not None:
            try:
                self.seat.restore_wire_residuals(load_outer_state(saved.wire_residual, shapes))
            except ValueError as exc:  # OuterStateError is one too
                raise MinerError(f"{saved.wire_residual}: {exc}") from None
        self.window = saved.window
        if self.cfg.averaging.overlap_mode != "off":
            self.rounds.resume(saved.window, shapes)
        logger.info("resumed %s at window %d from %s", self.name, self.window, saved.folder)
        return True

    # ---- one window ----------------------------------------------------------------------
    def _adopt(self, window: int) -> None:
        """Make the model θ_window (see the module docstring), decided and loaded by the
        main process and copied to the other processes."""
        changed = torch.zeros(1, dtype=torch.long)
        if self.main:
            changed[0] = int(self._choose_start(window))
        if int(broadcast(changed)[0]):
            self._sync_ranks()
            self._heldout = None
        self.window = window

    def _choose_start(self, window: int) -> bool:
        """Main process: load θ_window into the model (`train.window_start.choose_start`);
        returns whether the weights changed."""
        start = choose_start(
            self.model, window, seat=self.seat, synced=self.synced, own_window=self.window,
            store=self.store, ledger=self.ledger, cfg=self.cfg, pulls=self.pulls,
        )  # fmt: skip
        self.synced = start.synced
        if start.momentum is not None:
            self.momentum = start.momentum
        return start.changed

    def _look_ahead(self, window: int, names: list[str]) -> dict[str, torch.Tensor]:
        """With overlap, keep θ_w (main process: on our shard's tensors `names` and those
        the look-ahead moves; empty otherwise) and, eager, step our own Δ of window − 1
        into the model (`train.overlap`), on every process. Returns the θ_w kept."""
        moved = torch.zeros(1, dtype=torch.long)
        keep: dict[str, torch.Tensor] = {}
        # The synchronous round steps from `start`; only overlap restores θ_w afterwards.
        if self.main and self.cfg.averaging.overlap_mode != "off" and self.seat is not None:
            ours = self.rounds.sent_before(window)
            keep = shard_state(self.model, sorted({*names, *ours}))
            if self.cfg.averaging.overlap_mode == "eager" and ours:
                ahead = eager_start(keep, ours, self.momentum, self.cfg.outer)
                apply_to_shard(self.model, list(ahead), ahead)
                moved[0] = 1
        if int(broadcast(moved)[0]):
            self._sync_ranks()
        return keep

    def _sync_ranks(self) -> None:
        """Copy the main process's weights to the other processes of this miner."""
        if self.acc.num_processes > 1:
            for tensor in self.model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)

    def _decide(self, window: int) -> tuple[int, list[int]]:
        """(our shard, the shards some miner trains) for `window`, decided by the main
        process from the ledger's miner UIDs and shared with the other processes."""
        n_shards = self.cfg.model.shards
        decision = torch.zeros(1 + n_shards, dtype=torch.long)
        if self.main:
            neurons = self.ledger.neurons()
            miners = [n.uid for n in neurons if not n.validator_permit]
            if self.uid not in miners:
                raise MinerError(
                    f"UID {self.uid} is no longer a miner here (deregistered or holds a "
                    "validator permit)"
                )
            shared = self.cfg.model.expert_shards
            decision[0] = shard_for_miner(self.uid, miners, window, n_shards, shared=shared)
            for s in trained_shards(miners, window, n_shards, shared=shared):
                decision[1 + s] = 1
        decision = broadcast(decision)
        return int(decision[0]), [s for s in range(n_shards) if int(decision[1 + s])]

    def train_window(self, window: int) -> WindowReport:
        cfg = self.cfg
        self._adopt(window)
        shard, active = self._decide(window)
        names = self.shards[shard]
        # θ_w's loss is the last window's result unless _adopt replaced the weights.
        before = self._heldout
        if before is None:
            before = mean_loss(self.model, self.eval_pages, device=self.acc.device)
        # Announced to the groups: peers that start from different models learn it.
        self._start_fingerprint = model_fingerprint(self.model.state_dict())
        base = self._start_fingerprint[:16] if self.seat is not None else ""
        theta_w = self._look_ahead(window, names)
        start = shard_state(self.model, names)  # where the shard's training starts
        make_trainable(self.model, names)
        rows = training_rows(
            self.behaviour, self.keypair.address, window, cfg.run.seed,
            self.pages.train, self.pages.heldout, cfg.train.pages_per_window,
            affinity=self.affinities.get(shard),
        )  # fmt: skip
        pages = torch.from_numpy(rows)

        def log_step(stat: StepStats) -> None:
            self.global_step += 1
            self.tracker.log(step_metrics(stat, window, shard), step=self.global_step)

        bounds = (
            segment_bounds(cfg.train.inner_steps, cfg.train.trajectory_segments)
            if self.keeper
            else []
        )
        record = None
        if self.keeper is not None:
            self.keeper.prune(window - cfg.train.pow_keep_windows + 1)
            record = self.keeper.recorder(window, shard, bounds)
        stats = inner_loop(
            self.acc, self.model, names, pages, cfg.train, on_step=log_step,
            boundaries=bounds[1:], on_boundary=record,
        )  # fmt: skip
        report = WindowReport(
            window=window,
            uid=self.uid,
            shard=shard,
            loss=stats.mean_loss,
            heldout_before=before,
            heldout_loss=float("nan"),
            tokens_per_second=stats.tokens_per_second,
            published_bytes=0,
            late=False,
        )
        expert_metrics = moe_report(report, stats)
        if self.main:
            self._publish_and_step(window, shard, active, start, report, base, theta_w)
        self._sync_ranks()
        self.window = window + 1
        heldout = mean_loss(self.model, self.eval_pages, device=self.acc.device)
        self._heldout = report.heldout_loss = heldout
        self.tracker.log(window_metrics(report, expert_metrics), step=self.global_step)
        self.save_state()
        if self.main:
            with (self.dir / "windows.jsonl").open("a") as fh:
                fh.write(json.dumps(dataclasses.asdict(report)) + "\n")
        logger.info("%s", summary(report))
        return report

    def _publish_and_step(
        self,
        window: int,
        shard: int,
        active: list[int],
        start: dict[str, torch.Tensor],
        report: WindowReport,
        base: str,
        theta_w: dict[str, torch.Tensor],
    ) -> None:
        """Main process: Δ → store, Δ → the groups, outer step on every averaged shard
        (`train.group_round`; with overlap, on the previous window's: `train.overlap`).
        `theta_w`: θ_w on the tensors that training or the look-ahead moved."""
        cfg = self.cfg
        names = self.shards[shard]
        overlap = cfg.averaging.overlap_mode != "off" and self.seat is not None
        landed = None
        if overlap:  # nobody averaged window − 1 when nobody committed to it (window 0)
            landed = self.rounds.land(
                window,
                committed=lambda: (
                    window > 0 and bool(self.ledger.contribution_commitments(window - 1))
                ),
            )
        trained = shard_state(self.model, names)
        delta = {n: start[n] - trained[n] for n in names}  # pseudo-gradient Δ = θ_w − θ
        if self.behaviour != "honest":
            delta = misbehave(
                self.behaviour, delta, store=self.store, ledger=self.ledger, cfg=cfg,
                uid=self.uid, hotkey=self.keypair.address, window=window, shard=shard,
            )  # fmt: skip
        residual = {n: self.residual[n] for n in names if n in self.residual} or None
        payload = contribution_payload(self.seat, shard, names, delta, cfg, residual)
        if payload.residual is not None:
            self.residual.update(payload.residual)
        trajectory = None
        if self.keeper is not None and (meta := self.keeper.meta(window)) is not None:
            trajectory = Trajectory(
                bounds=tuple(meta[1]), states=tuple(self.keeper.digests(window, meta[1]))
            )
        prepared = self.store.prepare_contribution(
            payload.tensors, keypair=self.keypair, uid=self.uid, window=window, shard=shard,
            compression=Compression(scheme=str(payload.params["scheme"]), params=payload.params),
            trajectory=trajectory,
        )  # fmt: skip
        due = deadline(window, cfg.window)
        self._commit(window, prepared.digest, report)
        # A late Δ is kept out of the groups as it is out of the store.
        round_: concurrent.futures.Future[Outcomes] | None = None
        if self.seat is not None and not report.late:
            assert payload.parts is not None
            parts = poisoned(payload.parts) if self.behaviour == "poisoner" else payload.parts
            round_ = start_round(
                self.seat, self.ledger, cfg, window, shard, parts,
                commitment_body(prepared.manifest),
                commitments=committed_digests(self.ledger, window, due),
                receive=active, base=base,
            )  # fmt: skip
        if report.late and self.behaviour != "backdater":
            logger.warning(
                "window %d: not committed before the deadline block %d; not revealing", window, due
            )
        else:
            # Reveal only once the deadline block exists: until then nobody may read it.
            wait_for_block(self.ledger, due)
            ref = self.store.reveal_contribution(prepared)
            report.published_bytes = payload.nbytes
            if self.behaviour == "backdater":
                backdate(self.store, ref, self.ledger, start_block(window, cfg.window))
        if landed is not None:
            # θ_{w+1} = outer(θ_w, A_{w−1}); this window's round runs on into the next one.
            # A late Δ was neither sent nor revealed: nobody steps it in, nor do we.
            sent = {} if report.late else payload.sent
            self.rounds.start(
                PendingRound(window, shard, frozenset({shard, *active}), sent, round_)
            )
            apply_to_shard(self.model, list(theta_w), theta_w)
            step_averages(self.model, self.shards, self.momentum, landed.averages, cfg.outer)
            # In step: θ_w was the groups' (kept in step, a peer's, or the canonical one),
            # or nobody averaged window − 1 (the run's first window: every miner holds
            # the same latest checkpoint), and the round landed for every shard.
            synced = landed.in_step and (self.synced or not landed.shards)
            outcomes: Outcomes = landed.outcomes or {}
            shard, report.averaged_window = landed.shard, landed.window
        else:
            outcomes = round_.result() if round_ is not None else {}
            synced = self.seat is not None and in_step(
                outcomes, {shard, *active}, self.keypair.address
            )
            outer_steps(
                self.model, self.shards, self.momentum, outcomes,
                shard=shard, sent=payload.sent, start=start, outer=cfg.outer,
            )  # fmt: skip
            report.averaged_window = window if outcomes else -1
        if self.seat is not None and not synced and (outcomes or landed is not None):
            logger.warning(
                "window %d: out of step with the groups (a group failed, we missed its "
                "round, or our θ_w differs from most peers'); loading a peer's state next "
                "window", window,
            )  # fmt: skip
        report.canonical = self._check_canonical(window)
        round_report(report, outcomes, shard)
        report.synced = self.synced = synced
        report.fingerprint = model_fingerprint(self.model.state_dict())
        if self.offer is not None:
            self.offer.update(self.model, self.momentum, window=window + 1, synced=synced)

    def _check_canonical(self, window: int) -> str:
        """The published θ_window against the one our last round produced
        (`train.window_start.check_canonical`): we never adopt one that disagrees."""
        return check_canonical(self.store, window, ours=self._start_fingerprint, synced=self.synced)

    def _commit(self, window: int, digest: str, report: WindowReport) -> None:
        """Commit `digest` for `window` on the ledger; `report.late` when no block before
        the deadline took it (or, for a backdater, on purpose after the deadline)."""
        due = deadline(window, self.cfg.window)
        backdater = self.behaviour == "backdater"
        if backdater:
            wait_for_block(self.ledger, due)  # it commits what it copied, after the deadline
        block = commit_before_deadline(self.ledger, window, digest, due, anyway=backdater)
        report.committed_block = -1 if block is None else block
        report.late = block is None or block >= due

    # ---- the loop ------------------------------------------------------------------------
    def _from_main(self, value: Callable[[], int]) -> int:
        """`value()` as the main process computes it (from the ledger), on every process."""
        shared = torch.zeros(1, dtype=torch.long)
        if self.main:
            shared[0] = value()
        return int(broadcast(shared)[0])

    def current_window(self) -> int:
        return self._from_main(lambda: window_of(self.ledger.block_number(), self.cfg.window))

    def joinable_window(self) -> int:
        """The window to train next (`train.windows.joinable_window`)."""
        return self._from_main(lambda: joinable_window(self.ledger.block_number(), self.cfg.window))

    def run(self, max_windows: int | None = None) -> list[WindowReport]:
        """Mine until `max_windows` windows were trained (forever when None)."""
        self.load_state()
        reports: list[WindowReport] = []
        next_window = self.joinable_window()
        while max_windows is None or len(reports) < max_windows:
            target = max(next_window, self.joinable_window())
            if target > next_window:
                logger.info("late for window %d: skipping to window %d", next_window, target)
            if self.current_window() < target:
                if self.main:
                    wait_for_block(self.ledger, target * self.cfg.window.blocks)
                self.acc.wait_for_everyone()
            reports.append(self.train_window(target))
            next_window = target + 1
        if self.main:
            # With overlap the last window's round is still running. Its group met at the
            # deadline, so it is done within the all-gather's wait unless it never formed.
            avg = self.cfg.averaging
            self.rounds.finish(2 * avg.sender_timeout_s + avg.min_matchmaking_time_s)
            if reports and self.seat is not None and self._validators_present():
                span = self.cfg.window.blocks * self.ledger.block_time_s
                last = reports[-1].window + 1
                logger.info(
                    "staying until validators publish window %d (at most %.0f s)", last, span
                )
                serve_until_published(self.store, self.ledger, last, span)
        self.acc.wait_for_everyone()  # no process leaves while another is mid-collective
        if self.responder is not None and reports and self.cfg.validation.pow_checks > 0:
            # Validators challenge the last window after its reveal deadline: stay to answer.
            wait = self.cfg.validation.pow_answer_s + 4 * self.cfg.window.reveal_blocks * (
                self.ledger.block_time_s
            )
            self.responder.linger(reports[-1].window, timeout=wait + 10.0)
        return reports

    def _validators_present(self) -> bool:
        return any(n.validator_permit for n in self.ledger.neurons())

    def close(self) -> None:
        if self.responder is not None:
            self.responder.stop()
        if self.seat is not None:
            self.seat.close()
        self.tracker.finish()
        self.ledger.close()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m train.miner` / `accelerate launch -m train.miner` (`train.miner_main`)."""
    from train.miner_main import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
