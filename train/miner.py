"""The miner process: train the assigned shard each window and publish the pseudo-gradient.

    accelerate launch -m train.miner --config configs/tiny.yaml --hotkey alice
    accelerate launch --num_processes 2 -m train.miner --config configs/tiny.yaml --hotkey alice
    tensormine miner --config configs/tiny.yaml --hotkey alice        # one process

Every window w (ledger blocks [w·B, (w+1)·B)) the miner
1. enters with θ_w. With hivemind averaging (`averaging.enabled`, the default) a miner
   whose last round succeeded keeps its own θ_w, which every miner in step shares; one
   that joins late or missed a round downloads θ_w and the outer momentum from a
   registered peer in step, else falls back to the store. The store's θ_w is the
   canonical checkpoint of window w (the validators publish it), else the latest one
   before it, else the run's deterministic window-0 checkpoint (which the first miner to
   start writes). Without averaging the canonical checkpoint always wins when present;
2. trains its shard (a deterministic, balanced function of the miner UIDs and w) for H
   AdamW steps on its assigned pages (a function of its hotkey, w and the run seed);
3. forms Δ = θ_w − θ on the shard, compresses it, and publishes it with a manifest signed
   by its hotkey before the window's deadline block (a late Δ is not published);
4. at the deadline, all-reduces that Δ with the other miners of its shard over hivemind
   (a member of its shard's group, an auxiliary peer of the other shards' groups, all at
   once) and applies the outer step (Nesterov SGD, DiLoCo) to every shard's average,
   giving θ_{w+1}, identical on every miner in step. A group that fails leaves the
   miner with its own Δ on its shard (and θ_w on the shards it missed), out of step until
   it loads a peer's state or the store's checkpoint at the next window;
5. saves its state atomically (weights, outer momentum, the publication's and the wire's
   top-k residuals; a killed miner restarts into the current window), appends
   a line to ``<run dir>/miners/<name>/windows.jsonl``, and logs loss, learning rate, grad
   norm, tokens/s, step time, bytes published, window, shard and held-out loss to W&B
   (offline unless an API key is set).

Several accelerate processes form one miner (DDP inside the inner loop); the main
process alone talks to the ledger, the store and the DHT, and hands decisions to the
others as integer tensors and the model as a broadcast of its weights.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from averaging.compression import decode, encode
from averaging.group import AverageResult, AveragingFailed, PreparedParts
from averaging.outer import OuterStateError, load_outer_state, outer_step, save_outer_state
from averaging.participant import Participant
from averaging.parts import payload_params, payload_tensors
from chain.errors import ChainError
from chain.keys import KeyFileError, Keypair, default_keys_dir, load_key
from chain.ledger import Ledger
from store.api import Store, open_store
from store.checkpoint import OUTER_STATE_FILE, Provenance
from store.errors import NotFound, StoreConflict, StoreError
from store.manifest import Compression, commitment_body
from store.sources import contributions_entry
from tensormine.config import ConfigError, RunConfig, load_config
from tensormine.tracking import Tracker
from train.adversary import make_adversarial_delta, mean_of, training_rows
from train.behaviours import BEHAVIOURS, code_spelling
from train.cheats import backdate, peek_contributions
from train.contribution import commit_contribution, committed_digests
from train.data import Pages, load_pages
from train.inner import StepStats, inner_loop, mean_loss
from train.model import build_model, model_fingerprint
from train.pages import heldout_sample
from train.peer_state import PeerStateError, pack_state, unpack_state
from train.shards import apply_to_shard, make_trainable, shard_for_miner, shard_map, shard_state
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

logger = logging.getLogger("train.miner")

STATE_POINTER = "CURRENT"
WIRE_RESIDUAL = "wire_residual.safetensors"  # top-k error feedback owed to the groups
EVAL_SAMPLE_KEY = b"tensormine/miner-eval"


class MinerError(RuntimeError):
    """The miner cannot go on; the message says what to do."""


@dataclass
class WindowReport:
    window: int
    uid: int
    shard: int
    loss: float
    heldout_before: float  # held-out loss of θ_w, the model the window started from
    heldout_loss: float  # held-out loss of θ_{w+1}, after the outer step
    tokens_per_second: float
    published_bytes: int
    late: bool
    fingerprint: str = ""  # of θ_{w+1}: miners in step with their groups agree on it
    committed_block: int = -1  # the ledger block that took our commitment (-1: none)
    canonical: str = ""  # the published θ_w vs ours: match, differs, out-of-step, absent
    synced: bool = False  # every group of the window averaged (θ_{w+1} is the group's)
    members: list[str] = field(default_factory=list)  # hotkeys averaged in our shard's group
    dropped: list[str] = field(default_factory=list)
    averaging_bytes_sent: int = 0
    averaging_bytes_received: int = 0
    averaging_seconds: float = 0.0
    averaging_attempts: int = 0  # groups the rounds went through (> 1 after a retry)
    averaging_delivered: float = 0.0  # of a failed round: share of our Δ in some average


def resolve_mixed_precision(setting: str) -> str:
    """`auto`: bf16 on a GPU that has it, else full precision (CPU bf16 is slower)."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def open_ledger(cfg: RunConfig, attempts: int = 3) -> Ledger:
    """The run's ledger, with a few retries (1.5 s in all) while another process is
    creating it; a missing ledger is otherwise reported at once, not after a long wait."""
    for attempt in range(attempts):
        try:
            return Ledger(cfg.chain.db)
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise MinerError(
                    f"no ledger at {cfg.chain.db}; start one with `tensormine chain init` "
                    "and `tensormine chain run` (or point chain.db at it)"
                ) from None
            time.sleep(0.5 * 2.0**attempt)
    raise AssertionError("unreachable")


