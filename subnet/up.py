"""`tensormine subnet up | status | down`: the whole subnet on one machine, one command.

    tensormine subnet up --config configs/demo.yaml --miners 4 --validators 2 --windows 5
    tensormine subnet status --config configs/demo.yaml
    tensormine subnet down --config configs/demo.yaml

`up` starts the ledger's block producer (`tensormine chain run`), creates or reuses the
keys, funds, registers and stakes everyone through signed extrinsics, then starts every
validator (`python -m validation.validator`) and every miner (`accelerate launch -m
train.miner`) as its own process group on 127.0.0.1, each logging to
``<run dir>/logs/<name>.log``. It shows a live view until every miner has trained its
windows and the validators have scored the last of them, stops everything (the producer
last), and ends with a summary table, PNG plots, the final checkpoint pulled and sampled,
and where the W&B runs are.

Ctrl+C (or SIGTERM) stops every child within `subnet.stop_grace_s` seconds: SIGINT,
then SIGTERM, then SIGKILL to each process group. Run `up` again on the same folder to
resume: the ledger, the store, the keys and every process's state are kept, and nobody is
registered or staked twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.live import Live

from chain.config import RAO_PER_TAO
from chain.ledger import Ledger
from common.errors import TensormineError
from subnet import launch
from subnet.config import check
from subnet.launch import Participants, StakeBook
from subnet.procs import Children, orchestrator_alive, read_pidfile, stop_groups
from subnet.records import (
    Member,
    Snapshot,
    append_ledger_history,
    list_checkpoint_windows,
    one_model,
    published_fingerprints,
    read_jsonl,
    snapshot,
)
from subnet.view import render, status_line
from tensormine.config import RunConfig

logger = logging.getLogger(__name__)

PRODUCER = "producer"


class SubnetError(TensormineError, RuntimeError):
    """The subnet cannot start or go on; the message says why and what to do."""


@dataclass(frozen=True)
class Paths:
    run: Path

    @property
    def subnet(self) -> Path:
        return self.run / "subnet"

    @property
    def pidfile(self) -> Path:
        return self.subnet / "pids.json"

    @property
    def stakes(self) -> Path:
        return self.subnet / "stakes.json"

    @property
    def history(self) -> Path:
        return self.subnet / "ledger.jsonl"

    @property
    def logs(self) -> Path:
        return self.run / "logs"

    @property
    def plots(self) -> Path:
        return self.run / "plots"

    @property
    def final(self) -> Path:
        return self.run / "final"


@dataclass
class Outcome:
    """What `up` ended with (the CLI prints it; tests assert on it)."""

    snapshot: Snapshot | None = None
    interrupted: bool = False
    failed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)

    @property
    def rc(self) -> int:
        return 130 if self.interrupted else (1 if self.failed else 0)


def members_of(parts: Participants) -> list[Member]:
    return [Member(p.name, p.role, p.behaviour, p.keypair.address) for p in parts.all]


def child_env(cfg: RunConfig) -> dict[str, str]:
    threads = str(cfg.subnet.threads_per_process)
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        # hivemind's default shared-memory mode starts a torch_shm_manager that can outlive
        # its parent; file descriptors do the same job and die with the process.
        HIVEMIND_MEMORY_SHARING_STRATEGY="file_descriptor",
    )
    return env


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends `up` the way Ctrl+C does: every child is stopped first. SIGINT gets
    Python's own handler back even where it was inherited ignored (a shell starts
    background jobs that way), so `kill -INT` works on a `subnet up &` too."""

    def _raise(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


@contextlib.contextmanager
def shielded(console: Console) -> Iterator[None]:
    """While children are being stopped, a second Ctrl+C must not cut the shutdown short."""

    def _say(_signum: int, _frame: FrameType | None) -> None:
        console.print("[yellow]stopping the subnet's processes, a few seconds…[/]")

    prev_int = signal.signal(signal.SIGINT, _say)
    prev_term = signal.signal(signal.SIGTERM, _say)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, prev_int)
        signal.signal(signal.SIGTERM, prev_term)


