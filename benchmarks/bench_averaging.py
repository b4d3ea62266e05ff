"""Averaging benchmark (issue 5): bytes per outer step, compute utilization on a shaped
link, and held-out loss of 4 DiLoCo workers against 1 (arXiv 2311.08105).

    .venv/bin/python benchmarks/bench_averaging.py           # ~10 min on an idle 2-core box
    .venv/bin/python benchmarks/bench_averaging.py --quick   # ~2 min: 1 window, 1 round
    .venv/bin/python benchmarks/bench_averaging.py --plot benchmarks/results/x.png
    # on a loaded box: part 3's settings in parallel, window 0 from an earlier run
    .venv/bin/python benchmarks/bench_averaging.py --reuse-window0 --jobs 5
    # only some parts / codecs, e.g. top-k with 1 MiB parts on the shaped link
    .venv/bin/python benchmarks/bench_averaging.py --parts shaped --wires topk --part-size 1048576

`tiny` preset (5.26 M parameters, S = 1 shard), H = `train.inner_steps` AdamW steps of
8 × 128 tokens per window, in three parts:

0. Four workers train window 0 from the same θ_0 on their own pages; their Δ_i feed 1–2,
   and every inner step of the run is timed (the compute time of H steps is H × the median).
1. Four real peers (`_averaging_peer.py`, separate processes with their own DHT) all-reduce
   those Δ_i with `averaging.group.ShardAverager` for wire = none / fp16 / int8 / topk, on
   plain loopback; `AverageResult.bytes_sent/received` per peer per outer step, against
   data parallel: a dense fp32 ring (or butterfly) all-reduce of every inner step sends
   2·(n−1)/n · 4·P bytes per peer, H times a window.
2. The same four peers in network namespaces (`_netem.py`: each peer its own 100 Mbit/s
   link up and down, every packet delayed 50 ms one-way in the router, RTT 100 ms; needs
   root, `unshare`, `tc` and `iptables` (`apt-get install iptables`), skipped otherwise).
   Blocking communication = the all-reduce's wall time from the shared `start_at` (when
   the group forms) to the result; matchmaking (a config constant, overlappable with
   compute) is reported apart.
   Compute utilization = compute / (compute + blocking communication) (INTELLECT-1), for
   H = 20, 50, 100; data parallel blocks on one dense fp32 all-reduce per step.
3. Held-out loss at equal tokens, in one process: 4 workers (Δs averaged with the same
   codec math as the wire: `TopKSparsifier` error feedback, fp16 sparse reply) against
   1 worker doing 4× as many windows (same H and batch), for DiLoCo's outer step (lr 0.7,
   Nesterov 0.9) and plain averaging (lr 1, no momentum), top-k against uncompressed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from _bench_data import pages_and_heldout
from accelerate import Accelerator
from hivemind.compression import CompressionInfo
from safetensors.torch import load_file, save_file

from averaging.config import OuterConfig
from averaging.outer import mean_delta, outer_step
from averaging.wire import SparseCodec, TopKSparsifier
from tensormine.config import RunConfig, load_config
from train.inner import inner_loop, mean_loss
from train.model import build_model
from train.pages import assigned_pages
from train.shards import apply_to_shard, make_trainable, shard_map, shard_state

HERE = Path(__file__).resolve().parent
RUN_DIR = Path("runs/bench-averaging")
WORKERS = 4
WIRES = ("none", "fp16", "int8", "topk")
DILOCO = OuterConfig(lr=0.7, momentum=0.9, nesterov=True)
PLAIN = OuterConfig(lr=1.0, momentum=0.0, nesterov=False)
RATE_BITS, DELAY_MS = 100e6, 50.0

Delta = dict[str, torch.Tensor]


# ---- training (parts 0 and 3) -----------------------------------------------------------


@dataclass
class Trainer:
    cfg: RunConfig
    model: torch.nn.Module
    names: list[str]
    train_pages: Any
    evaluation: torch.Tensor
    accelerator: Accelerator = field(default_factory=lambda: Accelerator(cpu=True))
    theta0: Delta = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    cache: dict[tuple[int, int], Delta] = field(default_factory=dict)  # (worker, window) at θ_0
    steps_done: int = 0

    def delta(self, start: Delta, worker: int, window: int) -> Delta:
        """Δ = θ_w − θ after H inner steps of `worker` on its pages for `window`."""
        key = (worker, window)
        if window == 0 and key in self.cache:  # every run starts from the same θ_0
            return self.cache[key]
        apply_to_shard(self.model, self.names, start)
        n = self.train_pages.shape[0]
        order = assigned_pages(
            f"bench-worker-{worker}", window, self.cfg.run.seed, n, self.cfg.train.pages_per_window
        )
        stats = inner_loop(
            self.accelerator,
            self.model,
            self.names,
            torch.from_numpy(self.train_pages[order]),
            self.cfg.train,
        )
        self.step_seconds += [s.seconds for s in stats.steps]
        self.steps_done += len(stats.steps)
        trained = shard_state(self.model, self.names)
        out = {k: start[k] - trained[k] for k in self.names}
        if window == 0:
            self.cache[key] = out
        return out

    def heldout(self, theta: Delta) -> float:
        self.load(theta)
        return self.heldout_now()

    def load(self, theta: Delta) -> None:
        apply_to_shard(self.model, self.names, theta)

    def heldout_now(self) -> float:
        """Held-out loss of the model as it is."""
        return mean_loss(self.model, self.evaluation)


def setup(documents: int, eval_pages: int, seed: int = 0) -> Trainer:
    """The tiny preset's model (initialized with `seed`, which also seeds the workers'
    page draws), its pages and the held-out sample."""
    cfg = load_config(
        "configs/tiny.yaml",
        [f"run.dir={RUN_DIR}", f"data.max_documents={documents}", f"run.seed={seed}"],
    )
    cache = f"{RUN_DIR}/data"
    pages, evaluation = pages_and_heldout(cfg, cache, b"bench", eval_pages)
    model = build_model(cfg.model, cfg.run.seed)
    names = shard_map(model, 1)[0]
    make_trainable(model, names)
    return Trainer(cfg, model, names, pages.train, evaluation, theta0=shard_state(model, names))


def topk_average(sent: Sequence[Delta]) -> Delta:
    """The reducer's answer on the wire: mean of the sparsified Δs, re-encoded sparse fp16."""
    codec = SparseCodec()
    out = {}
    for name, value in mean_delta(sent).items():
        out[name] = codec.extract(codec.compress(value, CompressionInfo.from_tensor(value)))
    return out


