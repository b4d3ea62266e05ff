"""SparseLoCo wire and overlap (issue 15): held-out loss per window, and bytes per peer.

    .venv/bin/python benchmarks/bench_sparseloco.py --windows 30 --seeds 0 --jobs 2 \
        --plot benchmarks/results/sparseloco_cpu2.png --json benchmarks/results/sparseloco.json
    .venv/bin/python benchmarks/bench_sparseloco.py --windows 3 --settings fp32,sparse-overlap

`tiny` preset (5.26 M parameters, one shard), 4 workers, H = `train.inner_steps` AdamW
steps of 8 × 128 tokens per window, each worker on its own pages (`train.pages.
assigned_pages`, as miners). Per window the four Δs are combined with the library's own
wire math — `averaging.parts.wire_parts` + `reduce_parts` for the all-reduced codecs
(fp32 = ``none``, ``int8``), `averaging.sparseloco.ErrorFeedback` + `reduce_parts` on the
all-gathered ``sparseloco`` wire — and `averaging.outer.outer_step` gives θ_{w+1}. The
transport does not change the math (`tests/averaging`: every peer ends bit-identical
with it).

Settings (`--settings`, comma-separated):
- ``fp32``, ``int8``: DiLoCo with the tiny preset's outer step (lr 0.7, Nesterov 0.9).
- ``sparse``: SparseLoCo, 64 of 4,096 values, 2 bits, error feedback β = 0.95, outer
  lr 1 and no momentum (the buffer's decay plays the momentum's part).
- ``…-overlap``: the one-step-delayed outer update: the round of window w runs while
  window w+1 trains, so θ_{w+1} = outer(θ_w, average of window w − 1) and the first window
  changes nothing. Still one public function of what was committed.
- ``…-eager``: the same delayed public update, but worker i trains window w from
  outer(θ_w, its own committed row of window w − 1) — its own message standing in for the
  average still in flight (eager updates, arXiv 2502.12996) — and its Δ is measured from
  that start. The start is public (θ_w and i's revealed message), so validators can
  recompute it; the published model is θ_w, as with ``-overlap``.
- ``dp``: synchronous data parallel at equal tokens: one worker, batch 4 × 8 pages (the
  four workers' pages of each step), the same number of optimizer steps (windows × H), one
  AdamW and one cosine schedule over the whole run; what a datacenter would run.

Each (setting, seed) runs in its own process with one thread (`--jobs` at a time); the
loss after every window goes to `--json`, the mean over seeds to the table and `--plot`.
Bytes per peer per outer step are measured on the encoded bytes of window 0's Δs: the
butterfly (fp32, int8) sends (n−1)/n of its parts to the reducers and gets (n−1)/n of the
averaged parts back; the all-gather sends its message to n − 1 peers and gets theirs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from bench_averaging import RUN_DIR, WORKERS, Delta, Trainer, setup

from averaging.config import OuterConfig
from averaging.outer import outer_step
from averaging.parts import SPARSELOCO, reduce_parts, wire_parts
from averaging.settings import RobustConfig
from averaging.sparseloco import ErrorFeedback, SparseSpec
from train.inner import inner_loop
from train.pages import assigned_pages

SETTINGS = (
    "fp32",
    "fp32-overlap",
    "int8",
    "int8-overlap",
    "sparse",
    "sparse-overlap",
    "fp32-eager",
    "int8-eager",
    "sparse-eager",
    "dp",
)
DILOCO = OuterConfig(lr=0.7, momentum=0.9, nesterov=True)
# SparseLoCo's settings; `--k`, `--beta`, `--outer-lr` change them for a sweep.
SPARSE_OUTER = OuterConfig(lr=1.0, momentum=0.0, nesterov=False)
SPEC = SparseSpec(chunk=4096, k=64, positions="rice")  # the wire's default
BETA = 0.95


def configure_sparse(k: int, beta: float, lr: float) -> str:
    """Set the sparse settings of this process; returns their label."""
    global SPEC, BETA, SPARSE_OUTER
    SPEC, BETA = SparseSpec(chunk=4096, k=k, positions="rice"), beta
    SPARSE_OUTER = OuterConfig(lr=lr, momentum=0.0, nesterov=False)
    return f"k{k}-b{beta:g}-a{lr:g}"


PART_SIZE = 1 << 17  # the library's part_size_bytes
ROBUST = RobustConfig()


class Combiner:
    """One setting's wire: four Δs in, the average every peer ends with out."""

    def __init__(self, wire: str) -> None:
        self.wire = wire
        self.feedback = [ErrorFeedback(BETA) for _ in range(WORKERS)]
        self.rows: list[Delta] = []  # what each worker sent, decoded (public once revealed)
        # Per window, each worker's message in bytes, Rice-coded (sent) and packed (the
        # paper's 12-bit indices, the same values: encoded beside it for the count only).
        self.message_bytes: list[dict[str, list[int]]] = []

    def __call__(self, deltas: list[Delta]) -> Delta:
        shapes = {n: tuple(t.shape) for n, t in deltas[0].items()}
        if self.wire == SPARSELOCO:
            rows, sizes = [], {"rice": [], "packed": []}
            packed = replace(SPEC, positions="packed")
            for feedback, delta in zip(self.feedback, deltas, strict=True):
                sent = feedback.compress(delta, SPEC)
                sizes["packed"].append(len(feedback.compress(delta, packed).message.to_bytes()))
                sizes["rice"].append(len(sent.message.to_bytes()))
                feedback.commit(sent)
                rows.append(sent.message.decoded)
            self.message_bytes.append(sizes)
        else:
            rows = [wire_parts(d, self.wire, PART_SIZE)[1] for d in deltas]
        self.rows = [self.dense(r, shapes) for r in rows]
        return reduce_parts(rows, [1.0] * len(rows), shapes, self.wire, PART_SIZE, ROBUST)

    def dense(self, row: Any, shapes: dict[str, tuple[int, ...]]) -> Delta:
        """One member's row as the Δ it stands for (one member's `reduce_parts`)."""
        return reduce_parts([row], [1.0], shapes, self.wire, PART_SIZE, ROBUST)