class Subnet:
    """One `subnet up`: the children, the ledger handle and the view's inputs."""

    def __init__(self, cfg: RunConfig, config_path: str | None, overrides: list[str]) -> None:
        self.cfg = cfg
        self.common = launch.config_args(config_path, overrides)
        self.paths = Paths(cfg.run.dir)
        self.children = Children(self.paths.pidfile)
        self.notes: list[str] = []
        self.book = StakeBook(self.paths.stakes)
        self.keys_dir = cfg.subnet.keys_folder(cfg.run.dir)
        self.ledger: Ledger | None = None
        self.members: list[Member] = []
        self.last_window = -1

    # ---- start-up ------------------------------------------------------------------------
    def refuse_if_running(self) -> None:
        pid = orchestrator_alive(self.paths.pidfile)
        groups = read_pidfile(self.paths.pidfile)
        if pid is not None or groups:
            who = f"subnet up (pid {pid})" if pid else ", ".join(sorted(groups))
            raise SubnetError(
                f"a subnet is already running on {self.cfg.run.dir} ({who}); stop it with "
                "`tensormine subnet down` (same --config) or wait for it to finish"
            )

    def start_producer(self, ledger: Ledger) -> None:
        self.children.start(
            PRODUCER, PRODUCER, launch.producer_argv(ledger.path),
            log=self.paths.logs / f"{PRODUCER}.log", env=child_env(self.cfg),
        )  # fmt: skip
        first = ledger.block_number()
        limit = max(15.0, 20 * ledger.config.block_time_s)
        deadline = time.monotonic() + limit
        while ledger.block_number() <= first:
            self.check_producer()
            if time.monotonic() > deadline:
                raise SubnetError(
                    f"the block producer made no block in {limit:.0f}s; see "
                    f"{self.paths.logs / 'producer.log'}"
                )
            time.sleep(min(0.2, ledger.config.block_time_s))

    def check_producer(self) -> None:
        producer = self.children.children.get(PRODUCER)
        if producer is not None and (rc := producer.poll()) is not None:
            raise SubnetError(
                f"the block producer exited ({rc}):\n{log_tail(producer.log)}\n"
                f"(full log: {producer.log})"
            )

    def start_processes(self, parts: Participants) -> None:
        cfg, sub = self.cfg, self.cfg.subnet
        env = child_env(cfg)
        for p in parts.validators:
            # No --windows: a validator runs until it has scored the miners' last
            # window (it may have started before them), then `watch` stops it.
            argv = launch.validator_argv(p, common=self.common, keys_dir=self.keys_dir)
            self.children.start(p.name, "validator", argv, log=self._log(p.name), env=env)
        for p in parts.miners:
            # `subnet.windows` is the run's length: a resumed miner trains what is left.
            done = len(read_jsonl(cfg.run.dir / "miners" / p.name / "windows.jsonl"))
            remaining = sub.windows - done
            if remaining <= 0:
                self.notes.append(
                    f"{p.name} has trained its {sub.windows} windows already (raise --windows "
                    "to train more)"
                )
                continue
            behaviour = None if p.behaviour == "honest" else p.behaviour
            argv = launch.miner_argv(
                p, common=self.common, keys_dir=self.keys_dir, windows=remaining,
                processes=sub.processes_per_miner, behaviour=behaviour,
            )  # fmt: skip
            self.children.start(p.name, "miner", argv, log=self._log(p.name), env=env)

    def _log(self, name: str) -> Path:
        return self.paths.logs / f"{name}.log"

    # ---- watching ------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        if self.ledger is None:
            raise SubnetError("the ledger is not open yet")
        snap = snapshot(
            self.ledger, self.cfg.run.dir, self.members, self.book,
            window_blocks=self.cfg.window.blocks,
            checkpoints=list_checkpoint_windows(self.cfg.store),
        )  # fmt: skip
        for name, child in self.children.children.items():
            rc = child.poll()
            snap.status[name] = "running" if rc is None else f"exit {rc}"
        for m in self.members:
            snap.status.setdefault(m.name, "not started")
        return snap

    def record_window(self, snap: Snapshot, console: Console, live: bool) -> None:
        if snap.window != self.last_window:
            self.last_window = snap.window
            append_ledger_history(self.paths.history, snap)
            if not live:
                console.print(status_line(snap))

    def finished(self, since: float | None, target: int | None) -> bool:
        """Miners done, and validators done or past the miners' last window (or out of time)."""
        if self.children.running("miner"):
            return False
        validators = self.children.running("validator")
        if not validators or target is None or since is None:
            return True
        blocks = self.cfg.subnet.drain_windows * self.cfg.window.blocks
        drain_s = blocks * self.cfg.chain.block_time_s + 30.0
        if time.monotonic() - since > drain_s:
            self.notes.append(f"validators had not scored window {target} after {drain_s:.0f}s")
            return True
        run_dir = self.cfg.run.dir
        for child in validators:
            rows = read_jsonl(run_dir / "validators" / child.name / "windows.jsonl")
            done = [r["window"] for r in rows if isinstance(r.get("window"), int)]
            if not done or max(done) < target:
                return False
        return True

    def last_miner_window(self) -> int | None:
        windows = [
            int(r["window"])
            for m in self.members
            if m.role == "miner"
            for r in read_jsonl(self.cfg.run.dir / "miners" / m.name / "windows.jsonl")
            if isinstance(r.get("window"), int)
        ]
        return max(windows) if windows else None

    def watch(self, console: Console) -> None:
        title = f"tensormine subnet · {self.cfg.run.name} · {self.cfg.run.dir}"
        block_time = self.cfg.chain.block_time_s
        since: float | None = None
        target: int | None = None
        live_ctx: contextlib.AbstractContextManager[Live | None] = (
            Live(console=console, auto_refresh=False, transient=False)
            if console.is_terminal
            else contextlib.nullcontext()
        )
        with live_ctx as live:
            while True:
                self.check_producer()
                snap = self.snapshot()
                self.record_window(snap, console, live is not None)
                if live is not None:
                    live.update(
                        render(snap, self.members, block_time_s=block_time, title=title,
                               notes=self.notes),
                        refresh=True,
                    )  # fmt: skip
                if not self.children.running("miner") and since is None:
                    since, target = time.monotonic(), self.last_miner_window()
                if self.finished(since, target):
                    return
                time.sleep(self.cfg.subnet.refresh_s)

    # ---- the whole run -------------------------------------------------------------------
    def run(self, console: Console) -> Outcome:
        cfg = self.cfg
        outcome = Outcome()
        shown = 0  # notes printed at start-up are not repeated in the summary
        for warning in check(cfg.subnet, cfg.chain):
            logger.warning("%s", warning)
        self.refuse_if_running()
        parts = launch.participants(cfg)
        self.members = members_of(parts)
        ledger, created = launch.open_or_create_ledger(cfg, parts.owner)
        self.ledger = ledger
        console.print(
            f"[bold]{'new' if created else 'resuming'} subnet[/] in {cfg.run.dir}: ledger "
            f"{ledger.path} at block {ledger.block_number()}, {len(parts.validators)} "
            f"validators, {len(parts.miners)} miners, {cfg.subnet.windows} windows of "
            f"{cfg.window.blocks} blocks × {ledger.config.block_time_s}s"
        )
        try:
            with sigterm_as_interrupt():
                self.start_producer(ledger)
                sent = launch.populate(ledger, cfg, parts, self.book)
                launch.wait_for_permits(ledger, parts.validators)
                if holders := launch.miner_permits(ledger, parts.miners):
                    raise SubnetError(
                        f"{', '.join(holders)} hold validator permits and cannot mine: raise "
                        "chain.validator_min_stake_rao or lower chain.max_validators"
                    )
                console.print(
                    f"keys in {self.keys_dir}; {sent} extrinsics (funding, registration, "
                    f"stake); logs in {self.paths.logs}"
                )
                self.start_processes(parts)
                for note in self.notes:
                    console.print(f"[yellow]{note}[/]")
                shown = len(self.notes)
                self.watch(console)
        except KeyboardInterrupt:
            outcome.interrupted = True
            console.print("[yellow]interrupted: stopping every process[/]")
        finally:
            # Whoever still runs now is stopped by us; whoever ended before, ended by itself.
            stopped = {c.name for c in self.children.running()}
            with shielded(console):
                outcome.killed = self.children.stop_all(cfg.subnet.stop_grace_s, last=[PRODUCER])
        for name, child in self.children.children.items():
            rc = child.poll()
            if name not in stopped and rc != 0:
                outcome.failed.append(f"{name} (exit {rc}, log {child.log})")
        outcome.snapshot = self.snapshot()
        append_ledger_history(self.paths.history, outcome.snapshot)
        outcome.notes = self.notes[shown:]
        return outcome

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()


