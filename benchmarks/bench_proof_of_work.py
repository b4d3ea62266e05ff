"""What proof-of-work spot checks cost a validator and a miner, and what they tell apart.

    .venv/bin/python benchmarks/bench_proof_of_work.py            # tiny preset, 4 miners, 2 windows
    .venv/bin/python benchmarks/bench_proof_of_work.py --windows 3 --miners 8
    .venv/bin/python benchmarks/bench_proof_of_work.py --smoke    # harness model, < 2 minutes

Everything runs in one process on one machine, with the in-process harness of the
validator tests (`tests.validation.conftest.make_subnet`: a real ledger, a real local
store, miners that train and publish as `train.miner` does, `train.responder` threads that
answer challenges) and the tiny preset's model and training sizes (5.3 M parameters,
H = 20 steps of 8 × 128 tokens; `--smoke` keeps the harness's 0.4 M-parameter model).
Three subnets, keys derived from `--seed` (so the same miners, pages and Δ in each):

1. **Validator cost**: `--miners` honest miners committing trajectories of
   `--segments` segments (`train.pow_segments`, default the config's 10), scored by a
   validator with spot checks (`validation.pow_checks=1`) and by one without
   (`validation.pow_checks=0`), window by window in alternation so both see the same
   load on a shared machine. The headline is
   `WindowReport.seconds` per contribution with checks over without (goal: ≤ 1.5×), with
   `eval_seconds` beside it; the recompute itself is `PowVerdict.seconds` (captured from
   `SpotChecker.settle`), and `settle` wall time includes waiting for the answers. The
   miners' responder threads run in the validator's process, so their answering (reading
   the kept states, writing the answer) is counted in its seconds: an upper bound. Each
   validator first makes two passes over E (one-time costs of the process); the checked
   one's first recompute also builds its checker's model (once per validator process).
2. **Miner overhead**: disk the kept states of one window take
   (`TrajectoryKeeper.nbytes`; a miner keeps `train.pow_keep_windows` of them) and bytes
   written per answer (`Responder.bytes_sent` / answers), each against the published Δ
   (the contribution file's size from its manifest).
3. **Honest tolerance and cheats**: relative error and cosine of every check: the honest
   miners' of run 1 (one segment each) and a third subnet with `honest`, `honest1t`
   (trained on one thread), `scaled2` (H/2 steps, Δ × 2) and `unassigned` (one segment on
   pages it was not assigned), every segment checked (`validation.pow_checks=4`); a row
   gives the worst checked segment (or the one that failed). Honest ones must pass, the
   cheats must fail.
4. **Detection probability**, closed form: a miner that fabricates k of n segments, of
   which m are drawn, is caught in a window with p = 1 − C(n−k, m)/C(n, m), and after
   1/p windows on average.

Results: a markdown table on stdout and a JSON file (`--out`, default
benchmarks/results/proof_of_work.json; with `--smoke` a file in the temp folder, so a
smoke run never replaces real results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.validation.conftest import Subnet, make_subnet  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.inner import mean_loss  # noqa: E402
from validation.proof_of_work import Issued, PowVerdict, SpotChecker  # noqa: E402
from validation.report import MinerRow, WindowReport  # noqa: E402
from validation.validator import Validator  # noqa: E402

logger = logging.getLogger("bench_proof_of_work")

# configs/tiny.yaml's model and training, where the harness shrinks them.
TINY = {
    "model.hidden_size": 256,
    "model.intermediate_size": 688,
    "model.num_layers": 4,
    "model.num_heads": 4,
    "model.num_kv_heads": 4,
    "train.inner_steps": 20,
    "train.batch_size": 8,
    "data.seq_len": 128,
    "train.lr": 2e-3,
    "train.warmup_steps": 5,
}
CHEATS = ("scaled2", "unassigned")
TOLERANCE = ("honest", "honest1t", *CHEATS)


@dataclass
class Check:
    """One contribution's spot check as a validator saw it."""

    run: str
    window: int
    miner: str
    behaviour: str
    pow: str | None
    rel_error: float | None
    cosine: float | None
    segments: tuple[int, ...]
    seconds: float  # PowVerdict.seconds: fetching, loading, recomputing, comparing


@dataclass
class Run:
    """One subnet, its validator, and what was measured of it."""

    label: str
    net: Subnet
    validator: Validator
    reports: list[WindowReport] = field(default_factory=list)
    verdicts: dict[int, dict[int, PowVerdict]] = field(default_factory=dict)
    settle_s: dict[int, float] = field(default_factory=dict)
    delta_bytes: dict[tuple[str, int], int] = field(default_factory=dict)  # (miner, window)
    kept_bytes: dict[tuple[str, int], int] = field(default_factory=dict)

    def name_of(self, row: MinerRow) -> str | None:
        for name, kp in self.net.miners.items():
            if kp.address == row.hotkey:
                return name
        return None