class Miner:
    """One miner (one hotkey), possibly spread over several accelerate processes."""

    def __init__(
        self,
        cfg: RunConfig,
        keypair: Keypair,
        name: str,
        accelerator: Accelerator,
        behaviour: str = "honest",
    ):
        if behaviour not in BEHAVIOURS:
            raise MinerError(f"unknown behaviour {behaviour!r}; one of {', '.join(BEHAVIOURS)}")
        self.behaviour = behaviour
        self.cfg = cfg
        self.keypair = keypair
        self.name = name
        self.acc = accelerator
        self.main = accelerator.is_main_process
        self.dir = cfg.run.dir / "miners" / name
        self.ledger = open_ledger(cfg)
        uid = self.ledger.uid_of(keypair.address)
        if uid is None:
            raise MinerError(
                f"hotkey {name} ({keypair.address}) is not registered on {cfg.chain.db}; "
                f"register it with `tensormine chain register --key {name} --db {cfg.chain.db}`"
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
        self._shared: tuple[dict[str, Any], list[torch.Tensor]] | None = None
        self._shared_lock = threading.Lock()
        if self.main and cfg.averaging.enabled:
            self.seat = join_averaging(cfg, self.ledger, keypair, self.dir, self.model, self.shards)
        if self.main:
            commit_contributions_location(self.ledger, keypair, self.store.contributions_location)

    # ---- start-up ------------------------------------------------------------------------
    def _prepare_genesis_and_data(self) -> None:
        """Window 0 in the store (deterministic, first miner writes it), tokenizer, pages."""
        genesis = self.dir / "checkpoints" / "window-0"
        if self.main:
            self._ensure_window_zero()
            self._pull(0)
        self.acc.wait_for_everyone()
        self.tokenizer = load_tokenizer_from(genesis)
        align_special_tokens(self.model, self.tokenizer)
        with self.acc.main_process_first():
            self.pages: Pages = load_pages(
                self.cfg.data,
                self.tokenizer,
                self.data_cache,
                min_train_pages=self.cfg.train.batch_size,
            )
        needed = self.cfg.train.pages_per_window
        if self.pages.train.shape[0] < needed:
            raise MinerError(
                f"the corpus gives {self.pages.train.shape[0]} train pages; a window needs "
                f"{needed} (train.inner_steps × train.batch_size): use more data or fewer steps"
            )
        # A fixed sample spread over the held-out split (a prefix may be one document).
        n_heldout = self.pages.heldout.shape[0]
        spread = heldout_sample(
            EVAL_SAMPLE_KEY, 0, n_heldout, min(self.cfg.train.eval_pages, n_heldout)
        )
        self.eval_pages = torch.from_numpy(self.pages.heldout[spread])

    def _ensure_window_zero(self) -> None:
        try:
            self.store.resolve(window=0)
            return
        except NotFound:
            pass
        tokenizer = load_tokenizer(self.cfg.data, self.cfg.model.vocab_size, self.data_cache)
        align_special_tokens(self.model, tokenizer)
        prov = Provenance(
            run_id=self.cfg.run.name,
            window=0,
            ledger_block=self.ledger.block_number(),
            run_config=self.cfg.to_json_dict(),
            metrics={},
        )
        try:
            self.store.publish_checkpoint(self.model, tokenizer, prov)
            logger.info("wrote the run's window-0 checkpoint to %s", self.store.location)
        except StoreConflict:
            logger.info("another miner wrote window 0 first")

    @property
    def data_cache(self) -> Path:
        return self.cfg.data.cache_dir or self.cfg.run.dir / "data"

    # ---- state ---------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    def save_state(self) -> None:
        """Weights, outer momentum, residuals and window, atomically (main process)."""
        from safetensors.torch import save_file

        if not self.main:
            return
        root = self.state_dir
        folder = root / f"window-{self.window}"
        tmp = root / f".window-{self.window}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        save_outer_state(tmp / "outer.safetensors", self.momentum)
        save_outer_state(tmp / "residual.safetensors", self.residual)
        if self.seat is not None:
            save_outer_state(tmp / WIRE_RESIDUAL, self.seat.wire_residuals())
        meta = {"window": self.window, "fingerprint": model_fingerprint(state), "uid": self.uid}
        (tmp / "state.json").write_text(json.dumps(meta))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        pointer = root / f".{STATE_POINTER}.tmp"
        pointer.write_text(folder.name)
        pointer.replace(root / STATE_POINTER)  # the switch to the new state is one rename
        for old in root.glob("window-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)

    def load_state(self) -> bool:
        """Resume from the saved state, if any; returns whether there was one."""
        from safetensors.torch import load_file

        pointer = self.state_dir / STATE_POINTER
        if not pointer.is_file():
            return False
        folder = self.state_dir / pointer.read_text().strip()
        meta = json.loads((folder / "state.json").read_text())
        shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        weights = load_file(str(folder / "model.safetensors"))
        if {k: tuple(v.shape) for k, v in weights.items()} != shapes:
            raise MinerError(f"{folder}: saved weights do not fit model {self.cfg.model}")
        self.model.load_state_dict(weights)
        self._heldout = None
        self.momentum = load_outer_state(folder / "outer.safetensors", shapes)
        self.residual = load_outer_state(folder / "residual.safetensors", shapes)
        if self.seat is not None and (folder / WIRE_RESIDUAL).is_file():
            try:
                self.seat.restore_wire_residuals(load_outer_state(folder / WIRE_RESIDUAL, shapes))
            except ValueError as exc:  # OuterStateError is one too
                raise MinerError(f"{folder / WIRE_RESIDUAL}: {exc}") from None
        self.window = int(meta["window"])
        logger.info("resumed %s at window %d from %s", self.name, self.window, folder)
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
        """Main process: load θ_window into the model; returns whether the weights changed."""
        if self.seat is not None:
            if self.synced and self.window == window:
                return False  # the groups' θ_window, which every miner in step has
            if self._load_from_peers(window):
                return True
            self.synced = False
        # Out of step with no peer to copy (say, a group that could not form): the
        # validators' canonical θ_window puts every such miner back on one model, so wait
        # for it as long as there is still time to train before the deadline.
        source = self._fetch_canonical(window, wait=self.seat is not None)
        if source >= 0:
            folder = self.dir / "checkpoints" / f"window-{source}"
            weights = load_checkpoint_weights(folder)
            if model_fingerprint(weights) != model_fingerprint(self.model.state_dict()):
                logger.info(
                    "window %d: adopting the canonical checkpoint of window %d", window, source
                )
                self.model.load_state_dict(weights)
                # θ_{w+1} depends on the momentum too: one model means both.
                self.momentum = load_checkpoint_momentum(folder, self.model)
                return True
        elif self.window != window:
            # No canonical θ_window yet: our own θ from the last outer step stands in.
            logger.info(
                "window %d: no canonical checkpoint; using our own from window %d",
                window,
                self.window,
            )
        return False

    def _load_from_peers(self, window: int) -> bool:
        """Main process: take θ_window and the outer momentum from a registered peer in step."""
        assert self.seat is not None
        own = self.model.state_dict()
        budget = 3 * sum(t.numel() * 4 for t in own.values()) + (1 << 20)  # θ + b + framing
        try:
            got = self.seat.load_state(timeout=self.cfg.averaging.state_timeout_s, max_bytes=budget)
        except AveragingFailed as exc:
            logger.warning("window %d: cannot ask peers for their state: %s", window, exc)
            return False
        if got is None:
            logger.info("window %d: no peer shares its state", window)
            return False
        try:
            weights, momentum = unpack_state(got.metadata, got.tensors, expected=own, window=window)
        except PeerStateError as exc:
            logger.warning("window %d: refused the state of %s: %s", window, got.hotkey, exc)
            return False
        self.model.load_state_dict(weights)
        self.momentum = momentum
        self.synced = True
        logger.info(
            "window %d: loaded θ and outer momentum from %s (%d bytes)",
            window, got.hotkey, got.nbytes,
        )  # fmt: skip
        return True

    def _sync_ranks(self) -> None:
        """Copy the main process's weights to the other processes of this miner."""
        if self.acc.num_processes > 1:
            for tensor in self.model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)

    def _fetch_canonical(self, window: int, *, wait: bool = False) -> int:
        """Pull the checkpoint to start `window` from and return its window, or -1 to keep
        our own θ: the canonical θ_window if published (with `wait`, polled for until
        `window.canonical_wait` of the window has passed); a miner without state of its
        own takes the latest published one before it instead (window 0 at worst)."""
        until = start_block(window, self.cfg.window) + int(
            self.cfg.window.canonical_wait * self.cfg.window.blocks
        )
        waited = False
        while True:
            try:
                self._pull(window)
                if waited:
                    logger.info("window %d: the canonical checkpoint appeared", window)
                return window
            except NotFound:
                pass
            if not wait or self.ledger.block_number() >= until:
                break
            if not waited:
                logger.info(
                    "window %d: waiting for the canonical checkpoint until block %d", window, until
                )
                waited = True
            time.sleep(self.cfg.chain.block_time_s)
        if self.window >= 0:
            return -1
        earlier = [ref.window for ref in self.store.list_checkpoints() if ref.window < window]
        if not earlier:
            return -1
        self._pull(max(earlier))
        return max(earlier)

    def _pull(self, window: int) -> None:
        target = self.dir / "checkpoints" / f"window-{window}"
        if not target.exists():
            self.store.pull_checkpoint(target, window=window)

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
            decision[0] = shard_for_miner(self.uid, miners, window, n_shards)
            for uid in miners:
                decision[1 + shard_for_miner(uid, miners, window, n_shards)] = 1
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
        start = shard_state(self.model, names)  # θ_w on the shard
        # Announced to the groups: peers that start from different models learn it.
        self._start_fingerprint = model_fingerprint(self.model.state_dict())
        base = self._start_fingerprint[:16] if self.seat is not None else ""
        make_trainable(self.model, names)
        rows = training_rows(
            self.behaviour, self.keypair.address, window, cfg.run.seed,
            self.pages.train, self.pages.heldout, cfg.train.pages_per_window,
        )  # fmt: skip
        pages = torch.from_numpy(rows)

        def log_step(stat: StepStats) -> None:
            self.global_step += 1
            self.tracker.log(
                {
                    "train/loss": stat.loss,
                    "train/lr": stat.lr,
                    "train/grad_norm": stat.grad_norm,
                    "train/tokens_per_s": stat.tokens / max(stat.seconds, 1e-9),
                    "train/step_time_s": stat.seconds,
                    "window": window,
                    "shard": shard,
                },
                step=self.global_step,
            )

        stats = inner_loop(self.acc, self.model, names, pages, cfg.train, on_step=log_step)
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
        if self.main:
            self._publish_and_step(window, shard, active, start, report, base)
        self._sync_ranks()
        self.window = window + 1
        heldout = mean_loss(self.model, self.eval_pages, device=self.acc.device)
        self._heldout = report.heldout_loss = heldout
        self.tracker.log(
            {
                "eval/heldout_loss": heldout,
                "window/train_loss": stats.mean_loss,
                "window/tokens_per_s": stats.tokens_per_second,
                "window/published_bytes": report.published_bytes,
                "window/late": int(report.late),
                "averaging/synced": int(report.synced),
                "averaging/members": len(report.members),
                "averaging/dropped": len(report.dropped),
                "averaging/bytes_sent": report.averaging_bytes_sent,
                "averaging/bytes_received": report.averaging_bytes_received,
                "averaging/seconds": report.averaging_seconds,
                "averaging/attempts": report.averaging_attempts,
                "averaging/delivered": report.averaging_delivered,
            },
            step=self.global_step,
        )
        self.save_state()
        if self.main:
            with (self.dir / "windows.jsonl").open("a") as fh:
                fh.write(json.dumps(dataclasses.asdict(report)) + "\n")
        logger.info(
            "window %d shard %d: loss %.4f, held-out %.4f, %.0f tokens/s, published %d bytes%s; "
            "averaged with %d (%s), sent %d received %d bytes in %.1fs",
            window, shard, report.loss, heldout, report.tokens_per_second,
            report.published_bytes, " (late)" if report.late else "",
            len(report.members), "in step" if report.synced else "out of step",
            report.averaging_bytes_sent, report.averaging_bytes_received,
            report.averaging_seconds,
        )  # fmt: skip
        return report

    def _publish_and_step(
        self,
        window: int,
        shard: int,
        active: list[int],
        start: dict[str, torch.Tensor],
        report: WindowReport,
        base: str,
    ) -> None:
        """Main process: Δ → store, Δ → the groups, outer step on every averaged shard."""
        cfg = self.cfg
        names = self.shards[shard]
        trained = shard_state(self.model, names)
        delta = {n: start[n] - trained[n] for n in names}  # pseudo-gradient Δ = θ_w − θ
        if self.behaviour != "honest":
            delta = self._misbehave(window, shard, delta)
        parts = None
        if self.seat is not None:
            # With averaging, the contribution *is* the wire's parts: what we send into the
            # group's average is what we commit to, publish and are paid for.
            parts = self.seat.prepare(shard, delta)
            sent = parts.values
            payload = payload_tensors(parts.blobs)
            params = payload_params(
                parts.blobs, names, cfg.averaging.wire, cfg.averaging.wire_part_size_bytes
            )
            nbytes = sum(len(b) for b in parts.blobs)
        else:
            residual = {n: self.residual[n] for n in names if n in self.residual} or None
            encoded = encode(delta, cfg.compression, residual)
            shapes = {n: tuple(delta[n].shape) for n in names}
            sent = decode(encoded.tensors, encoded.params, shapes)  # what validators will see
            if encoded.residual is not None:
                self.residual.update(encoded.residual)
            payload, params, nbytes = dict(encoded.tensors), dict(encoded.params), encoded.nbytes
        prepared = self.store.prepare_contribution(
            payload, keypair=self.keypair, uid=self.uid, window=window, shard=shard,
            compression=Compression(scheme=str(params["scheme"]), params=params),
        )  # fmt: skip
        due = deadline(window, cfg.window)
        self._commit(window, prepared.digest, report)
        # The groups meet at the deadline, when commitments have closed: every miner
        # computes the same time from the ledger, so all declare the same expiry and agree
        # on a leader. Matchmaking runs (in the background) while we reveal. A late Δ is
        # kept out of the groups as it is out of the store.
        round_: concurrent.futures.Future[dict[int, AverageResult | AveragingFailed]] | None = None
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="averaging")
        if self.seat is not None and not report.late:
            meet = meeting_block(window, cfg.window)
            start_at = block_time(self.ledger, meet, anchor=start_block(window, cfg.window))
            # A group that has not formed by the window's end will not: give up then, so
            # that a failed round never makes the miner late for the next window.
            tail = cfg.window.publish_margin * cfg.chain.block_time_s
            timeout = max(start_at - time.time() + tail, cfg.averaging.min_matchmaking_time_s + 0.5)
            assert parts is not None
            if self.behaviour == "poisoner":  # its commitment stands; what it sends does not
                poison = {n: -10 * t for n, t in parts.raw.items()}
                parts = PreparedParts(parts.blobs, parts.values, poison)
            round_ = pool.submit(
                self.seat.average_window,
                window,
                {},
                prepared={shard: (parts, commitment_body(prepared.manifest))},
                commitments=committed_digests(self.ledger.path, window, due),
                start_at=start_at,
                timeout=timeout,
                receive=active,
                base=base,
                # Every peer weighs the members as the last epoch before the window began
                # left them, however the reads fall around an epoch near the deadline.
                weights_block=start_block(window, cfg.window),
            )
        pool.shutdown(wait=False)
        if report.late and self.behaviour != "backdater":
            logger.warning(
                "window %d: not committed before the deadline block %d; not revealing", window, due
            )
        else:
            # Reveal only once the deadline block exists: until then nobody may read it.
            wait_for_block(self.ledger, due)
            ref = self.store.reveal_contribution(prepared)
            report.published_bytes = nbytes
            if self.behaviour == "backdater":
                backdate(self.store, ref, self.ledger, start_block(window, cfg.window))
        outcomes: dict[int, AverageResult | AveragingFailed] = {}
        if round_ is not None:
            outcomes = round_.result()
        synced = (
            self.seat is not None
            and all(isinstance(outcomes.get(s), AverageResult) for s in {shard, *active})
            and Participant.in_step(outcomes, self.keypair.address)
        )
        if outcomes and not synced:
            logger.warning(
                "window %d: out of step with the groups (a group failed, or our θ_w differs "
                "from most peers'); loading a peer's state next window",
                window,
            )
        for s, shard_names in enumerate(self.shards):
            outcome = outcomes.get(s)
            if isinstance(outcome, AverageResult):
                average = outcome.tensors
            elif s == shard:
                average = sent  # on our own: our Δ alone
            else:
                continue  # this shard stays θ_w here
            theta = start if s == shard else shard_state(self.model, shard_names)
            momentum = {n: self.momentum[n] for n in shard_names if n in self.momentum}
            new_params, new_momentum = outer_step(theta, average, momentum, cfg.outer)
            self.momentum.update(new_momentum)
            apply_to_shard(self.model, shard_names, new_params)
        report.canonical = self._check_canonical(window)
        own = outcomes.get(shard)
        if isinstance(own, AverageResult):
            report.members, report.dropped = own.members, own.dropped
        for outcome in outcomes.values():  # a failed round's bytes were spent all the same
            report.averaging_bytes_sent += outcome.bytes_sent
            report.averaging_bytes_received += outcome.bytes_received
            report.averaging_seconds = max(report.averaging_seconds, outcome.seconds)
            report.averaging_attempts = max(report.averaging_attempts, outcome.attempts)
        if isinstance(own, AveragingFailed):
            report.averaging_delivered = own.delivered
        report.synced = self.synced = synced
        report.fingerprint = model_fingerprint(self.model.state_dict())
        self._share(window + 1)

    def _check_canonical(self, window: int) -> str:
        """Whether the published checkpoint of `window` is the θ_window our last round
        produced: "match", "differs" (we keep ours and say so: a miner never adopts a
        checkpoint that disagrees with its own successful round), "out-of-step" (we did
        not end the last round in step, so we had adopted it or a peer's) or "absent"."""
        if not self.synced:
            return "out-of-step"
        try:
            theirs = self.store.read_provenance(self.store.resolve(window=window)).fingerprint
        except StoreError:
            return "absent"
        ours = self._start_fingerprint
        if theirs is None:
            return "absent"
        if theirs != ours:
            logger.warning(
                "window %d: the published checkpoint (fingerprint %s…) is not the θ our round "
                "produced (%s…); keeping ours. `tensormine verify --window %d` checks it",
                window, theirs[:16], ours[:16], window - 1,
            )  # fmt: skip
            return "differs"
        return "match"

    def _commit(self, window: int, digest: str, report: WindowReport) -> None:
        """Commit `digest` for `window` on the ledger; `report.late` when no block before
        the deadline took it (or, for a backdater, on purpose after the deadline)."""
        cfg = self.cfg
        due = deadline(window, cfg.window)
        if self.behaviour == "backdater":
            wait_for_block(self.ledger, due)  # it commits what it copied, after the deadline
        if self.ledger.block_number() >= due and self.behaviour != "backdater":
            report.late = True
            return
        blocks = max(1, due - self.ledger.block_number()) + 2
        try:
            report.committed_block = commit_contribution(
                self.ledger, self.keypair, window, digest,
                timeout=blocks * cfg.chain.block_time_s + 10.0,
            )  # fmt: skip
        except ChainError as exc:
            logger.warning("window %d: the ledger refused our commitment: %s", window, exc)
            report.late = True
            return
        report.late = report.committed_block >= due

    def _misbehave(
        self, window: int, shard: int, delta: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The Δ an adversarial miner publishes instead of its own (demos and tests: the
        validators must give it nothing; see `train.adversary`)."""
        rng = torch.Generator().manual_seed(self.uid * 1_000_003 + window)
        other = None
        if self.behaviour in ("copier", "mixer", "backdater"):
            # A copier or mixer must commit before the deadline, when nothing of this
            # window is revealed; a backdater reads after it and commits late.
            due = deadline(window, self.cfg.window)
            until = reveal_deadline(window, self.cfg.window) if self.behaviour == "backdater" else (
                due - max(2, self.cfg.window.publish_margin)
            )  # fmt: skip
            others = peek_contributions(
                self.store, self.ledger, window, shard, delta, self.keypair.address,
                until=until, poll_s=self.cfg.chain.block_time_s,
            )  # fmt: skip
            if others:
                other = mean_of(others) if self.behaviour == "mixer" else others[0]
                logger.info("window %d: read %d Δ of others to %s", window, len(others),
                            self.behaviour)  # fmt: skip
            elif self.behaviour == "mixer":
                logger.info("window %d: nothing of others readable to mix in", window)
            else:
                logger.warning("window %d: nothing to copy; publishing noise instead", window)
                return make_adversarial_delta("noise", delta, None, rng)
        return make_adversarial_delta(self.behaviour, delta, other, rng)

    def _share(self, window: int) -> None:
        """Offer θ_window and the momentum to late joiners while we are in step."""
        if self.seat is None:
            return
        if not self.synced:
            self.seat.stop_sharing_state()
            return
        state = pack_state(self.model.state_dict(), self.momentum, window=window)
        with self._shared_lock:
            self._shared = state
        self.seat.share_state(self._shared_state, priority=window)

    def _shared_state(self) -> tuple[dict[str, Any], list[torch.Tensor]] | None:
        # Called from hivemind's thread when a peer downloads our state.
        with self._shared_lock:
            return self._shared

    # ---- the loop ------------------------------------------------------------------------
    def current_window(self) -> int:
        now = torch.zeros(1, dtype=torch.long)
        if self.main:
            now[0] = window_of(self.ledger.block_number(), self.cfg.window)
        return int(broadcast(now)[0])

    def joinable_window(self) -> int:
        """The window to train next: the current one while at most half of it has passed
        (enough time to train and publish before the deadline), else the next one."""
        now = torch.zeros(1, dtype=torch.long)
        if self.main:
            block = self.ledger.block_number()
            window = window_of(block, self.cfg.window)
            passed = block - start_block(window, self.cfg.window)
            now[0] = window if passed * 2 <= self.cfg.window.blocks else window + 1
        return int(broadcast(now)[0])

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
        self.acc.wait_for_everyone()  # no process leaves while another is mid-collective
        return reports

    def close(self) -> None:
        if self.seat is not None:
            self.seat.close()
        self.tracker.finish()
        self.ledger.close()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def commit_contributions_location(ledger: Ledger, keypair: Keypair, location: str) -> bool:
    """Tell validators where this hotkey's contributions are (the ``"contributions"`` key
    of its ledger commitment; the other keys, such as the DHT address, are kept). Returns
    whether an extrinsic was submitted; nothing is sent when the commitment already says
    so. It is not waited for: validators need it only once the first window is scored."""
    body = ledger.commitment_fields(keypair.address)
    entry = contributions_entry(location)
    if all(body.get(k) == v for k, v in entry.items()):
        return False
    text = json.dumps({**body, **entry}, sort_keys=True, separators=(",", ":"))
    ledger.submit_call(keypair, "commit", {"data": text})
    logger.info("committing contributions location %s", location)
    return True


def averaging_run_name(run: str) -> str:
    """The run's name as hivemind keys allow it (run names may contain dots)."""
    return run.replace(".", "-")