@dataclass
class Setting:
    label: str
    workers: int
    wire: str  # "none" or "topk"
    outer: OuterConfig


def train_setting(t: Trainer, s: Setting, windows: int, progress: Progress) -> list[float]:
    """Held-out loss after each window (index 0: θ_0)."""
    theta = t.theta0
    momentum: Delta = {}
    sparsifiers = [TopKSparsifier(0.02, 4096) for _ in range(s.workers)]
    losses = [t.heldout(theta)]
    for window in range(windows):
        deltas = [t.delta(theta, i, window) for i in range(s.workers)]
        if s.wire == "topk":
            sent = [sp.sparsify(d) for sp, d in zip(sparsifiers, deltas, strict=True)]
            for sp in sparsifiers:
                sp.commit()
            average = topk_average(sent)
        else:
            average = mean_delta(deltas)
        theta, momentum = outer_step(theta, average, momentum, s.outer)
        losses.append(t.heldout(theta))
        progress.tick(
            f"{s.label}: window {window + 1}/{windows}, held-out {losses[-1]:.3f}", t.steps_done
        )
    return losses


@dataclass
class Progress:
    total_steps: int
    started: float = field(default_factory=time.perf_counter)

    def tick(self, what: str, done: int) -> None:
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total_steps - done) if done else float("nan")
        print(
            f"  [{elapsed:5.0f} s] {what} ({done}/{self.total_steps} inner steps, ETA {eta:.0f} s)",
            flush=True,
        )


