"""`tensormine validator run|report`: the validator process and its window reports.

    tensormine validator run --config configs/tiny.yaml --hotkey validator-0 --windows 5
    tensormine validator report --config configs/tiny.yaml --hotkey validator-0 --last 3
    tensormine validator report --config configs/tiny.yaml          # every validator of the run
    tensormine verify --config configs/demo.yaml --window 3         # is checkpoint 4 θ_4?

`run` takes the same options as ``python -m validation.validator``. `report` reads
``<run.dir>/validators/<name>/windows.jsonl`` and prints one row per miner and window:
loss delta, own-data margin and t, copy verdict, admission reason, score, moving average
and weight; then per window the hivemind group checks, and the windows it skipped.
`verify` recomputes a published checkpoint from the store and the ledger
(`validation.verify`) and exits 1 when it differs.
"""

from __future__ import annotations

import argparse
from typing import Any

from common.cli import CliError, add_config_args, make_console
from tensormine.config import load_config
from validation.report import read_reports, read_skips, shard_table, window_table


def _run(args: argparse.Namespace) -> int:
    from validation.validator import main

    forwarded = ["--hotkey", args.hotkey]
    if args.config:
        forwarded += ["--config", args.config]
    for item in args.overrides:
        forwarded += ["--set", item]
    if args.keys_dir:
        forwarded += ["--keys-dir", args.keys_dir]
    if args.windows is not None:
        forwarded += ["--windows", str(args.windows)]
    return main(forwarded)


def _report(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    root = cfg.run.dir / "validators"
    names = [args.hotkey] if args.hotkey else sorted(p.name for p in root.glob("*") if p.is_dir())
    console = make_console()
    shown = 0
    for name in names:
        reports = read_reports(root / name / "windows.jsonl", last=args.last)
        if not reports:
            continue
        table = window_table(reports)
        table.title = f"validator {name}: last {len(reports)} window(s)"
        console.print(table)
        if any(len({r.shard for r in rep.miners}) > 1 for rep in reports):
            console.print(shard_table(reports))  # sharded runs: what each shard earned
        for rep in reports:
            published = rep.published or (f"adopted {rep.adopted}" if rep.adopted else "-")
            after = rep.heldout_loss if rep.next_heldout_loss is None else rep.next_heldout_loss
            console.print(
                f"window {rep.window}: {rep.admitted}/{rep.contributions} admitted, "
                f"L(θ_w;E) {rep.heldout_loss:.4f} -> {after:.4f}"
                f", published {published}, weights {'set' if rep.weights_set else 'not set'}, "
                f"{rep.seconds:.1f}s"
            )
            for group, check in sorted(rep.group_checks.items()):
                verdict = "ok" if check.get("ok") else "MISMATCH"
                console.print(
                    f"  group average {group} of UIDs {check.get('members')}: relative error "
                    f"{check.get('error')} vs the admitted Δ, {verdict}"
                )
        first = reports[0].window
        for skip in read_skips(root / name / "windows.jsonl"):
            if skip.windows and skip.windows[-1] >= first:
                console.print(
                    f"skipped windows {skip.windows[0]}..{skip.windows[-1]} (behind at block "
                    f"{skip.block}): their miners got no score from {name}"
                )
        shown += 1
    if not shown:
        raise CliError(
            f"no validator reports under {root}" + (f" for {args.hotkey}" if args.hotkey else "")
        )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from validation.verify import IDENTICAL, WITHIN, VerifyError, verify_window

    cfg = load_config(args.config, args.overrides)
    try:
        result = verify_window(cfg, args.window)
    except VerifyError as exc:
        raise CliError(str(exc)) from None
    for line in result.lines():
        print(line)
    return 0 if result.verdict in (IDENTICAL, WITHIN) else 1


def register(sub: Any) -> None:
    ver = sub.add_parser(
        "verify",
        help="recompute θ_{W+1} from the store and the ledger; is the published one it?",
    )
    add_config_args(ver)
    ver.add_argument("--window", type=int, required=True, help="W: checks the checkpoint of W+1")
    ver.set_defaults(handler=_verify)
    p = sub.add_parser("validator", help="score contributions, set weights, publish checkpoints")
    vsub = p.add_subparsers(dest="validator_command", metavar="COMMAND", required=True)
    run = vsub.add_parser("run", help="run a validator (same as python -m validation.validator)")
    add_config_args(run)
    run.add_argument("--hotkey", required=True, help="name of the validator's key")
    run.add_argument("--keys-dir", help="key directory (default $TENSORMINE_HOME/keys)")
    run.add_argument("--windows", type=int, help="stop after this many windows")
    run.set_defaults(handler=_run)
    rep = vsub.add_parser("report", help="print the last windows a validator scored")
    add_config_args(rep)
    rep.add_argument("--hotkey", help="the validator's name (default: every validator of the run)")
    rep.add_argument("--last", type=int, default=5, help="how many windows (default 5)")
    rep.set_defaults(handler=_report)