def join_averaging(
    cfg: RunConfig,
    ledger: Ledger,
    keypair: Keypair,
    folder: Path,
    model: PreTrainedModel,
    shards: list[list[str]],
) -> Participant:
    """A participant's seat in every shard's group (its DHT identity kept in `folder`)."""
    return Participant.join(
        cfg.averaging,
        run=averaging_run_name(cfg.run.name),
        ledger=ledger,
        keypair=keypair,
        identity_path=folder / "dht.key",
        templates={i: shard_state(model, names) for i, names in enumerate(shards)},
        commit_timeout=max(30.0, 10 * cfg.chain.block_time_s),
    )


def load_tokenizer_from(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(folder))
    return tokenizer


def align_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the model's config and generation config the tokenizer's special ids, so a
    published checkpoint generates (and stops) correctly with `transformers` alone."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key, None)
        setattr(model.config, key, value)
        if model.generation_config is not None:
            setattr(model.generation_config, key, value)


def load_checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A pulled (already verified) checkpoint's weights, from safetensors only."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(str(folder / name)))
    return {k: v.float() for k, v in weights.items()}


def load_checkpoint_momentum(folder: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The outer momentum published with a checkpoint (`store.checkpoint.OUTER_STATE_FILE`),
    checked against `model`'s parameters; empty when the checkpoint has none."""
    path = folder / OUTER_STATE_FILE
    if not path.is_file():
        return {}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    try:
        return load_outer_state(path, shapes)
    except OuterStateError as exc:
        raise MinerError(f"{path}: {exc}") from None


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.miner", description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", help="run config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--hotkey", required=True, help="name of the miner's key")
    parser.add_argument("--keys-dir", help="key directory (default $TENSORMINE_HOME/keys)")
    parser.add_argument("--windows", type=int, help="stop after this many windows")
    parser.add_argument(
        "--behaviour",
        default="honest",
        type=code_spelling,
        choices=BEHAVIOURS,
        help="an adversarial miner for demos and tests (the validators must pay it nothing)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    miner: Miner | None = None
    try:
        cfg = load_config(args.config, args.overrides)
        keypair = load_key(
            Path(args.keys_dir) if args.keys_dir else default_keys_dir(), args.hotkey
        )
        # Without a GPU, processes started by `accelerate launch --multi_gpu` form a gloo group.
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        )
        miner = Miner(cfg, keypair, args.hotkey, accelerator, behaviour=args.behaviour)
        miner.run(args.windows)
    except (MinerError, ConfigError, ChainError, KeyFileError, StoreError, TimeoutError) as exc:
        logger.error("%s", exc if str(exc) else repr(exc), exc_info=not str(exc))
        return 2
    except torch.OutOfMemoryError as exc:
        logger.error(
            "out of memory (%s): lower train.batch_size (raise train.grad_accum to keep the "
            "batch), data.seq_len, or use a smaller model preset",
            exc,
        )
        return 3
    except KeyboardInterrupt:
        logger.info("interrupted; the last finished window's state is saved")
        return 130
    finally:
        if miner is not None:
            miner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