# ---- the peers (parts 1 and 2) ----------------------------------------------------------


@dataclass(frozen=True)
class PeerArgs:
    """What every peer is told (see `_averaging_peer.py`)."""

    wires: Sequence[str]
    rounds: int
    lead: float
    sender_timeout: float
    part_size: int
    min_matchmaking: float = 2.0
    dial: bool = True  # dial every peer before a round, as miners do

    def flags(self) -> list[str]:
        return [
            f"--min-matchmaking={self.min_matchmaking}",
            f"--wires={','.join(self.wires)}",
            f"--rounds={self.rounds}",
            f"--lead={self.lead}",
            f"--sender-timeout={self.sender_timeout}",
            f"--part-size={self.part_size}",
            *([] if self.dial else ["--no-dial"]),
        ]


def run_peers(folder: Path, peer: PeerArgs, shaped: bool) -> list[dict[str, Any]]:
    """Start the four peers (in their namespaces if `shaped`), stream peer 0's progress,
    return every peer's rows."""
    procs = []
    for i in range(WORKERS):
        host = f"10.77.{i}.2" if shaped else "127.0.0.1"
        script = str(HERE / "_averaging_peer.py")
        cmd = [
            sys.executable,
            script,
            f"--index={i}",
            f"--peers={WORKERS}",
            f"--dir={folder}",
            f"--host={host}",
            *peer.flags(),
        ]
        if shaped:
            cmd = ["ip", "netns", "exec", f"tm-p{i}", *cmd]
        log = (folder / f"log_{i}.txt").open("w")
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE if i == 0 else log, stderr=log, text=True)
        )
    started, total = time.perf_counter(), len(peer.wires) * peer.rounds
    assert procs[0].stdout is not None
    for done, line in enumerate(procs[0].stdout, start=1):
        elapsed = time.perf_counter() - started
        print(
            f"  [{elapsed:5.0f} s] {line.strip()} (ETA {elapsed / done * (total - done):.0f} s)",
            flush=True,
        )
    rows = []
    for i, proc in enumerate(procs):
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(30)
        if proc.returncode != 0:
            tail = (folder / f"log_{i}.txt").read_text()[-2000:]
            raise RuntimeError(f"peer {i} exited with {proc.returncode}:\n{tail}")
        rows += [{"peer": i, **r} for r in json.loads((folder / f"result_{i}.json").read_text())]
    return rows


def prepare(folder: Path, deltas: Sequence[Delta]) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, delta in enumerate(deltas):
        save_file({k: v.contiguous() for k, v in delta.items()}, folder / f"delta_{i}.safetensors")


def shaped_child(folder: Path, peer: PeerArgs) -> None:
    """Inside `unshare --net --mount`: build the shaped network, check it, run the peers."""
    # The helper sits next to this script; whether `benchmarks` is a package or not.
    sys.path.insert(0, str(HERE))
    _netem = importlib.import_module("_netem")

    line = _netem.build(WORKERS, f"{RATE_BITS / 1e6:.0f}mbit", DELAY_MS)
    try:
        link = _netem.measure(0, 1, 20_000_000)
        (folder / "link.json").write_text(json.dumps(link))
        rtt, connect, bulk = statistics.median(link["rtt_s"]), link["connect_s"], link["bulk_s"]
        print(
            f"  link 0 → 1: RTT {rtt * 1e3:.1f} ms (TCP connect {connect * 1e3:.0f} ms), "
            f"20 MB in {bulk:.2f} s = {160 / bulk:.0f} Mbit/s",
            flush=True,
        )
        rows = run_peers(folder, peer, shaped=True)
        (folder / "rows.json").write_text(json.dumps(rows))
    finally:
        line.terminate()
        line.wait(10)


def can_shape() -> str | None:
    """Why the shaped run cannot happen here, or None."""
    if os.geteuid() != 0:
        return "not root"
    missing = [t for t in ("unshare", "ip", "tc", "iptables") if shutil.which(t) is None]
    return f"missing {', '.join(missing)}" if missing else None