def down(cfg: RunConfig, console: Console) -> int:
    """Stop a running `subnet up` of this run folder (and any child it left behind)."""
    paths = Paths(cfg.run.dir)
    grace = cfg.subnet.stop_grace_s
    pid = orchestrator_alive(paths.pidfile)
    if pid is not None:
        console.print(f"asking subnet up (pid {pid}) to stop")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 2 * grace + 15
        while time.monotonic() < deadline and orchestrator_alive(paths.pidfile) == pid:
            time.sleep(0.2)
    groups = read_pidfile(paths.pidfile)
    if groups:
        console.print(f"stopping left-over processes: {', '.join(sorted(groups))}")
        stop_groups(groups.values(), grace_s=grace)
    left = read_pidfile(paths.pidfile)
    if left:
        console.print(f"[red]still running: {left}[/]")
        return 1
    paths.pidfile.unlink(missing_ok=True)
    if pid is None and not groups:
        console.print(f"no subnet is running on {cfg.run.dir}")
    return 0


def finish(
    cfg: RunConfig, subnet: Subnet, outcome: Outcome, console: Console, *, sample: bool
) -> int:
    """The end of `up`: summary, books check, plots, final checkpoint and sample, W&B."""
    from subnet.plots import write_plots
    from subnet.summary import (
        pull_final,
        sample_text,
        summary_table,
        wandb_hint,
        write_summary_json,
    )

    snap = outcome.snapshot
    paths = subnet.paths
    if snap is None:
        return outcome.rc
    console.print(summary_table(snap, subnet.members))
    balanced = "[green]balanced[/]" if snap.books_balance else "[red]NOT balanced[/]"
    issued, held, pending = (
        x / RAO_PER_TAO for x in (snap.issuance, snap.accounts_total, snap.pending)
    )
    console.print(
        f"block {snap.block:,}: issuance {issued:,.9f} τ = balances and stakes {held:,.9f} τ "
        f"+ pending {pending:,.9f} τ: {balanced}"
    )
    ckpts = snap.checkpoints
    console.print(
        f"canonical checkpoints: {', '.join(f'window {w}' for w in ckpts) if ckpts else 'none'}"
    )
    console.print(one_model(snap.miners, published_fingerprints(cfg.store)).line())
    write_summary_json(paths.subnet / "summary.json", snap, subnet.members)
    for path in write_plots(snap, read_jsonl(paths.history), paths.plots):
        console.print(f"plot: {path}")
    for note in outcome.notes:
        console.print(f"[yellow]{note}[/]")
    for failed in outcome.failed:
        console.print(f"[red]failed: {failed}[/]")
    if sample and not outcome.interrupted and cfg.subnet.sample_tokens > 0:
        final = pull_final(cfg, paths.final, subnet.members)
        if final is None:
            console.print("no checkpoint in the store to sample from")
        else:
            console.print(
                f"pulled the checkpoint of window {final.window} into {final.folder} "
                f"(`tensormine pull {cfg.store.root} --window {final.window} --to DIR`)"
            )
            if final.weights_from is not None:
                console.print(
                    f"[yellow]window {final.window} is the untrained initial model (no "
                    f"validator published later ones); sampling a miner's θ instead: "
                    f"{final.weights_from}[/]"
                )
            text = sample_text(final, cfg.subnet.sample_prompt, cfg.subnet.sample_tokens)
            console.print("[bold]sample[/] (transformers AutoModelForCausalLM, top-k 40):")
            console.print(text, markup=False, highlight=False)
    for line in wandb_hint(cfg.run.dir):
        console.print(line, markup=False, highlight=False)
    if outcome.interrupted:
        console.print("resume with the same command: the ledger, store, keys and state are kept")
    return outcome.rc