def run_setting(
    t: Trainer, setting: str, windows: int, log: Any
) -> tuple[list[float], list[dict[str, list[int]]]]:
    """Held-out loss of θ_0 and after each window; the sparse messages' bytes per window."""
    if setting == "dp":
        return run_dp(t, windows, log), []
    base, _, mode = setting.partition("-")
    wire = {"fp32": "none", "int8": "int8", "sparse": SPARSELOCO}[base]
    outer = SPARSE_OUTER if base == "sparse" else DILOCO
    combine = Combiner(wire)
    theta, momentum = dict(t.theta0), {}
    pending: Delta | None = None
    losses = [t.heldout(theta)]
    for window in range(windows):
        starts = [theta] * WORKERS
        if mode == "eager" and combine.rows:
            # Each worker's own row of the previous window stands in for the average
            # still in flight; a copy of the momentum, so the public step is untouched.
            starts = [
                outer_step(theta, row, {k: v.clone() for k, v in momentum.items()}, outer)[0]
                for row in combine.rows
            ]
        average = combine([t.delta(starts[i], i, window) for i in range(WORKERS)])
        if mode:
            # The round of this window finishes while the next one trains: θ_{w+1} takes
            # the previous window's average.
            if pending is not None:
                theta, momentum = outer_step(theta, pending, momentum, outer)
            pending = average
        else:
            theta, momentum = outer_step(theta, average, momentum, outer)
        losses.append(t.heldout(theta))
        log(f"{setting} window {window + 1}/{windows}: held-out {losses[-1]:.4f}")
    return losses, combine.message_bytes


def run_dp(t: Trainer, windows: int, log: Any) -> list[float]:
    cfg = t.cfg.train
    h, b = cfg.inner_steps, cfg.batch_size
    n = t.train_pages.shape[0]
    steps = []
    for window in range(windows):
        orders = [
            assigned_pages(
                f"bench-worker-{i}", window, t.cfg.run.seed, n, t.cfg.train.pages_per_window
            )
            for i in range(WORKERS)
        ]
        for step in range(h):
            steps += [o[step * b : (step + 1) * b] for o in orders]
    pages = torch.from_numpy(t.train_pages[[int(p) for chunk in steps for p in chunk]])
    long = cfg.model_copy(update={"inner_steps": windows * h, "batch_size": WORKERS * b})
    losses = [t.heldout(t.theta0)]

    def evaluate(step: int, _params: Any, _moments: Any) -> None:
        losses.append(t.heldout_now())
        log(f"dp window {step // h}/{windows}: held-out {losses[-1]:.4f}")

    t.load(t.theta0)
    inner_loop(
        t.accelerator, t.model, t.names, pages, long,
        boundaries=set(range(h, windows * h + 1, h)), on_boundary=evaluate,
    )  # fmt: skip
    return losses