def capture_settle(run: Run) -> None:
    """Keep every verdict `SpotChecker.settle` returns, and its wall time."""
    checker: SpotChecker = run.validator.checker
    settle = checker.settle

    def wrapped(
        window: int,
        issued: Sequence[Issued],
        theta: Mapping[str, torch.Tensor],
        *,
        until: float,
    ) -> dict[int, PowVerdict]:
        started = time.perf_counter()
        got = settle(window, issued, theta, until=until)
        run.settle_s[window] = time.perf_counter() - started
        run.verdicts[window] = dict(got)
        return got

    checker.settle = wrapped  # type: ignore[method-assign]


def open_run(label: str, root: Path, data: Path, miners: list[str], seed: str, **sets: Any) -> Run:
    net = make_subnet(root / label, data, miners, key_seed=seed, **sets)
    run = Run(label, net, net.validator())
    capture_settle(run)
    warm_up(run.validator)
    return run


def warm_up(validator: Validator) -> None:
    """Two passes over E: the first passes of a process pay one-time costs, which would
    otherwise land on whichever validator scores first."""
    vcfg = validator.cfg.validation
    held = torch.from_numpy(validator.pages.heldout[: vcfg.heldout_pages])
    for _ in range(2):
        mean_loss(validator.model, held, batch=vcfg.eval_batch)


def mine(run: Run, window: int) -> None:
    """Every miner of `run` trains and publishes `window`; note Δ and kept-state bytes."""
    started = time.perf_counter()
    run.net.mine(window)
    store = run.net.store
    by_hotkey = {kp.address: name for name, kp in run.net.miners.items()}
    for ref in store.list_contributions(window):
        name = by_hotkey.get(ref.hotkey)
        if name is not None:
            run.delta_bytes[(name, window)] = store.read_manifest(ref).size
    for name, keeper in run.net.keepers.items():
        run.kept_bytes[(name, window)] = keeper.nbytes(window)
    logger.info(
        "%s: window %d mined by %d miners in %.1f s",
        run.label, window, len(run.net.miners), time.perf_counter() - started,
    )  # fmt: skip


def validate(run: Run, window: int) -> WindowReport:
    run.net.to_deadline(window)
    report = run.validator.process_window(window)
    run.reports.append(report)
    logger.info(
        "%s: window %d validated, %d contributions in %.2f s (eval %.2f s)",
        run.label, window, report.contributions, report.seconds, report.eval_seconds,
    )  # fmt: skip
    # A miner keeps `train.pow_keep_windows` windows of states; the rest are closed.
    keep = run.net.cfg.train.pow_keep_windows
    for keeper in run.net.keepers.values():
        keeper.prune(window + 1 - keep)
    return report


def checks_of(run: Run) -> list[Check]:
    out = []
    for report in run.reports:
        verdicts = run.verdicts.get(report.window, {})
        for row in report.miners:
            name = run.name_of(row)
            if name is None or row.pow is None or row.uid is None:
                continue
            verdict = verdicts.get(row.uid)
            out.append(
                Check(
                    run=run.label, window=report.window, miner=name,
                    behaviour=name.split("-")[0], pow=row.pow, rel_error=row.pow_rel_error,
                    cosine=row.pow_cosine, segments=verdict.segments if verdict else (),
                    seconds=verdict.seconds if verdict else math.nan,
                )
            )  # fmt: skip
    return out


def close(run: Run) -> None:
    run.validator.close()
    pages_owner = getattr(run.net, "_pages_owner", None)  # the harness's, for pages
    if isinstance(pages_owner, Validator):
        pages_owner.close()
    for responder in run.net.responders.values():
        responder.stop()
    run.net.ledger.close()


def detection(n: int, checks: Sequence[int], fabricated: Sequence[int]) -> list[dict[str, Any]]:
    """P(caught in one window) = 1 − C(n−k, m)/C(n, m), and the expected windows 1/p."""
    out = []
    for m in checks:
        m_eff = min(m, n)
        for k in fabricated:
            p = 1.0 - math.comb(n - k, m_eff) / math.comb(n, m_eff)
            out.append(
                {"n": n, "m": m, "k": k, "p": p, "expected_windows": 1.0 / p if p else math.inf}
            )
    return out