def known_members(cfg: RunConfig) -> list[Member]:
    """The run's participants whose keys exist (never creates a key)."""
    from chain.keys import load_key
    from subnet.config import SubnetConfig

    sub: SubnetConfig = cfg.subnet
    keys_dir = sub.keys_folder(cfg.run.dir)
    names = [(f"validator-{i}", "validator", "honest") for i in range(sub.validators)]
    names += [(f"miner-{i}", "miner", sub.behaviour(i)) for i in range(sub.miners)]
    return [
        Member(name, role, behaviour, load_key(keys_dir, name).address)
        for name, role, behaviour in names
        if (keys_dir / f"{name}.json").exists()
    ]


def status(cfg: RunConfig, console: Console) -> int:
    """Print the run's state once: the live view's content, and what still runs."""
    paths = Paths(cfg.run.dir)
    if not cfg.chain.db.exists():
        console.print(f"no subnet in {cfg.run.dir} (no ledger at {cfg.chain.db})")
        return 1
    members = known_members(cfg)
    groups = read_pidfile(paths.pidfile)
    pid = orchestrator_alive(paths.pidfile)
    with Ledger(cfg.chain.db) as ledger:
        snap = snapshot(
            ledger, cfg.run.dir, members, StakeBook(paths.stakes),
            window_blocks=cfg.window.blocks, checkpoints=list_checkpoint_windows(cfg.store),
        )  # fmt: skip
        block_time = ledger.config.block_time_s
    for m in members:
        snap.status[m.name] = "running" if m.name in groups else "stopped"
    console.print(
        render(snap, members, block_time_s=block_time, title=f"subnet in {cfg.run.dir}", notes=[])
    )
    console.print(
        f"subnet up is running (pid {pid})" if pid else "no `subnet up` is running on this folder"
    )
    return 0