def wire_bytes(t: Trainer) -> dict[str, dict[str, float]]:
    """Bytes each peer sends (= receives) per outer step on each wire, from window 0's Δs."""
    deltas = [t.delta(t.theta0, i, 0) for i in range(WORKERS)]
    shapes = {k: tuple(v.shape) for k, v in deltas[0].items()}
    n, share = WORKERS, (WORKERS - 1) / WORKERS
    out = {}
    for label, wire in (("fp32", "none"), ("int8", "int8")):
        own = sum(len(b) for b in wire_parts(deltas[0], wire, PART_SIZE)[0])
        rows = [wire_parts(d, wire, PART_SIZE)[1] for d in deltas]
        average = reduce_parts(rows, [1.0] * n, shapes, wire, PART_SIZE, ROBUST)
        back = sum(len(b) for b in wire_parts(average, wire, PART_SIZE)[0])
        out[label] = {"sent": share * (own + back), "message": own}
    for label, spec in (("sparse", SPEC), ("sparse-packed", replace(SPEC, positions="packed"))):
        message = ErrorFeedback(BETA).compress(deltas[0], spec).message.to_bytes()
        out[label] = {"sent": (n - 1) * len(message), "message": len(message)}
    params = sum(v.numel() for v in deltas[0].values())
    for row in out.values():
        row["bits_per_param"] = 8 * row["message"] / params
        row["vs_fp32"] = out["fp32"]["sent"] / row["sent"]
    return out


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    tag = configure_sparse(args.k, args.beta, args.outer_lr)
    setting, seed = args.child.split("@")
    t = setup(args.documents, args.eval_pages, seed=int(seed))
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"  [{time.perf_counter() - started:6.0f} s] seed {seed} {text}", flush=True)

    losses, message_bytes = run_setting(t, setting, args.windows, log)
    result: dict[str, Any] = {"setting": setting, "seed": int(seed), "losses": losses}
    if message_bytes:
        result["message_bytes"] = message_bytes
    if setting.startswith("sparse"):
        result["sparse"] = tag
    if args.bytes:
        result["bytes"] = wire_bytes(t)
    out = RUN_DIR / f"sparseloco_{setting}_{seed}_{tag}.json"
    out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--jobs", type=int, default=2, help="(setting, seed) runs at a time")
    parser.add_argument("--documents", type=int, default=300, help="stdlib files in the corpus")
    parser.add_argument("--eval-pages", type=int, default=32)
    parser.add_argument("--json", type=Path, help="every run's losses and the bytes")
    parser.add_argument("--plot", type=Path, help="PNG of the mean held-out loss per window")
    parser.add_argument("--k", type=int, default=64, help="sparse: values kept per 4,096")
    parser.add_argument("--beta", type=float, default=0.95, help="sparse: error-feedback decay")
    parser.add_argument("--outer-lr", type=float, default=1.0, help="sparse: outer lr α")
    parser.add_argument("--report-only", action="store_true", help="tables from earlier runs")
    parser.add_argument(
        "--extra",
        nargs="*",
        default=[],
        type=Path,
        help="run files of other sparse settings to show beside (labelled with their tag)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--bytes", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    settings = args.settings.split(",")
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; choose from {SETTINGS}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.report_only:
        setup(args.documents, args.eval_pages)  # builds the tokenizer and pages once
    jobs = [f"{s}@{seed}" for seed in seeds for s in settings]
    flags = [
        f"--windows={args.windows}",
        f"--documents={args.documents}",
        f"--eval-pages={args.eval_pages}",
        f"--k={args.k}",
        f"--beta={args.beta}",
        f"--outer-lr={args.outer_lr}",
    ]
    tag = configure_sparse(args.k, args.beta, args.outer_lr)
    running: list[tuple[str, subprocess.Popen[bytes]]] = []
    # --report-only: every run is on disk from an earlier call with the same arguments.
    pending = [] if args.report_only else list(jobs)
    first = True
    while pending or running:
        while pending and len(running) < args.jobs:
            job = pending.pop(0)
            extra = ["--bytes"] if first else []
            first = False
            running.append(
                (job, subprocess.Popen([sys.executable, __file__, "--child", job, *flags, *extra]))
            )
        time.sleep(2)
        for job, proc in list(running):
            if proc.poll() is not None:
                if proc.returncode != 0:
                    raise RuntimeError(f"{job} failed ({proc.returncode})")
                running.remove((job, proc))
    files = [RUN_DIR / f"sparseloco_{j.replace('@', '_')}_{tag}.json" for j in jobs]
    if args.report_only:  # whatever earlier calls ran: a setting may have fewer seeds
        files = [f for f in files if f.is_file()]
    runs = [json.loads(f.read_text()) for f in files]
    for path in args.extra:
        run = json.loads(path.read_text())
        run["setting"] = f"{run['setting']} ({run.get('sparse', '?')})"
        if run["setting"] not in settings:
            settings.append(run["setting"])
        runs.append(run)
    report(runs, settings, args)


def report(runs: list[dict[str, Any]], settings: list[str], args: argparse.Namespace) -> None:
    by_setting: dict[str, list[list[float]]] = {}
    for run in runs:
        by_setting.setdefault(run["setting"], []).append(run["losses"])
    settings = [s for s in settings if s in by_setting]
    wire = next((r["bytes"] for r in runs if "bytes" in r), None)
    base = statistics.mean(r[-1] for r in by_setting["fp32"]) if "fp32" in by_setting else None
    print(f"\n## Held-out loss after {args.windows} windows (mean over seeds {args.seeds})")
    print(
        "| setting | seeds | final loss | ± (seeds) | vs fp32 DiLoCo "
        "| bytes sent per peer per step | vs fp32 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in settings:
        finals = [r[-1] for r in by_setting[s]]
        mean = statistics.mean(finals)
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        rel = f"{100 * (mean / base - 1):+.2f} %" if base else "—"
        kind = s.split(" ")[0].split("-")[0]
        sent = wire.get(kind) if wire and kind != "dp" else None
        sent_text = f"{sent['sent'] / 1e6:.3f} MB" if sent else "—"
        ratio = f"{sent['vs_fp32']:.0f}×" if sent else "—"
        print(
            f"| {s} | {len(finals)} | {mean:.4f} | {spread:.4f} | {rel} | {sent_text} | {ratio} |"
        )
    if wire:
        print(
            "\nmessage bits per parameter: "
            + ", ".join(f"{k} {v['bits_per_param']:.3f}" for k, v in wire.items())
        )
    sized = [r for r in runs if r.get("message_bytes")]
    if sized and wire:
        fp32 = wire["fp32"]["sent"]
        print("\n## Sparse messages over the run: bytes each peer sends per outer step")
        print("| setting | seed | coding | mean | largest window | vs fp32 (mean / worst) |")
        print("| --- | ---: | --- | ---: | ---: | ---: |")
        for r in sized:
            for coding in ("rice", "packed"):
                per_window = [
                    (WORKERS - 1) * statistics.mean(w[coding]) for w in r["message_bytes"]
                ]
                mean, worst = statistics.mean(per_window), max(per_window)
                print(
                    f"| {r['setting']} | {r['seed']} | {coding} | {mean / 1e6:.4f} MB "
                    f"| {worst / 1e6:.4f} MB | {fp32 / mean:.1f}× / {fp32 / worst:.1f}× |"
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": runs, "bytes": wire}, indent=1))
    if args.plot:
        plot(by_setting, settings, args.plot)


def plot(by_setting: dict[str, list[list[float]]], settings: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for s in settings:
        curves = torch.tensor(by_setting[s])
        mean = curves.mean(0)
        seeds = curves.shape[0]
        ax.plot(range(len(mean)), mean, label=f"{s} ({seeds} seed{'s' * (seeds > 1)})",
                linestyle="--" if "overlap" in s else ":" if "eager" in s else "-")  # fmt: skip
    ax.set_xlabel("window (outer steps)")
    ax.set_ylabel("held-out loss (nats)")
    ax.set_ylim(top=min(8.5, ax.get_ylim()[1]))
    ax.set_title("tiny preset, 4 workers, H = 20: wire and overlap")
    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