# ---- tables -------------------------------------------------------------------------------


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per wire: mean bytes sent/received per peer per round, median all-reduce seconds,
    whether all peers got identical tensors in every round."""
    out: dict[str, dict[str, float]] = {}
    for wire in dict.fromkeys(r["wire"] for r in rows):
        mine = [r for r in rows if r["wire"] == wire]
        # A round counts when all four made it in one group; a failure or a smaller group
        # (the peers split, or one was dropped) is counted as failed.
        good = [r for r in mine if r.get("members") == WORKERS]
        failed = [r for r in mine if r.get("members") != WORKERS]
        if not good:
            out[wire] = {"failed": len(failed)}
            continue
        by_round: dict[int, set[str]] = {}
        for r in good:
            by_round.setdefault(r["round"], set()).add(r["digest"])
        out[wire] = {
            "sent": statistics.mean(r["bytes_sent"] for r in good),
            "received": statistics.mean(r["bytes_received"] for r in good),
            "allreduce_s": statistics.median(r["end"] - r["start_at"] for r in good),
            "allreduce_max_s": max(r["end"] - r["start_at"] for r in good),
            "matchmaking_s": statistics.median(r["start_at"] - r["called"] for r in good),
            "identical": float(all(len(d) == 1 for d in by_round.values())),
            "relative_error": statistics.mean(r["relative_error"] for r in good),
            "failed": len(failed),
        }
    return out


def bytes_table(params: int, net: dict[str, dict[str, float]]) -> None:
    dp_step = 2 * (WORKERS - 1) / WORKERS * 4 * params
    print(f"\n## 1. Bytes per peer per outer step (n = {WORKERS}, P = {params:,})")
    print(
        f"data parallel: dense fp32 ring all-reduce 2·(n−1)/n·4·P = {dp_step / 1e6:.2f} MB "
        "sent (and received) per peer per inner step, × H per window"
    )
    print(
        "| wire | sent MB | received MB | vs DiLoCo fp32 | reduction vs DP, H = 20 | "
        "H = 50 | H = 100 | all peers identical | ‖avg − mean‖/‖mean‖ |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    base = net.get("none", {}).get("sent")
    for wire, s in net.items():
        if "sent" not in s:
            print(f"| {wire} | failed | | | | | | | |")
            continue
        vs = f"{s['sent'] / base:.3f}" if base else "—"
        red = " | ".join(f"{dp_step * h / s['sent']:,.0f}×" for h in (20, 50, 100))
        print(
            f"| {wire} | {s['sent'] / 1e6:.2f} | {s['received'] / 1e6:.2f} | {vs} | {red} | "
            f"{'yes' if s['identical'] else 'NO'} | {s['relative_error']:.2e} |"
        )


def utilization_table(
    step_s: float,
    quiet_step_s: float,
    net: dict[str, dict[str, float]],
    loopback: dict[str, dict[str, float]],
    title: str,
) -> None:
    print(f"\n## 2. Compute utilization, {title}")
    source = (
        f"median inner step of this run; fastest decile {quiet_step_s * 1e3:.0f} ms"
        if step_s != quiet_step_s
        else "no inner steps timed in this run: RESULTS.md's quiet-box miner number"
    )
    print(
        f"compute: H × {step_s * 1e3:.0f} ms ({source}); communication: median blocking all-reduce"
    )
    print(
        "| scheme | blocking comm per sync (s) | loopback, unshaped (s) | H = 20 | H = 50 | "
        "H = 100 | H = 100, fastest-decile step |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    dense = net.get("none", {}).get("allreduce_s")
    if dense is not None:
        # Data parallel: every inner step blocks on one dense fp32 all-reduce.
        u = step_s / (step_s + dense)
        q = quiet_step_s / (quiet_step_s + dense)
        print(
            f"| data parallel (fp32 all-reduce every step) | {dense:.2f} | "
            f"{loopback.get('none', {}).get('allreduce_s', float('nan')):.2f} | "
            f"{u:.1%} | {u:.1%} | {u:.1%} | {q:.1%} |"
        )
    for wire, s in net.items():
        if "allreduce_s" not in s:
            continue
        comm = s["allreduce_s"]
        cells = " | ".join(f"{h * step_s / (h * step_s + comm):.1%}" for h in (20, 50, 100))
        q = 100 * quiet_step_s / (100 * quiet_step_s + comm)
        loop = loopback.get(wire, {}).get("allreduce_s", float("nan"))
        print(f"| DiLoCo, wire {wire} | {comm:.2f} | {loop:.2f} | {cells} | {q:.1%} |")


def loss_table(
    results: dict[str, list[float]],
    settings: Sequence[Setting],
    windows: int,
    tokens_per_window: int,
) -> None:
    print(f"\n## 3. Held-out loss at equal tokens ({tokens_per_window:,} tokens per worker-window)")
    marks = list(range(windows + 1))
    print(
        "| setting | "
        + " | ".join(f"{m * WORKERS * tokens_per_window / 1e3:.0f} k tokens" for m in marks)
        + " |"
    )
    print("| --- |" + " ---: |" * len(marks))
    for s in settings:
        losses = results[s.label]
        stride = WORKERS // s.workers  # 1 worker: every 4th window has the same tokens
        cells = " | ".join(f"{losses[m * stride]:.3f}" for m in marks)
        print(f"| {s.label} | {cells} |")


def plot(
    path: Path, results: dict[str, list[float]], settings: Sequence[Setting], tokens_per_window: int
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in settings:
        losses = results[s.label]
        tokens = [w * s.workers * tokens_per_window / 1e3 for w in range(len(losses))]
        ax.plot(tokens, losses, marker="o" if s.workers > 1 else ".", label=s.label)
    ax.set_xlabel("tokens (thousands, all workers)")
    ax.set_ylabel("held-out loss (nats)")
    ax.set_title("tiny, H = 20: 4 DiLoCo workers vs 1 worker")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


# ---- main -----------------------------------------------------------------------------------


def settings_for(args: argparse.Namespace) -> list[Setting]:
    settings = [
        Setting("4 workers, fp32, DiLoCo 0.7/0.9 Nesterov", WORKERS, "none", DILOCO),
        Setting("4 workers, fp32, plain (lr 1, no momentum)", WORKERS, "none", PLAIN),
        Setting("4 workers, top-k 2 % + EF, DiLoCo 0.7/0.9", WORKERS, "topk", DILOCO),
        Setting("4 workers, top-k 2 % + EF, plain", WORKERS, "topk", PLAIN),
        Setting("1 worker, 4× windows, plain", 1, "none", PLAIN),
    ]
    if args.all_settings:
        settings.append(Setting("1 worker, 4× windows, DiLoCo 0.7/0.9", 1, "none", DILOCO))
    return [settings[0], settings[2], settings[4]] if args.quick else settings


def window0(t: Trainer, reuse: bool, progress: Progress) -> list[Delta]:
    """Window 0 of the four workers from θ_0 (trained, or loaded from an earlier run)."""
    folder = RUN_DIR / "window0"
    files = [folder / f"delta_{i}.safetensors" for i in range(WORKERS)]
    if reuse and all(f.exists() for f in files):
        print(f"reusing window 0 from {folder} (no inner steps timed here)", flush=True)
        deltas = [load_file(f) for f in files]
        t.cache.update({(i, 0): d for i, d in enumerate(deltas)})
        return deltas
    deltas = []
    for i in range(WORKERS):
        deltas.append(t.delta(t.theta0, i, 0))
        progress.tick(f"worker {i} trained window 0", t.steps_done)
    folder.mkdir(parents=True, exist_ok=True)
    for f, delta in zip(files, deltas, strict=True):
        save_file({k: v.contiguous() for k, v in delta.items()}, f)
    return deltas


def loss_child(args: argparse.Namespace) -> None:
    """One setting of part 3 in its own process (`--jobs` > 1); writes its losses as JSON."""
    torch.set_num_threads(1)
    t = setup(args.documents, args.eval_pages)
    window0(t, True, Progress(0))
    s = settings_for(args)[args.loss_child]
    windows = (1 if args.quick else args.windows) * WORKERS // s.workers
    progress = Progress((windows - 1) * s.workers * t.cfg.train.inner_steps)  # window 0 cached
    losses = train_setting(t, s, windows, progress)
    out = {"losses": losses, "step_seconds": t.step_seconds}
    (RUN_DIR / f"loss_{args.loss_child}.json").write_text(json.dumps(out))


def held_out(
    args: argparse.Namespace, t: Trainer, settings: Sequence[Setting], progress: Progress
) -> dict[str, list[float]]:
    windows = 1 if args.quick else args.windows
    if args.jobs <= 1:
        return {
            s.label: train_setting(t, s, windows * WORKERS // s.workers, progress) for s in settings
        }
    # Settings in parallel processes (1 thread each); their step times count as compute too.
    flags = (
        [
            f"--windows={args.windows}",
            f"--documents={args.documents}",
            f"--eval-pages={args.eval_pages}",
        ]
        + ["--quick"] * args.quick
        + ["--all-settings"] * args.all_settings
    )
    pending = list(range(len(settings)))
    running: list[tuple[int, subprocess.Popen[bytes]]] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            k = pending.pop(0)
            cmd = [sys.executable, __file__, "--loss-child", str(k), *flags]
            running.append((k, subprocess.Popen(cmd)))
        time.sleep(1)
        for k, proc in list(running):
            if proc.poll() is not None:
                if proc.returncode != 0:
                    raise RuntimeError(f"setting {settings[k].label} failed ({proc.returncode})")
                running.remove((k, proc))
    results = {}
    for k, s in enumerate(settings):
        got = json.loads((RUN_DIR / f"loss_{k}.json").read_text())
        results[s.label] = got["losses"]
        t.step_seconds += got["step_seconds"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 window, 1 round, shaped only")
    parser.add_argument("--windows", type=int, default=3, help="windows of the 4-worker runs")
    parser.add_argument("--rounds", type=int, default=3, help="shaped all-reduce rounds per wire")
    parser.add_argument("--documents", type=int, default=300, help="stdlib files in the corpus")
    parser.add_argument("--eval-pages", type=int, default=32)
    parser.add_argument("--all-settings", action="store_true", help="+ 1 worker with DiLoCo")
    parser.add_argument("--lead", type=float, default=8.0, help="barrier → start_at, seconds")
    parser.add_argument("--jobs", type=int, default=1, help="part 3 settings in parallel")
    parser.add_argument(
        "--sender-timeout", type=float, default=30.0, help="AveragingConfig.sender_timeout_s"
    )
    parser.add_argument("--parts", default="loopback,shaped,loss", help="which parts to run")
    parser.add_argument("--wires", default=",".join(WIRES), help="wire codecs of parts 1-2")
    parser.add_argument("--part-size", type=int, default=1 << 17, help="part_size_bytes")
    parser.add_argument(
        "--reuse-window0", action="store_true", help="load window 0's Δs from an earlier run"
    )
    parser.add_argument("--plot", type=Path, help="PNG of the held-out loss curves")
    parser.add_argument("--min-matchmaking", type=float, default=2.0)
    parser.add_argument(
        "--no-dial", dest="dial", action="store_false",
        help="peers know only their bootstrap peer at a round (the benchmark before 2026-12-07)",
    )  # fmt: skip
    parser.add_argument("--shaped-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--loss-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    windows, rounds = (1, 1) if args.quick else (args.windows, args.rounds)
    wires = args.wires.split(",")
    peer = PeerArgs(
        wires, rounds, args.lead, args.sender_timeout, args.part_size,
        min_matchmaking=args.min_matchmaking, dial=args.dial,
    )  # fmt: skip
    if args.shaped_child:
        shaped_child(args.shaped_child, peer)
        return
    if args.loss_child is not None:
        loss_child(args)
        return
    parts = set(args.parts.split(","))

    t = setup(args.documents, args.eval_pages)
    params = sum(p.numel() for n, p in t.model.named_parameters() if n in set(t.names))
    h = t.cfg.train.inner_steps
    tokens_per_window = t.cfg.train.pages_per_window * t.cfg.data.seq_len
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {time.strftime('%Y-%m-%d %H:%M')}, load "
        f"{os.getloadavg()[0]:.1f}; tiny ({params:,} parameters, S = 1), H = {h}, batch "
        f"{t.cfg.train.batch_size} × {t.cfg.data.seq_len}, {WORKERS} workers"
    )
    settings = settings_for(args)
    # Window 0 is trained once per worker and shared (same θ_0 and pages everywhere).
    total = WORKERS * h + ("loss" in parts) * sum(
        (windows - 1) * s.workers * h if s.workers > 1 else (WORKERS * windows - 1) * h
        for s in settings
    )
    progress = Progress(total)

    print("\n## 0. Window 0: four workers from θ_0", flush=True)
    deltas = window0(t, args.reuse_window0, progress)

    loopback: dict[str, dict[str, float]] = {}
    if not args.quick and "loopback" in parts:
        print("\n## 1. Four peers on loopback (unshaped)", flush=True)
        folder = RUN_DIR / "net-loopback"
        prepare(folder, deltas)
        rows = run_peers(folder, replace(peer, rounds=1), shaped=False)
        loopback = summarize(rows)
    shaped: dict[str, dict[str, float]] = {}
    why = "not asked for" if "shaped" not in parts else can_shape()
    if why is None:
        print(
            f"\n## 2. Four peers on a shaped network ({RATE_BITS / 1e6:.0f} Mbit/s per peer "
            f"up and down, {DELAY_MS:.0f} ms one-way per packet)",
            flush=True,
        )
        folder = (RUN_DIR / "net-shaped").resolve()
        prepare(folder, deltas)
        subprocess.run(
            [
                "unshare",
                "--net",
                "--mount",
                "--propagation",
                "private",
                "--",
                sys.executable,
                __file__,
                "--shaped-child",
                str(folder),
                *peer.flags(),
            ],
            check=True,
        )
        shaped = summarize(json.loads((folder / "rows.json").read_text()))
    else:
        print(f"\n(part 2 skipped: {why})")

    results: dict[str, list[float]] = {}
    if "loss" in parts:
        print("\n## 3. Held-out loss", flush=True)
        results = held_out(args, t, settings, progress)

    # Compute: this run's inner steps; without any, the quiet-box miner benchmark's 0.231 s
    # (RESULTS.md "Miner": 4,439 tokens/s at 1,024 tokens per step).
    steps = sorted(t.step_seconds) or [1024 / 4439]
    step_s, quiet = statistics.median(steps), steps[len(steps) // 10]
    if shaped or loopback:
        bytes_table(params, shaped or loopback)
    for wire, s in shaped.items():
        print(
            f"  {wire}: matchmaking {s['matchmaking_s']:.1f} s (start_at lead, a constant), "
            f"all-reduce median {s['allreduce_s']:.2f} s, max {s['allreduce_max_s']:.2f} s, "
            f"failed or partial (peer, round)s {s['failed']:.0f}"
        )
    if shaped:
        utilization_table(step_s, quiet, shaped, loopback, "100 Mbit/s, 50 ms one-way")
    elif loopback:
        utilization_table(step_s, quiet, loopback, loopback, "loopback, unshaped")
    if results:
        loss_table(results, settings, windows, tokens_per_window)
    if args.plot and results:
        plot(args.plot, results, settings, tokens_per_window)
    print(
        f"\nload average at the end: {os.getloadavg()[0]:.1f}; "
        f"total {time.perf_counter() - progress.started:.0f} s"
    )


if __name__ == "__main__":
    main()
