"""Commit-reveal against weight copying (issue 14): what a copier earns per unit stake.

    .venv/bin/python benchmarks/bench_weight_copier.py            # ~2 minutes on 2 cores
    .venv/bin/python benchmarks/bench_weight_copier.py --seeds 3 --epochs 20 --warmup 40

Three honest validators and one copier of equal stake, eight miners whose quality drifts
each epoch (AR(1) with correlation rho). Honest validators set noisy views of the current
quality; the copier sets the consensus of the weights it can read on the ledger
(`chain.copier.run_copier`, a real `Ledger` produced in process, tempo 2). Each line is
the copier's dividend per unit stake over the honest validators' mean (mean ± sd over
seeds), with commit-reveal off and on (reveal period 1 and 2 epochs), for several drift
speeds ("drift": sd of one epoch's change of a miner's log quality; the honest views'
noise is 0.2); rho = 1 (no drift) is the control. Writes benchmarks/results/weight_copier.json
and weight_copier.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from chain.copier import CopierRun, CopierSetup, run_copier

RESULTS = Path(__file__).resolve().parent / "results"
RHOS = (1.0, 0.99, 0.95, 0.9, 0.8)
PERIODS = (1, 2)
HEADLINE = (0.9, 1)  # (rho, reveal period) of the per-epoch plot


def runs(
    setup: CopierSetup, commit_reveal: bool, seeds: list[int], folder: Path
) -> list[CopierRun]:
    return [run_copier(setup, commit_reveal=commit_reveal, seed=s, folder=folder) for s in seeds]


def summary(ratios: list[float]) -> str:
    spread = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
    return f"{statistics.mean(ratios):.3f} ± {spread:.3f}"


def step(setup: CopierSetup, rho: float) -> float:
    """Standard deviation of one epoch's change of a miner's log quality
    (sharpness · sqrt(2 (1 - rho))), to compare with the honest views' noise."""
    return setup.sharpness * math.sqrt(2 * (1 - rho))


def plot(
    setup: CopierSetup, rows: list[dict[str, Any]], series: dict[str, list[float]], path: Path
) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    drift = [step(setup, rho) for rho in RHOS]
    off = [next(r["off_mean"] for r in rows if r["rho"] == rho) for rho in RHOS]
    left.plot(drift, off, "o-", label="commit-reveal off")
    for period in PERIODS:
        on = [
            next(r["on_mean"] for r in rows if r["rho"] == rho and r["period"] == period)
            for rho in RHOS
        ]
        left.plot(drift, on, "s-", label=f"on, reveal period {period}")
    left.axhline(1.0, color="grey", lw=0.8)
    left.axvline(setup.noise, color="grey", ls=":", lw=0.8)
    left.set_xlabel("drift: sd of one epoch's change of log quality (dotted: honest noise)")
    left.set_ylabel("copier / honest dividend per unit stake")
    left.legend()
    for name, values in series.items():
        right.plot(range(len(values)), values, label=name)
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_xlabel("counted epoch")
    right.set_ylabel("copier / honest, mean over seeds")
    right.set_title(f"rho = {HEADLINE[0]}, reveal period {HEADLINE[1]}")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30, help="counted epochs (after warm-up)")
    parser.add_argument("--warmup", type=int, default=60, help="epochs before counting")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    base = CopierSetup(epochs=args.epochs, warmup=args.warmup)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    series: dict[str, list[float]] = {}
    print(f"copier / honest dividend per unit stake, {len(seeds)} seeds, {args.epochs} epochs")
    print(f"{'rho':>5} {'drift':>6} {'period':>6} {'off':>15} {'on':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for rho in RHOS:
            off = runs(dataclasses.replace(base, rho=rho), False, seeds, folder)
            for period in PERIODS:
                setup = dataclasses.replace(base, rho=rho, reveal_period_epochs=period)
                on = runs(setup, True, seeds, folder)
                row = {
                    "rho": rho,
                    "drift_sd": round(step(base, rho), 4),
                    "period": period,
                    "off": [r.ratio for r in off],
                    "on": [r.ratio for r in on],
                    "off_mean": statistics.mean(r.ratio for r in off),
                    "on_mean": statistics.mean(r.ratio for r in on),
                }
                rows.append(row)
                print(
                    f"{rho:5.2f} {step(base, rho):6.2f} {period:6d} "
                    f"{summary(row['off']):>15} {summary(row['on']):>15}",
                    flush=True,
                )
                if (rho, period) == HEADLINE:
                    for name, group in (("commit-reveal off", off), ("commit-reveal on", on)):
                        per_epoch = [r.per_epoch_ratio() for r in group]
                        series[name] = [statistics.mean(v) for v in zip(*per_epoch, strict=True)]
    took = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "date": dt.date.today().isoformat(),
        "seconds": round(took, 1),
        "seeds": seeds,
        "setup": dataclasses.asdict(base),
        "rows": rows,
        "headline": {"rho": HEADLINE[0], "period": HEADLINE[1], "per_epoch": series},
    }
    (args.out / "weight_copier.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(base, rows, series, args.out / "weight_copier.png")
    print(f"{took:.0f}s; wrote {args.out / 'weight_copier.json'} and weight_copier.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