def per_contribution(reports: Sequence[WindowReport]) -> tuple[float, float, int]:
    """(seconds, eval seconds) per contribution over `reports`, and the contributions."""
    n = sum(r.contributions for r in reports)
    return (
        sum(r.seconds for r in reports) / n,
        sum(r.eval_seconds for r in reports) / n,
        n,
    )


def finite(x: Any) -> Any:
    """`x` with every NaN or infinity replaced by None (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    return x


def mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def fmt_bytes(n: float) -> str:
    if math.isnan(n):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def fmt(x: float | None, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--windows", type=int, default=2, help="windows of each run (from 1)")
    parser.add_argument("--miners", type=int, default=4, help="honest miners of the cost runs")
    parser.add_argument(
        "--segments", type=int, default=TrainConfig().pow_segments, help="train.pow_segments"
    )
    parser.add_argument("--checks", type=int, default=1, help="validation.pow_checks, run 1")
    parser.add_argument("--seed", default="bench-pow", help="key_seed of every subnet")
    parser.add_argument("--no-cheats", action="store_true", help="skip the tolerance run")
    parser.add_argument(
        "--smoke", action="store_true", help="2 miners, 1 window, the harness's small model"
    )
    parser.add_argument("--out", type=Path, help="JSON results (see the docstring)")
    parser.add_argument("-v", "--verbose", action="store_true", help="every module's INFO log")
    args = parser.parse_args()
    if args.smoke:
        args.miners, args.windows = 2, 1
    out: Path = args.out or (
        Path(tempfile.gettempdir()) / "proof_of_work_smoke.json"
        if args.smoke
        else REPO / "benchmarks" / "results" / "proof_of_work.json"
    )
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logger.setLevel(logging.INFO)
    sizes: dict[str, object] = {} if args.smoke else dict(TINY)
    work = {"train.pow_segments": args.segments}
    windows = list(range(1, args.windows + 1))
    honest = [f"honest-{i}" for i in range(args.miners)]
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench-pow-") as tmp:
        root, data = Path(tmp), Path(tmp) / "data"
        logger.info("building the subnets in %s (tokenizer and pages on first use)", root)
        runs: list[Run] = []
        try:
            off = open_run(
                "off", root, data, honest, args.seed, **sizes, **work,
                **{"validation.pow_checks": 0},
            )  # fmt: skip
            runs.append(off)
            on = open_run(
                "on", root, data, honest, args.seed, **sizes, **work,
                **{"validation.pow_checks": args.checks},
            )  # fmt: skip
            runs.append(on)
            cfg = on.net.cfg
            pages = on.validator.pages
            logger.info(
                "model %s params, H = %d, batch %d × %d tokens; pages: %d train, %d held out",
                f"{sum(p.numel() for p in on.validator.model.parameters()):,}",
                cfg.train.inner_steps, cfg.train.batch_size, cfg.data.seq_len,
                pages.train.shape[0], pages.heldout.shape[0],
            )  # fmt: skip
            # ---- 1 and 2: the same miners with and without checks, in alternation ----
            for w in windows:
                pair = (off, on) if w % 2 else (on, off)
                for run in pair:
                    mine(run, w)
                for run in pair:
                    validate(run, w)
            # ---- 3: honest tolerance and cheats, every segment checked ----------------
            cheats: Run | None = None
            if not args.no_cheats:
                cheats = open_run(
                    "cheats", root, data, [f"{b}-0" for b in TOLERANCE], args.seed,
                    **sizes, **work, **{"validation.pow_checks": args.segments},
                )  # fmt: skip
                runs.append(cheats)
                for w in windows:
                    mine(cheats, w)
                    validate(cheats, w)
            responders = {
                name: (r.bytes_sent, len(r.answered)) for name, r in on.net.responders.items()
            }
        finally:
            for run in runs:
                close(run)
    took = time.perf_counter() - started

    # ---- 1: validator cost ------------------------------------------------------------
    off_s, off_eval, off_n = per_contribution(off.reports)
    on_s, on_eval, on_n = per_contribution(on.reports)
    on_checks = checks_of(on)
    recompute = [c.seconds for c in on_checks if not math.isnan(c.seconds)]
    settle_per = sum(on.settle_s.values()) / on_n if on_n else math.nan
    per_window = [
        {
            "window": a.window, "contributions": a.contributions,
            "off_s": a.seconds, "on_s": b.seconds,
            "off_eval_s": a.eval_seconds, "on_eval_s": b.eval_seconds,
            "settle_s": on.settle_s.get(b.window, 0.0),
        }
        for a, b in zip(off.reports, on.reports, strict=True)
    ]  # fmt: skip
    validator = {
        "off_s_per_contribution": off_s,
        "on_s_per_contribution": on_s,
        "ratio": on_s / off_s,
        "off_eval_s_per_contribution": off_eval,
        "on_eval_s_per_contribution": on_eval,
        "eval_ratio": on_eval / off_eval,
        "difference_s_per_contribution": on_s - off_s,
        "recompute_s_per_check": mean(recompute),
        "settle_s_per_contribution": settle_per,
        "contributions": {"off": off_n, "on": on_n},
        "windows": per_window,
    }

    # ---- 2: miner overhead ------------------------------------------------------------
    miners: list[dict[str, Any]] = []
    for name in honest:
        deltas = [v for (n, _w), v in on.delta_bytes.items() if n == name]
        kept = [v for (n, _w), v in on.kept_bytes.items() if n == name]
        sent, answers = responders.get(name, (0, 0))
        delta = mean(deltas)
        per_answer = sent / answers if answers else math.nan
        miners.append(
            {
                "miner": name, "delta_bytes": delta, "kept_bytes_per_window": mean(kept),
                "kept_ratio": mean(kept) / delta, "answers": answers,
                "bytes_per_answer": per_answer, "answer_ratio": per_answer / delta,
            }
        )  # fmt: skip
    delta_b = mean([m["delta_bytes"] for m in miners])
    kept_b = mean([m["kept_bytes_per_window"] for m in miners])
    answers_total = sum(int(m["answers"]) for m in miners)
    sent_total = sum(responders.get(m, (0, 0))[0] for m in honest)
    answer_b = sent_total / answers_total if answers_total else math.nan
    miner = {
        "delta_bytes": delta_b,
        "kept_bytes_per_window": kept_b,
        "kept_ratio": kept_b / delta_b,
        "keep_windows": cfg.train.pow_keep_windows,
        "bytes_per_answer": answer_b,
        "answer_ratio": answer_b / delta_b,
        "answers": answers_total,
        "per_miner": miners,
    }

    # ---- 3: tolerance and cheats ------------------------------------------------------
    all_checks = on_checks + (checks_of(cheats) if cheats else [])
    groups: dict[tuple[str, str], list[Check]] = {}
    for c in all_checks:
        groups.setdefault((c.run, c.behaviour), []).append(c)
    tolerance: list[dict[str, Any]] = []
    for (run_label, behaviour), cs in groups.items():
        rels = [c.rel_error for c in cs if c.rel_error is not None]
        coss = [c.cosine for c in cs if c.cosine is not None]
        passed = sum(c.pow == "pass" for c in cs)
        expect_pass = behaviour.startswith("honest")
        tolerance.append(
            {
                "run": run_label, "behaviour": behaviour, "checks": len(cs),
                "segments": sum(len(c.segments) for c in cs), "passed": passed,
                "max_rel_error": max(rels) if rels else None,
                "min_rel_error": min(rels) if rels else None,
                "min_cosine": min(coss) if coss else None,
                "max_cosine": max(coss) if coss else None,
                "labels": sorted({c.pow or "" for c in cs}),
                "as_expected": passed == len(cs) if expect_pass else passed == 0,
            }
        )  # fmt: skip
    honest_ok = all(t["as_expected"] for t in tolerance if str(t["behaviour"]).startswith("honest"))
    cheats_ok = all(t["as_expected"] for t in tolerance if t["behaviour"] in CHEATS)

    # ---- 4: detection probability -----------------------------------------------------
    detect = detection(args.segments, [1, 2, 4], [1, 2])

    result = {
        "meta": {
            "date": dt.date.today().isoformat(), "host": platform.node(),
            "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "smoke": args.smoke, "windows": windows, "miners": args.miners,
            "seed": args.seed, "segments": args.segments, "checks": args.checks,
            "inner_steps": cfg.train.inner_steps, "batch_size": cfg.train.batch_size,
            "seq_len": cfg.data.seq_len, "sets": {k: str(v) for k, v in sizes.items()},
            "pow_max_rel_error": cfg.validation.pow_max_rel_error,
            "pow_min_cosine": cfg.validation.pow_min_cosine, "wall_s": took,
        },
        "validator": validator,
        "miner": miner,
        "checks": [c.__dict__ for c in all_checks],
        "tolerance": tolerance,
        "honest_all_pass": honest_ok,
        "cheats_all_fail": cheats_ok,
        "detection": detect,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(finite(result), indent=2, default=str, allow_nan=False) + "\n")

    # ---- the tables -------------------------------------------------------------------
    size = "harness model (smoke)" if args.smoke else "tiny preset"
    print(f"# bench_proof_of_work, {platform.node()} ({platform.machine()}), {dt.date.today()}")
    print(
        f"{size}, H = {cfg.train.inner_steps}, batch {cfg.train.batch_size} × "
        f"{cfg.data.seq_len}; {args.miners} honest miners, windows {windows}; "
        f"pow_segments {args.segments}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {took:.0f} s in all"
    )
    print()
    print(f"## Validator, per contribution ({on_n} contributions each way)")
    print()
    print(f"| | pow_checks=0 | pow_checks={args.checks} | with / without |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| process_window s | {off_s:.3f} | {on_s:.3f} | **{on_s / off_s:.2f}×** |")
    print(f"| eval_seconds | {off_eval:.3f} | {on_eval:.3f} | {on_eval / off_eval:.2f}× |")
    print(
        f"| recompute s per check (PowVerdict.seconds) | – | {mean(recompute):.3f} | "
        f"{mean(recompute) / off_s:.2f} of a contribution without |"
    )
    print(f"| settle s (incl. waiting for answers) | – | {settle_per:.3f} | – |")
    print(f"| difference of the runs | – | {on_s - off_s:+.3f} | – |")
    print()
    print(
        "eval_seconds scores the same Δ either way: its ratio is this run's timing noise "
        "(and the responders answering in-process); use more --windows on a busy machine."
    )
    print()
    print("| window | s without | s with | eval without | eval with | settle |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in per_window:
        print(
            f"| {row['window']} | {row['off_s']:.2f} | {row['on_s']:.2f} | "
            f"{row['off_eval_s']:.2f} | {row['on_eval_s']:.2f} | {row['settle_s']:.2f} |"
        )
    print()
    print("## Miner, per window")
    print()
    print("| | bytes | / published Δ |")
    print("| --- | ---: | ---: |")
    print(f"| published Δ (contribution file) | {fmt_bytes(delta_b)} | 1.00 |")
    print(
        f"| kept states, one window ({args.segments} states) | {fmt_bytes(kept_b)} | "
        f"{kept_b / delta_b:.1f}× |"
    )
    print(
        f"| kept states, {cfg.train.pow_keep_windows} windows (pow_keep_windows) | "
        f"{fmt_bytes(kept_b * cfg.train.pow_keep_windows)} | "
        f"{kept_b * cfg.train.pow_keep_windows / delta_b:.1f}× |"
    )
    print(
        f"| one answer ({args.checks} segment(s), {answers_total} answers) | "
        f"{fmt_bytes(answer_b)} | {answer_b / delta_b:.1f}× |"
    )
    print()
    print(
        f"## Checks (pass: rel error ≤ {cfg.validation.pow_max_rel_error}, "
        f"cosine ≥ {cfg.validation.pow_min_cosine}; worst checked segment per row)"
    )
    print()
    print("| run | miner | checks | segments | passed | rel error | cosine | verdicts |")
    print("| --- | --- | ---: | ---: | ---: | --- | --- | --- |")
    for t in tolerance:
        rel = f"{fmt(t['min_rel_error'], '.2e')} – {fmt(t['max_rel_error'], '.2e')}"
        cos = f"{fmt(t['min_cosine'], '.6f')} – {fmt(t['max_cosine'], '.6f')}"
        note = "" if t["as_expected"] else " **UNEXPECTED**"
        print(
            f"| {t['run']} | {t['behaviour']} | {t['checks']} | {t['segments']} | "
            f"{t['passed']}/{t['checks']}{note} | {rel} | {cos} | {', '.join(t['labels'])} |"
        )
    print()
    print(f"honest checks all pass: {'yes' if honest_ok else 'NO'}; "
          f"cheats all caught: {'yes' if cheats_ok else 'NO'}"
          + ("" if cheats else " (tolerance run skipped)"))  # fmt: skip
    print()
    print(f"## Detection: k of n = {args.segments} segments fabricated, m checked")
    print()
    print("| m | p (k = 1) | windows to catch (k = 1) | p (k = 2) | windows to catch (k = 2) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for m in (1, 2, 4):
        got = {d["k"]: d for d in detect if d["m"] == m}
        print(
            f"| {m} | {got[1]['p']:.3f} | {got[1]['expected_windows']:.2f} | "
            f"{got[2]['p']:.3f} | {got[2]['expected_windows']:.2f} |"
        )
    n = args.segments
    print(
        f"(scaled2 fakes the segments after H/2: k = {n - n // 2} of {n}, Δ × 2; "
        f"unassigned trains one segment on other pages: k = 1 of {n})"
    )
    print()
    print(f"results: {out}")


if __name__ == "__main__":
    main()
